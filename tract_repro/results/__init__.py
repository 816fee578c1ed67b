"""Turning runs into the paper's tables: experiment definitions, the DVC pipeline, results/*.md."""
