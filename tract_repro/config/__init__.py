"""Configuration: gin files and bindings parsed into the configurables of every layer below.

:func:`parse` reads files and bindings (or a saved config text) with one-line errors that name
the file and line; :func:`query` and :func:`build` read what was bound.  The catalogue of
configurables is :mod:`tract_repro.config.catalogue`; what a job asks of its executor
(``slurm.*``, ``local_executor.*``) is declared in :mod:`tract_repro.config.executors`.
"""
import importlib.util  # noqa: F401  (gin 0.5's include path uses importlib.util without importing it)
import io
import logging
import re
import tokenize
from pathlib import Path

import gin

from tract_repro.common.errors import ConfigError
from tract_repro.config import catalogue  # noqa: F401  (registers every configurable, so any gin file can bind it)

GIN_ROOT = Path(__file__).resolve().parents[2] / "gin"


class _QuietSearch(logging.Filter):
    """gin logs 'Path not found' for every include candidate it tries; the real error is raised anyway."""

    def filter(self, record):
        return not record.getMessage().startswith("Path not found")


def describe(exc, bindings=(), files=()):
    """gin's multi-line error → one line: 'FILE:LINE: message', or "--gin 'BINDING': message"."""
    text = str(exc).strip()
    lines = text.splitlines() or [type(exc).__name__]
    message = lines[0].strip()
    if isinstance(exc, SyntaxError):
        message = re.sub(r"\s*\([^()]*line \d+\)$", "", lines[-1].strip()) or message
        if exc.filename and exc.filename != "<unknown>":
            return f"{exc.filename}:{exc.lineno}: {message}"
    if isinstance(exc, tokenize.TokenError):
        return f"{_find_unbalanced(files, bindings)}: unbalanced brackets or quotes"
    found = re.search(r'In file "([^"]*)", line (\d+)', text)
    if found:
        return f"{found.group(1)}:{found.group(2)}: {message}"
    found = re.search(r"In bindings string line (\d+)", text)
    if found and 0 < int(found.group(1)) <= len(bindings):
        return f"--gin {bindings[int(found.group(1)) - 1]!r}: {message}"
    return message


def _find_unbalanced(files, bindings):
    """Which gin file (and line) or binding fails to tokenize."""
    sources = [(str(f), Path(f).read_text()) for f in files] + [(f"--gin {b!r}", b) for b in bindings]
    for name, source in sources:
        try:
            list(tokenize.generate_tokens(io.StringIO(source).readline))
        except tokenize.TokenError as exc:
            return name if name.startswith("--gin") else f"{name}:{exc.args[1][0] - 1}"
    return "a gin file"


def parse(files=(), bindings=(), text=None):
    """Clear gin, then parse config ``text`` or ``files`` plus ``bindings``; raise ConfigError in one line."""
    gin.clear_config()
    for f in files:
        if not Path(f).is_file():
            raise ConfigError(f"gin file {f} not found: give a path like gin/digits_teacher.gin")
    search = [str(Path(f).resolve().parent) for f in files] + [str(GIN_ROOT), str(Path.cwd() / "gin")]
    for path in dict.fromkeys(search):
        if Path(path).is_dir():
            gin.add_config_file_search_path(path)
    quiet = _QuietSearch()
    logging.getLogger().addFilter(quiet)
    try:
        if text is not None:
            gin.parse_config(text)
        else:
            gin.parse_config_files_and_bindings(list(files), list(bindings))
    except (ValueError, SyntaxError, KeyError, OSError, TypeError, AttributeError, tokenize.TokenError) as exc:
        raise ConfigError(describe(exc, list(bindings), list(files))) from None
    finally:
        logging.getLogger().removeFilter(quiet)
    return gin.config_str()


def query(key, default=None):
    """The value bound to ``key`` (e.g. 'train.teacher'), following macros; ``default`` if unbound."""
    try:
        value = gin.query_parameter(key)
    except ValueError:
        return default
    while isinstance(value, gin.config.ConfigurableReference) and value.selector == "gin.macro":
        value = gin.query_parameter(f"{value.scoped_selector.split('/')[0]}/gin.macro.value")
    return value


def build(key, default=None):
    """Call the configurable bound to ``key`` (``@name`` or ``@name()``) with its bindings; ``default`` if unbound."""
    value = query(key)
    if value is None:
        return default() if callable(default) else default
    if isinstance(value, gin.config.ConfigurableReference):
        return value.scoped_configurable_fn()
    return value
