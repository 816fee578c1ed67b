"""Import a teacher checkpoint as a finished run directory (ema.pt, config.gin, run.json).

    python -m tract_repro.import_teacher gin/cifar10_teacher.gin --workdir runs/cifar10_teacher

The gin file describes the teacher's network and process and names the checkpoint in
``import_teacher.weights`` (a Google PD Flax file, an NVIDIA EDM pickle or a .pt state dict).
The run directory is then evaluated like any trained run.  Errors print one line (exit 2).

An import never touches an existing run: it is built in a new folder beside the target and renamed
into place when complete, into a ``--workdir`` that does not exist yet (or is empty).  A failed
import leaves nothing behind.
"""
import argparse
from pathlib import Path

from tract_repro import config
from tract_repro.common.cli import command
from tract_repro.common.errors import ConfigError
from tract_repro.common.files import atomic_folder, write_text
from tract_repro.config.runs import rebuild
from tract_repro.training.teacher import import_teacher


@command
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tract_repro.import_teacher",
                                     description="Import the teacher checkpoint named by import_teacher.weights "
                                                 "into a finished run directory.")
    parser.add_argument("files", nargs="+", metavar="FILE.gin")
    parser.add_argument("--gin", action="append", default=[], metavar="'name = value'")
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    text = config.parse(args.files, args.gin)
    saved = workdir / "config.gin"
    if saved.is_file() and (workdir / "ema.pt").is_file() and saved.read_text() == text:
        print(f"{workdir} already holds this import; nothing to do")
        return 0
    if config.query("import_teacher.weights") is None:
        raise ConfigError("bind import_teacher.weights to the checkpoint to import, e.g. --gin "
                          "\"import_teacher.weights = 'ckpts/cifar_original'\"")
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise ConfigError(f"{workdir} already holds files (a run or another import): import into a new --workdir")
    run = rebuild(text, workdir, with_data=False)  # the network and grid the saved config.gin will rebuild
    denoiser = run.denoiser
    process = dict(T=run.options.T, parameterisation=run.options.parameterisation,
                   noise_schedule=type(run.grid.schedule).__name__)
    try:
        with atomic_folder(workdir) as staging:  # a folder with config.gin and ema.pt is a finished import
            import_teacher(staging, denoiser, process)
            write_text(staging / "config.gin", text)
    except FileExistsError:
        raise ConfigError(f"{workdir} was written to meanwhile: import into a new --workdir") from None
    print(f"imported {config.query('import_teacher.weights')} → {workdir}")
    return 0


if __name__ == "__main__":
    from tract_repro.launching.process import exit_now

    exit_now(main())
