"""``codegen="eager"``: run the rewritten FX graphs op by op.

The graph is regenerated with FX's boxed calling convention: the compiled function
takes one list of inputs and clears it, and FX's generated code drops every value after
its last use, so a backward graph frees each saved activation as soon as it has
consumed it (as AOTAutograd's ``boxed_nop`` does for ``aot_eager``).

Before that, the kernels `memopt.analysis.eager_inplace` selects write their result
into an input read for the last time (their ``out=`` overload), as the memory timeline
assumes; then the elementwise kernels whose CPU kernel would copy a promoted operand
(a float times a bool dropout mask) run in pieces (`memopt.codegen.promoting`).

AOTAutograd traces a region for this codegen with `DECOMPOSITIONS`: ops whose ATen CPU
kernel allocates scratch the graph cannot see, traced as the ops that kernel runs, so
the memory timeline sees every buffer and the in-place writer can run them in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch.fx.graph import _BoxedCodeGen

from memopt.analysis.aliasing import analyze_aliasing
from memopt.analysis.eager_inplace import OUT_VARIANTS, eager_inplace_writes
from memopt.analysis.liveness import last_reads
from memopt.codegen.promoting import run_in_pieces
from memopt.graph import meta

__all__ = ["compile_eager", "write_in_place", "DECOMPOSITIONS"]

aten = torch.ops.aten


def _dropout_backward(grad: torch.Tensor, mask: torch.Tensor, scale: float) -> Any:
    """``native_dropout_backward`` on CPU as its ATen kernel computes it, op for op:
    ``grad * mask * scale``, so the bits are the same (`tests/test_eager_inplace.py`).
    As one kernel it holds ``grad * mask`` as scratch (a gradient-sized buffer, the
    peak of an eager attention's backward with dropout on); as two multiplications
    the first may write into ``grad`` and the second into the first's result. Other
    devices keep their fused kernel (``NotImplemented``: not decomposed)."""
    if grad.device.type != "cpu":
        return NotImplemented
    return grad * mask * scale


DECOMPOSITIONS: dict[torch._ops.OpOverload, Callable[..., Any]] = {
    aten.native_dropout_backward.default: _dropout_backward,
}
"""Decompositions AOTAutograd applies when tracing a region for eager codegen (module
docstring)."""


def compile_eager(gm: fx.GraphModule, example_inputs: Any = None) -> Callable[[list[Any]], Any]:
    """A boxed callable running ``gm``. ``gm``'s codegen is switched to boxed, the
    kernels `write_in_place` selects are rewritten to write into their input, and
    mixed-dtype elementwise kernels run in pieces (`memopt.codegen.promoting`)."""
    write_in_place(gm.graph)
    run_in_pieces(gm.graph)
    gm.graph.set_codegen(_BoxedCodeGen())
    gm.recompile()
    forward = gm.forward

    def run(args: list[Any]) -> Any:
        return forward(args)

    run._boxed_call = True  # type: ignore[attr-defined]
    run.graph_module = gm  # type: ignore[attr-defined]  # for inspection in tests
    return run


def write_in_place(graph: fx.Graph) -> int:
    """Rewrite the nodes `eager_inplace_writes` selects to their ``out=`` overload,
    writing into the input they read for the last time (of their output's shape: a
    softmax backward's gradient, an elementwise op's operand); the number rewritten.
    Needs fake values on the nodes (`memopt.graph.meta.has_fake_value`); a graph
    without them is left as it is."""
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    if not any(n.target in OUT_VARIANTS for n in nodes):
        return 0
    if not all(meta.has_fake_value(n) for n in nodes):
        return 0
    aliasing = analyze_aliasing(graph)
    index = {n: i for i, n in enumerate(nodes)}
    writes = eager_inplace_writes(graph, aliasing, last_reads(graph, aliasing, index), index)
    for node, read in writes.items():
        variant = OUT_VARIANTS[node.target]
        node.target = variant.overload
        node.kwargs = {**node.kwargs, variant.out_name: read}
    if writes:
        graph.lint()
    return len(writes)
