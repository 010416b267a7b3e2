"""The one in-memory CT type: HU array plus patient geometry (ITK/LPS conventions)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from thinslice.errors import ThinsliceError

# An axis counts as the thick (slice) axis only when its spacing exceeds every other axis by this fraction; below it
# (e.g. 0.625 mm slices with 0.7 x 0.8 mm pixels) the head-feet axis is taken, as CT is stacked axially.
ISO_TOL = 0.2


@dataclass
class Volume:
    """A 3D CT volume in Hounsfield units.

    Conventions follow SimpleITK so that geometry survives every file format unchanged:
    - ``array`` is float32 with numpy shape ``(nk, nj, ni)`` (index axis i is the *last* numpy axis);
    - ``spacing``/``origin`` are in index order (i, j, k), millimetres, LPS patient coordinates;
    - ``direction`` is 3x3 whose *columns* are the patient-space directions of index axes i, j, k.
    The slice (through-plane) axis is derived from the geometry (:attr:`slice_axis`), never assumed.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    slice_thickness: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # Set on volumes derived from another one (``with_slices``/``with_array``) so that a thin result, which may be
    # near-isotropic, keeps the slice axis of its thick input instead of re-deriving it from its own spacing.
    stack_axis: int | None = None

    def __post_init__(self) -> None:
        arr = np.asarray(self.array)
        if arr.ndim != 3:
            raise ThinsliceError(
                f"expected a 3D volume, got an array of shape {arr.shape}; pass a CT volume or DICOM series, "
                "not a single 2D image"
            )
        if min(arr.shape) < 1:
            raise ThinsliceError(f"volume has an empty axis (shape {arr.shape})")
        self.array = arr.astype(np.float32, copy=False)
        spacing = [float(s) for s in self.spacing]
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise ThinsliceError(
                f"volume has no valid voxel spacing ({self.spacing}); the file lacks spacing information: "
                "write it with spacing in mm (e.g. fix the NIfTI header pixdim)"
            )
        self.spacing = (spacing[0], spacing[1], spacing[2])
        ox, oy, oz = (float(o) for o in self.origin)
        self.origin = (ox, oy, oz)
        direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
            raise ThinsliceError("volume direction matrix is degenerate; the file's orientation is corrupt")
        self.direction = direction
        if self.stack_axis is not None and self.stack_axis not in (0, 1, 2):
            raise ThinsliceError(f"slice axis must be 0, 1 or 2, got {self.stack_axis}")

    # ----------------------------------------------------------------------------------------------- geometry
    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        """Size along index axes (i, j, k)."""
        k, j, i = self.array.shape
        return int(i), int(j), int(k)

    @property
    def slice_axis(self) -> int:
        """Index axis (0=i, 1=j, 2=k) that runs through the slices.

        The axis with the clearly largest spacing (>20% above the others) when the volume is anisotropic (thick
        slices, in any orientation); otherwise the axis closest to the patient's head-feet direction. A volume
        derived from another one keeps that one's slice axis.
        """
        if self.stack_axis is not None:
            return self.stack_axis
        sp = np.asarray(self.spacing)
        largest = int(np.argmax(sp))
        others = np.delete(sp, largest)
        if sp[largest] > others.max() * (1 + ISO_TOL):
            return largest
        return int(np.argmax(np.abs(self.direction[2, :])))

    @property
    def slice_spacing(self) -> float:
        return float(self.spacing[self.slice_axis])

    @property
    def num_slices(self) -> int:
        return self.shape_ijk[self.slice_axis]

    def numpy_axis(self, index_axis: int) -> int:
        """Numpy axis of the array that holds index axis ``index_axis``."""
        return 2 - index_axis

    def slices_first(self) -> np.ndarray:
        """View of the array with the slice axis moved to numpy axis 0: shape (n_slices, a, b)."""
        return np.moveaxis(self.array, self.numpy_axis(self.slice_axis), 0)

    def with_slices(
        self,
        slices_first: np.ndarray,
        slice_spacing: float,
        first_slice_offset_mm: float,
        slice_thickness: float | None = None,
    ) -> Volume:
        """A new volume on a new grid along the slice axis, same in-plane grid and orientation.

        ``first_slice_offset_mm`` is the position of the new first slice centre relative to the current first
        slice centre, measured along the slice axis direction.
        """
        axis = self.slice_axis
        array = np.moveaxis(np.asarray(slices_first, dtype=np.float32), 0, self.numpy_axis(axis))
        spacing = list(self.spacing)
        spacing[axis] = float(slice_spacing)
        origin = np.asarray(self.origin) + self.direction[:, axis] * float(first_slice_offset_mm)
        return Volume(
            array=np.ascontiguousarray(array),
            spacing=(spacing[0], spacing[1], spacing[2]),
            origin=(float(origin[0]), float(origin[1]), float(origin[2])),
            direction=self.direction.copy(),
            slice_thickness=slice_thickness,
            metadata=dict(self.metadata),
            stack_axis=axis,
        )

    def with_array(self, array: np.ndarray) -> Volume:
        """Same geometry, new voxel values (e.g. a model output on the same grid)."""
        if tuple(array.shape) != tuple(self.array.shape):
            raise ThinsliceError(f"array shape {array.shape} does not match volume shape {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy(), self.slice_thickness,
                      dict(self.metadata), stack_axis=self.slice_axis)

    def slice_positions_mm(self) -> np.ndarray:
        """Signed position of each slice centre along the slice direction, relative to the origin's projection."""
        axis = self.slice_axis
        d = self.direction[:, axis]
        start = float(np.dot(np.asarray(self.origin), d))
        return start + np.arange(self.num_slices) * self.slice_spacing

    def grid_differences(self, other: Volume, atol_mm: float = 1e-3) -> list[str]:
        """Human-readable list of how two voxel grids differ (empty when they are the same grid)."""
        diffs: list[str] = []
        if self.shape_ijk != other.shape_ijk:
            diffs.append(f"shape (i,j,k) {self.shape_ijk} vs {other.shape_ijk}")
        if not np.allclose(self.spacing, other.spacing, atol=1e-4, rtol=1e-5):
            diffs.append(f"spacing {_fmt(self.spacing)} vs {_fmt(other.spacing)} mm")
        if not np.allclose(self.origin, other.origin, atol=atol_mm):
            diffs.append(f"origin {_fmt(self.origin)} vs {_fmt(other.origin)} mm")
        if not np.allclose(self.direction, other.direction, atol=1e-4):
            diffs.append("direction (orientation) differs")
        return diffs

    def __repr__(self) -> str:
        return (f"Volume(shape_ijk={self.shape_ijk}, spacing={_fmt(self.spacing)}, origin={_fmt(self.origin)}, "
                f"slice_axis={self.slice_axis}, HU [{self.array.min():.0f}, {self.array.max():.0f}])")


def _fmt(values: tuple[float, ...] | np.ndarray) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"
