"""Mixed-dtype elementwise kernels without their promoted copies (CPU, eager codegen).

ATen's CPU kernels (TensorIterator) cast an operand whose dtype differs from the op's
common dtype into a temporary copy before they run; CUDA kernels cast as they read.
``x * mask`` with a float ``x`` and a bool ``mask`` therefore allocates a float copy
of the mask, as large as ``x``, that no graph shows. Such products are the dropout
masks' multiplications: dropout replayed in a recomputed forward (`memopt.graph.rng`)
and dropout's decomposed backward (`memopt.codegen.eager.DECOMPOSITIONS`), and they sit
at training steps' peaks (GPT-2's offload plan: 8 MiB of scratch the memory model did
not see, at its peak, measured op by op).

Under ``codegen="eager"`` such a kernel runs in pieces of `PIECE_ELEMENTS` (its
``out=`` overload on flat slices of the operands and the output), so the copy is one
piece. Element ``i`` of an elementwise op reads only element ``i`` of each operand, so
the bits are those of one call (``tests/test_promoting.py``). The memory model reads
`promoted_copy_bytes` (`memopt.analysis.workspace`).

Which kernels: ``add``, ``sub``, ``mul`` and ``div`` (their tensor and ``out=``
overloads), measured to copy a promoted operand on CPU; ``where`` and ``masked_fill``
do not (they take the mask as a condition). Pieces need every tensor operand and the
output contiguous and of one shape (no broadcasting); other calls run whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from memopt.analysis.aliasing import concrete_int
from memopt.codegen._chunks import spans
from memopt.graph import meta

__all__ = ["PIECE_ELEMENTS", "PROMOTING", "promoted_copy_bytes", "runs_in_pieces", "in_pieces", "run_in_pieces"]

aten = torch.ops.aten

PIECE_ELEMENTS: int = 1 << 18
"""Elements per piece (1 MiB of fp32 copy): the Python overhead of a piece (three
slices and a call, about 10 us) stays small next to its arithmetic."""

PROMOTING: dict[torch._ops.OpOverload, torch._ops.OpOverload] = {
    aten.add.Tensor: aten.add.out, aten.add.out: aten.add.out,
    aten.sub.Tensor: aten.sub.out, aten.sub.out: aten.sub.out,
    aten.mul.Tensor: aten.mul.out, aten.mul.out: aten.mul.out,
    aten.div.Tensor: aten.div.out, aten.div.out: aten.div.out,
}  # fmt: skip
"""Kernels that copy a promoted operand on CPU -> the ``out=`` overload pieces call."""


@dataclass(frozen=True)
class _Promotion:
    copied: list[torch.Tensor]
    """The operands the CPU kernel copies."""
    dtype: torch.dtype
    """The dtype it copies them to: the one it computes in (its output's: the operands'
    common dtype, or for ``div`` of integers the default float)."""
    pieces: bool
    """The eager codegen runs it in pieces: a copied operand of more than one piece,
    operands and output contiguous, of one shape, the output of the common dtype."""


def _promotion(node: fx.Node) -> _Promotion | None:
    """What ``node``'s CPU kernel copies, or None (no copy, or not such a kernel)."""
    if node.op != "call_function" or node.target not in PROMOTING or len(node.args) < 2:
        return None
    operands = [meta.fake_value(a) if isinstance(a, fx.Node) else None for a in node.args[:2]]
    out = meta.fake_value(node)
    if not all(isinstance(t, torch.Tensor) for t in operands) or not isinstance(out, torch.Tensor):
        return None
    if out.device.type not in ("cpu", "meta"):  # meta: estimates equal the CPU's; CUDA casts as it reads
        return None
    copied = [v for v in operands if v.dtype != out.dtype and v.dim() > 0]
    if not copied:
        return None
    pieces = (
        any(concrete_int(v.numel()) > PIECE_ELEMENTS for v in copied)
        and all(t.shape == out.shape and t.is_contiguous() for t in (*operands, out))
        and out.dtype == torch.result_type(*operands)
    )
    return _Promotion(copied, out.dtype, pieces)


def runs_in_pieces(node: fx.Node) -> bool:
    """Whether the eager codegen runs ``node`` in pieces (module docstring): it copies a
    promoted operand of more than one piece, and its operands and output are
    contiguous, of one shape, the output of the common dtype."""
    promotion = _promotion(node)
    return promotion is not None and promotion.pieces


def promoted_copy_bytes(node: fx.Node) -> int:
    """Bytes of the promoted copies ``node``'s CPU kernel holds while it runs, as the
    eager codegen runs it (one piece's, when `runs_in_pieces`)."""
    promotion = _promotion(node)
    if promotion is None:
        return 0
    elements = (concrete_int(v.numel()) for v in promotion.copied)
    return promotion.dtype.itemsize * sum(min(n, PIECE_ELEMENTS) if promotion.pieces else n for n in elements)


def in_pieces(op: torch._ops.OpOverload, a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
    """``op(a, b, **kwargs)`` (with ``out=`` when given; ``op`` one of `PROMOTING`)
    computed piece by piece into ``out`` (a fresh contiguous tensor when None). Run as
    the one call it stands for when the operands are not contiguous tensors of one
    shape (the graph's fake values said they would be). Pieces start at multiples of
    `PIECE_ELEMENTS`, a multiple of every vector width, so each element takes the
    kernel's same code path as in one call."""
    if not (a.shape == b.shape and a.is_contiguous() and b.is_contiguous()) or (
        out is not None and not (out.shape == a.shape and out.is_contiguous())
    ):
        return op(a, b, **kwargs) if out is None else op(a, b, out=out, **kwargs)
    if out is None:
        out = torch.empty(a.shape, dtype=torch.result_type(a, b), device=a.device)
    flat_a, flat_b, flat_out = a.view(-1), b.view(-1), out.view(-1)
    for start, end in spans(out.numel(), size=PIECE_ELEMENTS):
        PROMOTING[op](flat_a[start:end], flat_b[start:end], out=flat_out[start:end], **kwargs)
    return out


def run_in_pieces(graph: fx.Graph) -> int:
    """Rewrite the nodes `runs_in_pieces` selects into calls of `in_pieces` (after
    `memopt.codegen.eager.write_in_place`, whose ``out=`` they keep); the number
    rewritten. Needs fake values on the nodes."""
    count = 0
    for node in graph.nodes:
        if runs_in_pieces(node):
            node.args = (node.target, *node.args)
            node.target = in_pieces
            count += 1
    return count
