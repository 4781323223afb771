"""Replace one saved-for-backward value by others, in both graphs of a step.

Passes that change *how* a value crosses from forward to backward (compressed codes
instead of the value, a cast's source instead of the cast, later an offload
handle) all make the same edit:

* forward: in the output node's saved section (after ``num_fwd_outputs``), the value
  is replaced by the new forward values, at the same position (values already saved
  are not saved twice);
* backward: the value's placeholder is replaced by placeholders for the new values,
  inserted at the same position so forward outputs and backward inputs stay in the
  same order (`StepGraphs.saved_pairs`), and a caller-built expression recreating the
  value from them is inserted right before the first use.

AOTAutograd counts saved values from the forward outputs after the partitioner
returns, so the bookkeeping stays consistent without touching ``num_fwd_outputs``.
Saved SymInts (first among the backward inputs) are never touched.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.fx as fx

from memopt.analysis.aliasing import concrete_int
from memopt.analysis.compressible import SavedStorage, last_forward_reader, only_saved_views, saved_storages
from memopt.graph import meta
from memopt.graph.step import StepGraphs

__all__ = [
    "replace_saved_values",
    "store_after_last_reader",
    "rebuild_from_base",
    "erase_dead_views",
    "planned_storages",
    "planned_decision",
    "run_fake",
    "fake_mode_of_step",
    "is_half",
]

Rebuild = Callable[[fx.Graph, list[fx.Node]], list[fx.Node]]
A = TypeVar("A")


def run_fake(node: fx.Node, fake_mode: Any) -> Any:
    """Compute and record the fake value of a freshly inserted ``call_function`` node
    from its inputs' recorded values."""
    args = fx.node.map_arg(node.args, meta.fake_value)
    kwargs = fx.node.map_arg(node.kwargs, meta.fake_value)
    with fake_mode:
        value = node.target(*args, **kwargs)  # type: ignore[operator]
    meta.set_fake_value(node, value)
    return value


def replace_saved_values(
    step: StepGraphs,
    values: Sequence[fx.Node],
    replacements: Sequence[fx.Node],
    rebuild: Rebuild,
    *,
    names: Sequence[str] | None = None,
) -> list[fx.Node]:
    """Save ``replacements`` (forward nodes with fake values) instead of the saved
    forward ``values``, and recreate those values in backward with
    ``rebuild(backward_graph, placeholders)``, which returns one node per value (its
    insertion point is before the earliest first user of the values' placeholders;
    the nodes it makes need fake values). Returns the rebuilt nodes.

    The replacements take the position of the first of ``values`` in the forward
    outputs and backward inputs; replacements already saved are not saved twice.
    ``names`` optionally names the new backward placeholders (aligned with
    ``replacements``). Raises ``ValueError`` if a value is not saved.
    """
    assert step.backward is not None, "replace_saved_values needs a training step"
    pairs = dict(step.saved_pairs())
    missing = [v.name for v in values if v not in pairs]
    if missing:
        raise ValueError(f"region {step.region}: {missing} are not saved for backward")
    fw_out = step.forward.graph.find_nodes(op="output")[0]
    outputs = list(fw_out.args[0])
    positions = sorted(outputs.index(v, step.num_fwd_outputs) for v in values)
    fresh = [r for r in dict.fromkeys(replacements) if r not in pairs]
    anchor_ph = pairs[outputs[positions[0]]]
    for position in reversed(positions[1:]):
        del outputs[position]
    outputs[positions[0] : positions[0] + 1] = fresh
    fw_out.args = (type(fw_out.args[0])(outputs), *fw_out.args[1:])

    bw_graph = step.backward.graph
    placeholders: dict[fx.Node, fx.Node] = {}
    for k, r in enumerate(replacements):  # in forward-output order, like `fresh`
        if r in fresh and r not in placeholders:
            with bw_graph.inserting_before(anchor_ph):
                ph = bw_graph.placeholder(names[k] if names is not None else r.name)
            meta.set_fake_value(ph, meta.fake_value(r))
            placeholders[r] = ph
    old = [pairs[v] for v in values]
    users = [u for ph in old for u in ph.users]
    order = {n: i for i, n in enumerate(bw_graph.nodes)}
    with bw_graph.inserting_before(min(users, key=order.__getitem__) if users else anchor_ph):
        rebuilt = rebuild(bw_graph, [placeholders.get(r) or pairs[r] for r in replacements])
    for ph, new in zip(old, rebuilt):
        ph.replace_all_uses_with(new)
        bw_graph.erase_node(ph)
    return rebuilt


Encode = Callable[[fx.Graph, fx.Node], fx.Node]
"""Inserts (at the graph's insertion point) the node storing a dense value."""
Decode = Callable[[fx.Graph, list[fx.Node], list[int]], fx.Node]
"""Inserts the node restoring a dense value of the given size from the stored nodes."""


def store_after_last_reader(
    group: SavedStorage, encode: Encode, fake_mode: Any, tag: tuple[str, str], parts: int = 1
) -> list[fx.Node]:
    """Forward nodes storing the group's dense base (read in storage order) right after
    the last forward reader of its storage (`last_forward_reader`): the node
    ``encode`` makes, or its ``parts`` outputs. Each is tagged ``tag``."""
    base = group.base
    assert base is not None
    graph = base.graph
    source, anchor = base, last_forward_reader(group)
    if list(group.order) != sorted(group.order):  # read the storage in its own order
        with graph.inserting_after(anchor):
            source = anchor = graph.call_function(torch.ops.aten.permute.default, (base, list(group.order)))
        run_fake(source, fake_mode)
    with graph.inserting_after(anchor):
        stored = encode(graph, source)
    meta.copy_meta(base, stored)
    meta.set_memopt_tag(stored, *tag)
    value = run_fake(stored, fake_mode)
    if parts == 1:
        return [stored]
    outputs, anchor = [], stored
    for i in range(parts):
        with graph.inserting_after(anchor):
            anchor = graph.call_function(operator.getitem, (stored, i))
        meta.set_fake_value(anchor, value[i])
        outputs.append(anchor)
    return outputs


def rebuild_from_base(group: SavedStorage, decode: Decode, fake_mode: Any, tag: tuple[str, str]) -> Rebuild:
    """A ``rebuild`` callback for `replace_saved_values`: restore the group's base once
    with ``decode`` (in storage order, permuted back to the original dims), then each
    saved value (the base itself, or a view of it rebuilt with ``as_strided``)."""
    base = group.base
    original = meta.tensor_value(base) if base is not None else None
    assert base is not None and original is not None
    order = list(group.order)

    def rebuild(graph: fx.Graph, inputs: list[fx.Node]) -> list[fx.Node]:
        restored = decode(graph, inputs, [concrete_int(original.shape[d]) for d in order])
        meta.copy_meta(base, restored)
        meta.set_memopt_tag(restored, *tag)
        run_fake(restored, fake_mode)
        if order != sorted(order):  # back to the original dims: the original strides
            inverse = sorted(range(len(order)), key=order.__getitem__)
            restored = graph.call_function(torch.ops.aten.permute.default, (restored, inverse))
            run_fake(restored, fake_mode)
        return [_view_of(graph, restored, value, fake_mode) for value in group.values]

    return rebuild


def _view_of(graph: fx.Graph, restored: fx.Node, value: fx.Node, fake_mode: Any) -> fx.Node:
    """``value`` rebuilt from the restored base (itself if it has the base's layout)."""
    want, have = meta.tensor_value(value), meta.tensor_value(restored)
    assert want is not None and have is not None
    geometry = (list(want.shape), list(want.stride()), concrete_int(want.storage_offset()))
    if geometry == (list(have.shape), list(have.stride()), 0):
        return restored
    node = graph.call_function(torch.ops.aten.as_strided.default, (restored, *geometry))
    meta.copy_meta(value, node)
    run_fake(node, fake_mode)
    return node


def erase_dead_views(group: SavedStorage) -> None:
    """Remove the only-saved views of the group's storage that a rewrite left without
    users."""
    for node in sorted(only_saved_views(group), key=list(group.values[0].graph.nodes).index, reverse=True):
        if not node.users:
            node.graph.erase_node(node)


def planned_storages(
    step: StepGraphs, planned: Mapping[str, A], fmt_of: Callable[[A], str]
) -> tuple[list[tuple[SavedStorage, A]], list[str]]:
    """The saved storages a plan's actions name (by any saved value on the storage or
    its dense base), each with its action, grouped for the storage format
    ``fmt_of(action)`` (`memopt.analysis.compressible.saved_storages`); and the planned
    names no saved storage answers to (another pass replaced those values)."""
    out: list[tuple[SavedStorage, A]] = []
    found: set[str] = set()
    for fmt in sorted({fmt_of(a) for a in planned.values()}):
        for group in saved_storages(step, fmt, min_elements=0):
            names = [v.name for v in group.values] + ([group.base.name] if group.base is not None else [])
            action = next((planned[n] for n in names if n in planned and fmt_of(planned[n]) == fmt), None)
            if action is not None:
                found.update(n for n in names if n in planned)
                out.append((group, action))
    return out, sorted(set(planned) - found)


def planned_decision(decisions: Sequence[Any], group: SavedStorage) -> Any:
    """The plan's `TensorDecision` about ``group`` (named by a saved value or the base)."""
    names = {v.name for v in group.values} | ({group.base.name} if group.base is not None else set())
    return next(d for d in decisions if d.node_name in names)


def fake_mode_of_step(step: StepGraphs) -> Any:
    """The fake mode of the step's recorded values (forward placeholders)."""
    mode = meta.fake_mode_of(step.forward.graph.find_nodes(op="placeholder"))
    if mode is None:
        raise ValueError(
            f"region {step.region}: the forward graph carries no fake values; saved-value "
            f"rewrites need AOTAutograd's graphs (node.meta['val'])."
        )
    return mode


def is_half(value: Any) -> bool:
    """A bfloat16 or float16 tensor."""
    return isinstance(value, torch.Tensor) and value.dtype in (torch.bfloat16, torch.float16)
