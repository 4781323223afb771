"""How many bytes an optimizer's state takes, per parameter: measured when the state
exists, predicted when it does not yet (before the first ``step()``; on fake tensors,
where it never will).

The prediction is exact for torch's Adam/AdamW/SGD and memopt's optimizers (the
formulas of docs/optimizers.md); any other optimizer is assumed to keep two
parameter-sized tensors (Adam's count). 0-dim tensors (torch's ``step`` counts) are
not counted: they are a few bytes, and `memopt.optim.offload` keeps them in memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["state_bytes_of", "predicted_state_bytes", "lowrank_state_bytes", "adamw8bit_state_bytes", "group_of"]


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def state_bytes_of(optimizer: torch.optim.Optimizer, param: torch.Tensor, group: Mapping[str, Any]) -> int:
    """Bytes of ``param``'s state tensors of one or more dimensions: measured from
    ``optimizer.state`` when it holds any for ``param``, else `predicted_state_bytes`."""
    state = optimizer.state.get(param)
    if state:
        return sum(_nbytes(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return predicted_state_bytes(optimizer, param, group)


def predicted_state_bytes(optimizer: torch.optim.Optimizer, param: torch.Tensor, group: Mapping[str, Any]) -> int:
    """What ``optimizer`` will keep for ``param`` (in param group ``group``) after its
    first step (module docstring says for which optimizers this is exact)."""
    from memopt.optim._lowrank import LowRankAdamW
    from memopt.optim._projection import projection_side
    from memopt.optim.adamw8bit import AdamW8bit
    from memopt.optim.galore import GaLoreAdamW
    from memopt.optim.mezo import MeZO

    nbytes = _nbytes(param)
    if isinstance(optimizer, MeZO):
        return 0  # a step count: no tensors
    if isinstance(optimizer, LowRankAdamW) and optimizer.uses_lowrank(param, group):
        left = projection_side(param.shape, group["proj_type"]) == "left"
        return lowrank_state_bytes(tuple(param.shape), group["rank"], left, isinstance(optimizer, GaLoreAdamW))
    if isinstance(optimizer, AdamW8bit) and optimizer.uses_8bit(param, group):
        # one scale per block touched: of the whole tensor for a piece (`AdamW8bit.set_piece`)
        block_size = group["block_size"]
        return adamw8bit_state_bytes(param.numel(), block_size, optimizer.scale_blocks(param, block_size))
    if isinstance(optimizer, torch.optim.SGD):
        return nbytes if group.get("momentum", 0) else 0
    if isinstance(optimizer, torch.optim.Adam):
        return (3 if group.get("amsgrad", False) else 2) * nbytes
    return 2 * nbytes


def lowrank_state_bytes(shape: tuple[int, ...], rank: int, left: bool, projector: bool) -> int:
    """State of a rank-``rank`` low-rank Adam on a 2-D weight of ``shape`` (rows, cols):
    two fp32 moments (``rank x cols`` projected on the left, ``rows x rank`` on the
    right) and, for GaLore (``projector``), the fp32 projector of the other side."""
    rows, cols = shape
    moments = 2 * 4 * rank * (cols if left else rows)
    return moments + (4 * rank * (rows if left else cols) if projector else 0)


def adamw8bit_state_bytes(numel: int, block_size: int, blocks: int | None = None) -> int:
    """`AdamW8bit`'s state for ``numel`` elements: two uint8 codes per element and two
    fp32 absmax scales per block, ``blocks`` of them (default ``ceil(numel / block_size)``;
    a piece of a larger tensor keeps one per block of the whole it touches)."""
    return 2 * numel + 8 * (-(-numel // block_size) if blocks is None else blocks)


def group_of(optimizer: torch.optim.Optimizer) -> dict[int, tuple[torch.Tensor, Mapping[str, Any]]]:
    """id(param) -> (param, its param group), over every group of ``optimizer``."""
    return {id(p): (p, g) for g in optimizer.param_groups for p in g["params"]}
