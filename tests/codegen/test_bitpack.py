"""memopt::pack_bits / unpack_bits: bool masks stored exactly, eight per byte."""

from __future__ import annotations

import pytest
import torch

import memopt.codegen.bitpack  # noqa: F401  - registers the ops


def test_bit_order_is_row_major_least_significant_first() -> None:
    mask = torch.tensor([True, False, True, True, False, False, False, False, True])
    packed = torch.ops.memopt.pack_bits(mask)
    assert packed.tolist() == [0b00001101, 0b00000001]  # unused bits of the last byte are 0


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5, 7), (8 << 16 | 13,), (4, 8 << 16)])
def test_roundtrip_is_exact(shape: tuple[int, ...]) -> None:
    mask = torch.rand(shape) > 0.3
    packed = torch.ops.memopt.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(torch.ops.memopt.unpack_bits(packed, list(shape)), mask)


def test_ops_trace_and_check_their_arguments() -> None:
    mask = torch.rand(4, 6) > 0.5
    torch.library.opcheck(torch.ops.memopt.pack_bits.default, (mask,))
    torch.library.opcheck(torch.ops.memopt.unpack_bits.default, (torch.ops.memopt.pack_bits(mask), [4, 6]))
    with pytest.raises(ValueError, match="takes a torch.bool mask, got torch.float32"):
        torch.ops.memopt.pack_bits(torch.ones(3))
    with pytest.raises(ValueError, match=r"needs the uint8 \(3,\) tensor pack_bits made for size \[4, 6\]"):
        torch.ops.memopt.unpack_bits(torch.zeros(2, dtype=torch.uint8), [4, 6])
