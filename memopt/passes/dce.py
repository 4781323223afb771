"""Dead-code elimination that keeps everything with an observable effect."""

from __future__ import annotations

import torch.fx as fx

from memopt.analysis.manager import AnalysisManager
from memopt.graph import meta
from memopt.graph.step import StepGraphs
from memopt.passes.base import Pass, PassContext, PassResult

__all__ = ["DeadCodeElimination"]


def _keep(node: fx.Node) -> bool:
    return node.is_impure() or meta.has_side_effects(node) or meta.is_random(node)


class DeadCodeElimination(Pass):
    """Remove nodes whose values are never used.

    Purpose: later passes (and AOTAutograd's partitioner) can leave values nobody reads;
    each one costs memory for its lifetime and time to compute.

    Preconditions: graphs topologically sorted (FX invariant).

    Guarantees: every graph output is computed exactly as before. Nodes with side
    effects (mutations, collectives) and random ops are kept even when unused, because
    dropping a random op would shift the RNG stream of every later random op.
    Placeholders are never removed (the calling convention is fixed).

    Ordering: anywhere; cheapest run after passes that orphan nodes.
    """

    name = "dce"

    def run(self, step: StepGraphs, analyses: AnalysisManager, ctx: PassContext) -> PassResult:
        removed = 0
        for _, gm in step.graphs():
            before = len(gm.graph.nodes)
            gm.graph.eliminate_dead_code(is_impure_node=_keep)
            removed += before - len(gm.graph.nodes)
        if not removed:
            return PassResult.unchanged()
        return PassResult(True, details={"removed_nodes": removed})
