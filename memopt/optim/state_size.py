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

__all__ = ["state_bytes_of", "predicted_state_bytes", "group_of"]


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

    nbytes = _nbytes(param)
    if isinstance(optimizer, LowRankAdamW) and optimizer.uses_lowrank(param, group):
        rows, cols = param.shape
        rank = group["rank"]
        left = projection_side(param.shape, group["proj_type"]) == "left"
        moments = 2 * 4 * rank * (cols if left else rows)
        projector = 4 * rank * (rows if left else cols) if isinstance(optimizer, GaLoreAdamW) else 0
        return moments + projector
    if isinstance(optimizer, AdamW8bit) and optimizer.uses_8bit(param, group):
        return 2 * param.numel() + 8 * -(-param.numel() // group["block_size"])
    if isinstance(optimizer, torch.optim.SGD):
        return nbytes if group.get("momentum", 0) else 0
    if isinstance(optimizer, torch.optim.Adam):
        return (3 if group.get("amsgrad", False) else 2) * nbytes
    return 2 * nbytes


def group_of(optimizer: torch.optim.Optimizer) -> dict[int, tuple[torch.Tensor, Mapping[str, Any]]]:
    """id(param) -> (param, its param group), over every group of ``optimizer``."""
    return {id(p): (p, g) for g in optimizer.param_groups for p in g["params"]}
