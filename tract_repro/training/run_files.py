"""The small text files of a run directory: run.json and metrics.jsonl."""
import json
import os
from pathlib import Path


def write_json(path, obj):
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class MetricsLog:
    """Means of per-step metrics over each logging interval, appended as JSON lines."""

    def __init__(self, path):
        self.path = Path(path)
        self.sums, self.count, self.last_samples_flushed = {}, 0, 0

    def add(self, **values):
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def flush(self, **extra):
        record = dict(extra)
        record.update({k: v / self.count for k, v in self.sums.items()} if self.count else {})
        self.sums, self.count = {}, 0
        return record

    def write(self, record):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.last_samples_flushed = record["samples"]

    def truncate(self, samples):
        """On resume: keep only records up to the checkpoint's sample count."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["samples"] <= samples]
        write_json_lines(self.path, kept)
        self.last_samples_flushed = json.loads(kept[-1])["samples"] if kept else 0


def write_json_lines(path, lines):
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)
