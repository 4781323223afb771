"""Fail-soft: a failure inside memopt never fails the user's ``torch.compile``.

memopt owns five stages of a region's compile, in order (`STAGES`):

* ``pre-autograd``: the pre-autograd pipeline on Dynamo's graph (precision lowering);
* ``planning``: the memory analyses and the planner, after torch's partition;
* ``passes``: each pass of the pipeline (`memopt.passes.manager.PassManager`);
* ``whole-step recompile``: a region compiled again for the whole step
  (`memopt.backends.watched`);
* ``codegen``: the hand-off of memopt's graphs to Inductor or eager FX.

A failure in any of them is caught where the stage is run, and the region goes on
with what is still sound: a failed pass keeps what the passes before it did (when
those graphs verify), a failed planner leaves torch's partition unoptimized, a failed
recompile keeps the earlier plan, and anything else compiles the region as torch
would have without memopt. Each failure gives one `MemoptWarning` naming the stage,
the reason and how to report it, and a `Fallback` in the region's record (the report
and ``memopt.explain`` list them). With ``strict=True`` the failure raises
`MemoptInternalError` instead (tests run that way).
"""

from __future__ import annotations

import logging
import traceback
import warnings
from dataclasses import dataclass

from memopt.errors import MemoptInternalError, MemoptWarning

__all__ = ["STAGES", "Fallback", "fail_soft", "is_torch_signal"]

log = logging.getLogger("memopt")

STAGES = ("pre-autograd", "planning", "passes", "whole-step recompile", "codegen")

_HOW_TO_REPORT = (
    "This is a memopt bug: please report it with the traceback that "
    "options={'strict': True} raises (MEMOPT_LOGS=debug adds the pipeline's log)."
)


@dataclass(frozen=True)
class Fallback:
    """A memopt stage failed on a region, and what the region did instead."""

    region: str
    pass_name: str
    """The failed pass (stage ``passes``), else the stage's name."""
    reason: str
    stage: str = "passes"
    outcome: str = "this region runs unoptimized"

    def to_dict(self) -> dict[str, str]:
        return {
            "region": self.region,
            "stage": self.stage,
            "pass": self.pass_name,
            "reason": self.reason,
            "outcome": self.outcome,
        }


def is_torch_signal(exc: BaseException) -> bool:
    """Whether ``exc`` is Dynamo's, not memopt's: a request to restart the analysis
    (e.g. ``TensorifyScalarRestartAnalysis`` under ``dynamic=True``), to skip the frame,
    or an error torch raises for the user's code. These pass through memopt untouched."""
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(exc, TorchDynamoException)


def fail_soft(
    stage: str,
    region: str,
    exc: BaseException,
    *,
    strict: bool,
    outcome: str,
    pass_name: str | None = None,
    hint: str = "",
) -> Fallback:
    """Handle ``exc``, raised by memopt's ``stage`` on ``region``: with ``strict``
    raise `MemoptInternalError` (chained to ``exc``); otherwise log the traceback at
    DEBUG, warn once and return the `Fallback` to record. ``outcome`` says what the
    region does instead; ``hint`` adds a way around it (e.g. disabling the pass)."""
    if stage not in STAGES:
        raise ValueError(f"unknown memopt stage {stage!r}; stages: {', '.join(STAGES)}")
    reason = f"{type(exc).__name__}: {exc}"
    what = f"pass {pass_name!r}" if pass_name else stage
    if strict:
        raise MemoptInternalError(stage, region, reason, pass_name=pass_name) from exc
    log.debug("%s failed on region %s:\n%s", what, region, "".join(traceback.format_exception(exc)))
    warnings.warn(
        f"memopt: {what} failed on region {region} ({reason}); {outcome}. "
        f"{hint + ' ' if hint else ''}{_HOW_TO_REPORT}",
        MemoptWarning,
        stacklevel=3,
    )
    return Fallback(region, pass_name or stage, reason, stage, outcome)
