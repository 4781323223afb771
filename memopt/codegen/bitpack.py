"""Bool masks stored as bits: ``torch.ops.memopt.pack_bits`` / ``unpack_bits``.

Dropout and attention-dropout masks are saved for backward as ``torch.bool``, one
byte per element. ``compress_activations`` stores them exactly, eight elements per
byte (lossless, unlike the value formats)::

    memopt::pack_bits(Tensor mask) -> Tensor                   # uint8 (ceil(numel / 8),)
    memopt::unpack_bits(Tensor packed, SymInt[] size) -> Tensor  # bool of ``size``

Element ``i`` (row-major order) is bit ``i % 8`` (least significant first) of byte
``i // 8``; the last byte's unused bits are 0. Plain PyTorch ops, run chunk by chunk so
the scratch (a uint8 copy and the shifted bits) stays bounded; a fake implementation
lets the ops trace; Inductor calls them as extern kernels. No autograd (masks carry no
gradient).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["pack_bits", "unpack_bits", "packed_bytes"]

_CHUNK = 8 << 16  # elements per chunk (a multiple of 8)


def packed_bytes(numel: int) -> int:
    """Bytes that ``numel`` packed elements take."""
    return (numel + 7) // 8


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


@torch.library.custom_op("memopt::pack_bits", mutates_args=(), schema="(Tensor mask) -> Tensor")
def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """The bits of bool ``mask`` (row-major), eight per uint8, least significant first."""
    if mask.dtype != torch.bool:
        raise ValueError(f"pack_bits takes a torch.bool mask, got {mask.dtype}; compare to get one")
    flat = mask.reshape(-1)
    out = torch.empty(packed_bytes(flat.numel()), dtype=torch.uint8, device=mask.device)
    shifts = _shifts(mask.device)
    for start in range(0, flat.numel(), _CHUNK):
        bits = flat[start : start + _CHUNK].to(torch.uint8)
        bits = torch.nn.functional.pad(bits, (0, -bits.numel() % 8)).view(-1, 8)
        out[start // 8 : start // 8 + bits.shape[0]] = (bits << shifts).sum(dim=1, dtype=torch.uint8)
    return out


@torch.library.custom_op("memopt::unpack_bits", mutates_args=(), schema="(Tensor packed, SymInt[] size) -> Tensor")
def unpack_bits(packed: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The bool tensor of ``size`` whose bits `pack_bits` stored in ``packed``."""
    numel = 1
    for dim in size:
        numel *= dim
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_bytes(numel):
        raise ValueError(
            f"unpack_bits needs the uint8 ({packed_bytes(numel)},) tensor pack_bits made for size "
            f"{list(size)}, got {packed.dtype}{list(packed.shape)}; pass the original size"
        )
    out = torch.empty(numel, dtype=torch.bool, device=packed.device)
    shifts = _shifts(packed.device)
    for start in range(0, numel, _CHUNK):
        end = min(start + _CHUNK, numel)
        chunk = packed[start // 8 : packed_bytes(end)]
        bits = ((chunk.unsqueeze(1) >> shifts) & 1).reshape(-1)
        out[start:end] = bits[: end - start].bool()
    return out.reshape(list(size))


@pack_bits.register_fake
def _pack_bits_fake(mask: torch.Tensor) -> torch.Tensor:
    return mask.new_empty((packed_bytes(mask.numel()),), dtype=torch.uint8)


@unpack_bits.register_fake
def _unpack_bits_fake(packed: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return packed.new_empty(list(size), dtype=torch.bool)
