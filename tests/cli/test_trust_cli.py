"""The command line's promises: nothing the user had is replaced unasked, the thin grid covers the stack evenly,
short stacks, link loops, odd output paths and implausible numbers end in one line."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thinslice.cli.main import main
from thinslice.degrade.grid import thin_grid, thin_positions, whole_extent
from thinslice.degrade.pairs import simulate_pair
from thinslice.degrade.profiles import degrade
from thinslice.errors import ThinsliceError
from thinslice.io import read_volume, write_volume
from thinslice.io.volume import Volume


def _stack(n: int, spacing: float, rows: int = 4) -> Volume:
    z = np.arange(n, dtype=np.float32)
    return Volume(np.broadcast_to(z[:, None, None], (n, rows, rows)).astype(np.float32), (1.0, 1.0, spacing),
                  origin=(0.0, 0.0, 7.0))


def _margins(thick: Volume, spacing: float) -> tuple[float, float]:
    """Extent of the stack not covered by the thin slabs, at the low and the high end (mm)."""
    c, t = thick.slice_positions_mm(), thin_positions(thick, spacing)
    return (t[0] - spacing / 2) - (c[0] - thick.slice_spacing / 2), (c[-1] + thick.slice_spacing / 2) - (
        t[-1] + spacing / 2)


# ---------------------------------------------------------------------------------------------------- thin grid
def test_a_spacing_stored_a_hair_short_drops_no_slice() -> None:
    thick = _stack(35, float(np.float32(4.7999997)))
    assert thin_grid(thick, 2.0)[0] == 84
    assert thin_grid(thick, 3.0)[0] == 56
    low, high = _margins(thick, 3.0)
    assert low == pytest.approx(0.0, abs=1e-3) and high == pytest.approx(0.0, abs=1e-3)


def test_a_remainder_is_split_between_both_ends() -> None:
    thick = _stack(11, 4.8)  # 52.8 mm: 17 slices of 3 mm and 1.8 mm left
    n, offset = thin_grid(thick, 3.0)
    low, high = _margins(thick, 3.0)
    assert n == 17 and low == pytest.approx(0.9) and high == pytest.approx(0.9)
    assert offset == pytest.approx(-2.4 + 1.5 + 0.9)


def test_the_divisor_grid_starts_at_the_lower_edge_exactly() -> None:
    thick = _stack(10, 5.0)
    assert thin_grid(thick, 1.25) == (40, -2.5 + 0.625)  # exact, as before: no centring margin


@settings(max_examples=60, deadline=None)
@given(st.integers(3, 60), st.floats(0.5, 10.0), st.floats(0.1, 1.0))
def test_grid_is_centred_inside_the_extent(m: int, big: float, ratio: float) -> None:
    thick = _stack(m, big, rows=2)
    s = max(big * ratio, 0.05)
    n, _ = thin_grid(thick, s)
    low, high = _margins(thick, s)
    assert n == max(math.floor(m * big / s + 0.01), 1)
    assert low == pytest.approx(high, abs=0.01 * s + 1e-6 * m * big)  # a count within 1% of whole is whole
    assert -0.01 * s - 1e-9 <= low < s / 2 + 1e-9


def test_a_simulated_stack_keeps_an_extent_of_whole_thin_slices() -> None:
    thin = _stack(48, 1.25)
    thick = degrade(thin, factor=2.5, profile="box")
    assert thick.num_slices == 19
    kept = whole_extent(thick, 1.25)
    assert kept.num_slices == 18 and _margins(kept, 1.25) == pytest.approx((0.0, 0.0), abs=1e-9)
    assert whole_extent(degrade(thin, factor=4), 1.25).num_slices == 12  # whole already: unchanged
    # 5 mm from 0.9765625 mm slices (500 mm / 512) is 128/25 thin slices: a multiple of 25 slabs is kept.
    fine = _stack(300, 0.9765625, rows=2)
    thick, target = simulate_pair(fine, thickness=5.0, spacing=5.0)
    assert (thick.num_slices, target.num_slices) == (50, 256)


def test_spacing_below_any_ct_is_refused() -> None:
    with pytest.raises(ThinsliceError, match="finer than any CT"):
        thin_grid(_stack(10, 5.0), 0.001)


# ------------------------------------------------------------------------------------------------ existing outputs
@pytest.fixture
def thick_file(tmp_path) -> Path:
    return write_volume(_stack(6, 4.0, rows=8), tmp_path / "thick.nii.gz", dtype="float32")


def test_an_existing_output_is_refused_then_replaced_with_overwrite(thick_file, tmp_path, capsys) -> None:
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"mine")
    assert main(["upsample", str(thick_file), str(out), "--spacing", "1", "--method", "cubic"]) == 2
    assert capsys.readouterr().err.strip() == (f"thinslice upsample: error: output {out} exists; pass --overwrite to "
                                               "replace it")
    assert out.read_bytes() == b"mine"
    assert main(["upsample", str(thick_file), str(out), "--spacing", "1", "--method", "cubic", "--overwrite"]) == 0
    assert "replaced the existing" in capsys.readouterr().err
    assert read_volume(out).num_slices == 24


def test_degrade_and_the_std_map_refuse_existing_files(thick_file, tmp_path, capsys) -> None:
    out = tmp_path / "d.nii.gz"
    out.write_bytes(b"mine")
    assert main(["degrade", str(thick_file), str(out), "--factor", "2"]) == 2
    (tmp_path / "up_std.nii.gz").write_bytes(b"mine too")
    assert main(["upsample", str(thick_file), str(tmp_path / "up.nii.gz"), "--spacing", "1", "--method", "planes",
                 "--uncertainty"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # (and a note on the HU)
    assert len(err) == 2 and all("exists; pass --overwrite" in line for line in err) and "up_std" in err[1]
    assert out.read_bytes() == b"mine" and not (tmp_path / "up.nii.gz").exists()


def test_mhd_data_file_counts_as_the_output(thick_file, tmp_path, capsys) -> None:
    (tmp_path / "o.zraw").write_bytes(b"data of another image")
    assert main(["upsample", str(thick_file), str(tmp_path / "o.mhd"), "--spacing", "1", "--method", "cubic"]) == 2
    assert "o.zraw exists" in capsys.readouterr().err


def test_demo_names_its_earlier_files_and_refuses_a_file_as_folder(tmp_path) -> None:
    from thinslice.cli.cmd_demo import earlier_outputs

    (tmp_path / "views.png").write_bytes(b"")
    (tmp_path / "result_cubic.nii.gz").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("the user's")
    assert [p.name for p in earlier_outputs(tmp_path)] == ["result_cubic.nii.gz", "views.png"]
    with pytest.raises(ThinsliceError, match="is a file"):
        earlier_outputs(tmp_path / "notes.txt")


# --------------------------------------------------------------------------------------------------- odd paths
def test_symbolic_link_loops_and_outputs_under_a_file_are_one_line(thick_file, tmp_path, capsys) -> None:
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    (tmp_path / "plain").write_text("x")
    for args in ([str(tmp_path / "a"), str(tmp_path / "o.nii.gz")], [str(thick_file), str(tmp_path / "a")],
                 [str(thick_file), str(tmp_path / "plain" / "o.nii.gz")]):
        assert main(["upsample", *args, "--spacing", "1", "--method", "cubic"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "loops back" in err[0] and "loops back" in err[1]
    assert f"the output's folder {tmp_path / 'plain'} is a file" in err[2]


def test_a_non_finite_volume_is_refused_before_writing_and_named_as_such(tmp_path) -> None:
    out = tmp_path / "nan.nii.gz"
    out.write_bytes(b"previous")
    array = np.zeros((3, 4, 4), np.float32)
    array[1, 1, 1] = np.inf
    with pytest.raises(ThinsliceError, match="not writing .*NaN or infinite") as info:
        write_volume(Volume(array, (1.0, 1.0, 2.0)), out, dtype="float32")
    assert "full" not in str(info.value) and out.read_bytes() == b"previous"


# ------------------------------------------------------------------------------------------------- short stacks
def test_two_slices_refuse_data_consistency_and_auto_falls_back_to_cubic(tmp_path, capsys) -> None:
    src = write_volume(_stack(2, 4.0, rows=8), tmp_path / "two.nii.gz", dtype="float32")
    assert main(["upsample", str(src), str(tmp_path / "dc.nii.gz"), "--spacing", "1", "--method", "cubic-dc"]) == 2
    assert "cubic-dc needs at least 3 slices" in capsys.readouterr().err
    assert main(["upsample", str(src), str(tmp_path / "auto.nii.gz"), "--spacing", "1"]) == 0
    assert "using cubic" in capsys.readouterr().err
    assert read_volume(tmp_path / "auto.nii.gz").num_slices == 8


def test_selfcheck_length_messages() -> None:
    from thinslice.cli.cmd_selfcheck import check_length

    check_length(10, 4)
    with pytest.raises(ThinsliceError, match="use --factor 3 or smaller"):
        check_length(8, 4)
    with pytest.raises(ThinsliceError, match="needs at least 6"):
        check_length(5, 2)


# -------------------------------------------------------------------------------------------------- number ranges
@pytest.mark.parametrize(("args", "text"), [
    (["upsample", "i.nii.gz", "o.nii.gz", "--spacing", "1", "--samples", "100000000"], "from 1 to 64"),
    (["upsample", "i.nii.gz", "o.nii.gz", "--spacing", "1", "--seed", "-1"], "from 0 to"),
    (["upsample", "i.nii.gz", "o.nii.gz", "--spacing", "1", "--steps", "0"], "from 1 to 1000"),
    (["degrade", "i.nii.gz", "o.nii.gz", "--factor", "nan"], "from 1 to 64"),
    (["selfcheck", "i.nii.gz", "--factor", "1"], "from 2 to 16"),
    (["evaluate", "a.nii.gz", "b.nii.gz", "--trim", "x"], "got 'x'"),
    (["train-vae", "--data", "d", "--out", "o", "--lr", "0"], "--lr: must be a number"),
    (["prepare", "s", "o", "--split", "0.7", "0.2", "2"], "from 0 to 1"),
])
def test_numeric_options_out_of_range_are_one_argparse_line(args, text, capsys) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"thinslice {args[0]}: error: argument ") and text in err[-1]


def test_spacing_and_thickness_out_of_range_are_one_line(thick_file, tmp_path, capsys) -> None:
    out = str(tmp_path / "o.nii.gz")
    assert main(["upsample", str(thick_file), out, "--spacing", "0.001"]) == 2
    assert main(["degrade", str(thick_file), out, "--thickness", "5000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("is not a CT slice spacing or thickness" in line for line in err)


def test_prepare_refuses_the_files_of_an_earlier_prepare(tmp_path, capsys) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train.txt").write_text("my own list\n")
    assert main(["prepare", str(tmp_path / "src"), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "already holds train.txt" in err and "pass --overwrite" in err
    assert (tmp_path / "out" / "train.txt").read_text() == "my own list\n"
    # With --overwrite it goes on to the source (empty here: its own one-line error).
    assert main(["prepare", str(tmp_path / "src"), str(tmp_path / "out"), "--no-progress", "--overwrite"]) == 2
    assert "no DICOM series" in capsys.readouterr().err
