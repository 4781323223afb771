"""memopt's warning category, so users (and the test suite) can filter memopt's own
warnings: a fallback to the unoptimized graph, a skipped option, an infeasible budget;
and its errors."""

from __future__ import annotations

__all__ = [
    "MemoptWarning",
    "MemoptBudgetWarning",
    "MemoptBudgetError",
    "MemoptInternalError",
    "MemoptOffloadError",
    "MemoptOptimizerError",
    "MemoptRanksError",
    "MemoptFitError",
    "PASSED_THROUGH",
]


class MemoptWarning(UserWarning):
    """memopt skipped or degraded something it was asked to do; the message says what
    and why."""


class MemoptBudgetWarning(MemoptWarning):
    """The requested ``memory_budget`` cannot be met: memopt runs the plan with the
    smallest peak it found (`MemoptBudgetError` with ``strict=True``).

    Raised by memopt's planner, it carries the figures its message states (None
    otherwise), so that the regions of one step split by graph breaks, which state the
    same budget and peak, can be reported once for the step."""

    region: str | None = None
    """The region (Dynamo's compile id) or, for a step, its regions (``"2/0 and 4/0"``)."""
    budget_bytes: int | None = None
    min_feasible_peak: int | None = None
    statement: str | None = None
    """The message after ``"is infeasible for region R: "``: the peaks, what holds
    them, the advice."""


class MemoptBudgetError(ValueError):
    """The requested ``memory_budget`` cannot be met (raised with ``strict=True``;
    otherwise a `MemoptBudgetWarning`). The message gives the smallest reachable peak and
    what blocks going lower."""


class MemoptInternalError(RuntimeError):
    """A stage of memopt failed on a region (raised with ``strict=True``; otherwise memopt
    warns and falls back, see `memopt.failsoft`). ``stage`` is one of
    `memopt.failsoft.STAGES`; ``pass_name`` names the pass for stage ``passes``."""

    def __init__(self, stage: str, region: str, reason: str, *, pass_name: str | None = None) -> None:
        what = f"pass {pass_name!r}" if pass_name else f"stage {stage!r}"
        super().__init__(f"memopt {what} failed on region {region}: {reason}")
        self.stage = stage
        self.region = region
        self.reason = reason
        self.pass_name = pass_name


class MemoptOffloadError(RuntimeError):
    """An offload store cannot hold what the plan sends it: its directory is missing,
    unwritable, not private or too small, a write failed (a full disk), or the target
    does not fit the device. Raised at compile time where it can be foreseen, otherwise
    in the thread that runs the step, at the next offload operation. The message names
    the problem, the amount and the fix."""


class MemoptOptimizerError(RuntimeError):
    """``optimizer_in_backward`` cannot update a parameter inside backward correctly:
    the optimizer has no per-parameter update (MeZO, L-BFGS, an `OffloadedState`), a
    parameter's gradient comes from more than one backward (a graph break, a weight
    shared across regions, gradient accumulation), or code read a gradient that the
    update already consumed (global-norm clipping, GradScaler). Raised at compile time
    where it can be foreseen, otherwise when the step runs, before a wrong update is
    kept silently. The message names the parameter, the problem and the fix."""


class MemoptRanksError(RuntimeError):
    """The ranks of a sharded step did not compile a region together under a
    ``memory_budget``: every rank runs rank 0's plan (docs/sharding.md), and a rank
    waited ``rank_agreement_timeout`` seconds for the others to reach the same compile
    without them coming (one rank alone compiled again: its batch changed shape, or a
    guard failed on it only), or the process group's store failed. Raised on the rank
    that waited, instead of a hang in the step's collectives or a mismatch of them; never
    a fallback (a rank that ran another plan would mismatch the others' collectives). The
    message names the region, the ranks, what differs and the fix."""


class MemoptFitError(ValueError):
    """`memopt.fit` cannot answer: even the smallest size's planned peak is above the
    budget (the message names that floor, the options that may lower it and the size of
    the other dimension that fits, or that none does), the budget
    or a search argument is malformed, ``make_inputs`` does not take the size, or the
    model has nothing to train. The message names the problem, the value and the fix."""


PASSED_THROUGH: tuple[type[Exception], ...] = (
    MemoptInternalError, MemoptBudgetError, MemoptOffloadError, MemoptOptimizerError, MemoptRanksError,
)  # fmt: skip
"""memopt's errors that the backend's fail-soft (`memopt.failsoft`) raises as they are,
never turning them into a fallback: raised with ``strict=True``, or naming what the user
must change (an offload target, disk space, ranks that compile apart)."""
