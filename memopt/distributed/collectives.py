"""The collectives of a sharded parameter, as autograd functions over torch's
functional collectives, so that Dynamo traces them into the compiled graphs.

`Unshard` turns a parameter's local piece into the full tensor the module computes
with, and reduces the gradient on the way back:

    kind          forward (the full parameter)           backward (its gradient)
    "replicate"   the local tensor (it is full)          all-reduce
    "replica"     the rank's replica buffer, no comm     reduce-scatter to the local piece
    "shard"       all-gather of the local pieces         reduce-scatter to the local piece

Both directions pad to ``chunk * world`` rows (`memopt.distributed.layout`) and cut the
padding off again. The forward casts to ``param_dtype`` first (so a bf16 policy gathers
bf16); the backward casts the gradient to ``reduce_dtype``, adds any gradient
accumulated without sync (``pending``), divides by the world size (gradients are
averaged, as DDP and FSDP do) and reduces with a sum, then casts back to the dtype of
the local piece. Nothing is saved for backward: the gathered parameter lives only as
long as the module's own ops keep it.

`Accumulate` is the no-sync path: the forward passes the (detached) full parameter
through; the backward sends its gradient, unreduced, to a full-size accumulator leaf.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from memopt._compat import all_gather_single, reduce_scatter_single

__all__ = ["Unshard", "Accumulate", "KINDS"]

KINDS = ("replicate", "replica", "shard")


def _waited(tensor: torch.Tensor) -> torch.Tensor:
    """The plain tensor behind an eager functional collective's result (under tracing
    the collective already ends in ``wait_tensor``)."""
    if isinstance(tensor, funcol.AsyncCollectiveTensor):
        return tensor.wait()
    return tensor


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    missing = rows - tensor.shape[0]
    if missing == 0:
        return tensor
    return F.pad(tensor, [0, 0] * (tensor.dim() - 1) + [0, missing])


class Unshard(torch.autograd.Function):
    """``Unshard.apply(local, replica, pending, kind, rows, chunk, world, group,
    param_dtype, reduce_dtype)`` -> the full parameter (see the module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        local: torch.Tensor,
        replica: torch.Tensor | None,
        pending: torch.Tensor | None,
        kind: str,
        rows: int,
        chunk: int,
        world: int,
        group: str,
        param_dtype: torch.dtype | None,
        reduce_dtype: torch.dtype | None,
    ) -> torch.Tensor:
        ctx.kind, ctx.chunk, ctx.world, ctx.group = kind, chunk, world, group
        ctx.reduce_dtype, ctx.local_dtype = reduce_dtype, local.dtype
        ctx.local_rows = local.shape[0] if local.dim() else 0
        ctx.has_pending = pending is not None
        if pending is not None:
            ctx.save_for_backward(pending)
        if kind == "shard":
            piece = local.to(param_dtype) if param_dtype is not None else local
            gathered = _waited(all_gather_single(_pad_rows(piece, chunk), 0, group))
            return gathered.narrow(0, 0, rows) if gathered.shape[0] != rows else gathered
        source = replica.narrow(0, 0, rows) if kind == "replica" else local
        if param_dtype is not None and param_dtype != source.dtype:
            return source.to(param_dtype)
        return source.view_as(source)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if ctx.reduce_dtype is not None and grad.dtype != ctx.reduce_dtype:
            grad = grad.to(ctx.reduce_dtype)
        if ctx.has_pending:
            (pending,) = ctx.saved_tensors
            grad = grad + pending.to(grad.dtype)
        grad = grad / ctx.world
        if ctx.kind == "replicate":
            grad = _waited(funcol.all_reduce(grad, "sum", ctx.group))
        else:
            padded = _pad_rows(grad, ctx.chunk * ctx.world)
            grad = _waited(reduce_scatter_single(padded, "sum", 0, ctx.group))
            if grad.shape[0] != ctx.local_rows:
                grad = grad.narrow(0, 0, ctx.local_rows)
        if grad.dtype != ctx.local_dtype:
            grad = grad.to(ctx.local_dtype)
        return (grad,) + (None,) * 9


class Accumulate(torch.autograd.Function):
    """``Accumulate.apply(full, accumulator)`` -> ``full``; its gradient goes, unreduced
    and in the accumulator's dtype, to ``accumulator`` (a leaf: autograd sums it into
    ``accumulator.grad`` across micro-steps)."""

    @staticmethod
    def forward(ctx: Any, full: torch.Tensor, accumulator: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.dtype = accumulator.dtype
        return full.view_as(full)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:  # type: ignore[override]
        return None, grad.to(ctx.dtype)
