"""`GaLoreAdamW`: AdamW with gradients projected to rank r by the SVD of the gradient
(Zhao et al., GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection, 2024).

The projector (the top-r singular vectors of the current gradient on the side chosen by
``proj_type``) is computed at the first step and refreshed every ``update_proj_gap`` steps.
As in GaLore's reference code, the moments are kept across a refresh (they were
accumulated in the previous basis) and bias correction counts every step.

State per low-rank weight (m, n), rank r: right side (m >= n under the default ``"std"``)
``exp_avg`` and ``exp_avg_sq`` (m, r) fp32, ``projector`` (n, r) fp32, so
``4 * (2 * m * r + n * r)`` bytes; left side (m >= n under ``"min_state"``) ``4 * (2 * r * n
+ m * r)``. Other parameters: AdamW's two moments in the parameter's dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from memopt.optim._checks import check_choice
from memopt.optim._lowrank import LowRankAdamW
from memopt.optim._projection import SVD_METHODS, svd_projector

__all__ = ["GaLoreAdamW"]


class GaLoreAdamW(LowRankAdamW):
    """AdamW whose 2-D weights take a rank-``rank`` update in a gradient-SVD subspace.

    Args:
        params: parameters or param groups. A group may override any option below;
            ``{"params": ..., "lowrank": False}`` gives its parameters plain AdamW (the
            usual choice for embeddings and the output head).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay).
        rank: the rank r; weights with ``min(m, n) <= rank`` get plain AdamW (a low-rank
            group in which every 2-D weight would raises ``ValueError`` at its first step).
        update_proj_gap: steps between projector refreshes (SVDs).
        scale: multiplies the back-projected update (GaLore's alpha).
        proj_type: ``"std"`` (GaLore's rule: right when m >= n, else left),
            ``"min_state"`` (the side with the least state: left when m >= n, else right),
            ``"left"`` or ``"right"``.
        svd: ``"full"`` (``torch.linalg.svd``) or ``"randomized"`` (range finder, cost
            O(m n r) instead of O(m n min(m, n)), seeded by ``seed``).
        lowrank: False to give a group plain AdamW.
        seed: seed of the randomized SVD's probes.
        kernel: ``"auto"`` (fused Triton kernel for CUDA tensors), ``"triton"`` or ``"torch"``.
    """

    owner = "GaLoreAdamW"
    projection_keys = frozenset({"projector"})

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
        svd: str = "full",
        lowrank: bool = True,
        seed: int = 0,
        kernel: str = "auto",
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, rank, update_proj_gap, scale, proj_type,
            lowrank, seed, kernel, svd=svd,
        )  # fmt: skip

    def _check_group(self, group: Mapping[str, Any]) -> None:
        super()._check_group(group)
        check_choice(self.owner, "svd", group["svd"], SVD_METHODS)

    def _init_projection(
        self, param: torch.Tensor, state: dict[str, Any], group: Mapping[str, Any], side: str
    ) -> None:
        dim = param.shape[0] if side == "left" else param.shape[1]
        state["projector"] = torch.zeros(dim, group["rank"], dtype=torch.float32, device=param.device)

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
        if (step - 1) % gap == 0:
            fresh = svd_projector(
                grad, group["rank"], side, method=group["svd"], seed=state["seed"], stream=(step - 1) // gap
            )
            state["projector"].copy_(fresh)
        return state["projector"], step
