"""Cross-entropy over a large class dimension, computed a block of rows at a time:
``torch.ops.memopt.cross_entropy`` and its backward.

``F.cross_entropy(logits, target)`` decomposes into ``_log_softmax`` and ``nll_loss``.
Autograd saves the log-probabilities (a tensor the size of the logits) for backward,
and the backward holds three more of that size at once: the incoming gradient of the
log-probabilities (``nll_loss_backward``, zero but at the targets), the result, and
the saved log-probabilities it reads. For a language model's head the logits are the
largest tensors of the step (tokens x vocabulary), so the loss is often where the
step peaks.

These ops compute the same numbers from the logits alone, ``rows_per_block`` rows at
a time::

    memopt::cross_entropy(Tensor input, Tensor target, int reduction, int ignore_index,
        bool upcast=False) -> (Tensor loss, Tensor total_weight)
    memopt::cross_entropy_backward(Tensor grad, Tensor input, Tensor target,
        Tensor total_weight, int reduction, int ignore_index, bool upcast=False) -> Tensor

``input`` is ``(N, C)`` floating point, ``target`` ``(N,)`` class indices; ``reduction``
is ATen's enum (0 none, 1 mean, 2 sum); no class weights, no label smoothing. Autograd
saves ``input``, ``target`` and ``total_weight`` (a language model returns its logits,
so they are alive anyway), not the log-probabilities. Forward and backward each hold
one block of log-probabilities at a time; the backward computes each block of the
result in the result's own rows.

``upcast=True`` computes as ``F.cross_entropy(input.float(), target)`` does, which is
what ``torch.autocast`` runs for half logits (its fp32 policy for ``log_softmax`` and
``nll_loss``): each block of half logits is widened to fp32 and the loss is fp32; the
gradient is computed in an fp32 block and rounded into the half result, as autograd
rounds the gradient of the widening. Autograd still saves the half logits, not an fp32
copy of them. Each op then holds two fp32 blocks at a time (the widened block and its
log-probabilities; in backward, the log-probabilities and the gradient block).

**Same numbers, bit for bit.** Each block runs the very ATen kernels the unblocked
loss runs (``_log_softmax``, ``nll_loss_backward``, ``_log_softmax_backward_data``),
whose results for a row depend on that row alone; the reduction is
``nll_loss_forward`` itself, over the ``(N, 1)`` column of picked log-probabilities, so
it adds the same values in the same order as over ``(N, C)``
(``tests/codegen/test_cross_entropy.py`` checks fp32 and bf16, each reduction, ignored
targets). A fake implementation lets the ops trace; Inductor calls them as extern
kernels.
"""

from __future__ import annotations

import math

import torch

__all__ = ["HALF", "REDUCTIONS", "block_bytes", "compute_dtype", "rows_per_block"]

aten = torch.ops.aten

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_BLOCKS = 16  # the logits are split in at most this many row blocks...
_MIN_BLOCK_BYTES = 256 * 1024  # ...of at least this size (small losses run as one block)


HALF = (torch.float16, torch.bfloat16)
"""The logits dtypes ``upcast=True`` widens to fp32."""


def compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    """The dtype the blocks of ``dtype`` logits are computed in: fp32 for half logits
    with ``upcast``, else their own."""
    return torch.float32 if upcast and dtype in HALF else dtype


def rows_per_block(rows: int, classes: int, element_size: int) -> int:
    """Rows per block for an ``(rows, classes)`` input: ``rows / 16`` rounded up, but a
    block of at least 256 KiB (and at least one row)."""
    rows, classes = max(int(rows), 1), max(int(classes), 1)
    by_count = math.ceil(rows / _BLOCKS)
    by_size = math.ceil(_MIN_BLOCK_BYTES / (classes * element_size))
    return max(1, min(rows, max(by_count, by_size)))


def block_bytes(rows: int, classes: int, element_size: int) -> int:
    """Bytes of one block of log-probabilities (the ops' scratch: one block each)."""
    return rows_per_block(rows, classes, element_size) * max(int(classes), 1) * element_size


def _check(input: torch.Tensor, target: torch.Tensor, reduction: int) -> None:
    if input.dim() != 2 or target.dim() != 1 or target.shape[0] != input.shape[0]:
        raise ValueError(
            f"memopt::cross_entropy takes (N, C) logits and (N,) targets, got {tuple(input.shape)} and "
            f"{tuple(target.shape)}; call F.cross_entropy for other shapes"
        )
    if reduction not in REDUCTIONS.values():
        raise ValueError(f"reduction={reduction}: use 0 (none), 1 (mean) or 2 (sum)")


def _check_targets(target: torch.Tensor, classes: int, ignore_index: int) -> None:
    """Refuse a target outside ``[0, classes)`` that is not ``ignore_index``, as
    ``nll_loss`` does: the blocks pick with clamped indices, so without this check a bad
    label would be read as class 0 or ``classes - 1`` and train silently. On CPU an
    ``IndexError`` (``F.cross_entropy``'s); elsewhere a device-side assert, as ATen's
    CUDA kernel does, so the loss does not wait for the device."""
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if target.device.type != "cpu":
        torch._assert_async(~bad.any(), f"memopt::cross_entropy: a target is outside [0, {classes})")
        return
    if bad.any():
        value = int(target[bad][0])
        raise IndexError(
            f"Target {value} is out of bounds: memopt::cross_entropy (F.cross_entropy rewritten by memopt's "
            f"blocked_cross_entropy pass) has {classes} classes, so a target must be in [0, {classes}) or the "
            f"ignore_index {ignore_index}; fix the labels (padding should use ignore_index)"
        )


@torch.library.custom_op(
    "memopt::cross_entropy",
    mutates_args=(),
    schema="(Tensor input, Tensor target, int reduction, int ignore_index, bool upcast=False) -> (Tensor, Tensor)",
)
def cross_entropy(
    input: torch.Tensor, target: torch.Tensor, reduction: int, ignore_index: int, upcast: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.cross_entropy(input, target, reduction=..., ignore_index=...)`` (of
    ``input.float()`` with ``upcast``) and the total weight ``nll_loss_forward``
    returns, a block of rows at a time."""
    _check(input, target, reduction)
    n, c = input.shape
    _check_targets(target, c, ignore_index)
    dtype = compute_dtype(input.dtype, upcast)
    step = rows_per_block(n, c, dtype.itemsize)
    picked = input.new_empty(n, 1, dtype=dtype)
    for start in range(0, n, step):
        logp = aten._log_softmax(input[start : start + step].to(dtype), 1, False)
        rows = target[start : start + step]
        # An ignored row picks any class; nll_loss_forward skips it below.
        picked[start : start + step] = logp.gather(1, rows.clamp(0, c - 1).unsqueeze(1))
        del logp
    # A kept row picks column 0 of ``picked``; an ignored row is marked 1, no column of
    # it, which nll_loss_forward skips. (Marking it ``ignore_index`` fails for an
    # ignore_index of 0: the kept rows' column, so every row was ignored.)
    column = (target == ignore_index).to(target.dtype)
    loss, total_weight = aten.nll_loss_forward(picked, column, None, reduction, 1)
    return loss, total_weight


@cross_entropy.register_fake
def _(
    input: torch.Tensor, target: torch.Tensor, reduction: int, ignore_index: int, upcast: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(input, target, reduction)
    dtype = compute_dtype(input.dtype, upcast)
    loss = input.new_empty((input.shape[0],) if reduction == 0 else (), dtype=dtype)
    return loss, input.new_empty((), dtype=dtype)


@torch.library.custom_op(
    "memopt::cross_entropy_backward",
    mutates_args=(),
    schema=(
        "(Tensor grad, Tensor input, Tensor target, Tensor total_weight, int reduction, int ignore_index, "
        "bool upcast=False) -> Tensor"
    ),
)
def cross_entropy_backward(
    grad: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    total_weight: torch.Tensor,
    reduction: int,
    ignore_index: int,
    upcast: bool = False,
) -> torch.Tensor:
    """The gradient of `cross_entropy`'s loss with respect to ``input``, a block of rows
    at a time, each computed in the result's rows (with ``upcast`` and half logits, in
    an fp32 block rounded into them)."""
    _check(input, target, reduction)
    n, c = input.shape
    dtype = compute_dtype(input.dtype, upcast)
    step = rows_per_block(n, c, dtype.itemsize)
    widened = dtype != input.dtype
    out = torch.empty_like(input, memory_format=torch.contiguous_format)
    for start in range(0, n, step):
        block = slice(start, start + step)
        logp = aten._log_softmax(input[block].to(dtype), 1, False)
        g = grad if grad.dim() == 0 else grad[block]
        # The log-probabilities' gradient is scattered into the result's rows, then
        # the log-softmax backward overwrites it there, element by element (as memopt's
        # eager codegen runs it: memopt.analysis.eager_inplace).
        rows = torch.empty_like(logp) if widened else out[block]
        aten.nll_loss_backward.grad_input(g, logp, target[block], None, reduction, ignore_index, total_weight, grad_input=rows)
        aten._log_softmax_backward_data.out(rows, logp, 1, dtype, out=rows)
        del logp
        if widened:
            out[block] = rows  # rounded to the logits' dtype, as the widening's gradient is
        del rows  # not held while the next block is widened
    return out


@cross_entropy_backward.register_fake
def _(
    grad: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    total_weight: torch.Tensor,
    reduction: int,
    ignore_index: int,
    upcast: bool = False,
) -> torch.Tensor:
    _check(input, target, reduction)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    input, target, reduction, ignore_index, upcast = inputs
    ctx.save_for_backward(input, target, output[1])
    ctx.reduction, ctx.ignore_index, ctx.upcast = reduction, ignore_index, upcast


def _backward(ctx, grad_loss, grad_total_weight):  # type: ignore[no-untyped-def]
    input, target, total_weight = ctx.saved_tensors
    grad_input = None
    if ctx.needs_input_grad[0]:
        grad_input = torch.ops.memopt.cross_entropy_backward(
            grad_loss, input, target, total_weight, ctx.reduction, ctx.ignore_index, ctx.upcast
        )
    return grad_input, None, None, None, None


torch.library.register_autograd("memopt::cross_entropy", _backward, setup_context=_setup_context)
