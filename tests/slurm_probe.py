"""Runs inside SLURM jobs of tests/test_slurm.py; imports nothing heavy, so each task starts fast."""
import json
import os
from pathlib import Path


def record_distributed_env(folder):
    """Write what torch.distributed's env:// initialisation would read, one file per rank."""
    names = ["MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"]
    values = {name: os.environ.get(name) for name in names}
    (Path(folder) / f"rank{values['RANK']}.json").write_text(json.dumps(values))
    return values
