"""TensorFlow's C++ start-up lines, silenced for command-line runs.

TensorFlow is only the data pipeline's engine (seqio, tfds), yet loading it prints absl log lines
("All log messages before absl::InitializeLog()...", cudart stubs, CPU features) straight to file
descriptor 2, before ``TF_CPP_MIN_LOG_LEVEL`` can reach its logger; they bury the one line a user
needs. :func:`install` makes the process's first ``import tensorflow`` run with descriptor 2 on
/dev/null, and sets ``TF_CPP_MIN_LOG_LEVEL`` (unless the user did) for what TensorFlow logs later.
Python exceptions raised by the import still propagate; nothing else in the process is touched.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import sys

_PACKAGE = "tensorflow"


@contextlib.contextmanager
def _stderr_to_devnull():
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _QuietLoader(importlib.abc.Loader):
    """The package's own loader, executed with stderr muted; anything else is the original's."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with _stderr_to_devnull():
            self._loader.exec_module(module)

    def __getattr__(self, name):  # resources, get_data, ...: the original loader's
        return getattr(self._loader, name)


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` once (as the path finder would) and wraps its loader; then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name != _PACKAGE:
            return None
        uninstall()
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def install() -> None:
    """Mute TensorFlow's start-up output in this process (no-op once it is imported)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if _PACKAGE in sys.modules or any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietFinder())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _QuietFinder)]
