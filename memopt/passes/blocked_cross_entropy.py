"""Pass ``blocked_cross_entropy``: the loss stops holding logits-sized buffers.

A language model's loss, ``F.cross_entropy`` over tokens x vocabulary logits, makes
autograd save the log-probabilities (one more logits-sized tensor, through the whole
backward) and peaks in its backward with three of them live besides the logits
(docs/memory.md). This pass calls `memopt.codegen.cross_entropy`'s op instead, which
saves the logits (which the model returns, so they live anyway) and works a block of
rows at a time, with the same numbers bit for bit.

With ``codegen="inductor"`` the pass does nothing: Inductor generates the loss's
kernels itself (it recomputes the log-probabilities in the backward's fused kernel and
never writes ``nll_loss_backward``'s tensor), so its loss already holds no more than
the logits and their gradient, and the op's blocks would only add scratch (measured on
default-config Llama and BERT with the op's earlier two-block backward: 1 MiB more at
the unbudgeted peak, the budgeted floors unchanged; docs/memory.md).
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from memopt.analysis.manager import AnalysisManager, PreservedAnalyses
from memopt.codegen import cross_entropy as _ops  # registers memopt::cross_entropy
from memopt.graph import meta
from memopt.graph.step import StepGraphs
from memopt.passes.base import Pass, PassContext, PassResult

__all__ = ["BlockedCrossEntropy", "blocked_cross_entropy"]

_SIGNATURE = inspect.signature(F.cross_entropy)
_ENTER_AUTOCAST = torch.amp.autocast_mode._enter_autocast
_EXIT_AUTOCAST = torch.amp.autocast_mode._exit_autocast
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")
_UNCHANGED_DEFAULTS = {"weight": None, "size_average": None, "reduce": None, "label_smoothing": 0.0}


def _call(node: fx.Node) -> dict[str, Any] | None:
    """The arguments of an ``F.cross_entropy`` call the op computes the same way, or
    None: (N, C) floating logits, (N,) integer targets, a reduction by name, an integer
    ``ignore_index``, no class weights, no label smoothing, no legacy flags."""
    if node.op != "call_function" or node.target is not F.cross_entropy:
        return None
    try:
        bound = _SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    if any(arguments[name] != default for name, default in _UNCHANGED_DEFAULTS.items()):
        return None
    x, target = arguments["input"], arguments["target"]
    if not (isinstance(x, fx.Node) and isinstance(target, fx.Node)):
        return None
    x_value, t_value = meta.fake_value(x), meta.fake_value(target)
    if not (isinstance(x_value, torch.Tensor) and isinstance(t_value, torch.Tensor)):
        return None
    if x_value.dim() != 2 or not x_value.is_floating_point() or t_value.dim() != 1 or t_value.is_floating_point():
        return None
    if arguments["reduction"] not in _ops.REDUCTIONS or not isinstance(arguments["ignore_index"], int):
        return None
    return arguments


def _in_autocast(graph: fx.Graph) -> set[fx.Node]:
    """The nodes between an ``torch.autocast`` block's enter and exit in ``graph``."""
    inside, depth = set(), 0
    for node in graph.nodes:
        if node.target is _ENTER_AUTOCAST:
            depth += 1
        elif node.target is _EXIT_AUTOCAST:
            depth = max(depth - 1, 0)
        elif depth:
            inside.add(node)
    return inside


def _autocast_devices() -> frozenset[str]:
    """The device types an ambient ``torch.autocast`` is on for while compiling."""
    on = set()
    for device in _AUTOCAST_DEVICES:
        try:
            if torch.is_autocast_enabled(device):
                on.add(device)
        except RuntimeError:  # a device type this build does not know
            continue
    return frozenset(on)


def blocked_cross_entropy(graph: fx.Graph, autocast_devices: frozenset[str] = frozenset()) -> int:
    """Replace every eligible ``F.cross_entropy`` call of a Dynamo-level ``graph`` by
    ``memopt::cross_entropy`` (and a ``getitem`` of its loss); return how many.

    ``autocast_devices``: the device types of an ambient ``torch.autocast`` around the
    compiled call. Autocast runs the loss's ATen ops in fp32, so half logits on such a
    device are given to the op with ``upcast=True``, which computes what autocast does
    (the same numbers, bit for bit). Calls inside a ``torch.autocast`` block of the
    graph are left as written (the block may disable autocast, or differ from the
    ambient one)."""
    replaced = 0
    inside = _in_autocast(graph)
    for node in list(graph.nodes):
        arguments = None if node in inside else _call(node)
        if arguments is None:
            continue
        x, target = arguments["input"], arguments["target"]
        x_value = meta.fake_value(x)
        upcast = x_value.device.type in autocast_devices and x_value.dtype in _ops.HALF
        with graph.inserting_before(node):
            narrow = _half_source(graph, x)
            if narrow is not None:
                x, x_value, upcast = narrow, meta.fake_value(narrow), True
            args = (x, target, _ops.REDUCTIONS[arguments["reduction"]], arguments["ignore_index"], upcast)
            call = graph.call_function(torch.ops.memopt.cross_entropy.default, args)
            loss = graph.call_function(operator.getitem, (call, 0))
        value = torch.ops.memopt.cross_entropy.default(x_value, meta.fake_value(target), *args[2:])
        meta.set_example_value(call, value)
        meta.set_example_value(loss, value[0])
        meta.copy_dynamo_provenance(node, call)
        meta.copy_dynamo_provenance(node, loss)
        node.replace_all_uses_with(loss)
        graph.erase_node(node)
        if narrow is not None:
            _erase_unused(arguments["input"])
        replaced += 1
    return replaced


_RESHAPES = ("view", "reshape", "flatten", "contiguous")


def _widening(node: fx.Node) -> fx.Node | None:
    """The half tensor ``node`` widens to fp32 (``x.float()``, ``x.to(torch.float32)``,
    ``x.to(dtype=torch.float32)``), or None."""
    if node.op != "call_method" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source, rest = node.args[0], (node.args[1:], node.kwargs)
    widens = (node.target == "float" and rest == ((), {})) or (
        node.target == "to" and rest in (((torch.float32,), {}), ((), {"dtype": torch.float32}))
    )
    value = meta.fake_value(source)
    return source if widens and isinstance(value, torch.Tensor) and value.dtype in _ops.HALF else None


def _half_source(graph: fx.Graph, x: fx.Node) -> fx.Node | None:
    """For loss logits that are fp32 copies of half ones, reshaped (Hugging Face's
    ``logits.float()`` then ``.view(-1, vocab)``), the same reshapes of the half logits,
    inserted at the graph's insertion point, else None. Only when the copy and each
    reshape have no other user: then the op widens the half logits block by block
    (``upcast=True``, the same numbers) and saves them, not the fp32 copy."""
    chain, node = [], x
    while node.op == "call_method" and node.target in _RESHAPES and len(node.users) == 1:
        chain.append(node)
        node = node.args[0]
    source = _widening(node) if len(node.users) == 1 else None
    if source is None:
        return None
    for reshape in reversed(chain):
        fake = getattr(meta.fake_value(source), str(reshape.target))(*reshape.args[1:], **reshape.kwargs)
        source = graph.call_method(str(reshape.target), (source, *reshape.args[1:]), dict(reshape.kwargs))
        meta.set_example_value(source, fake)
        meta.copy_dynamo_provenance(reshape, source)
    return source


def _erase_unused(node: fx.Node) -> None:
    """Erase ``node`` and, in turn, the reshapes and widening it read, once unused."""
    while node.op == "call_method" and not node.users:
        source = node.args[0]
        node.graph.erase_node(node)
        if not isinstance(source, fx.Node):
            return
        node = source


class BlockedCrossEntropy(Pass):
    """Compute ``F.cross_entropy`` over (N, C) logits with `memopt.codegen.cross_entropy`.

    Purpose: the loss's backward stops holding the saved log-probabilities and two
    more logits-sized buffers (a language model's largest tensors), with the same
    numbers.

    Preconditions: ``step`` is the Dynamo-level graph of a region
    (``single_graph_name == "dynamo"``) with Dynamo's example values on its nodes.

    Guarantees: with ``codegen="eager"``, each call with (N, C) floating logits, (N,)
    integer targets, no class weights and no label smoothing is replaced, unless it is
    inside a ``torch.autocast`` block of the graph. Half logits the loss computes in
    fp32 (an fp32 copy read by the loss alone, through reshapes; or half logits under
    an autocast around the compiled call) are widened by the op block by block
    (``upcast=True``), so autograd saves the half logits. The loss and the logits'
    gradient are the same bit for bit;
    autograd saves the logits instead of the log-probabilities, and no step holds more
    than one block of them beyond its result. Other calls are left as written.

    Ordering: pre-autograd, after ``precision`` (which gives the loss fp32 inputs and
    recognizes ``F.cross_entropy`` by name). Eager codegen only (see the module's
    docstring for Inductor).
    """

    name = "blocked_cross_entropy"

    def run(self, step: StepGraphs, analyses: AnalysisManager, ctx: PassContext) -> PassResult:
        if step.is_training or step.single_graph_name != "dynamo":
            raise ValueError(
                f"pass 'blocked_cross_entropy' rewrites the Dynamo graph before AOTAutograd, but got the "
                f"{'forward/backward pair' if step.is_training else step.single_graph_name + ' graph'}; "
                f"run it in memopt.passes.pipeline.pre_autograd_pipeline."
            )
        if ctx.config.codegen == "inductor":
            return PassResult.unchanged(why="codegen='inductor' fuses the loss's kernels itself")
        replaced = blocked_cross_entropy(step.forward.graph, _autocast_devices())
        if not replaced:
            return PassResult.unchanged(losses=0)
        step.forward.recompile()
        return PassResult(
            True, PreservedAnalyses.none(), {"losses": replaced},
            summary=(f"blocked_cross_entropy: {replaced} loss(es) computed a block of rows at a time",),
        )
