"""Samplers with one signature, sample(D, x, λs, alpha_sigma, labels), and image grids."""
