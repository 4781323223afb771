"""Attention that would fall back to the math kernel, written out so that it runs in
low precision (used by pass ``precision``).

``scaled_dot_product_attention`` on CPU with ``dropout_p > 0`` (training with
attention dropout: Hugging Face GPT-2 and BERT at their default configs) cannot use
the fused CPU kernel, which has no dropout; it runs
``_scaled_dot_product_attention_math``, and that kernel **upcasts half inputs to fp32
on CPU**. Lowering the op's inputs to bf16 then buys nothing inside it: the scores,
the softmax output and the dropped-out probabilities are fp32, and the last two are
saved for backward (8 bytes per score, plus the 1-byte dropout mask), more than
``torch.autocast`` keeps (its bmm saves a bf16 copy of the probabilities).

`expand_math_attention` replaces such a node with the math kernel's own ops, as
torch functions the policy table then lowers one by one::

    scores = (q * scale) @ k.transpose(-2, -1)          # low (matmul)
    scores = scores.masked_fill(~mask, -inf)  or  scores + mask  (or a causal mask)
    probs  = aten._safe_softmax(scores, -1)             # fp32 math, bf16 result
    probs  = dropout(probs, p, training=True)           # bf16, 1-byte mask
    out    = probs @ v                                  # low (matmul)

so the values saved for backward are the bf16 probabilities before and after dropout
and the mask (5 bytes per score instead of 9). ``_safe_softmax`` is what the math
kernel uses (fully masked rows give zeros, not NaN); on CPU it computes in fp32 for
half inputs and rounds the result once. The fused kernels on CUDA (flash, memory
efficient) support dropout and save no probabilities, so only CPU nodes are expanded.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from memopt.graph import meta

__all__ = ["expand_math_attention", "math_attention_reason"]

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS: dict[str, Any] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _bound(node: fx.Node) -> dict[str, Any] | None:
    """The node's arguments by name, or None if they do not bind to SDPA's signature."""
    if len(node.args) > len(_SDPA_PARAMS) or any(k not in _SDPA_PARAMS for k in node.kwargs):
        return None
    bound = {**_DEFAULTS, **dict(zip(_SDPA_PARAMS, node.args)), **node.kwargs}
    return bound if all(p in bound for p in _SDPA_PARAMS[:3]) else None


def math_attention_reason(node: fx.Node, env: dict[fx.Node, Any]) -> str | None:
    """Why ``node`` (an SDPA call) would run the fp32-upcasting math kernel, or None
    if it would not, or cannot be expanded (symbolic sizes, a nested tensor, a
    dropout probability or scale computed in the graph)."""
    args = _bound(node)
    if args is None:
        return None
    q = env.get(args["query"])
    if not isinstance(q, torch.Tensor) or q.device.type != "cpu" or q.is_nested or q.dim() < 2:
        return None
    p, scale = args["dropout_p"], args["scale"]
    if not isinstance(p, (int, float)) or p == 0 or not (scale is None or isinstance(scale, (int, float))):
        return None
    values = [env.get(args[name]) for name in ("query", "key", "value")]
    if any(not isinstance(v, torch.Tensor) for v in values):
        return None
    if any(not isinstance(s, int) for v in values for s in v.shape):
        return None  # symbolic sizes: the causal mask and GQA repeat need concrete ones
    return "CPU attention with dropout runs the math kernel, which computes half inputs in fp32"


def expand_math_attention(
    graph: fx.Graph,
    node: fx.Node,
    env: dict[fx.Node, Any],
    visit: Callable[[fx.Node], None],
    cast_low: Callable[[fx.Node], fx.Node],
) -> fx.Node:
    """Insert the math kernel's ops before ``node``, ``visit`` each new node in order
    (the lowering pass decides its dtype), send ``node``'s users to the result and
    erase ``node``. ``cast_low(value)`` gives ``value`` in the low dtype, made before
    ``node`` (a floating mask is added in the scores' dtype, as SDPA's lowered inputs
    include its mask). Call only when `math_attention_reason` gave a reason."""
    args = _bound(node)
    assert args is not None
    q, k, v = args["query"], args["key"], args["value"]
    shape_q, shape_k = env[q].shape, env[k].shape
    made: list[fx.Node] = []

    def emit(kind: str, target: Any, *a: Any, **kw: Any) -> fx.Node:
        with graph.inserting_before(node):
            new = graph.call_method(target, a, kw) if kind == "method" else graph.call_function(target, a, kw)
        meta.copy_meta(node, new)
        meta.set_memopt_tag(new, "precision", "attention_expanded")
        visit(new)
        made.append(new)
        return new

    if args["enable_gqa"] and shape_q[-3] != shape_k[-3]:
        repeats = shape_q[-3] // shape_k[-3]
        k = emit("method", "repeat_interleave", k, repeats, -3)
        v = emit("method", "repeat_interleave", v, repeats, -3)
    scale = args["scale"] if args["scale"] is not None else 1.0 / math.sqrt(shape_q[-1])
    scores = emit("function", torch.matmul, emit("function", operator.mul, q, scale), emit("method", "transpose", k, -2, -1))
    mask = args["attn_mask"]
    if args["is_causal"]:
        ones = emit("function", torch.ones, (shape_q[-2], shape_k[-2]), dtype=torch.bool, device=env[q].device)
        mask = emit("method", "tril", ones)
    if isinstance(mask, fx.Node) and env[mask].dtype == torch.bool:
        scores = emit("method", "masked_fill", scores, emit("method", "logical_not", mask), float("-inf"))
    elif isinstance(mask, fx.Node):
        scores = emit("function", operator.add, scores, cast_low(mask))
    probs = emit("function", torch.ops.aten._safe_softmax.default, scores, -1)
    probs = emit("function", torch.nn.functional.dropout, probs, args["dropout_p"], True, False)
    out = emit("function", torch.matmul, probs, v)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return out
