"""Small op classifications shared by analyses and passes over AOTAutograd graphs.

* dtype casts (``_to_copy``, ``convert_element_type``) and view ops: cheap, exact to
  redo, so a saved value built from them can be recomputed or traced to its source;
* ops reading a value only for its signs or zeros (ReLU's ``threshold_backward``);
* values that may hold infinities on purpose (attention masks made with ``-inf``):
  a forward dataflow from ops with a non-finite constant through pointwise ops and
  views (reductions, matmuls and attention turn masked inputs into finite outputs).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

__all__ = [
    "CAST_OPS", "VIEW_OPS", "COPY_OPS", "SIGN_READERS", "cast_and_view_source", "may_hold_infinities", "allocated_at",
]  # fmt: skip

aten = torch.ops.aten
CAST_OPS = frozenset({aten._to_copy.default, torch.ops.prims.convert_element_type.default})
VIEW_OPS = frozenset({
    aten.t.default, aten.transpose.int, aten.permute.default, aten.view.default,
    aten._unsafe_view.default, aten.expand.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.slice.Tensor, aten.select.int,
    aten.alias.default, aten.detach.default,
})  # fmt: skip


COPY_OPS = frozenset({aten.clone.default, aten.reshape.default})
"""Single-input layout copies (Inductor's decompositions put them between a cast and
the value saved): deterministic and cheap to redo, like views."""

SIGN_READERS = frozenset({
    aten.threshold_backward.default, aten.le.Scalar, aten.lt.Scalar, aten.ge.Scalar,
    aten.gt.Scalar, aten.eq.Scalar, aten.ne.Scalar, aten.sign.default,
})  # fmt: skip
"""Ops that read a tensor for its signs or zeros (ReLU's backward and masks)."""


def allocated_at(node: fx.Node) -> fx.Node:
    """The node at which ``node``'s output memory is allocated: ``node`` itself, except
    for a ``memopt::reload_wait`` whose ``memopt::reload_start`` began filling a fresh
    buffer earlier (an offloaded value's prefetch)."""
    if str(node.target) == "memopt.reload_wait.default":
        start = node.args[0]
        if isinstance(start, fx.Node) and str(start.target) == "memopt.reload_start.default":
            return start
    return node


def cast_and_view_source(node: fx.Node) -> fx.Node:
    """The value ``node`` is made from by casts, views and layout copies only (``node``
    itself if its producer is anything else)."""
    while node.op == "call_function" and node.target in CAST_OPS | VIEW_OPS | COPY_OPS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _nonfinite_constant(args: Any) -> bool:
    if isinstance(args, float):
        return not math.isfinite(args)
    if isinstance(args, (list, tuple)):
        return any(_nonfinite_constant(a) for a in args)
    if isinstance(args, dict):
        return any(_nonfinite_constant(a) for a in args.values())
    return False


def _propagates(node: fx.Node) -> bool:
    target = node.target
    if target in VIEW_OPS or target in CAST_OPS:
        return True
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


def may_hold_infinities(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose values may hold inf/nan by construction (see module docstring)."""
    maybe: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if _nonfinite_constant(node.args) or _nonfinite_constant(node.kwargs):
            maybe.add(node)
        elif _propagates(node) and any(a in maybe for a in node.all_input_nodes):
            maybe.add(node)
    return maybe
