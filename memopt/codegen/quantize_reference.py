"""Block-wise quantization format and its PyTorch reference (the specification).

Format (see docs/kernels.md):

* ``x`` is read in row-major (``x.reshape(-1)``) order and split into consecutive blocks
  of ``block_size`` elements; the last block holds the remaining ``numel % block_size``
  elements when the size is not a multiple (it is not padded in storage).
* ``codes`` is a flat ``(numel,)`` tensor of ``dtype`` (``torch.int8`` or
  ``torch.float8_e4m3fn``); ``scales`` is ``(ceil(numel / block_size),)`` float32.
* Per block: ``absmax = max|x|`` (in float32), ``scale = absmax / qmax`` with
  ``qmax = 127`` (int8) or ``448`` (e4m3fn, its largest finite value); when that scale is
  0 (an all-zero block, or an absmax so small that the division underflows) the scale is
  1.0, so codes are 0 and dequantize to exactly 0.
* ``y = x / scale`` (IEEE float32 division). int8: ``round_half_to_even(y)`` clamped to
  ``[-127, 127]`` (-128 is never produced). e4m3fn: ``y`` clamped to ``[-448, 448]`` then
  rounded to nearest-even e4m3fn (a saturating cast: never NaN for finite input).
* Dequantize: ``codes.float() * scale`` in float32, then cast to ``out_dtype`` (round to
  nearest even).

Inputs are float32, bfloat16 or float16; all arithmetic is float32. Non-finite inputs
are not supported: a block holding inf or NaN gets a non-finite scale and undefined codes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "CODE_DTYPES",
    "FLOAT_DTYPES",
    "qmax",
    "num_blocks",
    "check_quantize_args",
    "check_dequantize_args",
    "quantize_blockwise_reference",
    "dequantize_blockwise_reference",
]

CODE_DTYPES: dict[torch.dtype, float] = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
"""Supported code dtypes and their ``qmax`` (largest code magnitude)."""

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
"""Dtypes accepted as quantize input and as dequantize output."""


def qmax(dtype: torch.dtype) -> float:
    """The largest code magnitude of code dtype ``dtype`` (127 or 448)."""
    return CODE_DTYPES[dtype]


def num_blocks(numel: int, block_size: int) -> int:
    """How many blocks (and scales) ``numel`` elements make: ``ceil(numel / block_size)``."""
    return (numel + block_size - 1) // block_size


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(
            f"block_size must be a positive int, got {block_size!r}; typical values are 64-256"
        )


def _check_code_dtype(dtype: torch.dtype) -> None:
    if dtype not in CODE_DTYPES:
        raise ValueError(
            f"unsupported code dtype {dtype}; use one of {sorted(map(str, CODE_DTYPES))}"
        )


def _check_float_dtype(what: str, dtype: torch.dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{what} must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype}; "
            "cast to torch.float32 first"
        )


def check_quantize_args(x: torch.Tensor, block_size: int, dtype: torch.dtype) -> None:
    """Raise ``ValueError`` naming the bad argument of a quantize call."""
    _check_block_size(block_size)
    _check_code_dtype(dtype)
    _check_float_dtype("the input's dtype", x.dtype)


def check_dequantize_args(
    codes: torch.Tensor,
    scales: torch.Tensor,
    size: Sequence[int],
    block_size: int,
    out_dtype: torch.dtype,
) -> None:
    """Raise ``ValueError`` naming the bad argument of a dequantize call.

    Shape checks go through ``torch._check_value`` so they hold for symbolic sizes too.
    """
    _check_block_size(block_size)
    _check_code_dtype(codes.dtype)
    _check_float_dtype("out_dtype", out_dtype)
    if codes.dim() != 1 or scales.dim() != 1 or scales.dtype != torch.float32:
        raise ValueError(
            f"codes must be 1-D and scales 1-D float32 (as quantize returns them), got "
            f"codes {codes.dtype}{list(codes.shape)}, scales {scales.dtype}{list(scales.shape)}"
        )
    numel = codes.shape[0]
    expected = num_blocks(numel, block_size)
    torch._check_value(
        scales.shape[0] == expected,
        lambda: f"{numel} codes in blocks of {block_size} need {expected} scales, got "
        f"{scales.shape[0]}; pass the block_size used to quantize",
    )
    elements = 1
    for dim in size:
        elements = elements * dim
    torch._check_value(
        elements == numel,
        lambda: f"size {list(size)} holds {elements} elements but there are {numel} codes; "
        "pass the original tensor's size",
    )


def _blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """``flat`` zero-padded to whole blocks, viewed as ``(num_blocks, block_size)`` (a
    view of ``flat`` itself when it is whole blocks: no copy)."""
    blocks = num_blocks(flat.numel(), block_size)
    if blocks * block_size == flat.numel():
        return flat.view(blocks, block_size)
    return F.pad(flat, (0, blocks * block_size - flat.numel())).view(blocks, block_size)


def _block_scales(x: torch.Tensor, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-block scales of ``x`` (float32, zero-scale guarded to 1.0)."""
    blocks = _blocks(x.reshape(-1).to(torch.float32), block_size)
    scales = blocks.abs().amax(dim=1) / qmax(dtype)
    return torch.where(scales == 0, torch.ones_like(scales), scales)


def quantize_blockwise_reference(
    x: torch.Tensor, block_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` block-wise: ``(codes (numel,) dtype, scales (num_blocks,) float32)``.

    The specification the Triton kernel must match bit for bit (module docstring).
    """
    check_quantize_args(x, block_size, dtype)
    flat = x.reshape(-1).to(torch.float32)
    scales = _block_scales(flat, block_size, dtype)
    limit = qmax(dtype)
    y = (_blocks(flat, block_size) / scales[:, None]).reshape(-1)[: flat.numel()]
    # y is this function's own tensor (the quotient): round and clamp it in place
    if dtype == torch.int8:
        codes = y.round_().clamp_(-limit, limit).to(torch.int8)
    else:
        codes = y.clamp_(-limit, limit).to(dtype)
    return codes, scales


def dequantize_blockwise_reference(
    codes: torch.Tensor,
    scales: torch.Tensor,
    size: Sequence[int],
    block_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Invert `quantize_blockwise_reference`: a tensor of ``size`` and ``out_dtype``."""
    check_dequantize_args(codes, scales, size, block_size, out_dtype)
    if codes.numel() % block_size == 0:  # whole blocks: scale the decoded values in place, no padded copy
        values = codes.to(torch.float32)
        values.view(-1, block_size).mul_(scales[:, None])
        return values.to(out_dtype).reshape(list(size))
    values = _blocks(codes.to(torch.float32), block_size) * scales[:, None]
    return values.reshape(-1)[: codes.numel()].to(out_dtype).reshape(list(size))
