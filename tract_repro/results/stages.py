"""What the DVC stage writers share: the launcher's command, gin bindings as quoted arguments, a gin file's
includes as dependencies, and the index of what each table row evaluates."""
from pathlib import Path

from tract_repro.results.experiments import EVALUATIONS  # noqa: F401  (re-exported for the stage writers)

LAUNCH = "python -m tract_repro.launch"


def quote(binding):
    return '"' + binding.replace('"', '\\"') + '"'


def gin_deps(gin_file, root="gin"):
    """A gin file and, recursively, the files it includes (include paths are relative to gin/)."""
    found, todo = [], [gin_file]
    while todo:
        current = todo.pop(0)
        if current in found or not Path(current).is_file():
            continue
        found.append(current)
        for line in Path(current).read_text().splitlines():
            if line.strip().startswith("include "):
                todo.append(f"{root}/{line.split(None, 1)[1].strip().strip(chr(39)).strip(chr(34))}")
    return found


def w_key(w):
    """Sort key of a guidance weight; None (no guidance) first."""
    return -1.0 if w is None else w


def index(evaluations):
    """{table: {row: evaluation}}: what each row evaluates, as the table stages read it from EVALUATIONS."""
    rows = {}
    for e in evaluations:
        rows.setdefault(e["table"], {})[e["row"]] = {k: v for k, v in e.items() if k not in ("table", "row")}
    return rows
