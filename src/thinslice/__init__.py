"""thinslice: thick-slice to thin-slice CT with a 3D latent diffusion model.

Data flows one way: volume (io) -> thick-slice simulation (degrade) -> latents (models.vae)
-> diffusion (diffusion, models.unet, models.control) -> volume (infer), scored by evaluate.
"""

from thinslice.errors import ThinsliceError
from thinslice.io.volume import Volume

__version__ = "0.1.0"
__all__ = ["ThinsliceError", "Volume", "__version__"]
