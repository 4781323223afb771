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

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from memopt.graph import meta
from memopt.graph.step import StepGraphs

__all__ = [
    "replace_saved_values",
    "last_forward_user",
    "run_fake",
    "fake_mode_of_step",
    "is_half",
]

Rebuild = Callable[[fx.Graph, list[fx.Node]], list[fx.Node]]


def run_fake(node: fx.Node, fake_mode: Any) -> Any:
    """Compute and record the fake value of a freshly inserted ``call_function`` node
    from its inputs' recorded values."""
    args = fx.node.map_arg(node.args, meta.fake_value)
    kwargs = fx.node.map_arg(node.kwargs, meta.fake_value)
    with fake_mode:
        value = node.target(*args, **kwargs)  # type: ignore[operator]
    meta.set_fake_value(node, value)
    return value


def last_forward_user(node: fx.Node) -> fx.Node:
    """The latest user of ``node`` that is not the output node (``node`` itself if it
    has no other user): the point after which only the saved copy needs it."""
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    users = [u for u in node.users if u.op != "output"]
    return max(users, key=order.__getitem__) if users else node


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
