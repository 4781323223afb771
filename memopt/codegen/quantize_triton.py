"""Triton kernels for block-wise quantize / dequantize, bit-identical to the reference.

Each program handles ``ROWS`` consecutive blocks as a ``(ROWS, BLOCK)`` tile (``BLOCK``
is ``block_size`` rounded up to a power of two, the tail masked): one load, a row
absmax, one store of codes and scales. Rounding is written out instead of left to
casts, because casts round differently across backends (measured on triton 3.9's
interpreter: float32 -> float8e4nv rounds ties away from zero, drops the carry into the
exponent and flushes e4m3 subnormals; float32 -> bfloat16 truncates):

* ``_rint`` rounds half to even with the ``(y + 1.5 * 2**23) - 1.5 * 2**23`` trick
  (exact for ``|y| < 2**22``; triton has no ``rint`` in ``tl.math`` and the
  interpreter cannot call libdevice).
* e4m3fn codes are computed as their bit pattern (`_e4m3_bits`) and stored through a
  ``uint8`` view, decoded the same way (`_e4m3_value`): no fp8 conversion is needed, so
  the kernels also run on GPUs without native fp8 (before sm_89).
* bfloat16 output is rounded to nearest even on the float32 bits (`_bf16_bits`).
* Divisions use ``tl.math.div_rn`` (IEEE), as ``/`` may lower to an approximate
  division on CUDA.

``TRITON_INTERPRET`` is read when this module is imported (see `memopt.codegen._triton`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from memopt.codegen._triton import FP_FUSION, device_guard, kernel_is_interpreted, triton_unavailable_reason
from memopt.codegen.quantize_reference import (
    check_dequantize_args,
    check_quantize_args,
    num_blocks,
    qmax,
)

__all__ = [
    "MAX_TRITON_BLOCK_SIZE",
    "quantize_blockwise_triton",
    "dequantize_blockwise_triton",
]

MAX_TRITON_BLOCK_SIZE = 16384
"""Largest ``block_size`` the kernels take (one block must fit one program's tile)."""

_TILE = 4096  # elements per program when blocks are small
_OUT_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _rint(y):
    """Round half to even, for ``|y| < 2**22`` (float32)."""
    return (y + 12582912.0) - 12582912.0


@triton.jit
def _e4m3_bits(y):
    """float8_e4m3fn bit pattern (int32 in [0, 255]) of ``y``, ``|y| <= 448``, RNE.

    With ``e = max(floor(log2|y|), -6)`` (-6: the smallest normal exponent) the code's
    magnitude is ``((e + 7) << 3) + q - 8`` where ``q = rint(|y| * 2**(3 - e))`` is the
    significand in eighths: normals have ``q`` in [8, 16] (16 carries into the
    exponent), subnormals have ``e = -6`` and ``q`` in [0, 8].
    """
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    mag = bits & 0x7FFFFFFF
    e = tl.maximum(((mag >> 23) & 0xFF) - 127, -6)
    pow2 = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2 ** (3 - e)
    q = _rint(mag.to(tl.float32, bitcast=True) * pow2).to(tl.int32)
    return (((e + 7) << 3) + q - 8) | (sign << 7)


@triton.jit
def _e4m3_value(code):
    """float32 value of float8_e4m3fn bit pattern ``code`` (int32); 0x7F/0xFF (NaN,
    never produced by quantize) decode to +-480. The sign bit is copied, not applied
    with ``-value``: triton 3.6 lowers float negation to ``0 - value`` (3.9 to a
    negation), which turns -0.0 (code 0x80) into +0.0."""
    exponent = (code >> 3) & 0xF
    mantissa = code & 7
    significand = tl.where(exponent == 0, mantissa, mantissa + 8).to(tl.float32)
    pow2 = ((tl.maximum(exponent, 1) + 117) << 23).to(tl.float32, bitcast=True)  # 2**(e-10)
    magnitude = (significand * pow2).to(tl.int32, bitcast=True)
    return (magnitude | ((code & 0x80) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_bits(x):
    """bfloat16 bit pattern (int32 in [0, 65535]) of float32 ``x``, round to nearest even."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16) & 0xFFFF


@triton.jit
def _tile(numel, block_size, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's block indices ``(ROWS,)``, element offsets ``(ROWS, BLOCK)`` and
    their mask (inside the block and inside the tensor); int64 offsets."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    offsets = rows[:, None] * block_size + cols[None, :]
    return rows, offsets, (cols[None, :] < block_size) & (offsets < numel)


@triton.jit
def _quantize_kernel(
    x_ptr, codes_ptr, scales_ptr, numel, blocks, block_size,
    QMAX: tl.constexpr, IS_FP8: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Quantize ``ROWS`` blocks: codes (int8, or e4m3 bits as uint8) and float32 scales."""
    rows, offsets, mask = _tile(numel, block_size, ROWS, BLOCK)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), tl.full((ROWS,), QMAX, tl.float32))
    scale = tl.where(scale == 0.0, 1.0, scale)
    y = tl.math.div_rn(x, scale[:, None])
    if IS_FP8:
        codes = _e4m3_bits(tl.minimum(tl.maximum(y, -QMAX), QMAX)).to(tl.uint8)
    else:
        codes = tl.minimum(tl.maximum(_rint(y), -QMAX), QMAX).to(tl.int8)
    tl.store(codes_ptr + offsets, codes, mask=mask)
    tl.store(scales_ptr + rows, scale, mask=rows < blocks)


@triton.jit
def _dequantize_kernel(
    codes_ptr, scales_ptr, out_ptr, numel, blocks, block_size,
    IS_FP8: tl.constexpr, OUT_KIND: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Dequantize ``ROWS`` blocks; OUT_KIND 0/1/2 writes float32/float16/bfloat16 bits."""
    rows, offsets, mask = _tile(numel, block_size, ROWS, BLOCK)
    raw = tl.load(codes_ptr + offsets, mask=mask, other=0)
    if IS_FP8:
        values = _e4m3_value(raw.to(tl.int32))
    else:
        values = raw.to(tl.float32)
    scale = tl.load(scales_ptr + rows, mask=rows < blocks, other=1.0)
    x = values * scale[:, None]
    if OUT_KIND == 2:
        tl.store(out_ptr + offsets, _bf16_bits(x).to(tl.uint16), mask=mask)
    elif OUT_KIND == 1:
        tl.store(out_ptr + offsets, x.to(tl.float16), mask=mask)
    else:
        tl.store(out_ptr + offsets, x, mask=mask)


def _tiling(block_size: int, blocks: int) -> tuple[int, int, tuple[int]]:
    """``(ROWS, BLOCK, grid)`` for ``blocks`` blocks of ``block_size``."""
    block = triton.next_power_of_2(block_size)
    rows = max(1, min(_TILE // block, triton.next_power_of_2(blocks)))
    return rows, block, (triton.cdiv(blocks, rows),)


def _check_runnable(kernel: object, *tensors: torch.Tensor) -> None:
    reason = triton_unavailable_reason(*tensors)
    if reason is None and tensors[0].device.type == "cpu" and not kernel_is_interpreted(kernel):
        reason = (
            "TRITON_INTERPRET=1 was set after memopt.codegen.quantize_triton was imported "
            "(triton reads it in @triton.jit, at import)"
        )
    if reason is not None:
        raise RuntimeError(
            f"cannot run memopt's Triton quantize kernels: {reason}; use "
            "quantize_blockwise_reference, or run with TRITON_INTERPRET=1 set before import"
        )


def _check_block_limit(block_size: int) -> None:
    if block_size > MAX_TRITON_BLOCK_SIZE:
        raise ValueError(
            f"block_size {block_size} exceeds the Triton kernels' limit "
            f"{MAX_TRITON_BLOCK_SIZE}; use a smaller block or the reference"
        )


def quantize_blockwise_triton(
    x: torch.Tensor, block_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_blockwise_reference` computed by `_quantize_kernel` (CUDA, or CPU under
    the interpreter)."""
    check_quantize_args(x, block_size, dtype)
    _check_block_limit(block_size)
    _check_runnable(_quantize_kernel, x)
    flat = x.reshape(-1).contiguous()
    blocks = num_blocks(flat.numel(), block_size)
    codes = torch.empty(flat.numel(), dtype=dtype, device=x.device)
    scales = torch.empty(blocks, dtype=torch.float32, device=x.device)
    if blocks:
        rows, block, grid = _tiling(block_size, blocks)
        is_fp8 = dtype == torch.float8_e4m3fn
        with device_guard(x):
            _quantize_kernel[grid](
                flat, codes.view(torch.uint8) if is_fp8 else codes, scales,
                flat.numel(), blocks, block_size,
                QMAX=qmax(dtype), IS_FP8=is_fp8, ROWS=rows, BLOCK=block, enable_fp_fusion=FP_FUSION["quantize"],
            )  # fmt: skip
    return codes, scales


def dequantize_blockwise_triton(
    codes: torch.Tensor,
    scales: torch.Tensor,
    size: Sequence[int],
    block_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """`dequantize_blockwise_reference` computed by `_dequantize_kernel`."""
    check_dequantize_args(codes, scales, size, block_size, out_dtype)
    _check_block_limit(block_size)
    _check_runnable(_dequantize_kernel, codes, scales)
    out = torch.empty(list(size), dtype=out_dtype, device=codes.device)
    blocks = scales.numel()
    if blocks:
        rows, block, grid = _tiling(block_size, blocks)
        is_fp8 = codes.dtype == torch.float8_e4m3fn
        with device_guard(codes):
            _dequantize_kernel[grid](
                codes.contiguous().view(torch.uint8) if is_fp8 else codes.contiguous(),
                scales.contiguous(),
                out.view(torch.uint16) if out_dtype == torch.bfloat16 else out,
                codes.numel(), blocks, block_size,
                IS_FP8=is_fp8, OUT_KIND=_OUT_KINDS[out_dtype], ROWS=rows, BLOCK=block,
                enable_fp_fusion=FP_FUSION["quantize"],
            )  # fmt: skip
    return out
