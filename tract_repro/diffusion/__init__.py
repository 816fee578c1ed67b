"""Diffusion maths as small pure functions, safe in float64 (method-spec §1-2)."""
