"""The block-wise format's reference, run in bounded memory (the ops' CPU kernels).

`quantize_reference` states the format in whole-tensor PyTorch ops, which materialize
several float32 copies of their input (pad, abs, divide, round): about 16 bytes of
scratch per element, several times the bytes the codes save. Blocks are independent,
so running the reference on consecutive chunks of whole blocks and writing each
chunk's codes and scales into preallocated outputs gives the same bits with scratch
bounded by the chunk (`CHUNK_ELEMENTS`, about 1 MiB of float32 temporaries). The
custom ops use these on every device except CUDA with Triton (whose kernels are fused
and need no scratch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memopt.codegen.quantize_reference import (
    check_dequantize_args,
    check_quantize_args,
    dequantize_blockwise_reference,
    num_blocks,
    quantize_blockwise_reference,
)

__all__ = ["CHUNK_ELEMENTS", "quantize_blockwise_chunked", "dequantize_blockwise_chunked"]

CHUNK_ELEMENTS = 1 << 16
"""Elements per chunk (rounded down to whole blocks, at least one block)."""


def _chunk(block_size: int) -> int:
    return max(CHUNK_ELEMENTS // block_size, 1) * block_size


def quantize_blockwise_chunked(
    x: torch.Tensor, block_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_blockwise_reference`, chunk by chunk: same outputs, bounded scratch."""
    check_quantize_args(x, block_size, dtype)
    flat = x.reshape(-1)
    numel, step = flat.numel(), _chunk(block_size)
    if numel <= step:
        return quantize_blockwise_reference(x, block_size, dtype)
    codes = torch.empty(numel, dtype=dtype, device=x.device)
    scales = torch.empty(num_blocks(numel, block_size), dtype=torch.float32, device=x.device)
    for start in range(0, numel, step):
        end = min(start + step, numel)
        c, s = quantize_blockwise_reference(flat[start:end], block_size, dtype)
        codes[start:end] = c
        scales[start // block_size : start // block_size + s.numel()] = s
    return codes, scales


def dequantize_blockwise_chunked(
    codes: torch.Tensor,
    scales: torch.Tensor,
    size: Sequence[int],
    block_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """`dequantize_blockwise_reference`, chunk by chunk: same output, bounded scratch."""
    check_dequantize_args(codes, scales, size, block_size, out_dtype)
    numel, step = codes.numel(), _chunk(block_size)
    if numel <= step:
        return dequantize_blockwise_reference(codes, scales, size, block_size, out_dtype)
    out = torch.empty(numel, dtype=out_dtype, device=codes.device)
    for start in range(0, numel, step):
        end = min(start + step, numel)
        first = start // block_size
        part = scales[first : first + num_blocks(end - start, block_size)]
        out[start:end] = dequantize_blockwise_reference(codes[start:end], part, [end - start], block_size, out_dtype)
    return out.reshape(list(size))
