"""memopt's warning category, so users (and the test suite) can filter memopt's own
warnings: a fallback to the unoptimized graph, a skipped option, an infeasible budget."""

from __future__ import annotations

__all__ = ["MemoptWarning"]


class MemoptWarning(UserWarning):
    """memopt skipped or degraded something it was asked to do; the message says what
    and why."""
