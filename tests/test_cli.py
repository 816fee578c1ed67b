"""The one error boundary of every command: a project error is one line and exit 2 (1 for a failed job);
anything else keeps its traceback; TRACT_TRACEBACK=1 shows the traceback of project errors too."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tract_repro.common.cli import command
from tract_repro.common.errors import ConfigError, GuidanceRangeWarning, JobFailed, TractError

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["tract_repro.launch", "tract_repro.evaluate", "tract_repro.import_teacher", "tract_repro.evaluation.fid",
            "tract_repro.evaluation.classifier", "tract_repro.results.tables", "tract_repro.results.pipeline",
            "tract_repro.results.check", "tract_repro.results.run_stages"]


@pytest.mark.parametrize("module", COMMANDS)
def test_every_command_runs_inside_the_boundary(module):
    main = importlib.import_module(module).main
    assert getattr(main, "__wrapped__", None) is not None and main.__code__ is command(lambda argv: 0).__code__


@pytest.mark.parametrize("error, status", [(ConfigError("bad binding: fix it\nmore detail"), 2),
                                           (JobFailed("job 7 failed: ValueError: x"), 1), (TractError("plain"), 2)])
def test_a_project_error_is_one_line_with_its_status(error, status, capsys, monkeypatch):
    monkeypatch.delenv("TRACT_TRACEBACK", raising=False)

    @command
    def main(argv=None):
        raise error

    assert main([]) == status
    assert capsys.readouterr().err == f"error: {str(error).splitlines()[0]}\n"


def test_any_other_error_keeps_its_traceback(monkeypatch):
    monkeypatch.delenv("TRACT_TRACEBACK", raising=False)

    @command
    def main(argv=None):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        main([])


def test_tract_traceback_shows_project_errors_in_full(monkeypatch):
    monkeypatch.setenv("TRACT_TRACEBACK", "1")

    @command
    def main(argv=None):
        raise ConfigError("bad binding")

    with pytest.raises(ConfigError):
        main([])


@pytest.mark.parametrize("module, args", [("tract_repro.evaluate", ["runs/nowhere"]),
                                          ("tract_repro.launch", ["gin/nowhere.gin"]),
                                          ("tract_repro.results.tables", ["no_such_table"])])
def test_commands_as_a_user_types_them(module, args, tmp_path):
    """One line on stderr and status 2; with TRACT_TRACEBACK=1 the traceback and status 1."""
    run = lambda env: subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,  # noqa: E731
                                     text=True, timeout=120, env=env)
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("TRACT_TRACEBACK", "TRACT_WARM")}
    plain = run(env)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and plain.stderr.startswith("error: "), plain.stderr
    full = run(dict(env, TRACT_TRACEBACK="1"))
    assert full.returncode == 1 and "Traceback (most recent call last)" in full.stderr and "ConfigError" in full.stderr


def test_a_project_warning_is_one_line_and_others_print_as_python_prints_them():
    """Inside a command, Python's printer writes a TractWarning as one line and any other warning as before; the
    formatter is Python's again afterwards, and recorded warnings (pytest.warns, catch_warnings) are untouched."""
    import warnings

    written = {}

    @command
    def main(argv=None):
        for category, text in ((GuidanceRangeWarning, "runs/x was trained on w in [0, 4]: not trained there (w = 7)"),
                               (DeprecationWarning, "a library's own warning")):
            written[category] = warnings.formatwarning(category(text), category, "module.py", 12, "the line")
        warnings.warn(GuidanceRangeWarning("recorded"))
        return 0

    before = warnings.formatwarning
    with pytest.warns(GuidanceRangeWarning, match="recorded"):
        assert main([]) == 0
    assert written[GuidanceRangeWarning] == "warning: runs/x was trained on w in [0, 4]: not trained there (w = 7)\n"
    assert written[DeprecationWarning] == before(DeprecationWarning("a library's own warning"), DeprecationWarning,
                                                 "module.py", 12, "the line")
    assert "\n" in written[DeprecationWarning].rstrip("\n")  # Python's two lines: where, then the source line
    assert warnings.formatwarning is before
