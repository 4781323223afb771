"""Seeded randomness that is the same on every device and traces under ``torch.compile``.

`gaussian` is a counter-based generator: element ``i`` of the output is a fixed function of
``(seed, stream, i)`` built from 32-bit integer mixing (the *lowbias32* hash) on int64
tensors, then Box-Muller (both outputs of each pair). No ``torch.Generator`` is involved, so a random projection can be
regenerated inside a compiled optimizer step (Dynamo does not trace generators), and CPU
and CUDA produce the same matrix, so a checkpoint resumes on either. ``stream`` may be a
symbolic int (a step count under Dynamo): it enters the graph as a 0-dim tensor, so a new
stream does not recompile.

`derive_seed` mixes Python ints into a 31-bit seed (splitmix64), for per-parameter and
per-step seeds computed on the host.
"""

from __future__ import annotations

import math

import torch

__all__ = ["derive_seed", "gaussian"]

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


def derive_seed(*parts: int) -> int:
    """A seed in [0, 2**31) that depends on every integer in ``parts`` (splitmix64 chain)."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 29
    return state & 0x7FFFFFFF


def gaussian(
    shape: tuple[int, ...], seed: int, stream: int, device: torch.device | str
) -> torch.Tensor:
    """Standard normal fp32 samples of ``shape``, a pure function of ``(seed, stream)``.

    ``seed`` and ``stream`` are non-negative ints below 2**32; the output must have fewer
    than 2**31 elements.
    """
    numel = math.prod(shape)
    if numel >= 2**31:
        raise ValueError(f"gaussian: {numel} elements requested; at most 2**31 - 1 per call")
    seed_t = torch.full((), seed & _MASK32, dtype=torch.int64, device=device)
    stream_t = torch.full((), stream, dtype=torch.int64, device=device) & _MASK32
    key = _mix32(_mix32(seed_t) ^ stream_t)
    pairs = (numel + 1) // 2
    counters = torch.arange(2 * pairs, dtype=torch.int64, device=device)
    bits = _mix32(_mix32(counters ^ key) ^ 0x5BD1E995)
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / 2**24)  # in (0, 1)
    radius = torch.sqrt(-2.0 * torch.log(uniform[:pairs]))
    angle = (2.0 * math.pi) * uniform[pairs:]
    normal = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])
    return normal[:numel].view(shape)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (Wellons) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``(x * constant) mod 2**32`` without int64 overflow: multiply 16-bit halves."""
    low = (x & 0xFFFF) * constant
    high = (((x >> 16) * constant) & 0xFFFF) << 16
    return (low + high) & _MASK32
