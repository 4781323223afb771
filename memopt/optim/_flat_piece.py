"""`FlatPiece`: `AdamW8bit` stepping one piece of a larger tensor (a rank's rows of a
sharded parameter) with the quantization blocks of the whole tensor.

The whole tensor, flattened, is cut into blocks of ``block_size`` from its first
element; a piece (elements ``offset .. offset + numel``) keeps one scale per block it
touches, so its blocks are the whole tensor's. A block that a cut between two pieces
crosses is *shared*: each piece holds some of its elements, and its scale (the absolute
maximum of the new moments over the whole block) is the maximum of the pieces' partial
maxima, which one collective (``reduce_max``, an all-reduce MAX over the pieces) gives
every piece. Then every element gets the code and scale the whole tensor's step gives it,
bit for bit (the update is elementwise, and a maximum does not depend on the order it is
taken in).

Per step and parameter with a shared block, every piece calls ``reduce_max`` once (a
piece that touches no shared block contributes zeros): ``2 * len(shared blocks)`` floats.
A parameter without one (every cut on a block boundary) steps as an unsharded tensor
would, with no collective.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from memopt.codegen.adam8bit import CodeTables, State8bit, adam8bit_step, block_moments, requantize, slice_state

__all__ = ["FlatPiece", "piece_blocks", "piece_step"]


@dataclass(frozen=True)
class FlatPiece:
    """Where a tensor lies in the whole tensor it is a piece of (both flattened)."""

    offset: int
    """Index of the piece's first element in the whole."""
    total: int
    """Elements of the whole."""
    cuts: tuple[int, ...]
    """Where every piece but the first starts in the whole (the same on every piece;
    a cut at 0 or ``total`` cuts no block)."""
    reduce_max: Callable[[torch.Tensor], None]
    """Replace a float32 tensor, in place, by its elementwise maximum over all pieces
    (every piece calls it together: an all-reduce MAX)."""

    def shared_blocks(self, block_size: int) -> tuple[int, ...]:
        """Indices (in the whole) of the blocks a cut crosses, ascending."""
        return tuple(sorted({c // block_size for c in self.cuts if 0 < c < self.total and c % block_size}))


def piece_blocks(offset: int, numel: int, block_size: int) -> int:
    """Blocks of the whole that elements ``offset .. offset + numel`` touch (0 when empty)."""
    return 0 if numel == 0 else (offset + numel - 1) // block_size - offset // block_size + 1


def piece_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: State8bit,
    piece: FlatPiece,
    *,
    tables: CodeTables,
    block_size: int,
    kernel: str,
    coefficients: Mapping[str, float | torch.Tensor],
) -> None:
    """One 8-bit AdamW step of ``param`` (contiguous), the piece ``piece`` of a whole
    tensor, in the whole's blocks: the blocks it holds alone through `adam8bit_step`
    (Triton on CUDA), its shared first and last block through the reference with the
    scale agreed by ``piece.reduce_max``. Every piece of the whole must call this in the
    same step (the collective). Raises ``ValueError`` if the state's scales are not one
    per block the piece touches (state made for another layout)."""
    numel = param.numel()
    scales = state[1]
    nblocks = piece_blocks(piece.offset, numel, block_size)
    if scales.numel() != nblocks or state[0].numel() != numel:
        raise ValueError(
            f"AdamW8bit: the state of a {numel}-element piece at offset {piece.offset} has "
            f"{state[0].numel()} codes and {scales.numel()} scales; blocks of {block_size} of the "
            f"whole tensor need {numel} and {nblocks} (was the state made for another world size "
            "or block_size? load a checkpoint saved with the same ones)"
        )
    shared = piece.shared_blocks(block_size)
    first = piece.offset // block_size
    edges = _edges(piece.offset, numel, nblocks, first, shared, block_size)
    flat, flat_grad = param.view(-1), grad.reshape(-1)
    edge_blocks = {j for j, _, _, _ in edges}
    body = range(1 if 0 in edge_blocks else 0, nblocks - 1 if nblocks - 1 in edge_blocks else nblocks)
    if len(body):  # whole-tensor blocks that this piece holds alone: its first one starts a block
        start = (first + body.start) * block_size - piece.offset
        end = min((first + body.stop) * block_size - piece.offset, numel)
        body_state = slice_state(state, start, end, slice(body.start, body.stop))
        adam8bit_step(
            flat[start:end], flat_grad[start:end], *body_state, tables=tables, block_size=block_size,
            kernel=kernel, **coefficients,
        )  # fmt: skip
    partial = torch.zeros(2, len(shared), dtype=torch.float32, device=param.device)
    moments = []
    for j, start, end, lead in edges:
        edge_state = slice_state(state, start, end, slice(j, j + 1))
        m, v = block_moments(flat[start:end], flat_grad[start:end], edge_state, tables, block_size, coefficients, lead)
        k = shared.index(first + j)
        partial[0, k], partial[1, k] = m.abs().amax(), v.abs().amax()
        moments.append((edge_state, m, v, lead, k))
    if shared:
        piece.reduce_max(partial)
    for edge_state, m, v, lead, k in moments:
        requantize(m, v, edge_state, tables, lead, (partial[0, k : k + 1], partial[1, k : k + 1]))


def _edges(
    offset: int, numel: int, nblocks: int, first: int, shared: tuple[int, ...], block_size: int
) -> list[tuple[int, int, int, int]]:
    """``(local block, start, end, lead)`` of the piece's shared blocks: at most its first
    and its last (one, when it touches a single block)."""
    edges = []
    for j in sorted({0, nblocks - 1}) if nblocks else []:
        if first + j in shared:
            block_start = (first + j) * block_size
            start = max(block_start, offset) - offset
            end = min(block_start + block_size, offset + numel) - offset
            edges.append((j, start, end, max(block_start, offset) - block_start))
    return edges

