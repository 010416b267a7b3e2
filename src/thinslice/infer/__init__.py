"""Upsampling a thick volume to thin slices: interpolation, CNN, latent diffusion."""
