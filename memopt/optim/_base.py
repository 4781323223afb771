"""`MemoptOptimizer`: what all of memopt's optimizers share with ``torch.optim.Optimizer``
and add to it: per-group argument checks, `state_bytes`, and a ``load_state_dict`` that
keeps every state tensor's dtype.

``torch.optim.Optimizer.load_state_dict`` casts every floating-point parameter's state
tensors to the parameter's dtype. That is right for Adam's moments and wrong here: it would
turn 8-bit codes into floats (4x the memory, and unusable as indices) and round the fp32
low-rank moments of a bf16 weight to bf16. memopt's loading casts only plain AdamW's
moments (``exp_avg`` and ``exp_avg_sq`` shaped like the parameter, created in the
parameter's dtype), so an fp32 checkpoint resumes on bf16 parameters; the rest keeps
its saved dtype, and every tensor moves to its parameter's device.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["MemoptOptimizer", "optimizer_state_bytes", "dense_grad"]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors held in ``optimizer.state`` (any torch optimizer).

    Counts each state tensor's ``numel * element_size``; Python numbers (steps, seeds)
    count as 0. For ``torch.optim.AdamW`` on fp32 parameters this is 8 bytes per parameter
    element plus 4 bytes per parameter for the ``step`` tensor.
    """
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


class MemoptOptimizer(torch.optim.Optimizer):
    """Base of memopt's optimizers. Subclasses implement `_check_group`, and `_update` (or
    their own ``step``)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, after checking the group's options (with defaults filled in)."""
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._check_group(merged)
        super().add_param_group(param_group)

    def _check_group(self, group: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming any invalid option of ``group``."""
        raise NotImplementedError

    def _state_keys(self, param: torch.Tensor, group: Mapping[str, Any]) -> frozenset[str]:
        """The keys of the state this optimizer makes for ``param`` under ``group``'s
        options (a loaded state is checked against them: `_check_loaded`)."""
        raise NotImplementedError

    def _check_loaded_groups(self, groups: list[dict[str, Any]]) -> None:
        """Raise ``ValueError`` naming any invalid option of the param groups of a state
        dict being loaded (each with the missing options filled from the defaults)."""
        for group in groups:
            self._check_group(group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """As torch's, then fill each group's missing options from the defaults (torch's
        optimizers do the same in theirs), so a checkpoint saved before an option existed
        loads with the option's default."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step over every parameter that has a gradient (`_update` each); ``closure``,
        if given, recomputes the loss with gradients enabled first and its value is returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        position = 0
        for group in self.param_groups:
            for param in group["params"]:
                position += 1
                if param.grad is not None:
                    grad = dense_grad(type(self).__name__, param)
                    self._update(param, grad, self.state[param], group, position)
        return loss

    def _update(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, Any],
        group: Mapping[str, Any],
        position: int,
    ) -> None:
        """Update one parameter in place. ``position`` is its 1-based index over all groups
        (stable when groups are appended), for per-parameter seeds."""
        raise NotImplementedError

    def state_bytes(self) -> int:
        """Bytes of the tensors in ``self.state`` (see `optimizer_state_bytes`)."""
        return optimizer_state_bytes(self)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load ``state_dict`` as ``torch.optim.Optimizer`` does, but keep the saved dtype
        of the state that has its own (8-bit codes, fp32 scales, fp32 low-rank moments and
        projectors); plain AdamW's moments take the
        parameter's dtype, as under torch (`_placed`). Every tensor moves to its
        parameter's device. Like torch, a state tensor already of the right device and
        dtype is used as is, not copied, and the load hooks see the whole dict (pre-hooks,
        which may replace it) and the loaded state (post-hooks)."""
        state_dict = dict(state_dict)  # shallow, as torch's
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hooked = pre_hook(self, state_dict)
            if hooked is not None:
                state_dict = hooked
        saved_state = state_dict["state"]
        self._check_loaded(state_dict)
        # torch's load runs the hooks itself, but it only sees the groups here: the pre-hooks
        # ran above on the whole dict, and the post-hooks run below once the state is in.
        pre_hooks, post_hooks = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = OrderedDict(), OrderedDict()
        try:
            super().load_state_dict({**state_dict, "state": {}})
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = pre_hooks, post_hooks
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        by_id = dict(zip(saved_ids, params))
        for pid, state in saved_state.items():
            if pid not in by_id:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: the state names parameter id {pid}, "
                    f"which no saved param group lists (ids {saved_ids})"
                )
            param = by_id[pid]
            self.state[param] = {key: _placed(key, value, param) for key, value in state.items()}
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _check_loaded(self, state_dict: Mapping[str, Any]) -> None:
        """Refuse, before anything is loaded, a state dict whose groups have invalid
        options (missing ones take the defaults) or whose state for a parameter is not
        the state this optimizer keeps for it (`_state_keys`): a checkpoint of another
        optimizer (``torch.optim.AdamW``'s moments for a weight that AdamW8bit quantizes
        or GaLore projects, GaLore's projector under SubspaceAdamW) would otherwise load
        and fail at the first step with a ``KeyError``, or keep tensors nothing uses.
        Groups that do not match this optimizer's are left to torch's load to refuse."""
        owner = type(self).__name__
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(saved["params"]) != len(group["params"]) for saved, group in zip(saved_groups, self.param_groups)
        ):
            return
        loaded = [{**self.defaults, **{k: v for k, v in saved.items() if k not in ("params", "param_names")}}
                  for saved in saved_groups]  # fmt: skip
        self._check_loaded_groups(loaded)
        where: dict[Any, tuple[int, torch.Tensor, dict[str, Any]]] = {}
        for index, (saved, group, options) in enumerate(zip(saved_groups, self.param_groups, loaded)):
            for pid, param in zip(saved["params"], group["params"]):
                where[pid] = (index, param, options)
        for pid, state in state_dict["state"].items():
            if not state or pid not in where:
                continue  # no state yet; an unknown id is named by the load
            index, param, options = where[pid]
            expected = self._state_keys(param, options)
            if set(state) != expected:
                raise ValueError(
                    f"{owner}.load_state_dict: the state of parameter {pid} (shape {tuple(param.shape)}, param "
                    f"group {index}) holds {sorted(state)}, but {owner} keeps {sorted(expected)} for it under the "
                    f"checkpoint's options: the checkpoint was saved by another optimizer (or with options that "
                    f"change this parameter's state). Resume with the optimizer that saved it, or load only the "
                    f"model's weights and start {owner} fresh (its moments warm up again)"
                )


ADAMW_MOMENTS: tuple[str, ...] = ("exp_avg", "exp_avg_sq")
"""The state keys of the moments that follow the parameter's dtype (plain AdamW's, which
`memopt.optim._adamw.init_adamw_state` creates like the parameter). Low-rank moments
share the names but never the parameter's shape (their rank is below ``min(m, n)``)."""


def _placed(key: str, value: Any, param: torch.Tensor) -> Any:
    """A loaded state value ``key`` for ``param``: tensors on its device; plain AdamW's
    moments (`ADAMW_MOMENTS`, shaped like the parameter) also in its dtype, as torch's load
    casts them, so an fp32 checkpoint resumes on bf16 parameters. Other tensors (8-bit codes,
    fp32 scales, low-rank moments and projectors) keep their saved dtype, whatever their
    shape: the one fp32 scale per moment of a 1-element parameter is shaped like it. A 0-dim ``step`` (torch's optimizers save the count as a tensor) becomes
    the Python int memopt's optimizers count in."""
    if not isinstance(value, torch.Tensor):
        return value
    if key == "step" and value.dim() == 0:
        return int(value.item())  # torch's optimizers save it as a tensor; memopt's count in ints
    if key in ADAMW_MOMENTS and value.is_floating_point() and param.is_floating_point() and value.shape == param.shape:
        return value.to(device=param.device, dtype=param.dtype)
    return value.to(device=param.device)


def dense_grad(owner: str, param: torch.Tensor) -> torch.Tensor:
    """``param.grad``, refusing complex parameters and sparse gradients with a message
    naming the fix."""
    grad = param.grad
    assert grad is not None
    if param.is_complex():
        raise RuntimeError(
            f"{owner} does not support complex parameters (shape {tuple(param.shape)}); "
            "train torch.view_as_real(param) instead, or use torch.optim.AdamW for it"
        )
    if grad.is_sparse:
        raise RuntimeError(
            f"{owner} does not support sparse gradients (parameter of shape {tuple(param.shape)}); "
            "use a dense embedding (sparse=False) or torch.optim.SparseAdam for it"
        )
    return grad
