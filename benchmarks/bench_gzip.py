"""Writing and reading .nii.gz at disk speed: thinslice's writer with ISA-L (and zlib, the fallback) against ITK
compressing while it writes (what thinslice did before), on a 512x512x300 int16 phantom (150 MB of voxels); each
``write_volume`` includes its check that the file reads back.

    .venv/bin/python benchmarks/bench_gzip.py [--slices 300] [--repeat 3]

Prints seconds per write and read (best of --repeat, engines alternating) and the file size for each engine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from thinslice.data.phantom import make_chest_phantom
from thinslice.io import gz, read_volume, write_volume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    volume = make_chest_phantom(shape=(args.slices, 512, 512), spacing=(0.8, 0.8, 1.25), seed=1)
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        engines = ("itk", "isal", "zlib") if gz.igzip is not None else ("itk", "zlib")
        for _ in range(args.repeat):  # alternating, so that a busy moment of the machine hits every engine
            for engine in engines:
                gz.ENGINE = engine
                path = folder / f"{engine}.nii.gz"
                start = time.perf_counter()
                write_volume(volume, path)
                written = time.perf_counter() - start
                read_volume(path)
                read = time.perf_counter() - start - written
                best = results.setdefault(engine, [written, read, 0.0])
                best[:] = [min(best[0], written), min(best[1], read), path.stat().st_size / 1e6]
    for engine, (written, read, size) in results.items():
        gz.ENGINE = engine
        label = "ITK's zlib (before)" if engine == "itk" else f"{engine}, level {gz.level()}"
        print(f"{label:<22} write {written:6.2f} s  read {read:6.2f} s  {size:6.1f} MB  "
              f"(write {written / results['itk'][0]:.2f}x ITK's)")


if __name__ == "__main__":
    main()
