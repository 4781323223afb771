"""Make dropout's output recomputable without drawing new random numbers.

``native_dropout(x, p, train)`` returns ``(x * mask * scale, mask)``. Recomputing it
in backward would draw a new mask. This rewrite keeps the random op (and so its mask)
where it is, and computes the output as ``(x * mask) * (1 / (1 - p))`` in a separate,
deterministic node that the rematerialization planner may recompute from the saved
mask (a bool tensor, a quarter of a float32 activation).

It is applied only where the result is bit-identical to ATen's kernel: float32 on
the CPU (checked by ``tests/test_remat.py``), for ``0 <= p < 1`` (``p = 0`` is common in
configs and still draws a mask). Elsewhere the dropout output stays a must-save value.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
from torch.fx import _lazy_graph_module as torch_lazy_graph_module
from torch.fx._lazy_graph_module import _use_lazy_graph_module

from memopt.graph import meta

__all__ = ["with_recomputable_dropout"]

aten = torch.ops.aten


def _eligible(node: fx.Node) -> bool:
    if node.target is not aten.native_dropout.default or len(node.args) < 3:
        return False
    x = node.args[0]
    value = meta.tensor_value(x) if isinstance(x, fx.Node) else None
    p, train = node.args[1], node.args[2]
    return (
        value is not None
        and value.dtype == torch.float32
        and value.device.type in ("cpu", "meta")
        and isinstance(p, (int, float))
        and 0.0 <= p < 1.0
        and bool(train)
    )


def with_recomputable_dropout(module: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of ``module`` with eligible dropout outputs rewritten (see module
    docstring), and how many were rewritten. The input module is not modified."""
    graph = copy.deepcopy(module.graph)
    count = 0
    for node in list(graph.nodes):
        if not _eligible(node):
            continue
        getitems = {u.args[1]: u for u in node.users if u.target is operator.getitem}
        out, mask = getitems.get(0), getitems.get(1)
        if out is None or mask is None or not out.users:
            continue
        x, p = node.args[0], node.args[1]
        with graph.inserting_after(mask):
            kept = graph.call_function(aten.mul.Tensor, (x, mask))
        with graph.inserting_after(kept):
            scaled = graph.call_function(aten.mul.Tensor, (kept, 1.0 / (1.0 - p)))
        with meta.graph_fake_mode(graph):
            meta.set_fake_value(kept, aten.mul.Tensor(meta.fake_value(x), meta.fake_value(mask)))
            meta.set_fake_value(scaled, aten.mul.Tensor(meta.fake_value(kept), 1.0 / (1.0 - p)))
        meta.copy_provenance(out, kept)
        meta.copy_provenance(out, scaled)
        out.replace_all_uses_with(scaled)
        count += 1
    if not count:
        return module, 0
    with _use_lazy_graph_module(True):
        rewritten = torch_lazy_graph_module._make_graph_module(module, graph)
    return rewritten, count
