"""Torch's functional collectives as they appear in memopt's FX graphs: which node is
an all-gather, a reduce-scatter, an all-reduce or the wait on one, and how a collective and its wait
find each other.

The graphs hold ``_c10d_functional`` ops (what `torch.distributed._functional_collectives`
traces to): a collective node starts the communication and returns its output buffer;
``wait_tensor`` on that buffer blocks until it is filled. Between the two, the
collective's input must stay alive (the process group reads it) and its output must not
be read.
"""

from __future__ import annotations

import torch
import torch.fx as fx

__all__ = [
    "ALL_GATHER",
    "REDUCE_SCATTER",
    "ALL_REDUCE",
    "ALL_REDUCE_INPLACE",
    "WAIT",
    "is_all_gather",
    "is_reduce_scatter",
    "is_all_reduce",
    "is_reduction",
    "is_collective",
    "is_wait",
    "waited_collective",
    "wait_of",
]

_c10d = torch.ops._c10d_functional
ALL_GATHER = _c10d.all_gather_into_tensor.default
ALL_GATHER_OUT = _c10d.all_gather_into_tensor_out.default
REDUCE_SCATTER = _c10d.reduce_scatter_tensor.default
ALL_REDUCE = _c10d.all_reduce.default
ALL_REDUCE_INPLACE = _c10d.all_reduce_.default
"""Reduces its input in place and returns it (waited like the functional one): memopt
puts it only on a buffer private to the collective (`bucket_collectives`' concatenation
of a bucket's gradients), which nothing else reads."""
WAIT = _c10d.wait_tensor.default


def is_all_gather(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (ALL_GATHER, ALL_GATHER_OUT)


def is_reduce_scatter(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is REDUCE_SCATTER


def is_all_reduce(node: fx.Node) -> bool:
    """A functional all-reduce, or the in-place one (`ALL_REDUCE_INPLACE`)."""
    return node.op == "call_function" and node.target in (ALL_REDUCE, ALL_REDUCE_INPLACE)


def is_reduction(node: fx.Node) -> bool:
    """A reduce-scatter or an all-reduce: how a gradient is reduced across ranks."""
    return is_reduce_scatter(node) or is_all_reduce(node)


def is_collective(node: fx.Node) -> bool:
    """A functional collective that starts communication and is waited on later (not
    the wait itself)."""
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and (
        node.target.namespace == "_c10d_functional" and node.target is not WAIT
    )


def is_wait(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is WAIT


def waited_collective(node: fx.Node) -> fx.Node | None:
    """For ``wait_tensor(c)`` with ``c`` a collective node, ``c``; else None."""
    if not is_wait(node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source = node.args[0]
    return source if is_collective(source) else None


def wait_of(collective: fx.Node) -> fx.Node | None:
    """The one ``wait_tensor`` on ``collective``'s output (None if there is none or
    several)."""
    waits = [u for u in collective.users if is_wait(u)]
    return waits[0] if len(waits) == 1 else None
