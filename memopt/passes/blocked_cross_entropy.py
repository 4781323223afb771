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


def _autocast_enabled() -> bool:
    """An ambient ``torch.autocast`` is on (for any device type) while compiling."""
    for device in _AUTOCAST_DEVICES:
        try:
            if torch.is_autocast_enabled(device):
                return True
        except RuntimeError:  # a device type this build does not know
            continue
    return False


def blocked_cross_entropy(graph: fx.Graph) -> int:
    """Replace every eligible ``F.cross_entropy`` call of a Dynamo-level ``graph`` by
    ``memopt::cross_entropy`` (and a ``getitem`` of its loss); return how many. Calls
    inside a ``torch.autocast`` block are left as written: autocast runs the loss's
    ATen ops in fp32, and the op would run in the logits' dtype."""
    replaced = 0
    autocast = _in_autocast(graph)
    for node in list(graph.nodes):
        arguments = None if node in autocast else _call(node)
        if arguments is None:
            continue
        x, target = arguments["input"], arguments["target"]
        args = (x, target, _ops.REDUCTIONS[arguments["reduction"]], arguments["ignore_index"])
        with graph.inserting_before(node):
            call = graph.call_function(torch.ops.memopt.cross_entropy.default, args)
            loss = graph.call_function(operator.getitem, (call, 0))
        value = torch.ops.memopt.cross_entropy.default(meta.fake_value(x), meta.fake_value(target), *args[2:])
        meta.set_example_value(call, value)
        meta.set_example_value(loss, value[0])
        meta.copy_dynamo_provenance(node, call)
        meta.copy_dynamo_provenance(node, loss)
        node.replace_all_uses_with(loss)
        graph.erase_node(node)
        replaced += 1
    return replaced


class BlockedCrossEntropy(Pass):
    """Compute ``F.cross_entropy`` over (N, C) logits with `memopt.codegen.cross_entropy`.

    Purpose: the loss's backward stops holding the saved log-probabilities and two
    more logits-sized buffers (a language model's largest tensors), with the same
    numbers.

    Preconditions: ``step`` is the Dynamo-level graph of a region
    (``single_graph_name == "dynamo"``) with Dynamo's example values on its nodes.

    Guarantees: with ``codegen="eager"``, each call with (N, C) floating logits, (N,)
    integer targets, no class weights and no label smoothing is replaced, unless a
    ``torch.autocast`` (a block in the graph, or one around the compiled call) would
    change its dtype. The loss and the logits' gradient are the same bit for bit;
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
        if _autocast_enabled():
            return PassResult.unchanged(why="compiled under torch.autocast, which computes the loss in fp32")
        replaced = blocked_cross_entropy(step.forward.graph)
        if not replaced:
            return PassResult.unchanged(losses=0)
        step.forward.recompile()
        return PassResult(
            True, PreservedAnalyses.none(), {"losses": replaced},
            summary=(f"blocked_cross_entropy: {replaced} loss(es) computed a block of rows at a time",),
        )
