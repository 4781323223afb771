"""Keep a rewrite that trades memory for time only while the step stays within budget.

The collective passes (`memopt.passes.collectives_dedupe`, `..._bucket`, `..._overlap`)
make communication cheaper by holding buffers longer: a bucket's flat buffer, a gather
issued early, a gradient held until a tied twin's is ready. The planner decided the
step's memory before them, so each checks its own result: the step's estimated peak
(the region in its step, as the planner judges it) must stay within
``max(memory_budget, peak before the rewrite)``. Without a budget the rewrite is kept.
In a sharded step every rank keeps or undoes a rewrite as rank 0 does
(`PassContext.agree`): each rank's estimate is of its own shards, and a rewrite kept on
one rank and undone on another would pair its collectives with other ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memopt.analysis.manager import AnalysisManager, PreservedAnalyses
from memopt.analysis.memory import MemoryAnalysis
from memopt.graph.step import StepGraphs
from memopt.passes.base import PassContext, PassResult

__all__ = ["BudgetGuard"]


@dataclass
class BudgetGuard:
    """Snapshot of ``step`` taken before a rewrite, with the peak it had then."""

    step: StepGraphs
    snapshot: StepGraphs
    peak_before: int

    @classmethod
    def before(cls, step: StepGraphs, analyses: AnalysisManager, ctx: PassContext) -> BudgetGuard:
        analyses.invalidate(PreservedAnalyses.none())  # the peak of these graphs, not a cached one
        return cls(step, step.clone(), step_peak(step, analyses, ctx))

    def limit(self, ctx: PassContext) -> int | None:
        """The peak the rewritten step may reach (None: any)."""
        budget = None if ctx.plan is None else ctx.plan.budget_bytes
        return None if budget is None else max(budget, self.peak_before)

    def fits(self, analyses: AnalysisManager, ctx: PassContext) -> tuple[bool, int]:
        """(within `limit`, estimated peak) of the step as it is now; nothing undone.
        Passes that try several rewrites (`restore` between them) ask this."""
        analyses.invalidate(PreservedAnalyses.none())
        peak = step_peak(self.step, analyses, ctx)
        limit = self.limit(ctx)
        if limit is None:
            return True, peak
        within = peak <= limit
        if ctx.agree is not None:  # the ranks' estimates differ; their collectives must not
            within = ctx.agree(within, "whether a collective rewrite keeps the step within the budget")
        return within, peak

    def restore(self, analyses: AnalysisManager) -> None:
        """Put a fresh copy of the snapshot's graphs into the step (the snapshot stays
        for the next try)."""
        fresh = self.snapshot.clone()
        self.step.forward, self.step.backward = fresh.forward, fresh.backward
        analyses.invalidate(PreservedAnalyses.none())

    def keep(
        self, analyses: AnalysisManager, ctx: PassContext, measured: tuple[bool, int] | None = None,
    ) -> tuple[bool, int]:
        """After the rewrite: (kept, peak after). A rewrite over `limit` is undone: the
        graphs of the snapshot are put back into the step. ``measured``: what `fits`
        answered on the step's graphs as they are now, the very graph modules, not
        rewritten since (not asked again: the same timeline, and every rank skips the
        same agreement)."""
        kept, peak = self.fits(analyses, ctx) if measured is None else measured
        if not kept:
            self.step.forward, self.step.backward = self.snapshot.forward, self.snapshot.backward
            analyses.invalidate(PreservedAnalyses.none())
        return kept, peak

    def result(
        self, analyses: AnalysisManager, ctx: PassContext, details: dict[str, Any], summary: str,
        measured: tuple[bool, int] | None = None,
    ) -> PassResult:
        """The pass's result once its rewrite is done: the graphs recompiled and the
        rewrite kept (``summary`` reported) or undone (`keep`, with ``measured``)."""
        self.step.recompile()
        kept, peak = self.keep(analyses, ctx, measured)
        details = {**details, "peak_after": peak}
        if not kept:
            details["reverted"] = f"estimated peak {peak} B over the limit {self.limit(ctx)} B"
            return PassResult(False, PreservedAnalyses.none(), details)
        return PassResult(True, PreservedAnalyses.none(), details, summary=(summary,))


def step_peak(step: StepGraphs, analyses: AnalysisManager, ctx: PassContext) -> int:
    """The estimated peak of the training step with ``step`` in it (the region among
    the step's others when it is planned for the whole step)."""
    timeline = analyses.get(MemoryAnalysis)
    context = ctx.step_context
    return (timeline if context is None else context.place(step, timeline)).peak_bytes
