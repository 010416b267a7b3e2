"""``thinslice serve``: the DICOM node against a real Orthanc (started here as a subprocess with its own config).

A tiny thick CT series (12 slices of 5 mm, 64x64) goes to the node through Orthanc's own C-STORE (as a PACS routes
it) or from pynetdicom / dcmtk's storescu; the node's thin series comes back into Orthanc, is read through its REST
API and compared with ``thinslice upsample`` on the same input. Faults: an unknown caller, series the rules skip, a
corrupt instance, the destination down, the same series twice, two series of one study at once, and kill -9 of the
node mid-job and mid-send (Orthanc slowed by a Lua filter that sleeps before it stores each instance).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest

pytest.importorskip("pynetdicom", reason="pynetdicom is not installed (pip install 'thinslice[node]')")

from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import CTImageStorage, Verification  # noqa: E402

from thinslice.cli.main import main  # noqa: E402
from thinslice.data.phantom import make_chest_phantom  # noqa: E402
from thinslice.degrade.profiles import degrade  # noqa: E402
from thinslice.io import read_volume, write_volume  # noqa: E402
from thinslice.node.queue import JobQueue  # noqa: E402
from thinslice.node.rules import load_rules  # noqa: E402
from thinslice.node.service import Node  # noqa: E402

ORTHANC = shutil.which("Orthanc")
needs_orthanc = pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed (apt-get install orthanc; CI "
                                                            "installs it)")
ROOT = Path(__file__).resolve().parents[2]  # the checkout: its src/ and docs/
THIN_SLICES = 48  # 12 slices of 5 mm restored to 1.25 mm over the same extent: 12 * 4
# Orthanc's Lua hook before it stores an instance (its Lua calls run one at a time): a slow PACS, 48 instances ~3 s.
SLOW_STORE = 'function ReceivedInstanceFilter(dicom, origin, info)\n  os.execute("sleep 0.05")\n  return true\nend\n'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check: Callable[[], object], seconds: float = 20.0, what: str = "condition") -> object:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")


class Orthanc:
    """One Orthanc process with its own storage, loopback ports and no authentication."""

    def __init__(self, root: Path, dicom_port: int, node_port: int, lua: str = "") -> None:
        self.root, self.dicom_port, self.http_port = root, dicom_port, _free_port()
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)
        config = {"Name": "thinslice-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
                  "DicomAet": "ORTHANC", "DicomPort": dicom_port, "HttpPort": self.http_port,
                  "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
                  "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True, "HttpServerEnabled": True,
                  "DicomModalities": {"thinslice": ["THINSLICE", "127.0.0.1", node_port]}}
        if lua:
            (root / "script.lua").write_text(lua)
            config["LuaScripts"] = [str(root / "script.lua")]
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps(config))

    def start(self) -> Orthanc:
        assert ORTHANC is not None
        log = open(self.root / "orthanc.log", "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        _wait(self._up, 30, "Orthanc's REST API")
        return self

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"Orthanc exited: {(self.root / 'orthanc.log').read_text()[-2000:]}")
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:  # killed: a clean stop takes seconds, and its storage is thrown away anyway
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def get(self, path: str) -> object:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            data = r.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data

    def post(self, path: str, body: bytes) -> object:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])  # type: ignore[index]

    def series_of_study(self, study_uid: str) -> list[dict]:
        return [s for s in self.get("/series?expand")  # type: ignore[union-attr]
                if self.get(f"/studies/{s['ParentStudy']}")["MainDicomTags"]["StudyInstanceUID"] == study_uid]

    def download(self, series: dict, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for inst in series["Instances"]:
            (folder / f"{inst}.dcm").write_bytes(self.get(f"/instances/{inst}/file"))  # type: ignore[arg-type]
        return folder


@pytest.fixture(scope="module")
def node_port() -> int:
    return _free_port()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, node_port) -> Iterator[Orthanc]:
    if ORTHANC is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc; CI installs it)")
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), _free_port(), node_port).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def planes_weights(tmp_path_factory) -> Path:
    from thinslice.checkpoints.bundle import save_model
    from thinslice.models.factory import build_planes

    folder = tmp_path_factory.mktemp("planes")
    save_model(build_planes("tiny"), "planes", "tiny", folder)
    return folder


def _thick_series(folder: Path, study: str, seed: int = 0, **tags: object) -> Path:
    """A 12-slice 5 mm chest CT of 64x64 as a DICOM series of ``study`` (``tags`` overwrite header values)."""
    thin = make_chest_phantom(shape=(48, 64, 64), spacing=(5.0, 5.0, 1.25), seed=seed)
    thick = degrade(thin, thickness=5.0, spacing=5.0)
    thick.metadata.update(patient_id="NODE-TEST", study_uid=study)
    staging = folder.with_name(folder.name + ".staging")
    write_volume(thick, str(staging) + "/")
    folder.mkdir(parents=True)
    for path in sorted(staging.iterdir()):
        ds = pydicom.dcmread(path)
        for key, value in tags.items():
            setattr(ds, key, value)
        ds.save_as(folder / path.name)
    shutil.rmtree(staging)
    return folder


def _rules(path: Path, dest_port: int, *, callers: str = '["ORTHANC", "TESTSCU"]', attempts: int = 3,
           backoff: float = 0.2, extra_rules: str = "", method: str = "cubic-dc", options: str = "",
           folder: Path | None = None) -> Path:
    archive = f'[destinations.archive]\nfolder = "{folder}"\n' if folder else ""
    path.write_text(f"""
[node]
allowed_callers = {callers}
stable_seconds = 0.5
max_attempts = {attempts}
backoff_seconds = {backoff}
max_backoff_seconds = 0.5
max_associations = 4

[destinations.pacs]
host = "127.0.0.1"
port = {dest_port}
ae_title = "ORTHANC"

{archive}
{extra_rules}
[[rule]]
name = "thick ct"
modality = ["CT"]
min_thickness_mm = 2.5
exclude = "(?i)planes"
spacing = 1.25
method = "{method}"
{options}
send_to = ["pacs"{', "archive"' if folder else ""}]
""")
    return path


def _send(folder: Path, port: int, calling: str = "TESTSCU", together: threading.Barrier | None = None) -> list[int]:
    """C-STORE every file of ``folder`` to the node from pynetdicom; the statuses (empty: association refused).
    ``together``: wait there once associated (so that parallel senders are all associated before any instance)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="THINSLICE")
    if not assoc.is_established:
        return []
    try:
        if together is not None:
            together.wait(10)
        return [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in sorted(folder.iterdir())]
    finally:
        assoc.release()


def _state(node_or_spool: Node | Path, series_uid: str, states: tuple[str, ...] = ("sent", "skipped", "failed")):
    queue = node_or_spool.queue if isinstance(node_or_spool, Node) else JobQueue(node_or_spool)
    job = queue.get(series_uid)
    if queue is not getattr(node_or_spool, "queue", None):
        queue.close()
    return job if job is not None and job.state in states else None


def _uid(folder: Path) -> str:
    return str(pydicom.dcmread(min(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID)


@pytest.fixture
def running_node(tmp_path, node_port) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def start(rules: Path, port: int = node_port) -> Node:
        node = Node(tmp_path / "spool", load_rules(rules), port=port, host="127.0.0.1", poll_seconds=0.05)
        node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


@needs_orthanc
def test_orthanc_routes_a_series_and_gets_the_thin_one_back(tmp_path, orthanc, running_node, planes_weights,
                                                            caplog) -> None:
    """Orthanc sends (C-STORE to the node's modality); the node's series arrive back in the same study, equal to
    ``thinslice upsample`` (cubic-dc, and planes with tiny weights and its std map as a second series), with the
    source's frame of reference."""
    caplog.set_level(logging.DEBUG)
    study = "1.2.826.0.1.3680043.8.498.101"
    planes_rule = f'[[rule]]\nname = "planes"\nseries_description = "(?i)planes"\nspacing = 1.25\nmethod = "planes"' \
                  f'\nuncertainty = true\noptions = {{ checkpoint = "{planes_weights}" }}\nsend_to = ["pacs"]\n'
    rules = _rules(tmp_path / "rules.toml", orthanc.dicom_port, extra_rules=planes_rule)
    node = running_node(rules)
    series = {"cubic-dc": _thick_series(tmp_path / "a", study, seed=1, SeriesDescription="chest 5mm"),
              "planes": _thick_series(tmp_path / "b", study, seed=2, SeriesDescription="chest planes 5mm",
                                      SeriesNumber=3)}
    for folder in series.values():
        ids = [orthanc.post("/instances", p.read_bytes())["ID"] for p in sorted(folder.iterdir())]  # type: ignore
        orthanc.post("/modalities/thinslice/store", json.dumps(ids).encode())
    for method, folder in series.items():
        job = _wait(lambda f=folder: _state(node, _uid(f)), 60, f"the {method} series to be sent")
        assert job.state == "sent" and job.instances == 12, job  # type: ignore[union-attr]
        uids = job.derived_uids.split()  # type: ignore[union-attr]
        assert len(uids) == (2 if method == "planes" else 1)  # planes: the thin series and its std map series
        stored = {s["MainDicomTags"]["SeriesInstanceUID"]: s for s in orthanc.series_of_study(study)}
        assert all(len(stored[uid]["Instances"]) == THIN_SLICES for uid in uids)
        derived = [stored[uids[0]]]
        got = read_volume(orthanc.download(derived[0], tmp_path / f"back-{method}"))
        options = ["--checkpoint", str(planes_weights)] if method == "planes" else []
        want_path = tmp_path / f"{method}.nii.gz"
        assert main(["-q", "upsample", str(folder), str(want_path), "--method", method, "--spacing", "1.25",
                     *options]) == 0
        want = read_volume(want_path)
        assert got.shape_ijk == want.shape_ijk
        assert np.allclose(got.spacing, want.spacing) and np.allclose(got.origin, want.origin, atol=1e-3)
        assert np.allclose(got.direction, want.direction, atol=1e-6)
        assert np.array_equal(got.array, want.array), f"{method}: max diff {np.abs(got.array - want.array).max()}"
        assert "NODE-TEST" not in caplog.text  # the patient ID is in every instance, never in the log
        first_in = pydicom.dcmread(min(folder.iterdir()))
        first_out = pydicom.dcmread(min((tmp_path / f"back-{method}").iterdir()))
        assert first_out.StudyInstanceUID == study and first_out.SeriesInstanceUID != first_in.SeriesInstanceUID
        assert first_out.FrameOfReferenceUID == first_in.FrameOfReferenceUID
    status = subprocess.run([sys.executable, "-c", "from thinslice.cli.main import main; raise SystemExit(main())",
                             "serve", "--status", "--spool", str(tmp_path / "spool")], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert status.returncode == 0 and "2 sent" in status.stdout and "NODE-TEST" not in status.stdout


@needs_orthanc
def test_unknown_caller_refused_known_caller_echoes(tmp_path, orthanc, running_node) -> None:
    node = running_node(_rules(tmp_path / "rules.toml", orthanc.dicom_port))
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.listener.port, ae_title="THINSLICE")
    assert assoc.is_rejected and not assoc.is_established
    assert _send(_thick_series(tmp_path / "s", "1.2.3.4.102"), node.listener.port, calling="STRANGER") == []
    assert node.queue.jobs() == []
    friend = AE(ae_title="TESTSCU")
    friend.add_requested_context(Verification)
    assoc = friend.associate("127.0.0.1", node.listener.port, ae_title="THINSLICE")
    assert assoc.is_established and int(assoc.send_c_echo().Status) == 0
    assoc.release()


@needs_orthanc
def test_rules_skip_non_ct_and_scouts_and_record_why(tmp_path, orthanc, running_node) -> None:
    study = "1.2.3.4.103"
    node = running_node(_rules(tmp_path / "rules.toml", orthanc.dicom_port))
    mr = _thick_series(tmp_path / "mr", study, seed=3, Modality="MR")
    scout = _thick_series(tmp_path / "scout", study, seed=4, SeriesDescription="Scout 5mm")
    thin = _thick_series(tmp_path / "thin", study, seed=5, SliceThickness="1.0")
    for folder in (mr, scout, thin):
        assert set(_send(folder, node.listener.port)) == {0}
    reasons = {}
    for name, folder in (("mr", mr), ("scout", scout), ("thin", thin)):
        job = _wait(lambda f=folder: _state(node, _uid(f)), 20, f"the {name} series to be decided")
        assert job.state == "skipped", job  # type: ignore[union-attr]
        reasons[name] = job.reason  # type: ignore[union-attr]
    assert "modality MR" in reasons["mr"] and "scout" in reasons["scout"] and "thickness 1 mm" in reasons["thin"]
    assert orthanc.series_of_study(study) == []


@needs_orthanc
def test_corrupt_instance_fails_the_job_with_its_reason(tmp_path, orthanc, running_node) -> None:
    node = running_node(_rules(tmp_path / "rules.toml", orthanc.dicom_port, attempts=2, backoff=0.1))
    folder = _thick_series(tmp_path / "bad", "1.2.3.4.104", seed=6)
    broken = sorted(folder.iterdir())[5]
    ds = pydicom.dcmread(broken)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # a third of the pixels: the instance cannot be read
    ds.save_as(broken)
    assert set(_send(folder, node.listener.port)) == {0}
    job = _wait(lambda: _state(node, _uid(folder)), 30, "the corrupt series to be parked")
    assert job.state == "failed" and job.attempts == 2 and job.reason, job  # type: ignore[union-attr]
    assert orthanc.series_of_study("1.2.3.4.104") == []


@needs_orthanc
def test_destination_down_retried_then_sent_once(tmp_path, node_port, running_node) -> None:
    late = Orthanc(tmp_path / "late-orthanc", _free_port(), node_port)
    node = running_node(_rules(tmp_path / "rules.toml", late.dicom_port, attempts=20, backoff=0.2))
    folder = _thick_series(tmp_path / "s", "1.2.3.4.105", seed=7)
    assert set(_send(folder, node.listener.port)) == {0}
    uid = _uid(folder)
    job = _wait(lambda: _state(node, uid, ("processed",)) if (node.queue.get(uid) or _Nil).attempts >= 1 else None,
                30, "a failed send")
    assert "refused or did not answer" in job.reason  # type: ignore[union-attr]
    late.start()
    try:
        job = _wait(lambda: _state(node, uid), 30, "the send once the destination is up")
        assert job.state == "sent"  # type: ignore[union-attr]
        time.sleep(0.5)  # anything sent twice would have arrived by now
        assert late.get("/statistics")["CountInstances"] == THIN_SLICES  # type: ignore[index]
        assert len(node.queue.sent_rows()) == 1
    finally:
        late.stop()


class _Nil:
    attempts = 0


@needs_orthanc
def test_same_series_twice_is_processed_and_sent_once(tmp_path, orthanc, running_node) -> None:
    """Sent to the node twice (the second time by dcmtk's storescu): one derived series in Orthanc and one copy in
    the folder destination."""
    study = "1.2.3.4.106"
    node = running_node(_rules(tmp_path / "rules.toml", orthanc.dicom_port, folder=tmp_path / "archive"))
    folder = _thick_series(tmp_path / "s", study, seed=8)
    assert set(_send(folder, node.listener.port)) == {0}
    uid = _uid(folder)
    first = _wait(lambda: _state(node, uid), 30, "the first send")
    storescu = shutil.which("storescu")
    if storescu:  # the second time from dcmtk, as a modality or router would resend
        subprocess.run([storescu, "-aet", "TESTSCU", "-aec", "THINSLICE", "127.0.0.1", str(node.listener.port),
                        *map(str, sorted(folder.iterdir()))], check=True, capture_output=True, timeout=60)
    else:
        assert set(_send(folder, node.listener.port)) == {0}
    time.sleep(1.0)  # longer than stable_seconds: a reopened job would be complete by now
    job = node.queue.get(uid)
    assert job is not None and job.state == "sent" and job.finished == first.finished  # type: ignore[union-attr]
    assert sorted(r[1] for r in node.queue.sent_rows()) == ["archive", "pacs"]
    copies = list((tmp_path / "archive").iterdir())
    assert [c.name for c in copies] == [first.derived_uids] and len(list(copies[0].iterdir())) == THIN_SLICES
    derived = orthanc.series_of_study(study)
    assert len(derived) == 1 and len(derived[0]["Instances"]) == THIN_SLICES


def _serve(spool: Path, rules: Path, port: int) -> Callable[[], subprocess.Popen]:
    """A function that starts ``thinslice serve`` as its own process (to be killed) and returns once it listens."""
    command = [sys.executable, "-c", "from thinslice.cli.main import main; raise SystemExit(main())", "serve",
               "--spool", str(spool), "--rules", str(rules), "--port", str(port), "--host", "127.0.0.1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait(lambda: _port_open(port) or proc.poll() is not None, 30, "the node to listen")
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
        return proc

    return start


def _kill_9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def _terminate(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(20)


@needs_orthanc
def test_kill_9_mid_job_resumes_and_sends_once(tmp_path, orthanc, node_port) -> None:
    study = "1.2.3.4.107"
    spool, port = tmp_path / "spool", _free_port()
    start = _serve(spool, _rules(tmp_path / "rules.toml", orthanc.dicom_port), port)
    proc = start()
    folder = _thick_series(tmp_path / "s", study, seed=9)
    uid = _uid(folder)
    try:
        assert set(_send(folder, port)) == {0}
        _wait(lambda: _state(spool, uid, ("running", "processed")), 30, "the job to start")
        _kill_9(proc)
        assert _state(spool, uid, ("running", "processed")) is not None  # it was killed mid-job
        proc = start()
        job = _wait(lambda: _state(spool, uid), 60, "the resumed job")
        assert job.state == "sent" and job.instances == 12  # type: ignore[union-attr]
        time.sleep(0.5)
        derived = orthanc.series_of_study(study)
        assert len(derived) == 1 and len(derived[0]["Instances"]) == THIN_SLICES
    finally:
        _terminate(proc)


@needs_orthanc
def test_kill_9_mid_send_resends_and_orthanc_holds_each_instance_once(tmp_path, node_port) -> None:
    """Killed while Orthanc (slowed to ~50 ms per instance) holds part of the thin series: the restarted node sends
    the same instances again, and Orthanc ends with the derived series' instances, each once."""
    slow = Orthanc(tmp_path / "slow-orthanc", _free_port(), node_port, lua=SLOW_STORE).start()
    spool, port = tmp_path / "spool", _free_port()
    start = _serve(spool, _rules(tmp_path / "rules.toml", slow.dicom_port), port)
    proc = start()
    folder = _thick_series(tmp_path / "s", "1.2.3.4.111", seed=13)
    uid = _uid(folder)
    try:
        assert set(_send(folder, port)) == {0}
        _wait(lambda: slow.count() >= 4, 60, "the send to begin")
        _kill_9(proc)
        time.sleep(0.5)  # an instance Orthanc was reading when the node died is stored or dropped by now
        partial = slow.count()
        killed = _state(spool, uid, ("running",))
        assert 4 <= partial < THIN_SLICES and killed is not None and killed.derived_uids, (partial, killed)
        proc = start()
        job = _wait(lambda: _state(spool, uid), 60, "the resumed send")
        assert job.state == "sent" and job.derived_uids == killed.derived_uids, job  # type: ignore[union-attr]
        time.sleep(0.5)  # anything sent twice would have arrived by now
        series = slow.get("/series?expand")
        assert [s["MainDicomTags"]["SeriesInstanceUID"] for s in series] == [job.derived_uids]  # type: ignore
        assert len(series[0]["Instances"]) == slow.count() == THIN_SLICES  # type: ignore[index]
        queue = JobQueue(spool)
        assert [(r[0], r[1], r[3]) for r in queue.sent_rows()] == [(job.derived_uids, "pacs", THIN_SLICES)]
        queue.close()
    finally:
        _terminate(proc)
        slow.stop()


@needs_orthanc
def test_two_series_of_one_study_at_once_become_two_thin_series(tmp_path, orthanc, running_node) -> None:
    """Two thick series of one study over two associations at the same time: two thin series in that study, each
    once, each derived from its own source (its reference and series number)."""
    study = "1.2.3.4.112"
    node = running_node(_rules(tmp_path / "rules.toml", orthanc.dicom_port))
    folders = [_thick_series(tmp_path / f"s{n}", study, seed=14 + n, SeriesNumber=n) for n in (2, 3)]
    sources = [_uid(f) for f in folders]
    assert len(set(sources)) == 2
    together = threading.Barrier(2)
    with ThreadPoolExecutor(2) as pool:
        statuses = list(pool.map(lambda f: _send(f, node.listener.port, together=together), folders))
    assert statuses == [[0] * 12, [0] * 12]
    jobs = [_wait(lambda u=u: _state(node, u), 60, "both series to be sent") for u in sources]
    assert [(j.state, j.instances) for j in jobs] == [("sent", 12)] * 2, jobs  # type: ignore[union-attr]
    derived = [j.derived_uids for j in jobs]  # type: ignore[union-attr]
    assert len(set(derived)) == 2 and not set(derived) & set(sources)
    time.sleep(0.5)  # anything sent twice would have arrived by now
    stored = {s["MainDicomTags"]["SeriesInstanceUID"]: s for s in orthanc.series_of_study(study)}
    assert sorted(stored) == sorted(derived)
    for number, source, uid in zip((2, 3), sources, derived, strict=True):
        assert len(stored[uid]["Instances"]) == THIN_SLICES
        first = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{stored[uid]['Instances'][0]}/file")))
        assert first.StudyInstanceUID == study and first.ReferencedSeriesSequence[0].SeriesInstanceUID == source
        assert int(first.SeriesNumber) == number + 1000


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_full_spool_and_oversized_instances_are_refused_whole(tmp_path, running_node) -> None:
    """Over the spool limit or the dataset size limit: 0xA700 (out of resources), and no file of it in the spool."""
    folder = _thick_series(tmp_path / "s", "1.2.3.4.108", seed=10)
    one = max(p.stat().st_size for p in folder.iterdir())
    rules = _rules(tmp_path / "rules.toml", 1)
    rules.write_text(rules.read_text().replace("[node]\n", f"[node]\nmax_spool_gb = {3.5 * one / 1e9}\n"))
    node = running_node(rules, port=_free_port())
    statuses = _send(folder, node.listener.port)
    assert statuses[:3] == [0, 0, 0] and set(statuses[3:]) == {0xA700}
    assert len(node.spool.instances(_uid(folder))) == 3 and not any(node.spool.tmp.iterdir())
    small = _rules(tmp_path / "small.toml", 1)
    small.write_text(small.read_text().replace("[node]\n", f"[node]\nmax_dataset_mb = {one / 2e6}\n"))
    other = Node(tmp_path / "spool2", load_rules(small), port=_free_port(), host="127.0.0.1")
    other.start()
    try:
        assert set(_send(folder, other.listener.port)) == {0xA700} and other.queue.jobs() == []
    finally:
        other.stop()


@pytest.mark.parametrize(("change", "message"), [
    ('allowed_callers = ["ORTHANC", "TESTSCU"]', "allowed_callers is empty"),
    ('send_to = ["pacs"]', "sends to nowhere"),
    ("spacing = 1.25", "has no spacing"),
    ("stable_seconds = 0.5", "unknown key(s) stable_second"),
])
def test_bad_rule_files_are_one_line_errors(tmp_path, change, message) -> None:
    from thinslice.errors import ThinsliceError

    rules = _rules(tmp_path / "rules.toml", 1)
    replacement = {"allowed_callers": "allowed_callers = []", "send_to": 'send_to = ["nowhere"]', "spacing": "",
                   "stable_seconds": "stable_second = 0.5"}[change.split(" ")[0]]
    rules.write_text(rules.read_text().replace(change, replacement))
    with pytest.raises(ThinsliceError, match=re.escape(message)) as caught:
        load_rules(rules)
    assert "\n" not in str(caught.value)


@needs_orthanc
def test_complete_on_demand_without_waiting_for_stability(tmp_path, orthanc, running_node, capsys) -> None:
    rules = _rules(tmp_path / "rules.toml", orthanc.dicom_port)
    rules.write_text(rules.read_text().replace("stable_seconds = 0.5", "stable_seconds = 3600"))
    node = running_node(rules, port=_free_port())
    folder = _thick_series(tmp_path / "s", "1.2.3.4.109", seed=11)
    assert set(_send(folder, node.listener.port)) == {0}
    uid = _uid(folder)
    time.sleep(0.3)
    assert node.queue.get(uid).state == "received"  # type: ignore[union-attr]
    assert main(["serve", "--complete", uid, "--spool", str(tmp_path / "spool")]) == 0
    assert "1 series marked complete" in capsys.readouterr().out
    job = _wait(lambda: _state(node, uid), 30, "the series completed on demand to be sent")
    assert job.state == "sent"  # type: ignore[union-attr]


def test_the_guide_rule_file_parses() -> None:
    """The rule file of docs/guide/node.md is a valid one (the reference cannot drift from the parser)."""
    from thinslice.node.rules import parse_rules, tomllib

    text = (ROOT / "docs" / "guide" / "node.md").read_text(encoding="utf-8")
    block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    rules = parse_rules(tomllib.loads(block), "node.md")
    assert [r.name for r in rules.rules] == ["chest", "other thick ct"] and rules.limits.workers == 2
    header = {"Modality": "CT", "SliceThickness": "5", "SeriesDescription": "Thorax 5mm", "BodyPartExamined": "CHEST"}
    assert rules.decide(header, 60)[0].name == "chest"  # type: ignore[union-attr]
    assert rules.decide({**header, "SeriesDescription": "Thorax MIP"}, 60)[0].name == "other thick ct"  # type: ignore
    assert "not a volume" in rules.decide({**header, "ImageType": "ORIGINAL\\PRIMARY\\LOCALIZER"}, 1)[1]


def test_instances_spooled_but_not_recorded_are_adopted_at_start(tmp_path) -> None:
    """A kill between an instance's rename and its record: the next start finds it (a new job, or a finished job
    reopened because its series changed)."""
    rules = load_rules(_rules(tmp_path / "rules.toml", 1))
    folder = _thick_series(tmp_path / "s", "1.2.3.4.110", seed=12)
    files = sorted(folder.iterdir())
    uid = _uid(folder)
    node = Node(tmp_path / "spool", rules, port=_free_port())
    for path in files[:3]:
        ds = pydicom.dcmread(path)
        node.spool.store(uid, ds.SOPInstanceUID, path.read_bytes())
    node.recover()
    job = node.queue.get(uid)
    assert job is not None and job.state == "received" and job.instances == 3
    node.queue.complete(uid)
    node.queue.finish(uid, "sent")
    node.spool.store(uid, pydicom.dcmread(files[3]).SOPInstanceUID, files[3].read_bytes())
    node.recover()
    job = node.queue.get(uid)
    assert job is not None and job.state == "received" and job.instances == 4 and job.attempts == 0
    node.queue.close()


def test_associations_beyond_the_limit_are_refused(tmp_path, running_node) -> None:
    rules = _rules(tmp_path / "rules.toml", 1)
    rules.write_text(rules.read_text().replace("max_associations = 4", "max_associations = 1"))
    node = running_node(rules, port=_free_port())
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    first = ae.associate("127.0.0.1", node.listener.port, ae_title="THINSLICE")
    second = ae.associate("127.0.0.1", node.listener.port, ae_title="THINSLICE")
    try:
        assert first.is_established and second.is_rejected
    finally:
        first.release()
    # The node counts the first association until its thread has ended, a moment after the release: a slot frees
    # within seconds, not at once.
    deadline = time.monotonic() + 10
    third = ae.associate("127.0.0.1", node.listener.port, ae_title="THINSLICE")
    while not third.is_established and time.monotonic() < deadline:
        time.sleep(0.2)
        third = ae.associate("127.0.0.1", node.listener.port, ae_title="THINSLICE")
    assert third.is_established
    third.release()
