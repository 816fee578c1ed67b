"""Datasets as in-memory image tensors in [−1, 1] with labels, and a deterministic data order."""
