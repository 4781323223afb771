"""Which values a fusing code generator (Inductor) never writes to memory.

Inductor inlines pointwise computations into the kernels that consume them; such a
value exists only in registers. The rule here follows Inductor's defaults: a
pointwise value is fused away when it is not a graph output, has at most
``realize_reads_threshold`` (4) users, and every user is itself fusible (pointwise, a
reduction, or a view whose users are fusible). Values read by extern kernels
(matmuls, convolutions) are materialized. It is a model of Inductor's scheduler,
checked against measured peaks in ``benchmarks/estimate_accuracy.py``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from memopt.analysis.cost import is_view

__all__ = ["fused_nodes"]

aten = torch.ops.aten
_REDUCTIONS = {
    aten.sum, aten.mean, aten.amax, aten.amin, aten.max, aten.min, aten.var, aten.var_mean,
    aten.prod, aten.argmax, aten.argmin, aten.any, aten.all, aten.std,
}  # fmt: skip
_MAX_READS = 4


def _pointwise(node: fx.Node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


def _reduction(node: fx.Node) -> bool:
    return getattr(node.target, "overloadpacket", None) in _REDUCTIONS


def fused_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Pointwise nodes of ``graph`` whose values a fusing codegen never materializes."""
    fusible_consumer: dict[fx.Node, bool] = {}

    def consumes_fused(node: fx.Node) -> bool:
        if node in fusible_consumer:
            return fusible_consumer[node]
        if node.op != "call_function":
            result = False
        elif _pointwise(node) or _reduction(node):
            result = True
        elif is_view(node):
            result = bool(node.users) and all(consumes_fused(u) for u in node.users)
        else:
            result = False
        fusible_consumer[node] = result
        return result

    fused: set[fx.Node] = set()
    for node in graph.nodes:
        if not _pointwise(node) or not node.users or len(node.users) > _MAX_READS:
            continue
        if all(consumes_fused(u) for u in node.users):
            fused.add(node)
    return fused
