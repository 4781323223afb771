"""Apply the memory plan's rematerialization: re-split the joint graph."""

from __future__ import annotations

from memopt.analysis.manager import AnalysisManager, PreservedAnalyses
from memopt.graph.partition import saved_names, split_joint
from memopt.graph.step import StepGraphs, clone_graph_module
from memopt.passes.base import Pass, PassContext, PassResult

__all__ = ["Rematerialize"]


class Rematerialize(Pass):
    """Save exactly the values the plan names; recompute the rest in backward.

    Purpose: carry out the budget planner's decision (`MemoryPlan.saved_values`, or
    `MemoryPlan.torch_partition`).

    Preconditions: a training step whose ``joint`` graph is kept (memopt's partition
    sets it); ``ctx.plan.saved_values`` names joint-graph values. Without a plan that
    names values (no budget, or the budget fits) the pass changes nothing.

    Guarantees: the forward saves those values (plus primals and symbols backward
    needs); every other value backward reads is recomputed in backward from them,
    each recomputed op just before its first use (or, when the plan is torch's own
    min-cut partition at some ``activation_memory_budget``, where torch put it). Random ops, side effects and
    collectives are never recomputed (the planner always saves them), so with eager
    codegen losses and gradients are bit-identical to the unbudgeted compile.

    Ordering: first (it replaces both graphs); ``dce`` and ``schedule`` run after it.
    """

    name = "remat"

    def run(self, step: StepGraphs, analyses: AnalysisManager, ctx: PassContext) -> PassResult:
        plan = ctx.plan
        wanted = None if plan is None else plan.saved_values
        if plan is None or wanted is None or step.joint is None or not step.is_training:
            return PassResult.unchanged()
        before = set(saved_names(step))
        graphs = None if plan.torch_partition is None else step.joint.torch_partition(plan.torch_partition)
        if plan.torch_partition is not None and graphs is None:
            raise RuntimeError(f"torch's partitioner failed at budget {plan.torch_partition}, which the plan chose")
        if graphs is not None:  # torch's own partition won: install it as it is
            step.forward, step.backward = (clone_graph_module(g) for g in graphs)
        else:
            step.forward, step.backward = split_joint(step.joint.recomputable(), wanted, step.region)
        after = set(saved_names(step))
        return PassResult(
            True,
            PreservedAnalyses.none(),
            details={
                "saved_before": len(before),
                "saved_after": len(after),
                "newly_recomputed": len(before - after),
                "segment_options": list(plan.segment_options),
            },
        )
