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
        python_formats = warnings.formatwarning

        def one_line_warning(message, category, filename, lineno, line=None):
            if issubclass(category, TractWarning):
                return f"warning: {one_line(message)}\n"
            return python_formats(message, category, filename, lineno, line)
        warnings.formatwarning = one_line_warning  # how Python's printer writes a warning; records are unaffected
        try:
            return main(argv)
        except TractError as exc:
            if os.environ.get("TRACT_TRACEBACK"):
                raise
            print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
            return exc.exit_status
        finally:
            warnings.formatwarning = python_formats
    return bounded
