"""Samplers with one signature, sample(D, x, λs, alpha_sigma, cond), their registry, teacher steps and image grids."""
