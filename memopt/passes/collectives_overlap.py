"""Pass ``overlap_collectives``: communication runs while the step computes.

As traced, every collective is waited right after it starts, so compute and
communication take turns. This pass moves the starts and the waits apart, a bounded
distance, as FSDP2 does:

* an all-gather (a bucket, or one parameter) starts right after the wait of the
  all-gather ``collective_prefetch`` places before it (with 1: the next bucket is
  fetched while the current one's layer computes) and is still waited right before its
  first use. Its inputs (casts, padding, the bucket's concatenation of shards) move up
  with it;
* a reduce-scatter still starts as soon as its gradient is ready, and is waited right
  before the reduce-scatter ``collective_prefetch`` places after it starts (the last
  ones before the graph's outputs), with whatever reads its result.

Only the graph order changes. The memory timeline sees the consequences: a gather's
buffer is allocated where it now starts, and a collective's input stays live until its
wait (`memopt.analysis.memory.reads_of`: the process group reads it until then).
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from memopt.analysis.manager import AnalysisManager
from memopt.graph import meta
from memopt.graph.collectives import is_all_gather, is_collective, is_reduce_scatter, is_wait, wait_of
from memopt.graph.step import StepGraphs
from memopt.passes.base import Pass, PassContext, PassResult
from memopt.passes.budget_guard import BudgetGuard

__all__ = ["OverlapCollectives", "prefetch_gathers", "defer_reduction_waits"]


def _movable(node: fx.Node, collective: fx.Node) -> bool:
    """``node`` may change places with other compute: no effect, no random draw, no
    other collective. (A bucket's buffers are made by its own nodes, which move too.)"""
    if node is collective:
        return True
    if is_collective(node) or is_wait(node) or meta.is_random(node):
        return False
    return not meta.has_side_effects(node)


def _between(graph: fx.Graph, start: fx.Node, end: fx.Node) -> list[fx.Node]:
    """Nodes strictly after ``start`` and up to and including ``end``."""
    nodes, node = [], start.next
    while node is not end:
        nodes.append(node)
        node = node.next
    return [*nodes, end]


def prefetch_gathers(graph: fx.Graph, depth: int) -> int:
    """Start each all-gather right after the wait of the one ``depth`` places before it
    (in wait order), with the nodes it reads that lie in between; the number moved."""
    gathers = [n for n in graph.nodes if is_all_gather(n) and wait_of(n) is not None]
    waits = sorted((wait_of(g) for g in gathers), key=_position(graph).__getitem__)  # type: ignore[arg-type]
    moved = 0
    for i, wait in enumerate(waits):
        if i < depth:
            continue
        gather, anchor = wait.args[0], waits[i - depth]
        assert isinstance(gather, fx.Node)
        order = _position(graph)
        if order[anchor] >= order[gather]:
            continue
        needed: set[fx.Node] = set()
        stack = [gather]
        while stack:
            node = stack.pop()
            if node in needed or order[node] <= order[anchor]:
                continue
            needed.add(node)
            stack.extend(node.all_input_nodes)
        block = [n for n in _between(graph, anchor, gather) if n in needed]
        if not all(_movable(n, gather) for n in block):
            continue
        for node in block:
            anchor.append(node)
            anchor = node
        moved += 1
    return moved


def defer_reduction_waits(graph: fx.Graph, depth: int) -> int:
    """Wait each reduce-scatter right before the one ``depth`` places after it starts
    (the last ones before the output), with what reads its result; the number moved."""
    scatters = [n for n in graph.nodes if is_reduce_scatter(n) and wait_of(n) is not None]
    output = graph.find_nodes(op="output")[0]
    moved = 0
    for i, scatter in enumerate(scatters):
        wait = wait_of(scatter)
        assert wait is not None
        target = scatters[i + depth] if i + depth < len(scatters) else output
        order = _position(graph)
        if order[wait] >= order[target]:
            continue
        block, reached = [], {wait}
        for node in _between(graph, wait, target)[:-1]:
            if any(inp in reached for inp in node.all_input_nodes):
                reached.add(node)
                block.append(node)
        if not all(_movable(n, wait) for n in block):
            continue
        for node in [wait, *block]:
            target.prepend(node)
        moved += 1
    return moved


def _position(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


class OverlapCollectives(Pass):
    """Start all-gathers early and wait reduce-scatters late (module docstring).

    Purpose: hide communication under compute instead of alternating with it.

    Preconditions: topologically sorted graphs; each collective has one wait.

    Guarantees: only the order of nodes changes, every data dependency holds, and the
    collectives keep their relative starting order on every rank (the all-gathers
    among themselves, the reduce-scatters among themselves), so results are
    bit-identical. Nothing with a side effect or a random draw moves. Kept only while
    the step's estimated peak stays within the budget
    (`memopt.passes.budget_guard`): a prefetched bucket is live one layer earlier, a
    gradient until its reduce-scatter is waited. Over the budget, only the
    reduce-scatters' waits move, else only the all-gathers' starts, else nothing.

    Ordering: after ``schedule`` and ``offload``, on the final order (the memory-aware
    schedule would sink every start back to its wait); after ``bucket_collectives``;
    before ``optimizer_in_backward``, which places each update after its gradient's
    (moved) wait.
    """

    name = "overlap_collectives"

    def run(self, step: StepGraphs, analyses: AnalysisManager, ctx: PassContext) -> PassResult:
        depth = ctx.config.collective_prefetch
        if depth == 0 or not any(is_collective(n) for _, gm in step.graphs() for n in gm.graph.nodes):
            return PassResult.unchanged()
        result = PassResult.unchanged()
        for gathers, reductions in ((True, True), (False, True), (True, False)):  # the first within budget
            guard = BudgetGuard.before(step, analyses, ctx)
            moved: dict[str, Any] = {}
            for name, gm in step.graphs():
                moved[name] = {"all_gather": prefetch_gathers(gm.graph, depth) if gathers else 0,
                               "reduce_scatter": defer_reduction_waits(gm.graph, depth) if reductions else 0}  # fmt: skip
            total = sum(sum(m.values()) for m in moved.values())
            if not total:
                continue
            summary = f"overlapped {total} collective(s) with compute"
            result = guard.result(analyses, ctx, {"moved": moved, "depth": depth}, summary)
            if result.modified:
                return result
        return result
