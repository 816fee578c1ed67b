"""The one error boundary of every command: ``main = command(main)``.

A :class:`~tract_repro.common.errors.TractError` is printed as one line, ``error: <message>``,
on stderr, and ``main`` returns the error's exit status (2 for bad input, 1 for a failed job).
Anything else propagates with its traceback (the interpreter exits with status 1).
``TRACT_TRACEBACK=1`` in the environment lets project errors propagate too, traceback included.
A :class:`~tract_repro.common.errors.TractWarning` is printed as one line too, ``warning: <message>``
(other warnings as Python prints them).
"""
import functools
import os
import sys
import warnings

from tract_repro.common.errors import TractError, TractWarning, one_line


def command(main):
    """Wrap a command's ``main(argv=None) -> int`` in the error boundary."""
    @functools.wraps(main)
    def bounded(argv=None):
        try:
            with warnings.catch_warnings():  # restores Python's own printer on the way out
                python_prints = warnings.showwarning

                def show(message, category, filename, lineno, file=None, line=None):
                    if issubclass(category, TractWarning):
                        print(f"warning: {one_line(message)}", file=sys.stderr if file is None else file, flush=True)
                    else:
                        python_prints(message, category, filename, lineno, file, line)
                warnings.showwarning = show
                return main(argv)
        except TractError as exc:
            if os.environ.get("TRACT_TRACEBACK"):
                raise
            print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
            return exc.exit_status
    return bounded
