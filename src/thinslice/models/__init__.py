"""Networks (VAE, latent UNet, IRControlNet, CNN baseline, planes), configured by dataclasses; one row each in the
network kinds table (models.kinds), built through it in models.factory."""
