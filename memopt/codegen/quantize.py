"""Block-wise quantize / dequantize as custom ops, ``torch.ops.memopt.*``.

Importing this module registers::

    memopt::quantize_blockwise(Tensor x, int block_size, ScalarType dtype)
        -> (Tensor, Tensor)                       # (codes, scales)
    memopt::dequantize_blockwise(Tensor codes, Tensor scales, SymInt[] size,
        int block_size, ScalarType out_dtype) -> Tensor

Dispatch: every device runs the PyTorch reference (`quantize_reference`), chunk by
chunk to bound its scratch memory (`quantize_chunked`), except CUDA, which runs the
Triton kernels (`quantize_triton`) when triton is installed and the block fits a
kernel tile, and the chunked reference otherwise. A fake (meta) implementation
gives output shapes without computing, so the ops trace under FakeTensor, ``make_fx``,
AOTAutograd and Dynamo; Inductor calls them as extern fallback kernels.

No autograd: the ops are meant for saved activations inside the partitioned forward
and backward graphs, below autograd. Backpropagating through them raises an error
saying so (instead of silently dropping the gradient).

The format is specified in `quantize_reference` and docs/kernels.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import torch

from memopt.codegen._triton import can_run_triton
from memopt.codegen.quantize_chunked import dequantize_blockwise_chunked, quantize_blockwise_chunked
from memopt.codegen.quantize_reference import (
    check_dequantize_args,
    check_quantize_args,
    dequantize_blockwise_reference,
    num_blocks,
    quantize_blockwise_reference,
)

__all__ = [
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_blockwise_reference",
    "dequantize_blockwise_reference",
]

_QUANTIZE_SCHEMA = "(Tensor x, int block_size, ScalarType dtype) -> (Tensor, Tensor)"
_DEQUANTIZE_SCHEMA = (
    "(Tensor codes, Tensor scales, SymInt[] size, int block_size, ScalarType out_dtype) -> Tensor"
)


def _use_triton(block_size: int, *tensors: torch.Tensor) -> bool:
    """Whether the CUDA implementation can hand this call to the Triton kernels."""
    if not can_run_triton(*tensors):
        return False
    from memopt.codegen.quantize_triton import MAX_TRITON_BLOCK_SIZE

    return block_size <= MAX_TRITON_BLOCK_SIZE


@torch.library.custom_op("memopt::quantize_blockwise", mutates_args=(), schema=_QUANTIZE_SCHEMA)
def quantize_blockwise(
    x: torch.Tensor, block_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of ``x`` in the block-wise format (reference on non-CUDA)."""
    return quantize_blockwise_chunked(x, block_size, dtype)


@torch.library.custom_op(
    "memopt::dequantize_blockwise", mutates_args=(), schema=_DEQUANTIZE_SCHEMA
)
def dequantize_blockwise(
    codes: torch.Tensor,
    scales: torch.Tensor,
    size: Sequence[int],
    block_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The tensor of ``size``/``out_dtype`` that ``(codes, scales)`` encode."""
    return dequantize_blockwise_chunked(codes, scales, size, block_size, out_dtype)


@quantize_blockwise.register_kernel("cuda")
def _quantize_cuda(
    x: torch.Tensor, block_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(block_size, x):
        from memopt.codegen.quantize_triton import quantize_blockwise_triton

        return quantize_blockwise_triton(x, block_size, dtype)
    return quantize_blockwise_chunked(x, block_size, dtype)


@dequantize_blockwise.register_kernel("cuda")
def _dequantize_cuda(
    codes: torch.Tensor,
    scales: torch.Tensor,
    size: Sequence[int],
    block_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    if _use_triton(block_size, codes, scales):
        from memopt.codegen.quantize_triton import dequantize_blockwise_triton

        return dequantize_blockwise_triton(codes, scales, size, block_size, out_dtype)
    return dequantize_blockwise_chunked(codes, scales, size, block_size, out_dtype)


@quantize_blockwise.register_fake
def _quantize_fake(
    x: torch.Tensor, block_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    check_quantize_args(x, block_size, dtype)
    numel = x.numel()
    codes = x.new_empty((numel,), dtype=dtype)
    return codes, x.new_empty((num_blocks(numel, block_size),), dtype=torch.float32)


@dequantize_blockwise.register_fake
def _dequantize_fake(
    codes: torch.Tensor,
    scales: torch.Tensor,
    size: Sequence[int],
    block_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    check_dequantize_args(codes, scales, size, block_size, out_dtype)
    return codes.new_empty(list(size), dtype=out_dtype)


def _not_differentiable(name: str) -> Callable[..., NoReturn]:
    """A backward formula for op ``name`` that raises, saying why there is none."""

    def backward(ctx: Any, *grads: Any) -> NoReturn:
        raise RuntimeError(
            f"memopt::{name} is not differentiable: it stores saved activations "
            "inside memopt's partitioned forward/backward graphs, below autograd; "
            "call it on detached tensors (tensor.detach())"
        )

    return backward


torch.library.register_autograd(
    "memopt::quantize_blockwise", _not_differentiable("quantize_blockwise")
)
torch.library.register_autograd(
    "memopt::dequantize_blockwise", _not_differentiable("dequantize_blockwise")
)
