"""Property tests of the readers and writers with hostile input: every read ends in a correct volume or one
ThinsliceError line that names the file; never another exception, a hang, or an allocation beyond what the
header-based memory check allows.

Reads run in a child process (:func:`thinslice.data.hostile.probe`): a FIFO or a memory bomb then fails one
example instead of the test run. Examples are derandomised, so CI sees the same ones every time;
THINSLICE_FUZZ_EXAMPLES=N runs N examples per property (e.g. 2000 for a long local run).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from thinslice.data import hostile
from thinslice.data.hostile import EITHER, REFUSE, Hostile, NiftiHeader, NrrdHeader
from thinslice.errors import ThinsliceError

EXAMPLES = int(os.environ.get("THINSLICE_FUZZ_EXAMPLES", "0"))
# Shrinking a failure re-reads many files, each up to READ_DEADLINE_S when it hangs: off unless asked for.
SHRINK = os.environ.get("THINSLICE_FUZZ_SHRINK", "") not in ("", "0")
# A read that is still running after this is a hang; the probe kills it and the example fails.
READ_DEADLINE_S = 8.0


def fuzz_settings(examples: int):
    """Fixed examples (derandomize), no hypothesis deadline (the probe has its own), scaled by the env var."""
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if SHRINK else [])
    return settings(max_examples=EXAMPLES or examples, deadline=None, derandomize=True, database=None, phases=phases,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def assert_read_ok(item: Hostile) -> None:
    outcome = hostile.probe(item.path, timeout=READ_DEADLINE_S)
    problems = hostile.judge(item, outcome)
    assert not problems, f"{item.path.name} ({item.description}): {problems}; outcome: {outcome.message[:300]}"


@pytest.fixture(scope="module")
def scratch():
    folder = Path(tempfile.mkdtemp(prefix="thinslice-fuzz-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def fresh(scratch: Path, name: str) -> Path:
    """A new empty folder for one example (hypothesis runs many examples in one test)."""
    folder = Path(tempfile.mkdtemp(dir=scratch))
    return folder / name


# ------------------------------------------------------------------------------------------------ the corpus
@pytest.fixture(scope="module")
def corpus(scratch):
    return hostile.corpus(scratch / "corpus")


@pytest.mark.parametrize("kind", ["nifti", "nrrd", "mha", "dicom"])
def test_hostile_corpus(corpus, kind):
    """Every file of the hostile corpus is read correctly or refused in one line naming it."""
    failures = []
    for item in corpus:
        if item.kind != kind:
            continue
        outcome = hostile.probe(item.path, timeout=READ_DEADLINE_S)
        if problems := hostile.judge(item, outcome):
            failures.append(f"{item.path.name} ({item.description[:80]}): {'; '.join(problems)[:300]}")
    assert not failures, f"{len(failures)} hostile {kind} file(s) mishandled:\n" + "\n".join(failures)


def test_corpus_is_small_and_deterministic(corpus, tmp_path):
    """Each hostile file is under 1 MB, and the same seed writes the same bytes (NRRD and MHA here; the NIfTI
    random headers by their fields; DICOM files get new UIDs from the series writer on every build)."""
    for item in corpus:
        if item.path.is_file() and not item.path.is_fifo():
            assert item.path.stat().st_size < 2**20, item.path
    first = hostile.nrrd_files(tmp_path / "a", seed=3) + hostile.mha_files(tmp_path / "a2", seed=3)
    second = hostile.nrrd_files(tmp_path / "b", seed=3) + hostile.mha_files(tmp_path / "b2", seed=3)
    assert len(first) == len(second) > 50
    for one, two in zip(first, second, strict=True):
        if not one.path.is_fifo():
            assert one.path.read_bytes() == two.path.read_bytes(), one.path
    headers = [repr(hostile.random_nifti_header(np.random.default_rng(3))) for _ in range(2)]
    assert headers[0] == headers[1]


def test_judge_catches_wrong_answers(tmp_path):
    """The judge itself: a refused control, a read of a file that must be refused, a multi-line or anonymous
    message and a hang are all reported (so a passing corpus means something)."""
    path = tmp_path / "x.nii"
    path.write_bytes(b"")
    item = Hostile(path, "test", "nifti", REFUSE)
    assert hostile.judge(item, hostile.Outcome("error", f"cannot read {path}: corrupt", "ThinsliceError")) == []
    assert hostile.judge(item, hostile.Outcome("error", "corrupt file", "ThinsliceError"))
    assert hostile.judge(item, hostile.Outcome("error", f"{path}\nsecond line", "ThinsliceError"))
    assert hostile.judge(item, hostile.Outcome("exception", "boom", "ValueError"))
    assert hostile.judge(item, hostile.Outcome("timeout", "no answer"))
    assert hostile.judge(item, hostile.Outcome("volume", "Volume(...)", shape=(8, 8, 6)))
    either = Hostile(path, "test", "nifti", EITHER, (8, 8, 6))
    assert hostile.judge(either, hostile.Outcome("volume", "Volume(...)", shape=(8, 8, 6))) == []
    assert hostile.judge(either, hostile.Outcome("volume", "Volume(...)", shape=(8, 8, 5)))
    assert hostile.judge(either, hostile.Outcome("volume", "V", shape=(8, 8, 6), growth=2**31))


def test_probe_survives_a_fifo_and_reads_a_control(tmp_path):
    """A FIFO does not block the test process, and a valid file is read and judged clean."""
    fifo = tmp_path / "pipe.nii"
    os.mkfifo(fifo)
    outcome = hostile.probe(fifo, timeout=2.0)
    assert outcome.status in ("timeout", "error", "volume", "exception", "crash")
    assert outcome.seconds < 10
    control = hostile.nifti_file(tmp_path / "ok.nii", NiftiHeader())
    outcome = hostile.probe(control, timeout=READ_DEADLINE_S)
    assert outcome.status == "volume" and outcome.shape == (8, 8, 6) and outcome.problems == []


# ------------------------------------------------------------------------------------ random NIfTI headers
edge_floats = st.one_of(st.sampled_from([0.0, -1.0, 1e-9, 1e9, math.nan, math.inf, -math.inf, 0.5, 3.0]),
                        st.floats(-1e4, 1e4, allow_nan=False))
dims_values = st.one_of(st.integers(-2, 12), st.sampled_from([0, 1, 32767, 2**20]))


@st.composite
def nifti_headers(draw) -> tuple[NiftiHeader, float, bool]:
    version = draw(st.sampled_from([1, 1, 2]))
    ndim = draw(st.sampled_from([3, 3, 3, 2, 4, 0, 8]))
    dims = (ndim, *(draw(dims_values) if draw(st.booleans()) else d for d in (8, 8, 6)), 1, 1, 1, 1)
    datatype = draw(st.sampled_from([*hostile.NIFTI_DTYPES, 0, 32, 128, 77]))
    bits = hostile.NIFTI_DTYPES.get(datatype, (16, ""))[0]
    bitpix = draw(st.one_of(st.just(bits), st.sampled_from([0, 8, 12, 16, 64, -8])))
    pixdim = (draw(st.sampled_from([1.0, -1.0, 0.0])), *(draw(edge_floats) if draw(st.booleans()) else v
                                                        for v in (1.0, 1.0, 3.0)), 1.0, 1.0, 1.0, 1.0)
    start = 352.0 if version == 1 else 544.0
    vox_offset = draw(st.one_of(st.just(start), st.sampled_from([0.0, 100.0, start + 1, 4096.0, 1e12, math.nan])))
    header = NiftiHeader(
        version=version, dims=dims, datatype=datatype, bitpix=bitpix, pixdim=pixdim, vox_offset=vox_offset,
        scl_slope=draw(st.one_of(st.just(1.0), edge_floats)), scl_inter=draw(st.one_of(st.just(0.0), edge_floats)),
        qform_code=draw(st.integers(-1, 4)), sform_code=draw(st.integers(-1, 4)),
        quatern=tuple(draw(st.lists(edge_floats, min_size=6, max_size=6))) if draw(st.booleans())
        else NiftiHeader().quatern,
        srow=tuple(draw(st.lists(edge_floats, min_size=12, max_size=12))) if draw(st.booleans())
        else NiftiHeader().srow,
        extension=draw(st.sampled_from([b"", b"\x20\0\0\0\x04\0\0\0" + b"\0" * 24, b"\xf0\xff\xff\x7f\x04\0\0\0"])),
        endian=draw(st.sampled_from(["<", "<", ">"])))
    return header, draw(st.sampled_from([1.0, 1.0, 0.5, 0.0, 1.5])), draw(st.booleans())


@fuzz_settings(60)
@given(nifti_headers())
def test_fuzz_nifti_headers(scratch, case):
    """Any NIfTI-1/2 header (with as much data as it promises, less, or more) is read right or refused."""
    header, fraction, gz = case
    data = hostile.default_voxels(header)
    data = data[: int(len(data) * min(fraction, 1.0))] + (b"\0" * (len(data) // 2) if fraction > 1 else b"")
    path = hostile.nifti_file(fresh(scratch, "f.nii.gz" if gz else "f.nii"), header, data)
    assert_read_ok(Hostile(path, repr(header)[:300], "nifti", EITHER, None, header.claimed_bytes()))


# --------------------------------------------------------------------------------- random NRRD/MHA headers
triples = st.one_of(st.sampled_from(["1 1 3", "0 1 3", "nan 1 3", "-1 1 3", "1e-12 1 1", "1e12 1 1", "1 1"]),
                    st.tuples(*[st.floats(-50, 50)] * 3).map(lambda t: " ".join(f"{v:g}" for v in t)))


@st.composite
def nrrd_headers(draw) -> tuple[NrrdHeader, str, float]:
    header = NrrdHeader()
    f = header.fields
    if draw(st.booleans()):
        f["sizes"] = " ".join(str(draw(dims_values)) for _ in range(3))
    f["type"] = draw(st.sampled_from(["short", "short", "float", "uchar", "double", "int64", "block", "what"]))
    f["encoding"] = draw(st.sampled_from(["raw", "raw", "gzip", "bzip2", "ascii", "hex", "nope"]))
    f["endian"] = draw(st.sampled_from(["little", "big", "none"]))
    if draw(st.booleans()):
        vectors = [draw(triples) for _ in range(3)]
        f["space directions"] = " ".join("(" + v.replace(" ", ",") + ")" for v in vectors)
    if draw(st.booleans()):
        f["space origin"] = "(" + draw(triples).replace(" ", ",") + ")"
    name = draw(st.sampled_from(["f.nrrd", "f.nrrd", "f.nhdr"]))
    if name == "f.nhdr":
        f["data file"] = draw(st.sampled_from(["data.raw", "../data.raw", "/dev/null", "missing.raw", "LIST"]))
    return header, name, draw(st.sampled_from([1.0, 0.5, 0.0, 2.0]))


@fuzz_settings(40)
@given(nrrd_headers())
def test_fuzz_nrrd_headers(scratch, case):
    header, name, fraction = case
    path = fresh(scratch, name)
    data = hostile.nrrd_voxels()
    data = data[: int(len(data) * min(1.0, fraction))] * (2 if fraction > 1 else 1)
    if header.fields["encoding"] == "gzip":
        import gzip

        data = gzip.compress(data, mtime=0)
    if name == "f.nhdr":
        (path.parent / "data.raw").write_bytes(data)
        if header.fields["data file"] == "LIST":
            header.extra_lines = ("data.raw",)
    hostile.nrrd_file(path, header, data)
    assert_read_ok(Hostile(path, header.text()[:300].decode(errors="replace"), "nrrd", EITHER))


@st.composite
def mha_headers(draw) -> tuple[dict[str, str], str, float]:
    fields = dict(hostile.MHA_BASE)
    if draw(st.booleans()):
        fields["DimSize"] = " ".join(str(draw(dims_values)) for _ in range(3))
    fields["ElementType"] = draw(st.sampled_from(["MET_SHORT", "MET_SHORT", "MET_FLOAT", "MET_UCHAR",
                                                  "MET_DOUBLE", "MET_NONE", "MET_LONG_LONG"]))
    fields["ElementSpacing"] = draw(st.one_of(st.just("1 1 3"), triples))
    fields["Offset"] = draw(st.one_of(st.just("0 0 0"), triples))
    if draw(st.booleans()):
        fields["TransformMatrix"] = " ".join(draw(triples) for _ in range(3))
    fields["NDims"] = draw(st.sampled_from(["3", "3", "2", "4", "0", "-1"]))
    fields["CompressedData"] = draw(st.sampled_from(["False", "True"]))
    fields["BinaryDataByteOrderMSB"] = draw(st.sampled_from(["False", "True"]))
    name = draw(st.sampled_from(["f.mha", "f.mha", "f.mhd"]))
    fields["ElementDataFile"] = "LOCAL" if name == "f.mha" else draw(
        st.sampled_from(["data.raw", "../data.raw", "/dev/null", "missing.raw", "LIST\ndata.raw"]))
    return fields, name, draw(st.sampled_from([1.0, 0.5, 0.0, 2.0]))


@fuzz_settings(40)
@given(mha_headers())
def test_fuzz_mha_headers(scratch, case):
    fields, name, fraction = case
    path = fresh(scratch, name)
    data = hostile.nrrd_voxels()
    data = data[: int(len(data) * min(1.0, fraction))] * (2 if fraction > 1 else 1)
    if fields["CompressedData"] == "True":
        import zlib

        data = zlib.compress(data)
    fields = dict(fields)
    data_file = fields.pop("ElementDataFile")
    text = hostile.mha_text(fields) + f"ElementDataFile = {data_file}\n".encode()
    if name == "f.mha":
        path.write_bytes(text + data)
    else:
        (path.parent / "data.raw").write_bytes(data)
        path.write_bytes(text)
    assert_read_ok(Hostile(path, text[:300].decode(errors="replace"), "mha", EITHER))


# ------------------------------------------------------------------------------------ random DICOM headers
@pytest.fixture(scope="module")
def base_series(scratch) -> Path:
    folder = scratch / "base_series"
    hostile.dicom_series(folder, n=3, size=8)
    return folder


ds_values = st.sampled_from(["0", "1", "-1", "NaN", "1e9", "1e-9", "0.7"])


@st.composite
def dicom_edits(draw) -> dict[str, object]:
    edits: dict[str, object] = {}
    options = {
        "Rows": st.sampled_from([0, 1, 4, 8, 16, 65535]),
        "Columns": st.sampled_from([0, 1, 4, 8, 16, 65535]),
        "BitsAllocated": st.sampled_from([1, 8, 12, 16, 32, 64]),
        "NumberOfFrames": st.sampled_from([0, 1, 2, 3, 1000000]),
        "PixelSpacing": st.lists(ds_values, min_size=1, max_size=3),
        "ImagePositionPatient": st.lists(ds_values, min_size=2, max_size=4),
        "ImageOrientationPatient": st.lists(st.sampled_from(["0", "1", "-1", "NaN", "0.5"]), min_size=5,
                                            max_size=6),
        "SamplesPerPixel": st.sampled_from([1, 3]),
        "PixelRepresentation": st.sampled_from([0, 1]),
        "RescaleSlope": ds_values,
        "PixelData": st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    }
    for key in draw(st.lists(st.sampled_from(sorted(options)), min_size=1, max_size=4, unique=True)):
        edits[key] = draw(options[key])
    edits["_which"] = draw(st.sampled_from(["all", "one"]))
    return edits


@fuzz_settings(25)
@given(dicom_edits())
def test_fuzz_dicom_headers(scratch, base_series, edits):
    """A CT series with some header fields changed in all files or one: read right or refused."""
    from thinslice.data.odd import edit_headers

    hostile._allow_invalid_values()
    folder = fresh(scratch, "series")
    shutil.copytree(base_series, folder)
    paths = sorted(folder.iterdir())
    which = edits.pop("_which")

    def change(ds, index):
        for key, value in edits.items():
            if key == "PixelData":
                ds.PixelData = (ds.PixelData * 2)[: int(len(ds.PixelData) * value) // 2 * 2]
            else:
                setattr(ds, key, value)

    edit_headers(paths if which == "all" else paths[1:2], change)
    assert_read_ok(Hostile(folder, f"{which}: {edits}", "dicom", EITHER))


# ---------------------------------------------------------------------------------- memory-bomb headers
@fuzz_settings(20)
@given(st.sampled_from(["nifti", "nrrd", "mha"]), st.integers(1200, 20000), st.integers(600, 4000))
def test_headers_claiming_more_memory_are_refused(scratch, kind, side, depth):
    """A header whose volume needs more than the memory the readers are told they have is refused, before the
    voxels are allocated, whatever data follows it."""
    sizes = (side, side, depth)
    claims = side * side * depth * 2
    assert claims > hostile.PROBE_AVAILABLE
    if kind == "nifti":
        header = NiftiHeader(dims=(3, *sizes, 1, 1, 1, 1))
        path = hostile.nifti_file(fresh(scratch, "bomb.nii"), header, hostile.nrrd_voxels())
    elif kind == "nrrd":
        header = NrrdHeader()
        header.fields["sizes"] = " ".join(map(str, sizes))
        path = hostile.nrrd_file(fresh(scratch, "bomb.nrrd"), header)
    else:
        fields = {**hostile.MHA_BASE, "DimSize": " ".join(map(str, sizes))}
        path = fresh(scratch, "bomb.mha")
        path.write_bytes(hostile.mha_text(fields) + hostile.nrrd_voxels())
    assert_read_ok(Hostile(path, f"{kind} claiming {sizes}", kind, REFUSE, None, claims))


# ------------------------------------------------------------------------------------ writers, read back
@st.composite
def volumes(draw):
    from scipy.spatial.transform import Rotation

    from thinslice.io import Volume

    shape = tuple(draw(st.integers(2, 6)) for _ in range(3))
    spacing = tuple(draw(st.sampled_from([0.05, 0.5, 0.7, 1.0, 1.25, 3.0, 5.0, 50.0])) for _ in range(3))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    rotation = Rotation.random(random_state=seed).as_matrix() if draw(st.booleans()) else np.eye(3)
    if draw(st.booleans()):
        rotation = rotation @ np.diag([1.0, 1.0, -1.0])  # left-handed
    origin = tuple(float(v) for v in rng.uniform(-500, 500, 3))
    values = rng.uniform(-1024, 3000, shape).astype(np.float32)
    special = draw(st.sampled_from(["none", "none", "nan", "inf", "huge"]))
    if special != "none":
        values.flat[int(rng.integers(values.size))] = {"nan": np.nan, "inf": np.inf, "huge": 1e7}[special]
    return Volume(values, spacing, origin, rotation), special


@fuzz_settings(40)
@given(volumes(), st.sampled_from([".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", "/"]),
       st.sampled_from(["int16", "float32"]))
def test_fuzz_write_then_read(scratch, case, ext, dtype):
    """A volume written in any format and read back has the same voxels in the same places (int16: rounded and
    clipped), or the write or read is refused in one line naming the file; NaN is never written as a number."""
    from thinslice.io import read_volume, write_volume

    volume, special = case
    if ext == "/" and dtype == "float32":
        dtype = "int16"  # DICOM series are int16 only (refusing float32 there is tested elsewhere)
    path = fresh(scratch, "out" + ext)
    try:
        written = write_volume(volume, path, dtype=dtype)
    except ThinsliceError as exc:
        assert_one_line_naming(exc, path)
        return
    if special in ("nan", "inf") and dtype == "int16":
        pytest.fail(f"{special} voxel written to {ext} as an int16 number (a silently wrong value)")
    try:
        back = read_volume(written)
    except ThinsliceError as exc:
        assert_one_line_naming(exc, written)
        assert special in ("nan", "inf"), f"{ext} {dtype}: own output refused: {exc}"
        return
    assert special not in ("nan", "inf"), f"{special} voxel read back from {ext} as {back!r}"
    assert sorted(back.shape_ijk) == sorted(volume.shape_ijk)
    exact = volume.array.astype(np.float64)
    # int16: rounded and clipped, unless the format keeps a value beyond int16 exactly (a DICOM rescale)
    clipped = np.clip(np.round(exact), -32768, 32767) if dtype == "int16" else exact
    tol = 0.51 if dtype == "int16" else 0.0
    for (corner, value), (_, raw) in zip(corner_values(volume, clipped), corner_values(volume, exact), strict=True):
        got = value_at(back, corner)
        assert got is not None, f"{ext} {dtype}: corner at {corner} mm is not on the read-back grid"
        close = [abs(got - v) <= tol + 1e-6 * max(1.0, abs(v)) for v in (value, raw)]
        assert any(close), f"{ext} {dtype}: {got} at {corner} mm, wrote {raw}"


def assert_one_line_naming(exc: ThinsliceError, path: Path) -> None:
    text = str(exc).strip()
    assert "\n" not in text, f"message has several lines: {text!r}"
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    assert name in text, f"message does not name {name}: {text!r}"


def corner_values(volume, array: np.ndarray):
    """(world position, value) of the 8 corner voxels of ``volume`` with voxels ``array`` (numpy k, j, i)."""
    ni, nj, nk = volume.shape_ijk
    for i in (0, ni - 1):
        for j in (0, nj - 1):
            for k in (0, nk - 1):
                ijk = np.array([i, j, k], dtype=np.float64)
                world = np.asarray(volume.origin) + volume.direction @ (np.asarray(volume.spacing) * ijk)
                yield world, float(array[k, j, i])


def value_at(volume, world: np.ndarray) -> float | None:
    """The voxel of ``volume`` whose centre is at ``world`` (within 1e-3 voxel), or None."""
    grid = volume.direction @ np.diag(volume.spacing)
    ijk = np.linalg.solve(grid, np.asarray(world) - np.asarray(volume.origin))
    index = np.round(ijk)
    if np.abs(ijk - index).max() > 1e-3 or np.any(index < 0) or np.any(index >= np.array(volume.shape_ijk)):
        return None
    i, j, k = (int(v) for v in index)
    return float(volume.array[k, j, i])
