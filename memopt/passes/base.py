"""The `Pass` protocol: what every memopt graph pass looks like.

A pass rewrites a `StepGraphs` in place to carry out decisions already made (by the
planner or by the pass's own local rule); it never re-plans. Its class docstring states
its purpose, preconditions, what it guarantees afterwards and its ordering constraints;
``tests/test_passes_contract.py`` checks that every registered pass has one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from memopt.analysis.manager import AnalysisManager, PreservedAnalyses
from memopt.config import MemoptConfig
from memopt.errors import MemoptInternalError
from memopt.graph.step import StepGraphs
from memopt.plan.plan import MemoryPlan

__all__ = ["Pass", "PassResult", "PassContext", "PassFailure"]

log = logging.getLogger("memopt.passes")


class PassFailure(MemoptInternalError):
    """A memopt pass raised (``strict=True``), or left graphs that fail verification."""

    def __init__(self, pass_name: str, region: str, reason: str) -> None:
        super().__init__("passes", region, reason, pass_name=pass_name)


@dataclass
class PassResult:
    """What a pass did: whether it changed the graphs, which analyses are still valid,
    and what the plan and the report learn from it.

    ``applied``: typed decisions (`memopt.plan.plan.TensorDecision`) for the values the
    pass carried a plan's action out on, as carried out (bytes stored, measured
    error); they replace the planned decisions of the same name in the final plan.
    ``plan_fields``: `MemoryPlan` fields the pass reports (e.g. ``schedule``).
    ``summary``: report lines saying what the pass changed. ``details``: free-form
    JSON-able data for dumps and debugging; nothing downstream reads it."""

    modified: bool
    preserved: PreservedAnalyses = field(default_factory=PreservedAnalyses.none)
    details: dict[str, Any] = field(default_factory=dict)
    applied: tuple[Any, ...] = ()
    plan_fields: dict[str, Any] = field(default_factory=dict)
    summary: tuple[str, ...] = ()

    @classmethod
    def unchanged(cls, **details: Any) -> PassResult:
        return cls(False, PreservedAnalyses.everything(), dict(details))


@dataclass
class PassContext:
    """Read-only inputs a pass may use besides the graphs: the config, the region's
    name and the memory plan decided for it (None before the planner has run)."""

    config: MemoptConfig
    region: str = "0"
    plan: MemoryPlan | None = None
    example_inputs: tuple[Any, ...] = ()
    measure_error: bool = False
    """Numerics-changing passes measure the error they introduce by running the graphs
    on ``example_inputs`` at compile time (costs a few extra runs; set while
    `memopt.explain`/`memopt.record` is active)."""
    step_context: Any = None
    """The other regions of the training step (a `memopt.plan.step_context.StepContext`)
    when the region is planned for the whole step; passes that check the budget judge
    the step's peak with it. None: the region is judged alone."""
    agree: Callable[[bool, str], bool] | None = None
    """``agree(decision, topic)``: rank 0's decision on every rank of a sharded step
    (`memopt.backends.ranks.rank0_value`), for a choice a pass makes from this rank's
    estimates (each rank's shards, so its estimates, differ) that changes the graphs'
    collectives. Every rank calls it at the same point, in the same order. None: one
    process, nothing to agree with."""


class Pass:
    """Base class of passes. Subclasses set a unique ``name`` and implement `run`."""

    name: ClassVar[str] = ""
    numerics_preserving: ClassVar[bool] = True
    """False for opt-in passes that change numbers (precision lowering, compression)."""

    def run(self, step: StepGraphs, analyses: AnalysisManager, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<memopt pass {self.name}>"
