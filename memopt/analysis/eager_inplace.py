"""Kernels the eager codegen runs in place: which node writes its result into which input.

Under ``codegen="eager"`` every op allocates its output. For a few CPU kernels whose
output has the size and layout of an input read for the last time, memopt's eager
codegen (`memopt.codegen.eager`) passes that input as the kernel's ``out=`` buffer
instead, and the memory timeline (`memopt.analysis.memory`) frees the input just
before the kernel, so the output costs nothing new. The rule lives here, once, so that
the estimate and the generated code cannot disagree.

The kernels are the softmax backwards, ``_softmax_backward_data`` and
``_log_softmax_backward_data``, over the last dimension of a contiguous CPU tensor: each
row's reduction (``sum(grad * out)``, ``sum(grad)``) is taken before any element of the
row is written, and every element is then written from the same position of the
inputs, so writing into ``grad_output`` gives the same bits as a fresh output (pinned by
``tests/test_eager_inplace.py``). They sit at the peak of many training steps: the loss's
log-softmax backward (logits-sized, with the logits and their saved log-softmax live)
and every eager attention's softmax backward.

Preconditions for a write into input ``grad_output``: its storage is made by an op of
this graph (not a graph input, whose buffer the caller may still hold), is no graph
output, and is read for the last time by this node (`last_use`, in the numbering of
``index``); the input is the whole storage, contiguous, of the output's dtype and
number of elements.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from memopt.analysis.aliasing import GraphAliasing, Storage, concrete_int

__all__ = ["eager_inplace_writes", "OUT_VARIANTS"]

aten = torch.ops.aten

OUT_VARIANTS: dict[torch._ops.OpOverload, tuple[torch._ops.OpOverload, str]] = {
    aten._softmax_backward_data.default: (aten._softmax_backward_data.out, "grad_input"),
    aten._log_softmax_backward_data.default: (aten._log_softmax_backward_data.out, "out"),
}
"""Op -> its ``out=`` overload and the name of the output argument."""


def eager_inplace_writes(
    graph: fx.Graph, aliasing: GraphAliasing, last_use: dict[Storage, int], index: dict[fx.Node, int]
) -> dict[fx.Node, fx.Node]:
    """Nodes the eager codegen runs in place: writer -> the input (``grad_output``, a
    node of ``graph``) whose storage it writes into. See the module docstring for when."""
    output = graph.find_nodes(op="output")
    protected = {s for n in (output[0].all_input_nodes if output else []) for s in aliasing.storages_of(n)}
    writes: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in OUT_VARIANTS or node not in index:
            continue
        grad = node.args[0]
        if isinstance(grad, fx.Node) and _writable(node, grad, aliasing, last_use, index[node], protected):
            writes[node] = grad
    return writes


def _writable(
    node: fx.Node, grad: fx.Node, aliasing: GraphAliasing, last_use: dict[Storage, int], at: int, protected: set[Storage]
) -> bool:
    value, read = node.meta.get("val"), grad.meta.get("val")
    storages = aliasing.storages_of(grad)
    if not isinstance(value, torch.Tensor) or not isinstance(read, torch.Tensor) or len(storages) != 1:
        return False
    storage = storages[0]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    return (
        storage.producer.op == "call_function"
        and storage not in protected
        and last_use.get(storage) == at
        and storage.device.type == "cpu"
        and isinstance(dim, int)
        and dim in (-1, value.dim() - 1)
        and read.dtype == value.dtype
        and read.is_contiguous()
        and value.is_contiguous()
        and concrete_int(read.storage_offset()) == 0
        and concrete_int(read.numel()) == concrete_int(value.numel())
        and storage.nbytes == concrete_int(value.numel()) * value.element_size()
    )
