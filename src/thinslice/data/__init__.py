"""Synthetic phantoms and training-pair sampling."""
