"""`SubspaceAdamW`: AdamW in a seeded random rank-r subspace that is never stored.

In the spirit of random-subspace methods (RSO, 2025; APOLLO; Flora) the projector is a
random (k, r) matrix with orthonormal columns, regenerated at every step from
``(state["seed"], (step - 1) // update_proj_gap)`` by a counter-based generator
(`memopt.optim._rng`), so only two ints are stored per weight, and resampled every
``update_proj_gap`` steps. Regenerating costs O(k r) hashing plus an O(k r^2) QR per step.

When the subspace is resampled the moments are reset to zero and bias correction restarts:
moments accumulated in one random basis carry no information about an independent one
(projecting them onto the new basis would keep about r/k of them), and a restarted Adam
takes its usual bias-corrected first steps in the new subspace.

State per low-rank weight (m, n), rank r: right side (m >= n under the default ``"std"``)
``exp_avg`` and ``exp_avg_sq`` (m, r) fp32, ``4 * 2 * m * r`` bytes; left side (m >= n
under ``"min_state"``) ``4 * 2 * r * n``. Other parameters: AdamW's two moments in the
parameter's dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from memopt.optim._lowrank import LowRankAdamW
from memopt.optim._projection import random_projector

__all__ = ["SubspaceAdamW"]


class SubspaceAdamW(LowRankAdamW):
    """AdamW whose 2-D weights take a rank-``rank`` update in a random subspace.

    Args:
        params: parameters or param groups. A group may override any option below;
            ``{"params": ..., "lowrank": False}`` gives its parameters plain AdamW.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay).
        rank: the rank r; weights with ``min(m, n) <= rank`` get plain AdamW (a low-rank
            group in which every 2-D weight would raises ``ValueError`` at its first step).
        update_proj_gap: steps between subspace resamples (moments reset then).
        scale: multiplies the back-projected update.
        proj_type: ``"std"`` (GaLore's rule: right when m >= n, else left),
            ``"min_state"`` (the side with the least state: left when m >= n, else right),
            ``"left"`` or ``"right"``.
        lowrank: False to give a group plain AdamW.
        seed: base seed; each weight's seed mixes it with the weight's position.
        kernel: ``"auto"`` (fused Triton kernel for CUDA tensors), ``"triton"`` or ``"torch"``.
    """

    owner = "SubspaceAdamW"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        lowrank: bool = True,
        seed: int = 0,
        kernel: str = "auto",
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, rank, update_proj_gap, scale, proj_type,
            lowrank, seed, kernel,
        )  # fmt: skip

    def _init_projection(
        self, param: torch.Tensor, state: dict[str, Any], group: Mapping[str, Any], side: str
    ) -> None:
        """Nothing to store: the seed is already in ``state``."""

    def _projector(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, Any],
        group: Mapping[str, Any],
        side: str,
    ) -> tuple[torch.Tensor, int]:
        step = state["step"]
        gap = group["update_proj_gap"]
        if step > 1 and (step - 1) % gap == 0:
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
        dim = param.shape[0] if side == "left" else param.shape[1]
        projector = random_projector(
            dim, group["rank"], seed=state["seed"], stream=(step - 1) // gap, device=param.device
        )
        return projector, (step - 1) % gap + 1
