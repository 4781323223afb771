"""Kernels the eager codegen runs in place: which node writes its result into which input.

Under ``codegen="eager"`` every op allocates its output. For CPU kernels whose output
has the size and layout of an input read for the last time, memopt's eager codegen
(`memopt.codegen.eager`) passes that input as the kernel's ``out=`` buffer instead, and
the memory timeline (`memopt.analysis.memory`) frees the input just before the kernel,
so the output costs nothing new. The rule lives here, once, so that the estimate and
the generated code cannot disagree.

The kernels (`OUT_VARIANTS`):

* the softmax backwards, ``_softmax_backward_data`` and ``_log_softmax_backward_data``,
  over the last dimension, written into ``grad_output``: each row's reduction
  (``sum(grad * out)``, ``sum(grad)``) is taken before any element of the row is
  written, and every element is then written from the same position of the inputs.
  They sit at the peak of many training steps: the loss's log-softmax backward
  (logits-sized, with the logits and their saved log-softmax live) and every eager
  attention's softmax backward;
* elementwise kernels (``add``, ``sub``, ``mul``, ``div``, ``neg`` and the activation
  backwards ``silu``/``gelu``/``tanh``/``sigmoid``/``threshold``), written into any
  tensor operand of the output's shape: element ``i`` of the output reads only element
  ``i`` of each operand, and an output that overlaps an operand exactly is what their
  in-place forms (``add_``) do. In a backward graph they are the gradient sums of
  residual connections, the loss's zero logits gradient added to the loss's own, and
  every activation's backward.

Both give the same bits as a fresh output (pinned by ``tests/test_eager_inplace.py``).

Preconditions for a write into an input: its storage is made by an op of this graph
(not a graph input, whose buffer the caller may still hold), is no graph output, is
read for the last time by this node (`last_use`, in the numbering of ``index``) and by
no other operand of it through another view; the input is the whole storage,
contiguous, of the output's dtype and shape (its number of elements, for the softmax
backwards).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from memopt.analysis.aliasing import GraphAliasing, Storage, concrete_int
from memopt.graph import meta

__all__ = ["eager_inplace_writes", "OUT_VARIANTS", "OutVariant"]

aten = torch.ops.aten

@dataclass(frozen=True)
class OutVariant:
    """How a kernel writes into one of its inputs."""

    overload: torch._ops.OpOverload
    """The ``out=`` overload."""
    out_name: str
    """Its output argument's name."""
    writable: tuple[int, ...]
    """Positions of the inputs it may write into, in order of preference."""
    last_dim: bool = False
    """Only when its ``dim`` (third argument) is the last dimension (softmax backwards)."""


def _elementwise(out: torch._ops.OpOverload, inputs: int = 2) -> OutVariant:
    """An elementwise kernel's variant: it may write into any of its ``inputs`` operands."""
    return OutVariant(out, "out" if out._overloadname == "out" else "grad_input", tuple(range(inputs)))


OUT_VARIANTS: dict[torch._ops.OpOverload, OutVariant] = {
    aten._softmax_backward_data.default: OutVariant(aten._softmax_backward_data.out, "grad_input", (0,), True),
    aten._log_softmax_backward_data.default: OutVariant(aten._log_softmax_backward_data.out, "out", (0,), True),
    aten.add.Tensor: _elementwise(aten.add.out),
    aten.sub.Tensor: _elementwise(aten.sub.out),
    aten.mul.Tensor: _elementwise(aten.mul.out),
    aten.div.Tensor: _elementwise(aten.div.out),
    aten.neg.default: _elementwise(aten.neg.out, inputs=1),
    aten.silu_backward.default: _elementwise(aten.silu_backward.grad_input),
    aten.gelu_backward.default: _elementwise(aten.gelu_backward.grad_input),
    aten.tanh_backward.default: _elementwise(aten.tanh_backward.grad_input),
    aten.sigmoid_backward.default: _elementwise(aten.sigmoid_backward.grad_input),
    aten.threshold_backward.default: _elementwise(aten.threshold_backward.grad_input),
}
"""Op -> how it writes into an input (module docstring)."""


def eager_inplace_writes(
    graph: fx.Graph, aliasing: GraphAliasing, last_use: dict[Storage, int], index: dict[fx.Node, int]
) -> dict[fx.Node, fx.Node]:
    """Nodes the eager codegen runs in place: writer -> the input (a node of ``graph``)
    whose storage it writes into. See the module docstring for when."""
    output = graph.find_nodes(op="output")
    protected = {s for n in (output[0].all_input_nodes if output else []) for s in aliasing.storages_of(n)}
    writes: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in OUT_VARIANTS or node not in index:
            continue
        variant = OUT_VARIANTS[node.target]
        if variant.last_dim and not _over_last_dim(node):
            continue
        for position in variant.writable:
            read = node.args[position] if position < len(node.args) else None
            if isinstance(read, fx.Node) and _writable(node, read, variant, aliasing, last_use, index[node], protected):
                writes[node] = read
                break
    return writes


def _over_last_dim(node: fx.Node) -> bool:
    value = meta.fake_value(node)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    return isinstance(value, torch.Tensor) and isinstance(dim, int) and dim in (-1, value.dim() - 1)


def _writable(
    node: fx.Node,
    read_node: fx.Node,
    variant: OutVariant,
    aliasing: GraphAliasing,
    last_use: dict[Storage, int],
    at: int,
    protected: set[Storage],
) -> bool:
    value, read = meta.fake_value(node), meta.fake_value(read_node)
    storages = aliasing.storages_of(read_node)
    if not isinstance(value, torch.Tensor) or not isinstance(read, torch.Tensor) or len(storages) != 1:
        return False
    storage = storages[0]
    others = [a for a in node.all_input_nodes if a is not read_node]
    same_shape = variant.last_dim or tuple(read.shape) == tuple(value.shape)
    return (
        storage.producer.op == "call_function"
        and storage not in protected
        and last_use.get(storage) == at
        and not any(storage in aliasing.storages_of(a) for a in others)  # no other view of it read here
        and storage.device.type == "cpu"
        and same_shape
        and read.dtype == value.dtype
        and read.is_contiguous()
        and value.is_contiguous()
        and concrete_int(read.storage_offset()) == 0
        and concrete_int(read.numel()) == concrete_int(value.numel())
        and storage.nbytes == concrete_int(value.numel()) * value.element_size()
    )
