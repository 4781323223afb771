"""Elementwise optimizer updates in bounded pieces.

An update whose math is elementwise (each element of the parameter depends only on the
same element of its gradient and state, plus scalars: AdamW, SGD, and 8-bit AdamW per
quantization block) gives the same bits computed over any partition of the elements.
Run over pieces of `UPDATE_CHUNK_ELEMENTS`, its temporaries (AdamW's
``exp_avg_sq.sqrt() / bias_correction``, 8-bit AdamW's fp32 copies of the moments) are
the size of a piece instead of the parameter's: for a 32000 x 4096 LM head, 8 MiB
instead of 1 GiB.

Users: `memopt.optim._adamw.adamw_update`, `memopt.codegen.adam8bit` (reference step),
and `memopt.optim._per_param.torch_update` (torch's own Adam/AdamW/SGD ``step`` on views
of one parameter, as ``optimizer_in_backward`` and `OffloadedState` run it). The memory
model (`memopt.analysis.optimizer_memory`) reads `update_piece_bytes`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

__all__ = ["UPDATE_CHUNK_ELEMENTS", "pieces", "spans", "update_piece_bytes"]

UPDATE_CHUNK_ELEMENTS: int = 1 << 20
"""Elements per piece (4 MiB of fp32): large enough that the per-piece Python and
kernel-launch overhead is negligible next to the arithmetic, small enough that the
temporaries are noise next to any parameter worth chunking."""


def spans(numel: int, multiple: int = 1, size: int | None = None) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of consecutive pieces covering ``range(numel)``, each of at most
    ``size`` elements (default `UPDATE_CHUNK_ELEMENTS`, read when called) rounded down
    to a multiple of ``multiple`` (at least one ``multiple``: a quantization block is
    never split)."""
    size = max((UPDATE_CHUNK_ELEMENTS if size is None else size) // multiple, 1) * multiple
    for start in range(0, numel, size):
        yield start, min(start + size, numel)


def pieces(*tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """Flat views of the same span of each of ``tensors``, span by span (`spans`), when
    they are contiguous, of one shape and larger than one piece; else the tensors
    themselves, once. Callers apply an elementwise update to each tuple in turn."""
    first = tensors[0]
    if first.numel() <= UPDATE_CHUNK_ELEMENTS or not all(
        t.shape == first.shape and t.is_contiguous() and t.layout == torch.strided for t in tensors
    ):
        yield tensors
        return
    flat = [t.view(-1) for t in tensors]
    for start, end in spans(first.numel()):
        yield tuple(f[start:end] for f in flat)


def update_piece_bytes(params: Iterable[torch.Tensor]) -> int:
    """Bytes of one piece of the widest-element parameter of ``params`` (a bound for
    any of them: a smaller parameter is one piece of its own size)."""
    return UPDATE_CHUNK_ELEMENTS * max((p.element_size() for p in params), default=4)
