"""How jobs run: forked seeds, submitit local and SLURM executors (checkpoint and requeue), warm starts, process exit."""
