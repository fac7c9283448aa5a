"""The project's error types: what the ``flexmoe`` command prints as one line, and what is a bug.

A :class:`FlexmoeError` is an expected failure whose message names the thing and the fix; ``flexmoe``
prints it as ``flexmoe <command>: error: <message>`` and exits with status 2. Every other exception
(a ``KeyError`` or ``ValueError`` from a programming mistake, say) keeps its traceback. Missing or
unwritable files (``OSError``) are the environment's, also printed as one line.
"""

from __future__ import annotations


class FlexmoeError(Exception):
    """An expected failure the user can act on (see the module docstring)."""


class UserError(FlexmoeError, ValueError):
    """Bad input: a path, a name or a setting that cannot work; the message says what to change."""


class UnknownName(UserError, KeyError):
    """A name looked up that is not there (a parameter subtree, a model's scores)."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0]) if self.args else ""
