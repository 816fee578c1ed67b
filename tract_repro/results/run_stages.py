"""Run a table's training stages from dvc.yaml where DVC is not installed (e.g. a lent GPU machine).

    python -m tract_repro.results.run_stages budget_sweep_gpu --jobs 6 --set digits.parallel=3

Runs the same commands as ``dvc repro`` would (``${digits.*}`` taken from params.yaml, or
``--set``), each stage once its upstream stages have finished, ``--jobs`` stages at a time.
Afterwards, on a machine with DVC, record the evaluations with ``dvc repro -s digits_eval_<tables>``
(e.g. ``digits_eval_budget_sweep_gpu``).
"""
import argparse
import re
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import yaml

from tract_repro.common.errors import ConfigError
from tract_repro.results.experiments import expand, load_run_templates, load_tables
from tract_repro.common.cli import command
from tract_repro.results.pipeline import load_params, load_stages, upstream_stages


def table_stages(table, root=".", params_file="params.yaml"):
    """The run stages (name → stage) that the digits rows of ``table`` need, from the pipeline files."""
    params = yaml.safe_load(Path(params_file).read_text())["digits"]
    tables = load_tables()
    if table not in tables:
        raise ConfigError(f"no experiments/{table}.yaml: choose from {', '.join(tables)}")
    phases, _ = expand({table: tables[table]}, load_run_templates(), params)
    stages = load_stages(root)
    missing = [k for k in phases if f"digits_run_{k}" not in stages]
    if missing:
        raise ConfigError(f"dvc.yaml has no stage for {missing[0]}: regenerate it with `python -m tract_repro.results.pipeline`")
    return {f"digits_run_{k}": stages[f"digits_run_{k}"] for k in phases}


def substitute(cmd, params):
    """Replace ${section.key} by its value from params.yaml."""
    def value(match):
        section, key = match.group(1).split(".", 1)
        return str(params[section][key])
    return re.sub(r"\$\{([\w.]+)\}", value, cmd)


def run(stages, params, jobs):
    upstream, done, failed, running = upstream_stages(stages), set(), [], {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while len(done) + len(failed) < len(stages):
            ready = [n for n in stages if n not in done and n not in running and n not in failed
                     and upstream[n] <= done and not (upstream[n] & set(failed))]
            for name in ready[:max(0, jobs - len(running))]:
                cmds = stages[name]["cmd"] if isinstance(stages[name]["cmd"], list) else [stages[name]["cmd"]]
                running[name] = pool.submit(_run_all, [substitute(c, params) for c in cmds])
                print(f"started {name}", flush=True)
            if not running:
                break  # what is left waits on failed stages
            finished, _ = wait(list(running.values()), return_when=FIRST_COMPLETED)
            for name in [n for n, f in running.items() if f in finished]:
                rc, seconds = running.pop(name).result()
                (done.add if rc == 0 else failed.append)(name)
                print(f"{'finished' if rc == 0 else 'FAILED'} {name} in {seconds:.0f} s", flush=True)
    return done, failed


def _run_all(cmds):
    t0 = time.perf_counter()
    for cmd in cmds:
        rc = subprocess.run(cmd, shell=True).returncode
        if rc:
            return rc, time.perf_counter() - t0
    return 0, time.perf_counter() - t0


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", help="an experiments/<table>.yaml name")
    parser.add_argument("--jobs", type=int, default=1, help="stages at a time")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a param")
    args = parser.parse_args(argv)
    params = load_params()
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if not value or section not in params or not name:
            raise ConfigError(f"--set {item!r}: give SECTION.KEY=VALUE with a section of params.yaml, e.g. digits.budget=16K")
        params[section][name] = value
    stages = table_stages(args.table)
    t0 = time.perf_counter()
    done, failed = run(stages, params, args.jobs)
    print(f"{len(done)}/{len(stages)} stages done in {time.perf_counter() - t0:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if len(done) < len(stages) else 0


if __name__ == "__main__":
    sys.exit(main())
