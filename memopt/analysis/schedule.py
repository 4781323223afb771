"""A memory-aware order of a graph's nodes, and the timeline a step would have in it.

`memory_aware_order` is the schedule: among the nodes ready to run, the one whose
outputs minus the storages it frees is smallest. The ``schedule`` pass applies it
(`memopt.passes.schedule`); the rematerialization planner asks `scheduled_timeline`
for the peak a candidate will have once scheduled, so that it judges candidates by the
estimate the pipeline will reach, not by the order the partition emitted
(docs/remat.md, "What memopt does").
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch.fx as fx

from memopt.analysis.aliasing import GraphAliasing, Storage, analyze_aliasing
from memopt.analysis.memory import build_timeline
from memopt.analysis.timeline import MemoryTimeline
from memopt.graph import meta
from memopt.graph.step import StepGraphs

__all__ = [
    "PLACED_TAGS", "apply_order", "memory_aware_order", "output_values_of", "restore_order", "schedule_step",
    "scheduled_timeline",
]

PLACED_TAGS = ("offloaded", "reloaded")
"""memopt tags of nodes whose position another pass chose (offload transfers)."""


def _ordering_deps(nodes: list[fx.Node], aliasing: GraphAliasing) -> dict[fx.Node, set[fx.Node]]:
    """Extra edges beyond data dependencies.

    * Random ops and ops with side effects keep their relative order (the RNG stream
      and effects happen as written).
    * A node writing a storage (in-place, ``copy_`` into an input) stays after every
      earlier reader of that storage and before every later one.
    """
    deps: dict[fx.Node, set[fx.Node]] = defaultdict(set)
    previous_effect: fx.Node | None = None
    readers: dict[Storage, list[fx.Node]] = defaultdict(list)
    writes: dict[Storage, list[fx.Node]] = defaultdict(list)
    for node in nodes:
        effectful = meta.has_side_effects(node) or meta.is_random(node)
        if effectful:
            if previous_effect is not None:
                deps[node].add(previous_effect)
            previous_effect = node
        read = {s for inp in node.all_input_nodes for s in aliasing.storages_of(inp)}
        for storage in read:
            for writer in writes[storage]:
                deps[node].add(writer)
        if meta.has_side_effects(node):
            for storage in read:
                deps[node].update(r for r in readers[storage] if r is not node)
                writes[storage].append(node)
        for storage in read:
            readers[storage].append(node)
    return deps


def memory_aware_order(
    graph: fx.Graph,
    aliasing: GraphAliasing | None = None,
    freeable_inputs: Iterable[fx.Node] = (),
) -> list[fx.Node]:
    """A topological order of ``graph``'s compute nodes chosen greedily to keep live
    memory low: among ready nodes, run the one whose outputs minus the storages it
    frees (as their last remaining user) is smallest; ties keep the original order.

    Storages of graph outputs are never freed; storages of placeholders only if the
    placeholder is in ``freeable_inputs`` (backward's saved values and tangents).
    """
    aliasing = aliasing or analyze_aliasing(graph)
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    position = {n: i for i, n in enumerate(nodes)}
    output_storages = {
        s for out in output_values_of(graph) for s in aliasing.storages_of(out)
    }
    freeable_inputs = set(freeable_inputs)
    storage_users: dict[Storage, set[fx.Node]] = defaultdict(set)
    for node in nodes:
        for inp in node.all_input_nodes:
            for s in aliasing.storages_of(inp):
                storage_users[s].add(node)

    def pinned(s: Storage) -> bool:
        if s in output_storages:
            return True
        return s.producer.op == "placeholder" and s.producer not in freeable_inputs

    extra = _ordering_deps(nodes, aliasing)
    preds = {n: {p for p in n.all_input_nodes if p in position} | extra.get(n, set()) for n in nodes}
    succs: dict[fx.Node, set[fx.Node]] = defaultdict(set)
    for n, ps in preds.items():
        for p in ps:
            succs[p].add(n)
    remaining_users = {s: set(users) for s, users in storage_users.items()}
    waiting = {n: len(ps) for n, ps in preds.items()}
    reads = {n: {s for inp in n.all_input_nodes for s in aliasing.storages_of(inp)} for n in nodes}

    def score(n: fx.Node) -> int:
        alloc = sum(s.nbytes for s in aliasing.fresh.get(n, []))
        freed = sum(s.nbytes for s in reads[n] if not pinned(s) and remaining_users.get(s) == {n})
        return alloc - freed

    # A ready node's score changes only when a storage it reads is left with it as its
    # one remaining user: then that node alone is scored again. The heap keeps stale
    # entries, skipped when popped (their score is no longer the node's).
    current: dict[fx.Node, int] = {}
    ready: list[tuple[int, int, fx.Node]] = []

    def push(n: fx.Node) -> None:
        value = score(n)
        if current.get(n) != value:  # an unchanged score keeps its entry (no duplicate to compare nodes by)
            current[n] = value
            heapq.heappush(ready, (value, position[n], n))

    for n in nodes:
        if waiting[n] == 0:
            push(n)
    order: list[fx.Node] = []
    while ready:
        value, _, n = heapq.heappop(ready)
        if current.get(n) != value:
            continue  # stale: scored again since, or already ordered
        del current[n]
        order.append(n)
        for s in reads[n]:
            users = remaining_users.get(s)
            if users is None:
                continue
            users.discard(n)
            if len(users) == 1 and (last := next(iter(users))) in current:
                push(last)
        for m in succs[n]:
            waiting[m] -= 1
            if waiting[m] == 0:
                push(m)
    if len(order) != len(nodes):
        raise RuntimeError(f"scheduling found a cycle: ordered {len(order)} of {len(nodes)} nodes")
    return order


def output_values_of(graph: fx.Graph) -> list[fx.Node]:
    out = graph.find_nodes(op="output")[0]
    args = out.args[0] if isinstance(out.args[0], (list, tuple)) else (out.args[0],)
    return [a for a in args if isinstance(a, fx.Node)]


def apply_order(graph: fx.Graph, order: list[fx.Node]) -> None:
    """Move the compute nodes ``order`` lists into that order, after the placeholders.
    An empty ``order`` (a graph of nothing but its output: a Dynamo region whose only
    op, such as Reformer's ``torch.seed()``, traced to nothing) leaves ``graph`` as it is."""
    if not order:
        return
    anchor = graph.find_nodes(op="placeholder")[-1] if graph.find_nodes(op="placeholder") else None
    if anchor is None:
        first = next(iter(graph.nodes))
        first.prepend(order[0])
        anchor = order[0]
        order = order[1:]
    for node in order:
        anchor.append(node)
        anchor = node


def restore_order(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    compute = [n for n in nodes if n.op not in ("placeholder", "output")]
    apply_order(graph, compute)


def schedule_step(step: StepGraphs) -> dict[str, list[fx.Node]]:
    """Put every graph of ``step`` in its memory-aware order (in place; graphs holding
    offload transfers keep theirs). Returns each graph's previous node list, for
    `restore_order`."""
    original = {name: list(gm.graph.nodes) for name, gm in step.graphs()}
    for name, gm in step.graphs():
        if any(meta.memopt_tag(n, tag) is not None for n in gm.graph.nodes for tag in PLACED_TAGS):
            continue
        freeable = gm.graph.find_nodes(op="placeholder") if name == "backward" else []
        apply_order(gm.graph, memory_aware_order(gm.graph, freeable_inputs=freeable))
    return original


def scheduled_timeline(
    step: StepGraphs, place: Callable[[MemoryTimeline], MemoryTimeline] = lambda t: t
) -> MemoryTimeline:
    """The timeline of ``step`` (through ``place``: e.g. into the whole step) with its
    graphs in memory-aware order. ``step``'s graphs are reordered to measure it and put
    back as they were before returning."""
    original = schedule_step(step)
    try:
        return place(build_timeline(step))
    finally:
        for name, gm in step.graphs():
            restore_order(gm.graph, original[name])
