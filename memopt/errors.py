"""memopt's warning category, so users (and the test suite) can filter memopt's own
warnings: a fallback to the unoptimized graph, a skipped option, an infeasible budget."""

from __future__ import annotations

__all__ = ["MemoptWarning", "MemoptBudgetError"]


class MemoptWarning(UserWarning):
    """memopt skipped or degraded something it was asked to do; the message says what
    and why."""


class MemoptBudgetError(ValueError):
    """The requested ``memory_budget`` cannot be met (raised with ``strict=True``;
    otherwise a `MemoptWarning`). The message gives the smallest reachable peak and
    what blocks going lower."""
