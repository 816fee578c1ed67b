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


VALUE_FIX = ("give a number, a 'quoted string', a list, tuple or dict of those, @configurable, @configurable() "
             "or %MACRO")
BINDING_FIX = "a binding is 'configurable.parameter = value' or 'MACRO = value'"

SYNTAX_FIXES = {  # gin's parser message → what to do
    "Couldn't parse statement, expected ':' or '='.": f"not a binding: {BINDING_FIX}",
    "Expected newline.": "unexpected text after the value: give one binding per --gin or per line, and quote strings",
    "Malformatted scope or selector.": "malformed name: write scope/configurable.parameter, without spaces",
    "Invalid identifier name.": "invalid name: use letters, digits and underscores",
    "Expected file path as string.": "write include 'path/to/file.gin', the path in quotes",
}


def describe(exc, bindings=(), files=()):
    """gin's multi-line error → one line that names where and what to do: 'FILE:LINE: message; fix', or
    "--gin 'BINDING': message; fix"."""
    text = str(exc).strip()
    lines = text.splitlines() or [type(exc).__name__]
    message = lines[0].strip()
    if isinstance(exc, tokenize.TokenError):
        return f"{_find_unbalanced(files, bindings)}: unbalanced brackets or quotes: close every bracket and quote"
    if isinstance(exc, SyntaxError):
        return f"{_syntax_location(exc, bindings)}: {_syntax_message(exc, lines)}"
    undefined = re.match(r"No bindings specified for '(.+)/gin\.macro'", message)
    if undefined:
        return _undefined_macro(undefined.group(1), text, bindings, files)
    where = None
    found = re.search(r'In file "([^"]*)", line (\d+)', text)
    if found:
        where = f"{found.group(1)}:{found.group(2)}"
    found = re.search(r"In bindings string line (\d+)", text)
    if where is None and found:
        where = _binding_at(int(found.group(1)), bindings)
    fix = _fix(exc, message, lines)
    message = f"{message.rstrip('.')}: {fix}" if fix else message
    return f"{where}: {message}" if where else message


def _binding_at(line, bindings):
    """The --gin binding on ``line`` (1-based) of the bindings gin parses (joined with newlines), if any."""
    for b in bindings:
        count = b.count("\n") + 1
        if line <= count:
            return f"--gin {b!r}"
        line -= count
    return None


def _syntax_location(exc, bindings):
    """'FILE:LINE', "--gin 'BINDING'" or 'line N' (a config text) of a gin syntax error."""
    if exc.filename and exc.filename != "<unknown>":
        return f"{exc.filename}:{exc.lineno}"
    return (_binding_at(exc.lineno, bindings) if exc.lineno else None) or f"config line {exc.lineno}"


def _syntax_message(exc, lines):
    """gin's syntax error with what to do instead."""
    message = re.sub(r"\s*\([^()]*line \d+\)$", "", lines[-1].strip()) or lines[0].strip()
    line, offset = exc.text or "", max(int(exc.offset or 0), 0)
    value = line.split("=", 1)[1].strip() if "=" in line else ""
    if message.startswith("Failed to parse token") or message == "Unable to parse value." or (
            message == "Unexpected token." and line[:offset].strip()):  # in the value: e.g. '@@', ')'
        return f"cannot parse the value {value!r}: {VALUE_FIX}" if value else f"cannot parse the value: {VALUE_FIX}"
    if message == "Unexpected token.":  # where a name should start the statement
        start = line.strip()
        if start.startswith("%"):  # a macro used as a statement
            name = re.match(r"%([\w/.]*)", start).group(1) or "NAME"
            return (f"not a binding: define the macro with '{name} = ...' (--gin '{name} = ...' or a gin file line), "
                    f"then use it in a value as %{name}")
        return f"not a binding: {BINDING_FIX}"
    if message.startswith(("Expected ',' or", "Expected ':'", "Expected ')'")):
        expected = message.split("  Got")[0].strip().rstrip(".")
        return f"cannot parse the value {value!r} ({expected}): check its brackets and commas"
    return SYNTAX_FIXES.get(message, f"{message} ({BINDING_FIX})")


def _undefined_macro(name, text, bindings, files):
    """One line for a macro used (%NAME) but never defined, naming the binding that uses it."""
    use = re.compile(rf"%{re.escape(name)}(?![\w/.])")
    where = None
    for b in bindings:
        if use.search(b):
            where = f"--gin {b!r}"
            break
    for path in ([] if where else _with_includes(files)):
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if use.search(line.split("#", 1)[0]):
                where = f"{path}:{number}"
                break
        if where:
            break
    if where is None:  # a config text: the binding as gin prints it
        binding = None
        for line in text.splitlines()[1:]:
            if line and not line[0].isspace() and not line.startswith("#") and "=" in line:
                binding = line.strip()
            if use.search(line) and binding:
                where = binding
                break
    return (f"{where + ': ' if where else ''}undefined macro %{name}: define it with --gin '{name} = ...' "
            f"or a line '{name} = ...' in a gin file")


def _with_includes(files):
    """The gin files given and, recursively, the files they include (as far as they can be found)."""
    seen, queue = [], [Path(f) for f in files]
    while queue:
        path = queue.pop(0)
        if path in seen or not path.is_file():
            continue
        seen.append(path)
        for found in re.finditer(r"^\s*include\s+['\"]([^'\"]+)['\"]", path.read_text(errors="replace"), re.M):
            name = found.group(1)
            queue.extend([c for c in (path.parent / name, GIN_ROOT / name, Path.cwd() / "gin" / name, Path(name))
                          if c.is_file()][:1])
    return seen


def _fix(exc, message, lines):
    """What to do about a gin error other than a syntax error (None: the message says it)."""
    import difflib

    found = re.match(r"No configurable matching '(.+)'\.$", message)
    if found:
        binding = lines[-1].strip() if len(lines) > 2 else ""
        macro = re.match(r"([\w/.]+?)/gin\.macro\s*=", binding)
        if macro:
            return f"to define a macro write '{macro.group(1)} = ...' (without /gin.macro)"
        close = difflib.get_close_matches(found.group(1).split(".")[0], _configurables(), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"{hint}check the configurable's name ({BINDING_FIX})"
    found = re.match(r"No configurable matching reference '@([\w/.]+?)(\(\))?'\.", message)
    if found:
        close = difflib.get_close_matches(found.group(1).split("/")[-1], _configurables(), n=1)
        return (f"did you mean @{close[0]}? " if close else "") + "check the name after @ (a registered configurable)"
    found = re.match(r"Configurable '(.+)' doesn't have a parameter named '(.+)'\.$", message)
    if found:
        close = difflib.get_close_matches(found.group(2), _parameters(found.group(1)), n=1)
        return f"did you mean '{found.group(1)}.{close[0]}'?" if close else "check the parameter's name"
    if isinstance(exc, ImportError):
        return "install the module or remove the import"
    return None


def _configurables():
    """The names of every registered configurable (for 'did you mean')."""
    return sorted({selector.split(".")[-1] for selector, _ in gin.config._REGISTRY.items()})


def _parameters(name):
    """The parameter names of configurable ``name`` (empty if unknown)."""
    import inspect

    try:
        return list(inspect.signature(gin.config._REGISTRY.get_match(name).wrapped).parameters)
    except (TypeError, ValueError, AttributeError):
        return []


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
    except (ValueError, SyntaxError, KeyError, OSError, TypeError, AttributeError, ImportError,
            tokenize.TokenError) as exc:
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
