"""`MeZO`: zero-order SGD from two forward passes (Malladi et al., Fine-Tuning Language
Models with Just Forward Passes, 2023), so training needs only inference memory.

One step with a fresh seed ``s`` and a random direction ``z ~ N(0, I)`` (one block per
parameter, regenerated from ``s`` whenever needed, never stored)::

    theta += eps * z;      L+ = closure()
    theta -= 2 * eps * z;  L- = closure()
    g = (L+ - L-) / (2 * eps)                     # SPSA estimate of grad . z
    theta += eps * z                              # restore
    theta = theta * (1 - lr * weight_decay) - lr * g * z

The perturbations are in place, so ``theta`` after a restore equals the original up to
rounding (exactly in exact arithmetic; about one ulp per step in fp32, more in bf16, as
in the MeZO reference code). There is no optimizer state beyond a step count: 0 bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from memopt.optim._base import MemoptOptimizer
from memopt.optim._checks import check_int, check_number
from memopt.optim._rng import derive_seed

__all__ = ["MeZO"]


class MeZO(MemoptOptimizer):
    """Zero-order (SPSA) SGD. ``step(closure)`` calls ``closure`` twice; it must return the
    loss of the model as it stands (perturbed) and must not call ``backward``.

    Args:
        params: parameters or param groups; a group may override ``lr`` and
            ``weight_decay``. Parameters with ``requires_grad=False`` are left alone.
        lr: learning rate.
        eps: perturbation scale, the same for every group (one finite difference per step).
        weight_decay: decoupled weight decay.
        seed: base seed; step k, parameter i use ``derive_seed(seed, k, i)``.
    """

    owner = "MeZO"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        seed: int = 0,
    ) -> None:
        check_number(self.owner, "eps", eps, low=0.0, low_open=True)
        check_int(self.owner, "seed", seed, low=0)
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay, seed=seed))

    def _check_group(self, group: Mapping[str, Any]) -> None:
        self._check_shared(group, self.defaults)

    def _check_loaded_groups(self, groups: list[dict[str, Any]]) -> None:
        """A checkpoint's groups set eps and seed as the optimizer that saved it did (they
        replace this one's, as torch's load replaces every option): they must agree with
        each other, not with this optimizer's constructor."""
        for group in groups:
            self._check_shared(group, groups[0])

    def _check_shared(self, group: Mapping[str, Any], reference: Mapping[str, Any]) -> None:
        """``group``'s lr and weight_decay, and its eps and seed equal to ``reference``'s."""
        check_number(self.owner, "lr", group["lr"], low=0.0)
        check_number(self.owner, "weight_decay", group["weight_decay"], low=0.0)
        if group["eps"] != reference["eps"] or group["seed"] != reference["seed"]:
            raise ValueError(
                f"{self.owner}: a param group sets eps={group['eps']!r}, seed={group['seed']!r}; "
                f"both must equal the optimizer's (eps={reference['eps']!r}, "
                f"seed={reference['seed']!r}) "
                "because one step takes one finite difference over all parameters"
            )

    def _state_keys(self, param: torch.Tensor, group: Mapping[str, Any]) -> frozenset[str]:
        return frozenset({"step"})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> float:  # type: ignore[override]
        """One SPSA step; returns the mean of the two losses (an estimate of the loss at
        the unperturbed parameters)."""
        if closure is None:
            raise TypeError(
                "MeZO.step needs a closure returning the loss (it estimates the gradient from "
                "two forward passes), e.g. opt.step(lambda: loss_fn(model(x), y))"
            )
        eps, base_seed = self.param_groups[0]["eps"], self.param_groups[0]["seed"]
        entries = self._trainable()
        self._refuse_grads(entries, "before the step")
        step = self._next_step(entries)
        seeds = [derive_seed(base_seed, step, position) for position, _, _ in entries]
        self._perturb(entries, seeds, eps)
        loss_plus = float(closure())
        self._refuse_grads(entries, "after the closure ran")
        self._perturb(entries, seeds, -2.0 * eps)
        loss_minus = float(closure())
        projected_grad = (loss_plus - loss_minus) / (2.0 * eps)
        for (_, param, group), seed in zip(entries, seeds):
            z = _direction(param, seed)
            param.add_(z, alpha=eps)
            if group["weight_decay"] != 0:
                param.mul_(1.0 - group["lr"] * group["weight_decay"])
            param.add_(z, alpha=-group["lr"] * projected_grad)
        return (loss_plus + loss_minus) / 2.0

    def _trainable(self) -> list[tuple[int, torch.Tensor, dict[str, Any]]]:
        """(position, parameter, group) of every parameter that requires grad."""
        entries = []
        position = 0
        for group in self.param_groups:
            for param in group["params"]:
                position += 1
                if param.requires_grad:
                    entries.append((position, param, group))
        return entries

    def _next_step(self, entries: list[tuple[int, torch.Tensor, dict[str, Any]]]) -> int:
        """Count this step in every parameter's state and return it (1-based)."""
        step = 0
        for _, param, _ in entries:
            state = self.state[param]
            state["step"] = state.get("step", 0) + 1
            step = max(step, state["step"])
        return step

    def _refuse_grads(self, entries: list[tuple[int, torch.Tensor, dict[str, Any]]], when: str) -> None:
        for position, param, _ in entries:
            if param.grad is not None:
                raise RuntimeError(
                    f"MeZO: parameter #{position} (shape {tuple(param.shape)}) has a .grad {when}. "
                    "MeZO uses forward passes only: remove loss.backward() from the training loop "
                    "and the closure, and clear leftover grads with optimizer.zero_grad(set_to_none=True)"
                )

    @staticmethod
    def _perturb(entries: list[tuple[int, torch.Tensor, dict[str, Any]]], seeds: list[int], scale: float) -> None:
        for (_, param, _), seed in zip(entries, seeds):
            param.add_(_direction(param, seed), alpha=scale)


def _direction(param: torch.Tensor, seed: int) -> torch.Tensor:
    """The random direction ``z`` for ``param`` under ``seed``: standard normal, in the
    parameter's dtype, on its device."""
    generator = torch.Generator(device=param.device)
    generator.manual_seed(seed)
    return torch.randn(param.shape, generator=generator, device=param.device, dtype=param.dtype)
