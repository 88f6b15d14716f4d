"""Errors a user can act on. The CLI prints their message on one line and exits with code 2."""
from __future__ import annotations


class UserInputError(ValueError):
    """Bad input a user can fix; the message says what is wrong and what to do, on one line."""


class IncompatibleRunError(UserInputError):
    """The run directory is incomplete, corrupt or from another schema version."""
