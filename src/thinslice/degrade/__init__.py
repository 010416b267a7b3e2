"""Thick-slice simulation by slice profiles (box, Gaussian, decimation)."""
