"""Latency and throughput of ``thinslice serve`` against a real Orthanc (both started here, on loopback).

    .venv/bin/python benchmarks/bench_node.py latency --method cubic-dc
    .venv/bin/python benchmarks/bench_node.py latency --method planes
    .venv/bin/python benchmarks/bench_node.py throughput --method cubic-dc --series 20

latency: one 512x512x64 series of 5 mm slices (a chest phantom) sent to the node; the time from the last instance
acknowledged by the node to the last instance of the thin (1.25 mm) series stored in Orthanc, with the node's own
split (waiting for the series to be stable, processing, sending). throughput: ``--series`` such series sent at
once (one association each), the time until every thin series is in Orthanc, as series per hour. Results go to
stdout as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from copy import deepcopy
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from thinslice.data.phantom import make_chest_phantom
from thinslice.degrade.profiles import degrade
from thinslice.io import write_volume


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(port: int, path: str) -> object:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
        return json.loads(r.read())


def start_orthanc(root: Path) -> tuple[subprocess.Popen, int, int]:
    root.mkdir(parents=True, exist_ok=True)
    dicom, web = free_port(), free_port()
    config = {"Name": "bench", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
              "DicomAet": "ORTHANC", "DicomPort": dicom, "HttpPort": web, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "Plugins": [], "DicomCheckCalledAet": False}
    (root / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen([shutil.which("Orthanc") or "Orthanc", str(root / "orthanc.json")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            http(web, "/system")
            return proc, dicom, web
        except OSError:
            time.sleep(0.05)
    raise SystemExit("Orthanc did not start")


def make_series(folder: Path, seed: int, shape: tuple[int, int, int]) -> list[pydicom.Dataset]:
    """A 5 mm series (``shape``: thin slices of 1.25 mm, rows, columns; 4 thin slices per thick one)."""
    thin = make_chest_phantom(shape=shape, spacing=(0.7, 0.7, 1.25), seed=seed)
    thick = degrade(thin, thickness=5.0, spacing=5.0)
    thick.metadata.update(study_uid=f"1.2.826.0.1.3680043.8.498.9{seed}", patient_id=f"BENCH{seed}")
    write_volume(thick, str(folder) + "/")
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir())]


def renamed(datasets: list[pydicom.Dataset], seed: int) -> list[pydicom.Dataset]:
    """The same images as another series of another study (new study, series, frame and instance UIDs)."""
    from pydicom.uid import generate_uid

    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for ds in datasets:
        copy = deepcopy(ds)  # a shallow copy would share the elements
        copy.StudyInstanceUID, copy.SeriesInstanceUID, copy.FrameOfReferenceUID = study, series, frame
        copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        copy.PatientID = f"BENCH{seed}"
        out.append(copy)
    return out


def send(datasets: list[pydicom.Dataset], port: int) -> float:
    """C-STORE the series to the node; the time the last instance was acknowledged."""
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="THINSLICE")
    assert assoc.is_established, "the node refused the association"
    for ds in datasets:
        assert int(assoc.send_c_store(ds).Status) == 0
    done = time.time()
    assoc.release()
    return done


def start_node(spool: Path, dicom: int, method: str, stable: float, associations: int,
               send_associations: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    spool.mkdir(parents=True, exist_ok=True)
    rules = spool.parent / "rules.toml"
    rules.write_text(f"""[node]
allowed_callers = ["BENCH"]
stable_seconds = {stable}
max_associations = {associations}

[destinations.pacs]
host = "127.0.0.1"
port = {dicom}
ae_title = "ORTHANC"
associations = {send_associations}

[[rule]]
name = "ct"
spacing = 1.25
method = "{method}"
send_to = ["pacs"]
""")
    proc = subprocess.Popen([sys.executable, "-c", "from thinslice.cli.main import main; raise SystemExit(main())",
                             "serve", "--spool", str(spool), "--rules", str(rules), "--port", str(port), "--host",
                             "127.0.0.1"], stderr=subprocess.DEVNULL)
    for _ in range(1200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    raise SystemExit("the node did not start")


def jobs(spool: Path) -> list[dict]:
    db = sqlite3.connect(spool / "jobs.sqlite")
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM jobs")]
    finally:
        db.close()


def wait_stored(spool: Path, web: int, count: int, thin_slices: int, timeout: float) -> float:
    """Poll until ``count`` jobs are sent and Orthanc holds each derived series whole; the time that was seen."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        sent = [j for j in jobs(spool) if j["state"] == "sent"]
        failed = [j for j in jobs(spool) if j["state"] == "failed"]
        if failed:
            raise SystemExit(f"failed: {failed[0]['reason']}")
        if len(sent) == count:
            series = {s["MainDicomTags"]["SeriesInstanceUID"]: len(s["Instances"])
                      for s in http(web, "/series?expand")}  # type: ignore[union-attr]
            if all(series.get(j["derived_uids"]) == thin_slices for j in sent):
                return time.time()
        time.sleep(0.1)
    raise SystemExit("timed out")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("latency", "throughput"))
    parser.add_argument("--method", default="cubic-dc")
    parser.add_argument("--series", type=int, default=20)
    parser.add_argument("--slices", type=int, default=64, help="thick slices per series (default 64)")
    parser.add_argument("--size", type=int, default=512, help="rows and columns (default 512)")
    parser.add_argument("--stable", type=float, default=1.0, help="[node] stable_seconds (default 1)")
    parser.add_argument("--send-associations", type=int, default=4,
                        help="associations the node sends on at once (default 4)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that the finally below stops Orthanc and the node
    root = Path(tempfile.mkdtemp(prefix="bench-node-"))
    orthanc, dicom, web = start_orthanc(root / "orthanc")
    node, port = start_node(root / "spool", dicom, args.method, args.stable, max(8, args.series + 2),
                            args.send_associations)
    try:
        n = 1 if args.mode == "latency" else args.series
        shape = (args.slices * 4, args.size, args.size)
        first = make_series(root / "in", 0, shape)  # the phantom takes about a minute at 512x512: made once
        series = [first] + [renamed(first, i) for i in range(1, n)]
        start = time.time()
        acks: list[float] = []
        threads = [threading.Thread(target=lambda s=s: acks.append(send(s, port))) for s in series]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stored = wait_stored(root / "spool", web, n, args.slices * 4, timeout=7200)
        done = jobs(root / "spool")
        row = {"mode": args.mode, "method": args.method, "series": n, "shape": f"{args.size}x{args.size}x"
               f"{args.slices}", "stable_seconds": args.stable,
               "send_associations": args.send_associations, "cpus": os.cpu_count(),
               "send_in_s": round(max(acks) - start, 2),
               "latency_s": round(stored - max(acks), 2),
               "process_s": [round(j["processed"] - j["started"], 2) for j in done],
               "send_out_s": [round(j["finished"] - j["processed"], 2) for j in done]}
        if args.mode == "throughput":
            row["all_stored_s"] = round(stored - start, 1)
            row["series_per_hour"] = round(n * 3600 / (stored - start), 1)
        print(json.dumps(row), flush=True)
    finally:
        node.terminate()
        node.wait(30)
        orthanc.kill()
        orthanc.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
