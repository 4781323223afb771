"""Pass ``overlap_collectives``: communication runs while the step computes.

As traced, every collective is waited right after it starts, so compute and
communication take turns. This pass moves the starts and the waits apart, a bounded
distance, as FSDP2 does:

* an all-gather (a bucket, or one parameter) starts right after the wait of the
  all-gather ``collective_prefetch`` places before it (with 1: the next bucket is
  fetched while the current one's layer computes) and is still waited right before its
  first use. Its inputs (casts, padding, the bucket's concatenation of shards) move up
  with it;
* a reduction (a reduce-scatter, or an all-reduce: stages 0 and 1) still starts as soon
  as its gradient is ready, and is waited right before the reduction
  ``collective_prefetch`` places after it starts (the last ones before the graph's
  outputs), with whatever reads its result. Reduce-scatters and all-reduces are one
  sequence in graph order, so a mixed graph (a 0-dimensional parameter's all-reduce
  among stage 3's reduce-scatters) keeps its reductions' order.

Only the graph order changes. The memory timeline sees the consequences: a gather's
buffer is allocated where it now starts, and a collective's input stays live until its
wait (`memopt.analysis.memory.reads_of`: the process group reads it until then).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch.fx as fx

from memopt.analysis.manager import AnalysisManager, PreservedAnalyses
from memopt.graph import meta
from memopt.graph.collectives import is_all_gather, is_collective, is_reduction, is_wait, wait_of
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


Accept = Callable[[], bool]
"""Asked after each move when the budget is tight: keep it (True) or undo it."""


def _restore_after(anchor: fx.Node, nodes: list[fx.Node]) -> None:
    """Put ``nodes`` back right after ``anchor``, in this order (undo a move)."""
    for node in nodes:
        anchor.append(node)
        anchor = node


Undo = Callable[[], None]


def _prefetch_one(graph: fx.Graph, gather: fx.Node, anchor: fx.Node) -> Undo | None:
    """Move ``gather``, with the nodes it reads after ``anchor``, to right after
    ``anchor``; how to undo it, or None if it did not move."""
    order = _position(graph)
    if order[anchor] >= order[gather]:
        return None
    needed: set[fx.Node] = set()
    stack = [gather]
    while stack:
        node = stack.pop()
        if node in needed or order[node] <= order[anchor]:
            continue
        needed.add(node)
        stack.extend(node.all_input_nodes)
    span = _between(graph, anchor, gather)
    block = [n for n in span if n in needed]
    if not all(_movable(n, gather) for n in block):
        return None
    _restore_after(anchor, block)
    return lambda: _restore_after(anchor, span)


def _defer_one(graph: fx.Graph, wait: fx.Node, target: fx.Node) -> Undo | None:
    """Move ``wait``, with what reads its result before ``target``, to right before
    ``target``; how to undo it, or None if it did not move."""
    order = _position(graph)
    if order[wait] >= order[target]:
        return None
    span = _between(graph, wait, target)[:-1]
    block, reached = [], {wait}
    for node in span:
        if any(inp in reached for inp in node.all_input_nodes):
            reached.add(node)
            block.append(node)
    if not all(_movable(n, wait) for n in block):
        return None
    before = wait.prev
    for node in [wait, *block]:
        target.prepend(node)
    return lambda: _restore_after(before, [wait, *span])


def _longest_kept(depth: int, accept: Accept | None, move: Callable[[int], Undo | None]) -> int:
    """The distance one collective moves: ``depth``, or with ``accept`` (a budget to
    keep) the longest of ``depth`` down to 1 whose move (``move(distance)``, None when
    it cannot) ``accept`` keeps; 0: none (every rejected move undone)."""
    for distance in range(depth, 0 if accept is not None else depth - 1, -1):
        undo = move(distance)
        if undo is None:
            continue
        if accept is None or accept():
            return distance
        undo()
    return 0


def prefetch_gathers(graph: fx.Graph, depth: int, accept: Accept | None = None) -> list[int]:
    """Start each all-gather right after the wait of the one ``depth`` places before it
    (in wait order), with the nodes it reads that lie in between. With ``accept``, a
    move it rejects is undone and the next shorter distance tried. The distance each
    all-gather moved, in wait order (0: not moved)."""
    gathers = [n for n in graph.nodes if is_all_gather(n) and wait_of(n) is not None]
    waits = sorted((wait_of(g) for g in gathers), key=_position(graph).__getitem__)  # type: ignore[arg-type]

    def move(i: int, distance: int) -> Undo | None:
        return None if i < distance else _prefetch_one(graph, waits[i].args[0], waits[i - distance])  # type: ignore[arg-type]

    return [_longest_kept(depth, accept, functools.partial(move, i)) for i in range(len(waits))]


def defer_reduction_waits(graph: fx.Graph, depth: int, accept: Accept | None = None) -> list[int]:
    """Wait each reduction (reduce-scatter or all-reduce) right before the one ``depth``
    places after it starts (the last ones before the output), with what reads its
    result. With ``accept``, a move it rejects is undone and the next shorter distance
    tried. The distance each reduction's wait moved, in order (0: not moved)."""
    scatters = [n for n in graph.nodes if is_reduction(n) and wait_of(n) is not None]
    output = graph.find_nodes(op="output")[0]

    def move(i: int, distance: int) -> Undo | None:
        target = scatters[i + distance] if i + distance < len(scatters) else output
        return _defer_one(graph, wait_of(scatters[i]), target)  # type: ignore[arg-type]

    return [_longest_kept(depth, accept, functools.partial(move, i)) for i in range(len(scatters))]


def _position(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


class OverlapCollectives(Pass):
    """Start all-gathers early and wait reductions late (module docstring).

    Purpose: hide communication under compute instead of alternating with it.

    Preconditions: topologically sorted graphs; each collective has one wait.

    Guarantees: only the order of nodes changes, every data dependency holds, and the
    collectives keep their relative starting order on every rank (the all-gathers
    among themselves, the reductions among themselves), so results are
    bit-identical. Nothing with a side effect or a random draw moves. The step's
    estimated peak stays within the budget (`memopt.passes.budget_guard`): a
    prefetched bucket is live one layer earlier, a gradient until its reduction
    is waited. When every collective moved ``collective_prefetch`` places puts the
    step over, each collective is moved in turn (all-gathers in wait order, then the
    reductions' waits), at ``collective_prefetch`` places or the longest shorter
    distance that keeps the step's estimated peak within the budget, or not at all;
    ``details["distances"]`` counts the collectives moved at each distance (0: not
    moved).

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
        guard = BudgetGuard.before(step, analyses, ctx)
        distances = _overlap(step, depth, None)
        if not _moved(distances):
            return PassResult.unchanged()
        fits, peak = guard.fits(analyses, ctx)
        details: dict[str, Any] = {"depth": depth, "peak_before": guard.peak_before, "limit": guard.limit(ctx)}
        if not fits:  # each collective in turn, as far ahead as the budget allows
            guard.restore(analyses)
            details["all_at_depth"] = {"peak": peak, "fits": False}
            distances = _overlap(step, depth, lambda: guard.fits(analyses, ctx)[0])
        details["moved"] = {name: {kind: sum(d > 0 for d in ds) for kind, ds in kinds.items()} for name, kinds in distances.items()}
        details["distances"] = {name: {kind: dict(sorted(Counter(ds).items())) for kind, ds in kinds.items()} for name, kinds in distances.items()}  # fmt: skip
        total = _moved(distances)
        if not total:
            guard.restore(analyses)
            details["reverted"] = f"no collective moves within the limit {guard.limit(ctx)} B"
            return PassResult(False, PreservedAnalyses.none(), details)
        held = sum(d < depth for kinds in distances.values() for ds in kinds.values() for d in ds)
        within = f" ({held} at a shorter distance or none, within the budget)" if held and not fits else ""
        return guard.result(analyses, ctx, details, f"overlapped {total} collective(s) with compute{within}")


def _overlap(step: StepGraphs, depth: int, accept: Accept | None) -> dict[str, dict[str, list[int]]]:
    """Prefetch the all-gathers, then defer the reductions' waits, graph by graph; the
    distance each moved."""
    return {
        name: {"all_gather": prefetch_gathers(gm.graph, depth, accept), "reduction": defer_reduction_waits(gm.graph, depth, accept)}
        for name, gm in step.graphs()
    }  # fmt: skip


def _moved(distances: dict[str, dict[str, list[int]]]) -> int:
    return sum(d > 0 for kinds in distances.values() for ds in kinds.values() for d in ds)
