"""The project's exceptions: one base, whose message is the one line a command prints.

Every fault a user can fix (a bad binding, a missing file, a refused job) is raised as a
:class:`TractError` whose message is one line that names the fix.  The command-line boundary
(:func:`tract_repro.common.cli.command`) prints it as ``error: <message>`` and exits with the
error's ``exit_status``; any other exception is a bug and keeps its traceback.
"""


class TractError(Exception):
    """A fault the user can fix: its message is one line that names the fix (exit status 2)."""

    exit_status = 2


class ConfigError(TractError, ValueError):
    """A configuration, a command-line argument or an input file is wrong: nothing was done or written."""


class JobFailed(TractError, RuntimeError):
    """A job ran and failed (a diverged loss, a failed submitted job): exit status 1."""

    exit_status = 1


class TractWarning(UserWarning):
    """Something a user should know that does not stop the command: printed as one line, ``warning: <message>``."""


class GuidanceRangeWarning(TractWarning):
    """A w-conditioned student is sampled at a guidance weight outside the range it was trained on (one line)."""


def one_line(exc):
    """The first non-empty line of an exception's message (its type's name if it has none)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
