"""The error types that the CLI reports as a message instead of a traceback, and the bounded repr they quote."""

from __future__ import annotations

import reprlib
from typing import Any


class UserError(Exception):
    """Something the user can fix: a bad config value, an unreadable file, a checkpoint that does not fit.

    The CLI prints its message and exits with status 2; every other exception is a bug and keeps its
    traceback.
    """


class ConfigError(UserError, ValueError):
    """A configuration value, key or combination that cannot work; raised before any work starts."""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 2, 6, 6, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 60, 40


def show(value: Any) -> str:
    """``repr(value)`` cut to at most ~120 characters, whatever its size: error messages repeat user values."""
    text = _REPR.repr(value)  # bounded work: reprlib never looks past its limits
    return text if len(text) <= 120 else f"{text[:117]}..."
