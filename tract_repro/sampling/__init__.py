"""Samplers with one signature, sample(D, x, λs, alpha_sigma, labels), their registry, teacher steps and image grids."""
