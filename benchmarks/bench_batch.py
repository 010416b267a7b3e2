"""Cohort throughput of ``thinslice batch``: 8 real CT volumes, 1 and 2 local workers, Ray on a local cluster, and a
Ray run in which one worker process is killed mid-case; then the QC page in headless Chromium.

The volumes are the shared real CTs (``/work/shared/data/ct``), as 5 mm inputs: the thinner ones are first
degraded to 5 mm (Gaussian, FWHM 5 mm; cached in ``WORK/inputs``), the two real 5 mm scans are used as they are.
Every run is the command a user types (a subprocess), timed from start to exit; the Ray cluster is started once with
``ray start`` on loopback (127.0.0.1) and reached by its address, as a real cluster would be.

    .venv/bin/python benchmarks/bench_batch.py --method cubic-dc --work runs/bench_batch

Writes ``WORK/results.json`` and prints a table; the screenshot goes to ``docs/images/batch_report.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

VOLUMES = ("ct02_chest_4dct-phase00_philips-bigbore", "ct03_chest_lung-pet-ct-dx-A0001_5mm",
           "ct04_head_invesalius-cranium", "ct07_chest_lidc-idri-0314_1mm", "ct08_head_cptac-gbm-c3n01192_1.25mm",
           "ct09_chest-abdomen_pancreatic-ct-cbct-seg_3mm", "ct10_chest_cmb-crc-msb-01068_2.5mm",
           "ct11_abdomen_crlm-ct-1006_5mm")
THICK_MM = 5.0
RAY_PORT = 6390
BIN = Path(sys.executable).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/ct"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench_batch"))
    parser.add_argument("--method", default="cubic-dc")
    parser.add_argument("--spacing", type=float, default=1.25)
    parser.add_argument("--screenshot", type=Path, default=Path("docs/images/batch_report.png"))
    parser.add_argument("--runs", nargs="+", default=["w1", "w2", "ray", "ray-kill"],
                        help="which runs (w1 w2 ray ray-kill)")
    parser.add_argument("--volumes", nargs="+", default=[v.split("_")[0] for v in VOLUMES], metavar="ctNN",
                        help="a subset of the 8 volumes (default: all)")
    args = parser.parse_args()
    inputs = prepare_inputs(args.data, args.work / "inputs", [v for v in VOLUMES if v.split("_")[0] in args.volumes])
    results: dict = {"uptime_start": _uptime(), "method": args.method, "cases": len(inputs), "runs": {}}
    batch = [str(BIN / "thinslice"), "batch", str(args.work / "inputs"), "--spacing", str(args.spacing),
             "--method", args.method, "-q"]
    for name, extra in (("w1", ["--workers", "1"]), ("w2", ["--workers", "2"])):
        if name in args.runs:
            results["runs"][name] = timed_run(batch + extra, args.work / f"out_{name}")
    if {"ray", "ray-kill"} & set(args.runs):
        results["ray_start_s"] = start_ray()
        try:
            address = ["--ray", f"127.0.0.1:{RAY_PORT}"]
            if "ray" in args.runs:
                results["runs"]["ray"] = timed_run(batch + address, args.work / "out_ray")
            if "ray-kill" in args.runs:
                results["runs"]["ray-kill"] = timed_run(batch + address, args.work / "out_ray_kill", kill=True)
        finally:
            subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True)
    results["uptime_end"] = _uptime()
    summarise(results)
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    report = next((args.work / f"out_{n}" / "report.html" for n in ("ray", "w2", "w1")
                   if (args.work / f"out_{n}" / "report.html").exists()), None)
    if report is not None:
        screenshot(report, args.screenshot)
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))


def prepare_inputs(data: Path, folder: Path, volumes: list[str]) -> list[Path]:
    """The volumes as 5 mm inputs (degraded once, then reused)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem in volumes:
        source = data / f"{stem}.nii.gz"
        target = folder / f"{stem.split('_')[0]}_5mm.nii.gz"
        if not target.exists():
            command = [str(BIN / "thinslice"), "degrade", str(source), str(target), "--thickness", str(THICK_MM),
                       "--spacing", str(THICK_MM)]
            if stem.endswith("_5mm"):  # a real 5 mm acquisition
                shutil.copyfile(source, target)
            else:
                subprocess.run(command, check=True, capture_output=True)
        paths.append(target)
    return paths


def timed_run(command: list[str], out: Path, kill: bool = False) -> dict:
    """Run ``thinslice batch`` into a fresh ``out``; with ``kill``, SIGKILL one Ray worker process mid-case."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    # Clusters from `ray start` use token authentication; the driver reads the token from ~/.ray/auth_token.
    env = {**os.environ, "RAY_AUTH_MODE": "token"} if "--ray" in command else None
    proc = subprocess.Popen([*command, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    killed: dict = {}
    if kill:
        threading.Thread(target=kill_one_worker, args=(out, killed), daemon=True).start()
    output, _ = proc.communicate()
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    done = [r for r in rows if r["status"] == "done"]
    seconds = [float(r["seconds"]) for r in done]
    result = {"command": " ".join([*command, "--out", str(out)]), "exit_code": proc.returncode,
              "wall_s": round(wall, 1), "cases_per_hour": round(3600 * len(done) / wall, 1),
              "done": len(done), "failed": len(rows) - len(done),
              "done_once": len({r["key"] for r in done}) == len(done),
              "case_seconds_median": round(statistics.median(seconds), 2) if seconds else None,
              "case_seconds_sum": round(sum(seconds), 1),
              "peak_memory_mb_max": max((float(r["peak_memory_mb"]) for r in done), default=None),
              "workers": sorted({r["worker"] for r in done}), "killed": killed, "tail": output[-500:]}
    if kill:
        result["temp_left"] = [p.name for p in out.iterdir() if p.name.startswith(".thinslice-tmp-")]
    print(f"{out.name}: {result['wall_s']} s, {result['cases_per_hour']} cases/h, {result['done']} done, "
          f"exit {proc.returncode}, killed {killed or '-'}", flush=True)
    return result


def kill_one_worker(out: Path, killed: dict) -> None:
    """After the first case is done, SIGKILL one busy Ray worker (``ray::CaseActor``) of this benchmark's cluster."""
    import psutil

    journal = out / "cases.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not (journal.exists() and journal.read_text().strip()):
        time.sleep(0.2)
    time.sleep(2.0)  # well inside the next case (each takes several seconds)
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        title = " ".join(proc.info["cmdline"] or []) or proc.info["name"] or ""
        if title.startswith("ray::CaseActor"):
            done_before = len(journal.read_text().splitlines())
            os.kill(proc.info["pid"], signal.SIGKILL)
            killed.update(pid=proc.info["pid"], title=title[:60], cases_done_before=done_before)
            return


def start_ray() -> float:
    """A 2-CPU Ray head on loopback; returns how long ``ray start`` took."""
    subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True)
    start = time.perf_counter()
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(RAY_PORT),
                    "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"], check=True,
                   capture_output=True)
    return round(time.perf_counter() - start, 1)


def summarise(results: dict) -> None:
    runs = results["runs"]
    print("| run | wall s | cases/h | median s/case | done | failed |\n|---|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['wall_s']} | {r['cases_per_hour']} | {r['case_seconds_median']} | {r['done']} | "
              f"{r['failed']} |")
    if "ray" in runs and "w2" in runs:
        results["ray_overhead_vs_w2"] = round(runs["ray"]["wall_s"] / runs["w2"]["wall_s"] - 1, 3)


def screenshot(report: Path, target: Path) -> None:
    """The QC page as Chromium renders it (headless, no network, a throw-away profile)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("no chromium: apt-get install -y chromium; screenshot skipped")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}",
                        f"--screenshot={target.resolve()}", "--window-size=1400,1000",
                        f"file://{report.resolve()}"], check=True, capture_output=True, timeout=120)
    print(f"screenshot: {target}")


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
