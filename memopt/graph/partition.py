"""Split a joint forward+backward graph given the set of values to save.

This is the one place memopt calls AOTAutograd's private partitioning helpers
(``torch._functorch.partitioners``); ``tests/test_partition.py`` pins their behaviour.
Given the saved set, ``_extract_fwd_bwd_modules`` builds the forward graph (returning
the saved values after the user outputs) and the backward graph, into which it copies
every forward op the backward needs but that is not saved: that copy *is* the
rematerialization. ``reordering_to_mimic_autograd_engine`` then moves each recomputed
op to just before its first use, so recomputed values do not all materialize at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch.fx as fx
from torch._functorch import partitioners as torch_partitioners

from memopt.graph import meta
from memopt.graph.step import StepGraphs

__all__ = ["JointGraph", "split_joint", "forward_nodes", "saved_names"]


@dataclass
class JointGraph:
    """AOTAutograd's joint graph of a training region, kept for re-partitioning."""

    module: fx.GraphModule
    num_fwd_outputs: int

    def node(self, name: str) -> fx.Node:
        found = self._by_name().get(name)
        if found is None:
            raise KeyError(f"joint graph has no node {name!r}")
        return found

    def _by_name(self) -> dict[str, fx.Node]:
        cache = getattr(self, "_names", None)
        if cache is None:
            cache = {n.name: n for n in self.module.graph.nodes}
            self._names = cache
        return cache


def forward_nodes(joint: JointGraph, *, required_only: bool = False) -> list[fx.Node]:
    """Joint-graph compute nodes that do not depend on an incoming gradient, in graph
    order: the values a forward pass can compute. With ``required_only``, only those
    the forward outputs depend on (the rest are forward-side values only backward
    uses, such as a layer norm's saved statistics or views of attention inputs)."""
    graph = joint.module.graph
    output = graph.find_nodes(op="output")[0]
    outs = output.args[0][: joint.num_fwd_outputs]
    needed: set[fx.Node] = set()
    stack = [o for o in outs if isinstance(o, fx.Node)]
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        stack.extend(node.all_input_nodes)
    tangent_dependent: set[fx.Node] = set()
    for node in graph.nodes:
        if meta.is_tangent(node) or any(i in tangent_dependent for i in node.all_input_nodes):
            tangent_dependent.add(node)
    return [
        n
        for n in graph.nodes
        if n.op == "call_function" and n not in tangent_dependent and (n in needed or not required_only)
    ]


def saved_names(step: StepGraphs) -> list[str]:
    """Names of the values ``step``'s forward saves for backward."""
    return [n.name for n in step.saved_outputs()]


def split_joint(joint: JointGraph, saved: Iterable[str], region: str = "0") -> tuple[fx.GraphModule, fx.GraphModule]:
    """Forward and backward graphs that save exactly the values named in ``saved``
    (plus every primal and symbol backward needs) and recompute the rest in backward,
    each recomputed op placed just before its first use."""
    graph = joint.module.graph
    placeholders = graph.find_nodes(op="placeholder")
    primals = [p for p in placeholders if not meta.is_tangent(p) and "seed" not in p.name]
    wanted = [joint.node(n) for n in dict.fromkeys(saved)]
    tensors = [n for n in primals if not meta.is_symbolic(n)] + [n for n in wanted if not meta.is_symbolic(n)]
    symbols = [n for n in graph.nodes if meta.is_symbolic(n) and n.op != "output" and not meta.is_tangent(n)]
    forward, backward = torch_partitioners._extract_fwd_bwd_modules(
        joint.module,
        list(dict.fromkeys(tensors)),
        list(dict.fromkeys(symbols)),
        num_fwd_outputs=joint.num_fwd_outputs,
    )
    backward = torch_partitioners.reordering_to_mimic_autograd_engine(backward)
    forward = torch_partitioners.raise_getitems(forward)
    backward = torch_partitioners.raise_getitems(backward)
    return forward, backward
