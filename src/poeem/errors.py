"""User-facing errors: each one says what was expected, what was received, and how to fix it."""

from __future__ import annotations


class PoeemError(ValueError):
    """A bad input or state that the user can fix.

    The message has the form ``"<what>: expected <expected>, got <received>. Fix: <fix>"``.
    """

    def __init__(self, what: str, expected: str, received: str, fix: str) -> None:
        self.what, self.expected, self.received, self.fix = what, expected, received, fix
        super().__init__(f"{what}: expected {expected}, got {received}. Fix: {fix}")
