"""Networks (VAE, latent UNet, IRControlNet, CNN baseline), configured by dataclasses; built in models.factory."""
