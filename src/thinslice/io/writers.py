"""Writing volumes: NIfTI, NRRD, MetaImage by extension, or a DICOM CT series when the path is a folder.

Every write is atomic (a half-written file never appears under the final name) and never replaces the input the
volume was read from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from thinslice.errors import ThinsliceError, os_reason
from thinslice.io.atomic import current_umask, make_temp_dir, native_messages_to_log
from thinslice.io.dicom import DicomSeriesOptions, check_ct_output, write_dicom_series
from thinslice.io.dicom_study import SOURCE_KEY
from thinslice.io.formats import (
    DICOM,
    DICOM_SUFFIXES,
    NIFTI,
    FileFormat,
    file_extension,
    files_written_beside,
    format_for_suffix,
    writable_suffixes,
    writable_text,
    writes_compressed,
)
from thinslice.io.gz import compress_file, compresses_itself
from thinslice.io.lazy import lazy_import
from thinslice.io.limits import check_voxel_values
from thinslice.io.volume import Volume

if TYPE_CHECKING:  # the real modules for the type checker; at run time they load on first use
    import SimpleITK as sitk
else:
    sitk = lazy_import("SimpleITK")  # loaded when a file is first read or written

DTYPES = ("int16", "float32")
log = logging.getLogger(__name__)
_META_PREFIX = "thinslice_"  # same prefix the reader restores metadata from


def std_path_for(output: str | Path) -> Path:
    """Where the uncertainty map of ``output`` goes: ``ct.nii.gz`` -> ``ct_std.nii.gz``, folder ``out/`` ->
    ``out_std/`` (``thinslice upsample`` and ``thinslice batch`` alike)."""
    text = str(output).rstrip("/\\")
    path = Path(text)
    ext = file_extension(path)
    if ext and path.name.lower().endswith(ext) and len(path.name) > len(ext):
        return path.with_name(path.name[: -len(ext)] + "_std" + path.name[-len(ext):])
    return path.with_name(path.name + "_std")


def std_dtype(path: str | Path) -> str:
    """Voxel type of a std map: float32 in files, int16 HU in a DICOM series (its rescale keeps 1 HU steps)."""
    return "int16" if is_folder_output(path) else "float32"


def write_std_map(std: Volume, path: str | Path, method: str, overwrite: bool = False) -> Path:
    """Write an uncertainty map beside its output: float32 in a file, a DICOM series of its own (the source's
    SeriesNumber + 2000, described as ``<method> std``) in a folder."""
    return write_volume(std, path, dtype=std_dtype(path), overwrite=overwrite, method=f"{method} std",
                        series_number_offset=2000)


def is_folder_output(path: str | Path) -> bool:
    """True when ``path`` names a DICOM series folder: it ends with a separator or has no extension."""
    text = str(path)
    if text.endswith(("/", os.sep)):
        return True
    if format_for_suffix(file_extension(text)) is not None:
        return False
    return Path(text).is_dir() or Path(text).suffix == ""


def _refuse_unreadable_values(volume: Volume, path: Path) -> None:
    """Never write a volume that the readers would refuse (NaN, infinity, values beyond any CT range): an int16
    cast would turn NaN into a plausible number, and a float file would be refused by the next program that reads
    it, far from the step that made the values."""
    try:
        check_voxel_values(volume.array, "the volume")
    except ThinsliceError as exc:
        raise ThinsliceError(f"not writing {path}: {exc}".replace(" before using the volume", "")
                             .replace("check the file's scaling", "check the step that made them")) from None


def write_volume(
    volume: Volume,
    path: str | Path,
    *,
    dtype: str = "int16",
    reference_input: str | Path | None = None,
    overwrite: bool = False,
    series_description: str | None = None,
    method: str | None = None,
    series_number_offset: int | None = None,
) -> Path:
    """Write ``volume`` to ``path`` and return the written path.

    ``.nii``/``.nii.gz``/``.nrrd``/``.nhdr``/``.mha``/``.mhd`` write one file (``dtype`` int16: HU rounded and
    clipped to the int16 range; float32: values as they are). A path without extension, or ending with ``/``, writes
    a DICOM CT series (int16 HU) into that folder; an existing non-empty folder is only replaced with
    ``overwrite=True``. An existing file is replaced, atomically, as ``SimpleITK.WriteImage`` and ``nibabel.save``
    do (the command line refuses it unless ``--overwrite``: see ``thinslice.cli.checks``). ``reference_input`` is
    the file or folder the volume came from: writing over it is refused. A DICOM series keeps the patient and study
    of a DICOM source; ``series_description`` replaces the default '<source description> <mm> mm thinslice <method>';
    ``series_number_offset`` (default 1000) is added to the source's SeriesNumber for the new series.
    """
    if dtype not in DTYPES:
        raise ThinsliceError(f"unknown output dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    folder_output = is_folder_output(path)
    path = Path(path)
    _refuse_unreadable_values(volume, path)
    if reference_input is not None:
        refuse_overwriting_input(path, Path(reference_input))
    if folder_output:
        check_ct_output(volume)
        if dtype != "int16":
            raise ThinsliceError("DICOM series are written as int16 HU; use dtype int16 or write NIfTI/NRRD/MHA "
                                 "for float32 values")
        options = DicomSeriesOptions(series_description=series_description, method=method)
        if series_number_offset is not None:
            options = dataclasses.replace(options, series_number_offset=series_number_offset)
        DICOM.write(volume, path, dtype=dtype, overwrite=overwrite, options=options)
        return path
    fmt = check_file_target(path)
    fmt.write(volume, path, dtype=_file_dtype(volume, dtype, path), overwrite=overwrite, options=None)
    return path


def _file_dtype(volume: Volume, dtype: str, path: Path) -> str:
    """``dtype``, but float32 where int16 would round away the source's finer value steps (a fractional
    RescaleSlope such as 0.001 recorded as metadata ``value_step``): 21 levels instead of 20,000."""
    try:
        step = float(volume.metadata.get("value_step", "1"))
    except ValueError:
        step = 1.0
    if dtype != "int16" or not (np.isfinite(step) and 0 < step < 1):
        return dtype
    log.warning("%s: the source stores values in steps of %.4g (its RescaleSlope), which int16 would round to "
                "whole numbers; written as float32 instead", path, step)
    return "float32"


def check_file_target(path: Path) -> FileFormat:
    """Refuse a file output the writers cannot make (a .dcm file, an unknown extension, an existing folder), else
    the format it is written in; used by :func:`write_volume` and, before any computation, by the command line."""
    ext = file_extension(path)
    if ext in DICOM_SUFFIXES:
        raise ThinsliceError(f"{path}: a DICOM output is a series folder; give a folder path (no extension or "
                             "ending with '/') instead of a single .dcm file")
    fmt = format_for_suffix(ext)
    if fmt is None or ext not in writable_suffixes():
        raise ThinsliceError(f"{path}: unknown output format {ext!r}; use {writable_text()}, "
                             "or a folder path (ending with '/') for a DICOM series")
    if path.is_dir():
        raise ThinsliceError(f"{path} is an existing folder; give a file name for the {ext} output")
    return fmt


def refuse_overwriting_input(out: Path, ref: Path) -> None:
    """Fail when writing ``out`` would replace or sit around the input ``ref``: every file the write creates (an
    .mhd/.nhdr output writes its data file beside it) is compared with every file a read of ``ref`` opens (a
    detached header's data files, a DICOM series' files), not the two paths alone."""
    from thinslice.io.readers import files_read

    out_abs, ref_abs = out.resolve(), ref.resolve()
    if _same_file(out, ref):
        raise ThinsliceError(f"output {out} is the input file/folder; choose another output path")
    if ref_abs.is_relative_to(out_abs):
        raise ThinsliceError(f"output {out} contains the input {ref}; choose another output path")
    targets = files_written(out)
    # Every file a read opens lies in the input's folder (detached data must lie beside its header): an output
    # elsewhere needs no look at the input's files (a DICOM folder would be scanned again).
    base = ref_abs if ref_abs.is_dir() else ref_abs.parent
    if not any(t.resolve().is_relative_to(base) for t in targets):
        return
    try:
        inputs = files_read(ref)
    except ThinsliceError:
        inputs = [ref]  # the read itself will say what is wrong with the input
    for target in targets:
        for source in inputs:
            if _same_file(target, source):
                what = "is" if target == out else f"writes {target.name}, which is"
                raise ThinsliceError(f"output {out} {what} a file the input {ref} is read from ({source.name}); "
                                     "choose another output path")


def files_written(path: Path) -> list[Path]:
    """The files a file output creates: the path itself, and for a detached header (.mhd, .nhdr) the data file ITK
    writes beside it (compressed or not)."""
    return [path, *files_written_beside(path)]


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def volume_to_image(volume: Volume, dtype: str = "float32") -> sitk.Image:
    """A SimpleITK image with the volume's values (as ``dtype``) and geometry."""
    array = volume.array
    if dtype == "int16":
        low, high = float(array.min()), float(array.max())
        if low < -32768.5 or high > 32767.5:
            raise ThinsliceError(f"values from {low:.0f} to {high:.0f} do not fit the int16 output (-32768..32767 "
                                 "HU); write with --dtype float32, or check the input and options that produced them")
        array = np.rint(array).astype(np.int16)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(s) for s in volume.spacing))
    image.SetOrigin(tuple(float(o) for o in volume.origin))
    image.SetDirection(tuple(float(d) for d in np.asarray(volume.direction, dtype=np.float64).ravel()))
    return image


def write_image_file(volume: Volume, path: Path, *, dtype: str, overwrite: bool = True, options: object = None
                     ) -> None:
    """The writer of the file formats (through SimpleITK): metadata kept as the format allows, written atomically
    and read back before it replaces anything. ``overwrite`` and ``options`` are unused (the signature of every
    writer in :mod:`thinslice.io.formats`; the caller decides about existing files)."""
    image = volume_to_image(volume, dtype)
    # NIfTI has no place for arbitrary keys but keeps an 80-character note; NRRD and MetaImage keep key/values.
    if volume.slice_thickness:
        image.SetMetaData("ITK_FileNotes", f"thinslice slice_thickness={volume.slice_thickness:.6g}")
        image.SetMetaData(_META_PREFIX + "slice_thickness", f"{volume.slice_thickness:.10g}")
    for key, value in volume.metadata.items():
        clean_key = re.sub(r"[^A-Za-z0-9_]", "_", str(key))
        clean_value = " ".join(str(value).split())
        # The DICOM source record (patient and study, instance UIDs) is for DICOM outputs only.
        if clean_key and clean_key not in ("source", SOURCE_KEY) and clean_value:
            image.SetMetaData(_META_PREFIX + clean_key, clean_value)
    # Write into a private temporary folder under the final name (so that detached headers such as .mhd/.nhdr
    # reference the right data file), check it, then move the files into place, header last.
    with contextlib.ExitStack() as stack:
        try:
            tmp_dir = stack.enter_context(make_temp_dir(path.parent))
        except OSError as exc:
            raise ThinsliceError(f"cannot write {path}: {os_reason(exc)} ({path.parent})") from None
        try:
            gzipped = path.name.lower().endswith(".nii.gz") and compresses_itself()  # at disk speed (io.gz)
            first = tmp_dir / (path.name[:-3] if gzipped else path.name)
            try:
                with native_messages_to_log():
                    sitk.WriteImage(image, str(first), useCompression=writes_compressed(path) and not gzipped)
            except RuntimeError as exc:
                raise ThinsliceError(f"cannot write {path}: {str(exc).strip().splitlines()[-1][:200]}") from None
            _verify_written(first, image, path)
            if gzipped:
                compress_file(first, tmp_dir / path.name)
                first.unlink()
            produced = sorted(tmp_dir.iterdir(), key=lambda p: p.name == path.name)
            for item in produced:
                os.replace(item, path.parent / item.name)
        except OSError as exc:
            raise ThinsliceError(f"cannot write {path}: {os_reason(exc)}; the previous file, if any, is unchanged"
                                 ) from None


def _verify_written(tmp: Path, image: sitk.Image, path: Path) -> None:
    """Read the temporary file back and compare it with what was meant to be written.

    ITK's NIfTI writer reports a full disk only on stderr ("NWAD: wrote only 0 of ... bytes") and leaves a truncated
    file, so the write is checked here, before the rename that would replace a good previous output.
    """
    from thinslice.io.readers import _check_nifti_complete

    try:
        if format_for_suffix(file_extension(path)) is NIFTI:
            _check_nifti_complete(tmp)
        with native_messages_to_log():
            written = sitk.ReadImage(str(tmp))  # keep a reference: array views do not keep the image alive
        back, meant = sitk.GetArrayViewFromImage(written), sitk.GetArrayViewFromImage(image)
        same = back.shape == meant.shape and np.array_equal(back, meant, equal_nan=back.dtype.kind == "f")
    except (RuntimeError, ThinsliceError):
        same = False
    if not same and not np.isfinite(sitk.GetArrayViewFromImage(image)).all():
        raise ThinsliceError(f"cannot write {path}: the volume holds non-finite values (NaN or infinity), which do "
                             f"not read back from {file_extension(path)}; the previous file, if any, is unchanged")
    if not same:
        free = shutil.disk_usage(path.parent).free
        raise ThinsliceError(f"cannot write {path}: the written file does not read back ({free / 2**20:.0f} MB free "
                             "on that disk; full?); the previous file, if any, is unchanged")


def write_dicom_folder(volume: Volume, folder: Path, *, dtype: str = "int16", overwrite: bool,
                       options: DicomSeriesOptions) -> None:
    """The DICOM row's writer: a new series in ``folder`` (int16 HU; ``dtype`` is checked by :func:`write_volume`),
    swapped in whole; a non-empty folder is replaced only with ``overwrite``."""
    if folder.exists() and not folder.is_dir():
        raise ThinsliceError(f"{folder} is an existing file; a DICOM output needs a folder path")
    non_empty = folder.is_dir() and any(folder.iterdir())
    if non_empty and not overwrite:
        raise ThinsliceError(f"output folder {folder} is not empty; choose a new folder (or pass overwrite=True in "
                             "Python)")
    try:
        _replace_dicom_folder(volume, folder, non_empty, options)
    except OSError as exc:
        raise ThinsliceError(f"cannot write the DICOM series {folder}: {os_reason(exc)}; the previous series, "
                             "if any, is unchanged") from None


def _replace_dicom_folder(volume: Volume, folder: Path, non_empty: bool, options: DicomSeriesOptions) -> None:
    """Write the series into a temporary folder, then swap it in (the old series is restored if the swap fails)."""
    with make_temp_dir(folder.parent) as tmp_dir:
        _swap_dicom_folder(volume, folder, tmp_dir, non_empty, options)


def _swap_dicom_folder(volume: Volume, folder: Path, tmp_dir: Path, non_empty: bool,
                       options: DicomSeriesOptions) -> None:
    old_dir: Path | None = None
    swapped = False
    try:
        write_dicom_series(volume, tmp_dir, options)
        if non_empty:
            old_dir = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old_dir / folder.name)
        elif folder.is_dir():
            folder.rmdir()
        os.replace(tmp_dir, folder)
        swapped = True
        os.chmod(folder, 0o777 & ~current_umask())  # mkdtemp made it private (0700)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if old_dir is not None:
            if not swapped and not folder.exists():  # the new series never arrived: put the old one back
                os.replace(old_dir / folder.name, folder)
            shutil.rmtree(old_dir, ignore_errors=True)

