"""`LowRankAdamW`: the step shared by `GaLoreAdamW` and `SubspaceAdamW`.

Per parameter and step:

* a 2-D weight with ``lowrank=True`` and ``rank < min(m, n)``: the subclass supplies a
  projector (GaLore: SVD of the gradient, stored; Subspace: regenerated from a seed), the
  gradient is projected to rank r (one matmul), and `memopt.codegen.lowrank_adam_step`
  updates the rank-r moments and the weight in one fused step;
* any other parameter: plain AdamW, exactly as ``torch.optim.AdamW``.

``state["step"]`` is a Python int, so a compiled ``optimizer.step`` sees it as a symbolic
int after warm-up: the refresh condition ``(step - 1) % gap == 0`` then costs one graph
per outcome, not one per step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch

from memopt.codegen.lowrank_adam import lowrank_adam_step
from memopt.optim._adamw import ADAMW_STATE_KEYS, adam_coefficients, adamw_group_step, torch_update_device
from memopt.optim._base import MemoptOptimizer
from memopt.optim._checks import check_adamw_group, check_bool, check_choice, check_int, check_number
from memopt.optim._projection import PROJ_TYPES, left_form, project, projection_side
from memopt.optim._rng import derive_seed

__all__ = ["LowRankAdamW"]


class LowRankAdamW(MemoptOptimizer):
    """Base class: subclasses implement `_init_projection` and `_projector`."""

    owner: ClassVar[str] = "LowRankAdamW"
    projection_keys: ClassVar[frozenset[str]] = frozenset()
    """The state keys `_init_projection` adds to a low-rank weight's state."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        rank: int,
        update_proj_gap: int,
        scale: float,
        proj_type: str,
        lowrank: bool,
        seed: int,
        kernel: str,
        **extra: Any,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
            update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
            lowrank=lowrank, seed=seed, kernel=kernel, **extra,
        )  # fmt: skip
        super().__init__(params, defaults)
        # How many param groups `_check_new_groups` has checked, as a list changed in
        # place: inside a compiled step torch 2.11's Dynamo cannot assign an attribute of an
        # optimizer (its OptimizerVariable tracks no attribute mutation; 2.13's does), but
        # it traces an item assignment.
        self._groups_checked = [0]

    def _check_group(self, group: Mapping[str, Any]) -> None:
        owner = self.owner
        check_adamw_group(owner, group)
        check_int(owner, "rank", group["rank"], low=1)
        check_int(owner, "update_proj_gap", group["update_proj_gap"], low=1)
        check_number(owner, "scale", group["scale"], low=0.0, low_open=True)
        if group["proj_type"] == "reverse_std":
            raise ValueError(
                f"{owner}: proj_type='reverse_std' (GaLore's reference code's name) is not valid; its rule "
                "(left when m >= n, else right) is proj_type='min_state' here: expected one of "
                f"{PROJ_TYPES}"
            )
        check_choice(owner, "proj_type", group["proj_type"], PROJ_TYPES)
        check_bool(owner, "lowrank", group["lowrank"])
        check_int(owner, "seed", group["seed"], low=0, high=2**32 - 1)

    @staticmethod
    def uses_lowrank(param: torch.Tensor, group: Mapping[str, Any]) -> bool:
        """Whether ``param`` gets the low-rank update under ``group``'s options."""
        return bool(group["lowrank"]) and param.dim() == 2 and group["rank"] < min(param.shape)

    def _state_keys(self, param: torch.Tensor, group: Mapping[str, Any]) -> frozenset[str]:
        if not self.uses_lowrank(param, group):
            return ADAMW_STATE_KEYS
        return frozenset({"step", "seed", "exp_avg", "exp_avg_sq"}) | self.projection_keys

    def _update(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, Any],
        group: Mapping[str, Any],
        position: int,
    ) -> None:
        if not state:
            self._check_new_groups()
        if not self.uses_lowrank(param, group):
            adamw_group_step(param, grad, state, group)
            return
        side = projection_side(param.shape, group["proj_type"])
        if not state:
            rows, cols = param.shape
            moment_shape = (group["rank"], cols) if side == "left" else (rows, group["rank"])
            state["step"] = 0
            state["seed"] = derive_seed(group["seed"], position)
            state["exp_avg"] = torch.zeros(moment_shape, dtype=torch.float32, device=param.device)
            state["exp_avg_sq"] = torch.zeros(moment_shape, dtype=torch.float32, device=param.device)
            self._init_projection(param, state, group, side)
        state["step"] += 1
        projector, bias_step = self._projector(param, grad, state, group, side)
        lowrank_grad = project(grad, projector, side)
        weight, lowrank_grad, exp_avg, exp_avg_sq = left_form(
            side, param, lowrank_grad, state["exp_avg"], state["exp_avg_sq"]
        )
        lowrank_adam_step(
            weight, lowrank_grad, projector, exp_avg, exp_avg_sq, kernel=group["kernel"],
            **adam_coefficients(group, bias_step, scale=group["scale"], device=torch_update_device(group["kernel"], weight)),
        )

    def _check_new_groups(self) -> None:
        """`_check_some_lowrank` on every group added since the last call. Called at the
        first update of any parameter (a bias too, whatever the order of the groups and
        of their parameters), so a refusal comes before any parameter has changed: the
        step is refused whole, not half taken. Checked then, not when a group is added,
        so that wrappers that build the optimizer on shards
        (`memopt.distributed.ShardedOptimizer`) refuse those with their own reason first."""
        for group in self.param_groups[self._groups_checked[0] :]:
            self._check_some_lowrank(group)
        self._groups_checked[0] = len(self.param_groups)

    def _check_some_lowrank(self, group: Mapping[str, Any]) -> None:
        """Refuse a low-rank group whose ``rank`` is not below ``min(m, n)`` of any of its
        2-D parameters: every one would get plain AdamW (AdamW's whole state) while the
        user asked for a low-rank update. A group with no 2-D parameter, or with
        ``lowrank=False``, is plain AdamW as asked."""
        matrices = [p for p in group["params"] if p.dim() == 2]
        if not group["lowrank"] or not matrices or any(self.uses_lowrank(p, group) for p in matrices):
            return
        largest = max(min(p.shape) for p in matrices)
        raise ValueError(
            f"{self.owner}: rank={group['rank']} is not below min(m, n) of any 2-D parameter of "
            f"its param group (the largest min(m, n) is {largest}), so none would get the low-rank "
            f"update; expected rank < {largest}, or lowrank=False for a group meant for plain AdamW"
        )

    def _init_projection(
        self, param: torch.Tensor, state: dict[str, Any], group: Mapping[str, Any], side: str
    ) -> None:
        """Add the subclass's projection state to a fresh ``state``."""
        raise NotImplementedError

    def _projector(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, Any],
        group: Mapping[str, Any],
        side: str,
    ) -> tuple[torch.Tensor, int]:
        """The projector for this step (``state["step"]`` already counts it) and the step
        count to use for Adam's bias correction."""
        raise NotImplementedError
