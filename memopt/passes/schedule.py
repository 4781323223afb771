"""Memory-aware scheduling: reorder each graph's nodes to lower the step's peak."""

from __future__ import annotations

from memopt.analysis.manager import AnalysisManager, PreservedAnalyses
from memopt.analysis.memory import MemoryAnalysis
from memopt.analysis.schedule import memory_aware_order, restore_order, schedule_step
from memopt.graph.step import StepGraphs
from memopt.passes.base import Pass, PassContext, PassResult
from memopt.plan.decisions import Offload

__all__ = ["MemoryAwareSchedule", "memory_aware_order"]


class MemoryAwareSchedule(Pass):
    """Reorder nodes inside the forward and backward graphs to lower the step's peak.

    Purpose: the order AOTAutograd emits follows the user's program; a different
    topological order can free large values earlier and allocate later ones later.

    Preconditions: none beyond FX's (topologically sorted graphs with fake values).

    Guarantees: every data dependency holds; random ops and ops with side effects
    (in-place writes, collectives) keep their relative order, and readers of a
    written storage stay on their side of the write, so results are bit-identical.
    The new order is kept only if the estimated peak of the whole step drops;
    otherwise the graphs are left exactly as they were. The before/after peaks are
    reported as the plan's ``schedule``.

    Ordering: after passes that add nodes (rematerialization places recomputation
    where it wants it; scheduling afterwards may only improve on the result), and
    after ``dce``; before ``offload``. When the plan offloads values the graphs keep
    their order: the planner timed each transfer against the windows of that order
    (last forward reader, first backward reader), and this pass, blind to the
    transfers, would move the first backward readers of saved values to the start of
    backward to free them early, reloading them there.
    """

    name = "schedule"

    def run(self, step: StepGraphs, analyses: AnalysisManager, ctx: PassContext) -> PassResult:
        before = analyses.get(MemoryAnalysis).peak_bytes
        if ctx.plan is not None and ctx.plan.actions(Offload):
            report = {"peak_before": before, "peak_after": before, "applied": False,
                      "skipped": "the plan offloads values; their transfers were timed on this order"}
            return PassResult(False, PreservedAnalyses.everything(), dict(report), plan_fields={"schedule": report})
        original = schedule_step(step)  # transfers placed by the offload pass keep their order
        analyses.invalidate(PreservedAnalyses.none())  # the order changed: ask again
        after = analyses.get(MemoryAnalysis).peak_bytes
        if after >= before:
            for name, gm in step.graphs():
                restore_order(gm.graph, original[name])
            analyses.invalidate(PreservedAnalyses.none())  # what is cached is of the rejected order
            report = {"peak_before": before, "peak_after": before, "applied": False}
            return PassResult(False, PreservedAnalyses.everything(), dict(report), plan_fields={"schedule": report})
        report = {"peak_before": before, "peak_after": after, "applied": True}
        return PassResult(True, PreservedAnalyses.none(), dict(report), plan_fields={"schedule": report})
