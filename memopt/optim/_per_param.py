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
does, so one parameter at a time gives the same bits. torch's Adam, AdamW and SGD step a
parameter larger than `memopt.codegen._chunks.UPDATE_CHUNK_ELEMENTS` piece by piece
(flat views of the parameter, its gradient and its state): elementwise math gives the
same bits, and the step's temporaries are one piece, not a parameter's size (AdamW's
two, for an LM head, would otherwise sit beside its gradient at the in-backward peak).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from memopt.codegen import _chunks
from memopt.optim._base import MemoptOptimizer, dense_grad

__all__ = ["ELEMENTWISE", "PerParamUpdate", "per_param_update", "memopt_update", "torch_update", "uses_memopt_step"]

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
    """The optimizer's own step with ``param`` the only parameter of the only group; for
    torch's elementwise optimizers (`ELEMENTWISE`), over pieces of the parameter
    (`_step_in_pieces`), so the step's temporaries are one piece's size."""
    if _in_pieces(optimizer, group, param):
        _step_in_pieces(optimizer, group, param)
    else:
        _step_alone(optimizer, group, param)


ELEMENTWISE: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
"""torch optimizers (these classes exactly, not subclasses) whose update of an element
reads only that element of the parameter, gradient and state, plus 0-dim state (the
step count) and the group's scalars; their state tensors are shaped like the parameter.
Their fused implementation (``fused=True``) is stepped whole: it makes no temporaries,
and on CPU its vectorized loop and its scalar tail round differently, so pieces whose
ends fall inside a vector would change bits."""


def _in_pieces(optimizer: torch.optim.Optimizer, group: dict[str, Any], param: torch.Tensor) -> bool:
    grad = param.grad
    state = optimizer.state.get(param, {})
    return (
        type(optimizer) in ELEMENTWISE
        and not group.get("differentiable", False)
        and not group.get("fused", False)  # no temporaries to save, and its vector and scalar paths round apart
        and param.numel() > _chunks.UPDATE_CHUNK_ELEMENTS
        and param.is_contiguous()
        and grad is not None
        and grad.layout == torch.strided
        and grad.shape == param.shape
        and grad.is_contiguous()
        and all(_piecewise(v, param) or not isinstance(v, torch.Tensor) or v.dim() == 0 for v in state.values())
    )


def _piecewise(value: Any, param: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == param.shape and value.is_contiguous()


def _step_in_pieces(optimizer: torch.optim.Optimizer, group: dict[str, Any], param: torch.Tensor) -> None:
    """The optimizer's step on each piece of ``param`` in turn (a flat view, with its
    gradient's and its state tensors' same views; 0-dim state, the step count, cloned per
    piece and written back once), which for an elementwise optimizer gives the bits of one
    step over the whole parameter (pinned by tests/test_optimizer_in_backward.py). With
    no state yet, each piece's fresh state is copied into tensors of the parameter's
    size as the pieces go (torch initializes state elementwise: zeros, or SGD's copy
    of the gradient)."""
    flat, flat_grad = param.detach().view(-1), param.grad.detach().view(-1)  # type: ignore[union-attr]
    state = optimizer.state.get(param, {})
    whole: dict[str, Any] = {}
    for start, end in _chunks.spans(flat.numel()):
        piece = flat[start:end]
        piece.grad = flat_grad[start:end]
        optimizer.state[piece] = {
            k: v.view(-1)[start:end] if _piecewise(v, param) else v.clone() if isinstance(v, torch.Tensor) else v
            for k, v in state.items()
        }
        try:
            _step_alone(optimizer, group, piece)
        finally:
            stepped = optimizer.state.pop(piece, {})
            piece.grad = None
        for key, value in stepped.items():
            if not state and isinstance(value, torch.Tensor) and value.dim() > 0:  # a piece's fresh state
                if key not in whole:
                    whole[key] = torch.empty(param.shape, dtype=value.dtype, device=value.device)
                whole[key].view(-1)[start:end].copy_(value)
            else:
                whole.setdefault(key, value)  # views of the state, or 0-dim/plain values alike in every piece
    if not whole:
        return  # a stateless step (SGD without momentum) records no state
    target = optimizer.state[param]
    for key, value in whole.items():
        if state and _piecewise(state.get(key), param):
            continue  # updated in place through the views
        if isinstance(target.get(key), torch.Tensor) and isinstance(value, torch.Tensor) and value.dim() == 0:
            target[key].copy_(value)  # keep the tensor object others may hold
        else:
            target[key] = value


def _step_alone(optimizer: torch.optim.Optimizer, group: dict[str, Any], param: torch.Tensor) -> None:
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
