"""Cut a forward graph into segments at its bottlenecks, the planner's stages.

A *boundary* is a forward value every later computation reaches only through it
(ignoring parameters, values derived from parameters alone, small values such as
masks or rotary tables, and values computed from small values alone, such as an
attention mask broadcast to the scores' shape): in topological order, no large value made before it is read
after it. The residual stream between transformer blocks, or the activation between
CNN stages, are boundaries. Between consecutive boundaries lies a *segment*: if the
segment's boundary input is saved, everything inside can be recomputed in backward
without touching any other segment, which makes each segment's options independent
(the planner's MILP relies on that).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from memopt.graph import meta

__all__ = ["Segment", "find_segments", "must_save", "must_save_reason"]

aten = torch.ops.aten


def must_save(node: fx.Node) -> bool:
    """Values that are never recomputed: random ops (recomputing would draw new
    random numbers), ops with side effects or collectives (but an all-gather of a
    parameter shard may be gathered again, whatever its tag: `meta.is_regatherable`),
    and values tagged must-save for correctness (memopt's pins of reads of inputs the
    step writes, torch's forced saves); for a ``getitem``, its multi-output producer
    decides. A must-save tag a user's ``torch.utils.checkpoint`` put on a value
    (`meta.checkpoint_must_save`: a block boundary, a selective policy's choice) is a
    preference, not a constraint: the planner may recompute that value to meet a budget,
    as it may save a value the checkpoint would recompute (recomputing a deterministic
    op gives the same numbers)."""
    source = node.args[0] if node.target is operator.getitem and node.args else node
    if not isinstance(source, fx.Node):
        return False
    if meta.is_regatherable(source):
        return False  # AOTAutograd tags every collective must-save (force_save_collectives); not these
    if meta.is_random(source) or meta.has_side_effects(source):
        return True
    return meta.must_save_tag(source) and not meta.checkpoint_must_save(source)


def must_save_reason(node: fx.Node) -> str | None:
    """Why `must_save` holds for ``node`` (None where it does not), as the plan's
    decision states it."""
    if not must_save(node):
        return None
    source = node.args[0] if node.target is operator.getitem and node.args else node
    assert isinstance(source, fx.Node)  # must_save holds
    if meta.is_random(source):
        return "random op: recomputing would draw new random numbers"
    if meta.has_side_effects(source):
        return "side effect: recomputing would run it twice"
    return (
        "tagged must-save, never recomputed: a read of an input the step writes in place (recomputed, "
        "it would read the new contents), or saved by torch's partitioner for correctness"
    )


@dataclass
class Segment:
    """One stage of the forward: its nodes (graph order) and the values later
    segments read from it (``crossers``: its boundary plus any small values)."""

    index: int
    nodes: list[fx.Node]
    crossers: list[fx.Node] = field(default_factory=list)

    @property
    def boundary(self) -> fx.Node:
        return self.nodes[-1]


def _from_small(nodes: Sequence[fx.Node], dependent: set[fx.Node], small: int) -> set[fx.Node]:
    """Activation-dependent values computed from small activation-dependent values and
    constants alone, directly or through other such values, reading no parameter or
    buffer: an attention mask broadcast from the ``attention_mask`` input to the
    scores' shape, read by every block. Such a value never blocks a cut; a segment
    that reads it from an earlier one keeps it (a crosser), at its size. An embedding
    (it reads its weight) or anything computed from a large activation blocks; so does
    anything read from a multi-output op (its tuple has no single size: a batch norm's
    ``getitem`` is as large as its input)."""
    side: set[fx.Node] = set()
    for node in nodes:
        if node not in dependent or node.op == "placeholder":
            continue
        inputs = node.all_input_nodes
        data = [i for i in inputs if i in dependent]
        if (
            data
            and all(i in side or (meta.tensor_value(i) is not None and meta.value_bytes(i) <= small) for i in data)
            and not any(i.op == "placeholder" for i in inputs if i not in dependent)
        ):
            side.add(node)
    return side


def _activation_dependent(nodes: Sequence[fx.Node], activation_inputs: set[fx.Node]) -> set[fx.Node]:
    dependent: set[fx.Node] = set(activation_inputs)
    for node in nodes:
        if any(i in dependent for i in node.all_input_nodes):
            dependent.add(node)
    return dependent


def find_segments(
    nodes: Sequence[fx.Node],
    activation_inputs: set[fx.Node],
    extras: Sequence[fx.Node] = (),
    saved_bytes: dict[fx.Node, int] | None = None,
    max_segments: int = 48,
    min_nodes: int = 2,
) -> list[Segment]:
    """Segments of the forward compute ``nodes`` (joint-graph order).

    ``activation_inputs`` are the placeholders that carry data (not parameters or
    buffers); values depending on none of them are never boundaries nor blockers.
    ``extras`` are forward-side values only backward uses; each joins the segment of
    its latest input (they never decide boundaries). ``saved_bytes`` (bytes the
    partitioner saves, by node) keeps a boundary only once the segment it closes saves
    at least twice the boundary's size: recomputing a segment from a boundary as
    large as what it saves would gain nothing (a plain MLP gets two-layer segments).
    """
    position = {n: i for i, n in enumerate(nodes)}
    dependent = _activation_dependent(nodes, activation_inputs)
    sizes = sorted(meta.value_bytes(n) for n in nodes if n in dependent and meta.value_bytes(n) > 0)
    large = sizes[(3 * len(sizes)) // 4] if sizes else 0
    small = large // 8
    side = _from_small(nodes, dependent, small)

    def blocks(n: fx.Node) -> bool:
        return n in dependent and meta.value_bytes(n) > small and n not in side

    reach = [max((position[u] for u in n.users if u in position), default=i) for i, n in enumerate(nodes)]
    candidates: list[int] = []
    furthest = -1
    for i, n in enumerate(nodes):
        if furthest <= i and blocks(n) and reach[i] > i:
            candidates.append(i)
        if blocks(n):
            furthest = max(furthest, reach[i])
    weight = [(saved_bytes or {}).get(n, 0) for n in nodes]
    cuts = _thin(candidates, nodes, weight, max_segments, min_nodes, saved_bytes is not None)
    segments: list[Segment] = []
    start = 0
    for end in [*cuts, len(nodes) - 1]:
        if end < start:
            continue
        segments.append(Segment(len(segments), list(nodes[start : end + 1])))
        start = end + 1
    _attach(segments, extras)
    _mark_crossers(segments)
    return segments


def _attach(segments: list[Segment], extras: Sequence[fx.Node]) -> None:
    owner = {n: s.index for s in segments for n in s.nodes}
    for node in extras:
        if node in owner or not segments:
            continue
        k = max((owner[i] for i in node.all_input_nodes if i in owner), default=0)
        segments[k].nodes.append(node)
        owner[node] = k


def _thin(
    candidates: list[int], nodes: Sequence[fx.Node], weight: list[int], max_segments: int, min_nodes: int,
    by_benefit: bool,
) -> list[int]:
    """Keep boundaries at least ``min_nodes`` apart, worth cutting at (see
    `find_segments`), at most ``max_segments - 1``."""
    n = len(nodes)
    kept: list[int] = []
    last = -1
    for c in candidates:
        inside = sum(weight[last + 1 : c + 1])
        worth = not by_benefit or inside >= 2 * meta.value_bytes(nodes[c])
        if c - last >= min_nodes and n - 1 - c >= min_nodes and worth:
            kept.append(c)
            last = c
    if len(kept) >= max_segments:
        step = len(kept) / (max_segments - 1)
        kept = [kept[int(i * step)] for i in range(max_segments - 1)]
    return kept


def _mark_crossers(segments: list[Segment]) -> None:
    owner = {n: s.index for s in segments for n in s.nodes}
    for segment in segments:
        segment.crossers = [
            n for n in segment.nodes if any(owner.get(u, -1) > segment.index for u in n.users)
        ]
