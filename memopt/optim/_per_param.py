"""One parameter's update by an optimizer's own math, shared by `OffloadedState` (which
streams the state one parameter at a time) and `memopt.optim.in_backward` (which runs
each parameter's update inside the backward graph).

* memopt's optimizers: their per-parameter ``_update``, with the parameter's 1-based
  position over all groups (Subspace's seeds depend on it) and its own state;
* any other ``torch.optim.Optimizer`` whose update is per parameter (AdamW, Adam, SGD,
  ...): its ``step`` with the parameter's group temporarily holding that parameter alone
  (the step's undecorated function: the optimizer's step hooks, and any wrapper set on
  the instance, do not run). The group's hyper-parameters are read at call time, so
  LR schedulers' edits apply.

Both read ``param.grad``, which the caller sets first. Torch's single-tensor
implementations (the CPU default) compute each parameter exactly as a full ``step``
does, so one parameter at a time gives the same bits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from memopt.optim._base import MemoptOptimizer, dense_grad

__all__ = ["PerParamUpdate", "per_param_update", "memopt_update", "torch_update", "uses_memopt_step"]

PerParamUpdate = Callable[[torch.optim.Optimizer, dict[str, Any], torch.Tensor, int], None]
"""``(optimizer, group, param, position)``: update ``param`` in place from ``param.grad``."""


def _unhooked(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` without torch's profiling/hook wrapper (`Optimizer._patch_step_function`)."""
    while getattr(step, "hooked", False) and hasattr(step, "__wrapped__"):
        step = step.__wrapped__
    return step


def uses_memopt_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` steps with `MemoptOptimizer.step` (a loop over ``_update``)."""
    return isinstance(optimizer, MemoptOptimizer) and (
        _unhooked(type(optimizer).step) is _unhooked(MemoptOptimizer.step))


def memopt_update(optimizer: torch.optim.Optimizer, group: dict[str, Any], param: torch.Tensor,
                  position: int) -> None:
    """A `MemoptOptimizer`'s ``_update`` of ``param`` from ``param.grad``."""
    assert isinstance(optimizer, MemoptOptimizer)
    grad = dense_grad(type(optimizer).__name__, param)
    optimizer._update(param, grad, optimizer.state[param], group, position)


def torch_update(optimizer: torch.optim.Optimizer, group: dict[str, Any], param: torch.Tensor,
                 position: int) -> None:
    """The optimizer's own step with ``param`` the only parameter of the only group."""
    params, groups = group["params"], optimizer.param_groups
    group["params"] = [param]
    optimizer.param_groups = [group]
    try:
        _unhooked(type(optimizer).step)(optimizer)
    finally:
        group["params"] = params
        optimizer.param_groups = groups


def per_param_update(optimizer: torch.optim.Optimizer) -> PerParamUpdate:
    """The per-parameter update for ``optimizer`` (module docstring)."""
    return memopt_update if uses_memopt_step(optimizer) else torch_update
