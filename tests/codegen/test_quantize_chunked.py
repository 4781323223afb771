"""The ops' CPU path runs the reference chunk by chunk: the same bits as the whole-
tensor reference, with scratch memory bounded by the chunk instead of the input."""

from __future__ import annotations

import pytest
import torch

import memopt.codegen.quantize  # noqa: F401  - registers torch.ops.memopt.*
from memopt.codegen.quantize_chunked import CHUNK_ELEMENTS
from memopt.codegen.quantize_reference import dequantize_blockwise_reference, quantize_blockwise_reference
from memopt.testing.measure import measure_peak

CODES = (torch.int8, torch.float8_e4m3fn)


@pytest.mark.parametrize("dtype", CODES, ids=["int8", "fp8"])
@pytest.mark.parametrize("block_size", [64, 100, 1000])
@pytest.mark.parametrize("numel", [100, CHUNK_ELEMENTS, 3 * CHUNK_ELEMENTS + 17])
def test_chunked_ops_equal_the_reference(dtype: torch.dtype, block_size: int, numel: int) -> None:
    x = torch.randn(numel, dtype=torch.bfloat16) * torch.linspace(0.1, 10, numel).bfloat16()
    codes, scales = torch.ops.memopt.quantize_blockwise(x, block_size, dtype)
    want_codes, want_scales = quantize_blockwise_reference(x, block_size, dtype)
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))
    assert torch.equal(scales, want_scales)
    got = torch.ops.memopt.dequantize_blockwise(codes, scales, [numel], block_size, torch.float32)
    assert torch.equal(got, dequantize_blockwise_reference(codes, scales, [numel], block_size, torch.float32))


def test_scratch_is_bounded_by_the_chunk() -> None:
    """Quantizing 16 MiB of float32: the peak is the codes and scales plus at most
    ~2 MiB of scratch (the whole-tensor reference holds an input-sized fp32 quotient)."""
    numel = 1 << 22
    x = torch.randn(numel)
    kept: dict[str, object] = {}
    outputs = numel * 1 + (numel // 64) * 4
    peak = measure_peak(lambda: kept.setdefault("q", torch.ops.memopt.quantize_blockwise(x, 64, torch.int8)))
    assert peak.peak_growth_bytes < outputs + 2 * 2**20
    reference = measure_peak(lambda: kept.setdefault("r", quantize_blockwise_reference(x, 64, torch.int8)))
    assert reference.peak_growth_bytes >= outputs + x.numel() * x.element_size()
    codes, scales = kept["q"]  # type: ignore[misc]
    restore = measure_peak(lambda: kept.setdefault("d", torch.ops.memopt.dequantize_blockwise(codes, scales, [numel], 64, torch.float32)))
    assert restore.peak_growth_bytes < x.numel() * 4 + 2 * 2**20
