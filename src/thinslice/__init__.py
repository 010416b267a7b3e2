"""thinslice: thick-slice to thin-slice CT with a 3D latent diffusion model.

Data flows one way: volume (io) -> thick-slice simulation (degrade) -> latents (models.vae)
-> diffusion (diffusion, models.unet, models.control) -> volume (infer), scored by evaluate.
"""

from typing import TYPE_CHECKING, Any

from thinslice.errors import ThinsliceError
from thinslice.io.volume import Volume
from thinslice.version import __version__

if TYPE_CHECKING:
    from thinslice.infer.upsample import Upsampler
    from thinslice.io import read_volume, write_volume

__all__ = ["ThinsliceError", "Upsampler", "Volume", "__version__", "read_volume", "write_volume"]


def __getattr__(name: str) -> Any:
    """``thinslice.Upsampler``, ``read_volume`` and ``write_volume`` on first use: importing the package (as
    ``thinslice --help`` does) stays free of the readers' and methods' imports."""
    if name == "Upsampler":
        from thinslice.infer.upsample import Upsampler

        return Upsampler
    if name in ("read_volume", "write_volume"):
        import thinslice.io as io

        return getattr(io, name)
    raise AttributeError(f"module 'thinslice' has no attribute {name!r}")
