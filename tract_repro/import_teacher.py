"""Import a teacher checkpoint into a finished run directory (ema.pt, config.gin, run.json).

    python -m tract_repro.import_teacher gin/cifar10_teacher.gin --workdir runs/cifar10_teacher

The gin file describes the teacher's network and process and names the checkpoint in
``import_teacher.weights`` (a Google PD Flax file, an NVIDIA EDM pickle or a .pt state dict).
The run directory is then evaluated like any trained run.  Errors print one line (exit 2).
"""
import argparse
import os
import sys
from pathlib import Path

from tract_repro import config
from tract_repro.training.teacher import import_teacher


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tract_repro.import_teacher",
                                     description="Import the teacher checkpoint named by import_teacher.weights "
                                                 "into a finished run directory.")
    parser.add_argument("files", nargs="+", metavar="FILE.gin")
    parser.add_argument("--gin", action="append", default=[], metavar="'name = value'")
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    try:
        text = config.parse(args.files, args.gin)
        saved = workdir / "config.gin"
        if saved.is_file() and (workdir / "ema.pt").is_file() and saved.read_text() == text:
            print(f"{workdir} already holds this import; nothing to do")
            return 0
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "ema.pt").unlink(missing_ok=True)
        import_teacher(workdir)
        saved.write_text(text)  # last: a directory with config.gin and ema.pt is a finished import
    except ValueError as exc:
        if os.environ.get("TRACT_TRACEBACK"):
            raise
        print(f"error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"imported {config.query('import_teacher.weights')} → {workdir}")
    return 0


if __name__ == "__main__":
    from tract_repro.process import exit_now

    exit_now(main())
