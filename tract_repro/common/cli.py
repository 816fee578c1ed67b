"""The one error boundary of every command: ``main = command(main)``.

A :class:`~tract_repro.common.errors.TractError` is printed as one line, ``error: <message>``,
on stderr, and ``main`` returns the error's exit status (2 for bad input, 1 for a failed job).
Anything else propagates with its traceback (the interpreter exits with status 1).
``TRACT_TRACEBACK=1`` in the environment lets project errors propagate too, traceback included.
"""
import functools
import os
import sys

from tract_repro.common.errors import TractError, one_line


def command(main):
    """Wrap a command's ``main(argv=None) -> int`` in the error boundary."""
    @functools.wraps(main)
    def bounded(argv=None):
        try:
            return main(argv)
        except TractError as exc:
            if os.environ.get("TRACT_TRACEBACK"):
                raise
            print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
            return exc.exit_status
    return bounded
