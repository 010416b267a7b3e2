"""Residual-shifting (ResShift) diffusion in latent space, DDIM as a comparison option."""
