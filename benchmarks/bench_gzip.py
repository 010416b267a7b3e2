"""Writing and reading .nii.gz at disk speed: thinslice's writer (ISA-L, then zlib as the fallback engine) against
ITK's own gzip (what thinslice used before), on a 512x512x300 int16 phantom (150 MB of voxels).

    .venv/bin/python benchmarks/bench_gzip.py [--slices 300] [--repeat 3]

Prints seconds per write and read (best of --repeat) and the file size for each engine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from thinslice.data.phantom import make_chest_phantom
from thinslice.io import gz, read_volume, write_volume
from thinslice.io.lazy import lazy_import


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    volume = make_chest_phantom(shape=(args.slices, 512, 512), spacing=(0.8, 0.8, 1.25), seed=1)
    sitk = lazy_import("SimpleITK")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_volume(volume, folder / "plain.nii")
        image = sitk.ReadImage(str(folder / "plain.nii"))
        itk = _best(lambda: sitk.WriteImage(image, str(folder / "itk.nii.gz"), useCompression=True), args.repeat)
        print(f"ITK gzip (before)        write {itk:6.2f} s  {(folder / 'itk.nii.gz').stat().st_size / 1e6:6.1f} MB  "
              f"read {_best(lambda: read_volume(folder / 'itk.nii.gz'), args.repeat):6.2f} s")
        for engine in ("isal", "zlib") if gz.igzip is not None else ("zlib",):
            gz.ENGINE = engine
            path = folder / f"{engine}.nii.gz"
            seconds = _best(lambda p=path: write_volume(volume, p), args.repeat)
            read = _best(lambda p=path: read_volume(p), args.repeat)
            print(f"thinslice {engine:<5} level {gz.level()}  write {seconds:6.2f} s  {path.stat().st_size / 1e6:6.1f} "
                  f"MB  read {read:6.2f} s")


if __name__ == "__main__":
    main()
