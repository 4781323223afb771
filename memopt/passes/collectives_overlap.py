"""Pass ``overlap_collectives``: communication runs while the step computes.

As traced, every collective is waited right after it starts, so compute and
communication take turns. This pass moves the starts and the waits apart, as far as
the cost model says hides the communication and at most ``collective_prefetch``
collectives (as FSDP2 moves them a fixed distance):

* an all-gather (a bucket, or one parameter) starts right after the wait of the
  all-gather some places before it and is still waited right before its first use;
  its inputs (casts, padding, the bucket's concatenation of shards) move up with it.
  It moves the fewest places (1 to ``collective_prefetch``) at which its modelled
  network time is hidden by the modelled compute up to its wait
  (`memopt.analysis.collective_time`: one FIFO link per process group, so the
  collectives already in flight delay it), or ``collective_prefetch`` places (as far
  as it can) when none hides it. It never starts before the all-gather waited before
  it, so the all-gathers keep their starting order;
* a reduction (a reduce-scatter, or an all-reduce: stages 0 and 1) still starts as soon
  as its gradient is ready, and its wait, with whatever reads its result, moves down
  to right before the start of a later reduction (the last ones: before the graph's
  outputs): the fewest places (1 to ``collective_prefetch``) at which the compute
  after its start hides it, else ``collective_prefetch``. Reduce-scatters and
  all-reduces are one sequence in graph order, so a mixed graph (a 0-dimensional
  parameter's all-reduce among stage 3's reduce-scatters) keeps its reductions' order.

A collective moved fewer places than it could holds its buffers for a shorter time: a
gather's buffer (and its concatenation of shards) is allocated later, a reduction's
input is freed sooner at its wait. So the modelled choice holds those buffers no
longer than moving each collective the whole bound would (the memory timeline, and
under a budget the guard, check the step either way;
`tests/distributed/test_overlap_modelled.py`). The first gathers, with fewer than
``collective_prefetch`` gathers before them, move as far as they can (the distance
counted in collectives left them in place). The choice is greedy, one collective at a
time in order (all-gathers, then the reductions, graph by graph), each against the
graph as the ones before it left it.

Only the graph order changes. The memory timeline sees the consequences: a gather's
buffer is allocated where it now starts, and a collective's input stays live until its
wait (`memopt.analysis.liveness.reads_of`: the process group reads it until then).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch.fx as fx

from memopt.analysis.collective_time import CollectiveClock, CollectiveTime
from memopt.analysis.cost import device_model
from memopt.analysis.manager import AnalysisManager, PreservedAnalyses
from memopt.analysis.memory import main_device
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


def _hiding_distance(clock: CollectiveClock, graph: fx.Graph, collective: fx.Node, depth: int, move: Callable[[int], Undo | None]) -> int:
    """The fewest places (0 to ``depth``) ``collective`` moves (``move``) for the
    modelled compute to hide it, else the most it can move (at most ``depth``); the
    graph is left as it was. Compute alone counts (`CollectiveClock.times` without
    stalls): the collectives not placed yet still wait where traced, and their stalls
    would pass for compute."""
    farthest = 0
    for distance in range(depth + 1):
        undo = move(distance) if distance else _stay
        if undo is None:
            continue
        hidden = clock.times(graph, stalls=False)[collective].exposed == 0.0
        undo()
        if hidden:
            return distance
        farthest = distance
    return farthest


def _stay() -> None:
    """Undo of not moving."""


def _distances(graph: fx.Graph, collectives: list[fx.Node], depth: int, accept: Accept | None, clock: CollectiveClock | None, move: Callable[[int, int], Undo | None], reach: Callable[[int], int]) -> dict[str, int]:  # fmt: skip
    """Move each of ``collectives`` in turn (``move(i, distance)``): ``depth`` places,
    or with ``clock`` as few as hide it (`_hiding_distance`, at most ``reach(i)``:
    farther moves end where that one does); with ``accept``, the longest of those
    distances down to 1 that it keeps. The distance each moved, by name, in this
    order."""
    distances: dict[str, int] = {}
    for i, collective in enumerate(collectives):
        step = functools.partial(move, i)
        wanted = depth if clock is None else _hiding_distance(clock, graph, collective, min(depth, reach(i)), step)
        distances[collective.name] = _longest_kept(wanted, accept, step)
    return distances


def prefetch_gathers(graph: fx.Graph, depth: int, accept: Accept | None = None, clock: CollectiveClock | None = None) -> dict[str, int]:  # fmt: skip
    """Start each all-gather right after the wait of the one ``depth`` places before it
    (in wait order), or with ``clock`` the fewest places that hide it, with the nodes
    it reads that lie in between, never before the all-gather waited before it. With
    ``accept``, a move it rejects is undone and the next shorter distance tried. The
    distance each all-gather moved, by name, in wait order (0: not moved)."""
    waits: list[fx.Node] = sorted((w for n in graph.nodes if is_all_gather(n) and (w := wait_of(n)) is not None), key=_position(graph).__getitem__)  # fmt: skip
    gathers: list[fx.Node] = [w.args[0] for w in waits]  # type: ignore[misc]

    def move(i: int, distance: int) -> Undo | None:
        if i < distance:
            return None
        anchor, position = waits[i - distance], _position(graph)  # earlier moves changed the order
        if i and position[gathers[i - 1]] > position[anchor]:
            anchor = gathers[i - 1]  # started after that wait: start after it
        return _prefetch_one(graph, gathers[i], anchor)

    return _distances(graph, gathers, depth, accept, clock, move, reach=lambda i: i)


def defer_reduction_waits(graph: fx.Graph, depth: int, accept: Accept | None = None, clock: CollectiveClock | None = None) -> dict[str, int]:  # fmt: skip
    """Wait each reduction (reduce-scatter or all-reduce) right before the one ``depth``
    places after it starts (the last ones before the output), or with ``clock`` the
    fewest places that hide it, with what reads its result. With ``accept``, a move it
    rejects is undone and the next shorter distance tried. The distance each
    reduction's wait moved, by name, in order (0: not moved)."""
    scatters = [n for n in graph.nodes if is_reduction(n) and wait_of(n) is not None]
    output = graph.find_nodes(op="output")[0]

    def move(i: int, distance: int) -> Undo | None:
        target = scatters[i + distance] if i + distance < len(scatters) else output
        return _defer_one(graph, wait_of(scatters[i]), target)  # type: ignore[arg-type]

    return _distances(graph, scatters, depth, accept, clock, move, reach=lambda i: len(scatters) - i)


def _position(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


class OverlapCollectives(Pass):
    """Start all-gathers early and wait reductions late, as far as hides them in
    modelled time (module docstring).

    Purpose: hide communication under compute instead of alternating with it, holding
    buffers no longer than that takes.

    Preconditions: topologically sorted graphs; each collective has one wait.

    Guarantees: only the order of nodes changes, every data dependency holds, and the
    collectives keep their relative starting order on every rank (the all-gathers
    among themselves, the reductions among themselves), so results are
    bit-identical. Nothing with a side effect or a random draw moves. Each collective
    moves the fewest places, up to ``collective_prefetch``, at which the cost model
    (`memopt.analysis.collective_time`, on the step's device model) hides it, or
    ``collective_prefetch`` places when none does. The step's estimated peak stays
    within the budget (`memopt.passes.budget_guard`): a prefetched bucket is live
    earlier, a gradient until its reduction is waited. When those moves put the step
    over, each collective is moved in turn (all-gathers in wait order, then the
    reductions' waits), at its modelled distance or the longest shorter one that keeps
    the step's estimated peak within the budget, or not at all. ``details``:
    ``distances`` counts the collectives moved at each distance (0: not moved);
    ``collectives`` lists each collective (per graph, all-gathers in wait order, then
    reductions) with its distance and modelled ``seconds``, ``hidden`` and
    ``exposed`` time after the pass; ``exposed`` totals per graph before and after.

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
        clock = CollectiveClock(device_model(main_device(step)))
        exposed_before = _exposed(step, clock)
        distances = _overlap(step, depth, None, clock)
        if not _moved(distances):
            return PassResult.unchanged()
        fits, peak = guard.fits(analyses, ctx)
        details: dict[str, Any] = {"depth": depth, "peak_before": guard.peak_before, "limit": guard.limit(ctx)}
        if not fits:  # each collective in turn, as far ahead as the budget allows
            guard.restore(analyses)
            details["all_at_depth"] = {"peak": peak, "fits": False}
            distances = _overlap(step, depth, lambda: guard.fits(analyses, ctx)[0], clock)
        details["moved"] = {name: {kind: sum(d > 0 for d in ds.values()) for kind, ds in kinds.items()} for name, kinds in distances.items()}  # fmt: skip
        details["distances"] = {name: {kind: dict(sorted(Counter(ds.values()).items())) for kind, ds in kinds.items()} for name, kinds in distances.items()}  # fmt: skip
        details["collectives"] = _timed(step, clock, distances)
        details["exposed"] = {"before": exposed_before, "after": _exposed(step, clock)}
        total = _moved(distances)
        if not total:
            guard.restore(analyses)
            details["reverted"] = f"no collective moves within the limit {guard.limit(ctx)} B"
            return PassResult(False, PreservedAnalyses.none(), details)
        within = " (some at a shorter distance or none, within the budget)" if not fits else ""
        after = sum(details["exposed"]["after"].values())
        summary = f"overlapped {total} collective(s) with compute{within}; modelled exposed communication {sum(exposed_before.values()):.3g} s -> {after:.3g} s"  # fmt: skip
        return guard.result(analyses, ctx, details, summary)


Distances = dict[str, dict[str, dict[str, int]]]
"""graph -> kind (``all_gather``, ``reduction``) -> collective's name -> distance moved."""


def _overlap(step: StepGraphs, depth: int, accept: Accept | None, clock: CollectiveClock) -> Distances:
    """Prefetch the all-gathers, then defer the reductions' waits, graph by graph; the
    distance each moved."""
    return {
        name: {"all_gather": prefetch_gathers(gm.graph, depth, accept, clock), "reduction": defer_reduction_waits(gm.graph, depth, accept, clock)}
        for name, gm in step.graphs()
    }  # fmt: skip


def _moved(distances: Distances) -> int:
    return sum(d > 0 for kinds in distances.values() for ds in kinds.values() for d in ds.values())


def _exposed(step: StepGraphs, clock: CollectiveClock) -> dict[str, float]:
    """Modelled exposed seconds of each graph's collectives, in its current order."""
    return {name: sum(t.exposed for t in clock.times(gm.graph).values()) for name, gm in step.graphs()}


def _timed(step: StepGraphs, clock: CollectiveClock, distances: Distances) -> dict[str, list[dict[str, Any]]]:
    """Each moved-or-not collective of each graph: its kind, distance and modelled
    times in the graph's current order."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for name, gm in step.graphs():
        times: dict[str, CollectiveTime] = {node.name: t for node, t in clock.times(gm.graph).items()}
        rows[name] = [
            {"name": node, "kind": kind, "distance": distance, "seconds": times[node].seconds,
             "hidden": times[node].hidden, "exposed": times[node].exposed}
            for kind, by_node in distances[name].items() for node, distance in by_node.items() if node in times
        ]  # fmt: skip
    return rows
