"""Exceptions the user can act on. str(exc) is a whole sentence that says what to do next.

The command line turns any ReconcilerError into exit code 1 and one message on stderr; anything
else that escapes is a bug.
"""

from __future__ import annotations


class ReconcilerError(Exception):
    """Base class: the user must act; the message says how."""


class DesiredStateError(ReconcilerError):
    """users.yaml is unreadable or invalid; every problem is listed, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class SecretError(ReconcilerError):
    """A passphrase is missing, too short or wrong."""


class StateError(ReconcilerError):
    """The state directory holds something the tool refuses to touch without a human."""


class UsageError(ReconcilerError):
    """The command line asks for something that cannot be done."""
