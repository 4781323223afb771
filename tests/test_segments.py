"""Segment boundaries (`memopt.plan.segments`) on hand-built graphs."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from memopt.plan.segments import find_segments


def _blocks_with_a_broadcast_mask(x: torch.Tensor, keep: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # An additive mask broadcast from a small boolean input to the scores' shape, as
    # Hugging Face builds it once from ``attention_mask`` and every block reads it.
    mask = torch.where(keep[:, None, :].expand(-1, x.shape[1], -1), 0.0, float("-inf"))
    for _ in range(4):
        scores = torch.softmax((x @ w) @ x.transpose(1, 2) + mask, dim=-1)
        x = torch.relu(scores @ x @ w) + x
    return x.sum()


def test_a_broadcast_mask_read_by_every_block_does_not_block_cuts():
    """Rule: a value computed from small activations and constants alone (reading no
    parameter) is not a blocker: it is kept as a crosser, and each block still ends
    a segment. Before, the mask (as large as the residual stream) reached from the
    first block to the last, so the blocks formed a single segment."""
    x, keep, w = torch.randn(2, 64, 64), torch.ones(2, 64, dtype=torch.bool), torch.randn(64, 64)
    gm = make_fx(_blocks_with_a_broadcast_mask, tracing_mode="fake")(x, keep, w)
    x_ph, keep_ph, _ = gm.graph.find_nodes(op="placeholder")
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    segments = find_segments(nodes, {x_ph, keep_ph})
    assert len(segments) >= 4, [s.boundary.name for s in segments]
    mask = next(n for n in nodes if n.target is torch.ops.aten.where.self)
    assert mask in segments[0].crossers


def test_values_read_from_a_multi_output_op_are_not_small():
    """Rule: a batch norm's outputs come through ``getitem`` of a tuple, which has no
    single size; they are as large as the activation and must not pass as "computed
    from small values" (that made a CNN one segment: nothing could be recomputed)."""
    from memopt.plan.segments import _from_small, _activation_dependent

    def bn_relu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.ops.aten.native_batch_norm(x, w, b, mean, var, True, 0.1, 1e-5)[0]).sum()

    args = (torch.randn(8, 16, 32, 32), torch.ones(16), torch.zeros(16), torch.zeros(16), torch.ones(16))
    gm = make_fx(bn_relu, tracing_mode="fake")(*args)
    x_ph = gm.graph.find_nodes(op="placeholder")[0]
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    side = _from_small(nodes, _activation_dependent(nodes, {x_ph}), small=1024)
    assert not any(n.target is torch.ops.aten.relu.default for n in side), sorted(n.name for n in side)
