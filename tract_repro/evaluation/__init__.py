"""Evaluation of runs: sampling with per-sample seeds, digits-FD, FID and teacher fidelity (method-spec §8)."""
