"""Make dropout's output and mask recomputable without drawing new random numbers.

``native_dropout(x, p, train)`` returns ``(x * mask * scale, mask)``. Recomputing it
in backward would draw a new mask. This rewrite keeps the random draw where it is,
now also returning the generator's state before it (`memopt.graph.rng`:
``dropout_with_rng_state``), and gives every consumer of the mask a deterministic
replay of it from that state (``dropout_mask_replay``); the output becomes
``(x * mask) * (1 / (1 - p))`` in separate, deterministic nodes. The rematerialization
planner may then recompute the output from the mask, and the mask from the state (a
few kilobytes), instead of saving a bool tensor per dropout. In the forward graph a
replay is turned back into the drawn mask (`drawn_masks_in_forward`): the forward
never draws twice.

It is applied only where the result is bit-identical to ATen's kernel: float32 on
the CPU (checked by ``tests/test_remat.py``), for ``0 <= p < 1`` (``p = 0`` is common in
configs and still draws a mask), and only at static sizes: the replay takes the mask's
size and stride as ints, and reading a symbolic size as an int (dynamic shapes) adds a
shape guard that specializes the compiled region to the traced sizes (every later size
was compiled anew). Elsewhere the dropout output stays a must-save value.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
from torch.fx import _lazy_graph_module as torch_lazy_graph_module
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.fx._lazy_graph_module import _use_lazy_graph_module

from memopt.graph import meta
from memopt.graph.rng import dropout_mask_replay, dropout_with_rng_state  # noqa: F401  (registers the ops)

__all__ = ["with_recomputable_dropout", "drawn_masks_in_forward"]

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
        and all(is_concrete_int(s) for s in (*value.shape, *value.stride()))
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
        _draw_with_state(graph, node, mask, p)
        replay = _replay_for_consumers(graph, node, mask, p)
        with graph.inserting_after(replay):
            kept = graph.call_function(aten.mul.Tensor, (x, replay))
        with graph.inserting_after(kept):
            scaled = graph.call_function(aten.mul.Tensor, (kept, 1.0 / (1.0 - p)))
        with meta.graph_fake_mode(graph):
            meta.set_fake_value(kept, aten.mul.Tensor(meta.fake_value(x), meta.fake_value(replay)))
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


_DRAW = torch.ops.memopt.dropout_with_rng_state.default
_REPLAY = torch.ops.memopt.dropout_mask_replay.default


def _draw_with_state(graph: fx.Graph, node: fx.Node, mask: fx.Node, p: float) -> None:
    """Turn ``node`` (``native_dropout``) into ``dropout_with_rng_state`` in place: its
    getitems 0 and 1 keep their meaning, getitem 2 is the state."""
    x = node.args[0]
    node.target, node.args, node.kwargs = _DRAW, (x, p), {}
    with graph.inserting_after(mask):
        state = graph.call_function(operator.getitem, (node, 2))
    with meta.graph_fake_mode(graph):
        drawn = _DRAW(meta.fake_value(x), p)
        meta.set_fake_value(node, drawn)
        meta.set_fake_value(state, drawn[2])
    meta.copy_provenance(node, state)


def _replay_for_consumers(graph: fx.Graph, node: fx.Node, mask: fx.Node, p: float) -> fx.Node:
    """Every consumer of ``mask`` reads a replay of it from the state instead; returns
    the replay."""
    state = next(u for u in node.users if u.target is operator.getitem and u.args[1] == 2)
    value = meta.fake_value(mask)
    size, stride = [int(s) for s in value.shape], [int(s) for s in value.stride()]
    with graph.inserting_after(state):
        replay = graph.call_function(_REPLAY, (state, size, stride, p))
    with meta.graph_fake_mode(graph):
        meta.set_fake_value(replay, _REPLAY(meta.fake_value(state), size, stride, p))
    meta.copy_provenance(mask, replay)
    mask.replace_all_uses_with(replay)
    return replay


def drawn_masks_in_forward(graph: fx.Graph) -> int:
    """Replace every mask replay whose draw is in ``graph`` (a forward graph) by the
    drawn mask itself (the same values, without a second draw). Returns how many."""
    count = 0
    for replay in list(graph.find_nodes(op="call_function", target=_REPLAY)):
        state = replay.args[0]
        if not isinstance(state, fx.Node) or state.op != "call_function" or not isinstance(state.args[0], fx.Node):
            continue  # the state is a placeholder: this is backward's replay
        draw = state.args[0]
        drawn = next((u for u in draw.users if u.target is operator.getitem and u.args[1] == 1), None)
        if drawn is None:
            with graph.inserting_after(draw):
                drawn = graph.call_function(operator.getitem, (draw, 1))
            meta.set_fake_value(drawn, meta.fake_value(draw)[1])
            meta.copy_provenance(replay, drawn)
        replay.replace_all_uses_with(drawn)
        graph.erase_node(replay)
        count += 1
    return count
