"""An allow-list unpickler for pickled dicts of numpy arrays (CIFAR-10's "python version" batches).

``pickle.load`` runs whatever callable a file names; this unpickler resolves only the globals in
``ALLOWED`` (the numpy array reconstruction) and refuses every other one before anything runs.
"""
import importlib
import pickle

from tract_repro.common.errors import ConfigError

#: (module, name) pairs a CIFAR-10 batch needs; numpy 1 writes ``numpy.core``, numpy 2 ``numpy._core``.
ALLOWED = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # protocol ≤ 2 writes Python 3 bytes as _codecs.encode(text, 'latin1')
})


class UnsafePickleError(ConfigError):
    """A pickle names a global outside the allow-list."""


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """``_codecs.encode`` restricted to the latin-1 round trip that protocol-2 bytes use."""
    if encoding.replace("_", "-").lower() not in ("latin1", "latin-1", "iso-8859-1"):
        raise UnsafePickleError(f"refusing _codecs.encode with codec {encoding!r}: only latin-1 is allowed")
    return text.encode("latin-1", errors)


def _resolve(module, name):
    import numpy as np

    if name == "_reconstruct":  # either spelling → the installed numpy's function, no deprecated import
        try:
            multiarray = importlib.import_module("numpy._core.multiarray")
        except ImportError:  # numpy < 1.26
            multiarray = importlib.import_module("numpy.core.multiarray")
        return multiarray._reconstruct
    if (module, name) == ("_codecs", "encode"):
        return _latin1_encode
    return getattr(np, name)


class SafeUnpickler(pickle.Unpickler):
    """``find_class`` returns only allowed globals; anything else raises ``UnsafePickleError``."""

    def __init__(self, file, *, path="<stream>", allowed=ALLOWED, **kwargs):
        super().__init__(file, **kwargs)
        self.path, self.allowed = path, frozenset(allowed)

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise UnsafePickleError(f"refusing to unpickle {module}.{name} from {self.path}: "
                                    "only numpy arrays, dicts and lists are allowed")
        if (module, name) in ALLOWED:
            return _resolve(module, name)
        return super().find_class(module, name)  # a caller-widened allow-list

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing a persistent id in {self.path}: only plain pickles are allowed")


def load(path, allowed=ALLOWED, encoding="latin1"):
    """Unpickle ``path`` through the allow-list (``latin1`` decodes Python 2 strings, as torchvision does)."""
    with open(path, "rb") as f:
        return SafeUnpickler(f, path=str(path), allowed=allowed, encoding=encoding).load()
