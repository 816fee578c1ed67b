"""Warm-started stage processes: ``python -m tract_repro.warm [--] CMD [ARG ...]``.

Runs CMD (e.g. ``dvc repro digits_table1``) beside a server that has imported torch and the
libraries every entry point needs once; each ``python -m tract_repro.X`` inside CMD is forked from
it instead of spending seconds on imports (:mod:`tract_repro.launching.warm`).
"""
if __name__ == "__main__":
    from tract_repro.launching import warm
    from tract_repro.launching.process import exit_now

    exit_now(warm.main())
