"""Trainers (VAE, diffusion, CNN baseline) on one shared Accelerate-based engine."""
