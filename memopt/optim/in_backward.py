"""The runtime of ``optimizer_in_backward``: each parameter updated inside backward,
right after its gradient is complete, by the optimizer's own per-parameter math.

The ``optimizer_in_backward`` pass (`memopt.passes.optimizer_in_backward`) calls
``memopt::apply_update(grad, param)`` in the backward graph; the op lands in `update`:

1. ``param``'s optimizer is found in a registry filled by `attach` (by the parameter's
   identity, so one compiled graph serving several modules updates each module's own
   parameters);
2. ``param.grad = grad``; the optimizer's update for that parameter alone runs
   (`memopt.optim._per_param`): its group's hyper-parameters (learning rate, betas,
   weight decay) and the parameter's state (step count, moments) are read now, so LR
   schedulers work and the result is the same as ``opt.step()``'s (bitwise for torch's
   single-tensor implementations, the CPU default, and for memopt's optimizers);
3. ``param.grad`` is set to a marker that holds no memory (`ConsumedGrad`): the gradient
   dies there. Any op on the marker raises `MemoptOptimizerError` naming the parameter,
   so global-norm clipping, ``GradScaler.unscale_``/inf checks, or a gradient arriving
   from outside the compiled region (autograd accumulating into ``.grad``) fail loudly
   instead of being silently ignored.

`attach` wraps the optimizer's ``step`` (an instance attribute, so LR schedulers'
wrappers compose with it in either order): a step skips the parameters updated in
backward since the previous step (it clears their markers and runs the optimizer on the
others: parameters outside the compiled regions still update there); ``step(closure)``
runs the closure (whose backward updates the compiled parameters) and then that step.
``zero_grad``
needs no change (it drops the markers). A parameter updated twice before a step
(backward run twice: gradient accumulation, or a region called twice per step) raises.

Ordering guarantee: the update of a parameter runs after every read of it in the
backward graph (the pass places it so), and at most once per ``opt.step()``.
"""

from __future__ import annotations

import sys
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from memopt.errors import MemoptOptimizerError
from memopt.optim._checks import is_sharded_optimizer
from memopt.optim._per_param import PerParamUpdate, per_param_update

__all__ = ["InBackward", "ConsumedGrad", "attach", "check_fusable", "owner_of", "update"]

_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""Parameter -> the `InBackward` of the optimizer that updates it in backward."""

_ATTR = "_memopt_in_backward"


def check_fusable(optimizer: Any) -> None:
    """Raise `MemoptOptimizerError` (or ``TypeError``) if ``optimizer`` cannot update
    its parameters one at a time inside backward."""
    from memopt.optim.mezo import MeZO
    from memopt.optim.offload import OffloadedState

    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"memopt option optimizer_in_backward={type(optimizer).__name__} must be a torch.optim.Optimizer "
            "over the compiled model's parameters (e.g. torch.optim.AdamW(model.parameters())), or None."
        )
    if isinstance(optimizer, MeZO):
        raise MemoptOptimizerError(
            "optimizer_in_backward=MeZO: MeZO is zero-order (two forward passes, no backward), so there is "
            "no gradient to update from inside backward. Drop optimizer_in_backward: MeZO already keeps no "
            "gradients."
        )
    if isinstance(optimizer, OffloadedState):
        raise MemoptOptimizerError(
            "optimizer_in_backward=OffloadedState(...): its state is streamed from the store for a whole "
            "step, not one parameter at a time inside backward. Pass the optimizer it wraps (its state then "
            "stays in memory), or keep OffloadedState and drop optimizer_in_backward."
        )
    if is_sharded_optimizer(optimizer):
        raise MemoptOptimizerError(
            "optimizer_in_backward=ShardedOptimizer: the update inside backward does not support sharded "
            "models (memopt.distributed.shard) yet; its tensors are this rank's rows, not the parameters the "
            "compiled backward returns gradients for, so nothing would be updated. Drop optimizer_in_backward "
            "and call optimizer.step() after backward."
        )
    if isinstance(optimizer, torch.optim.LBFGS):
        raise MemoptOptimizerError(
            "optimizer_in_backward=LBFGS: L-BFGS couples all parameters (and re-evaluates the loss), so no "
            "parameter can be updated alone inside backward. Drop optimizer_in_backward for it."
        )


class ConsumedGrad(torch.Tensor):
    """``param.grad`` after the in-backward update: the parameter's shape and dtype, no
    memory. Every op on it raises `MemoptOptimizerError` naming the op and the fix."""

    @staticmethod
    def __new__(cls, param: torch.Tensor, name: str) -> ConsumedGrad:
        marker = torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, param.shape, dtype=param.dtype, device=param.device, requires_grad=False
        )
        marker.param_name = name
        return marker

    def __init__(self, param: torch.Tensor, name: str) -> None:
        pass

    def __repr__(self) -> str:  # type: ignore[override]
        return f"ConsumedGrad({self.param_name}, shape={tuple(self.shape)})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        names = sorted({a.param_name for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, cls)})
        raise MemoptOptimizerError(
            f"{func} read the gradient of parameter(s) {', '.join(names)}, which optimizer_in_backward already "
            "applied and freed inside backward (.grad holds only this marker until opt.step()). Code that needs "
            "every gradient after backward cannot run with it: global-norm clipping (clip_grad_norm_; HF "
            "Trainer: max_grad_norm=0), GradScaler (unscale_, inf checks: use bf16 instead of fp16), or a "
            "gradient reaching the parameter from outside the compiled region (a graph break inside the "
            "model, a weight also used eagerly). Fix: turn that off, or drop optimizer_in_backward."
        )


class InBackward:
    """The in-backward state of one optimizer (made by `attach`)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._update: PerParamUpdate = per_param_update(optimizer)
        self._pending: WeakIdKeyDictionary = WeakIdKeyDictionary()  # param -> its name; updated since step
        self._where: dict[int, tuple[int, int]] = {}  # id(param) -> (group index, 1-based position)
        self._regions: WeakIdKeyDictionary = WeakIdKeyDictionary()  # param -> frame of the region updating it
        self.previous_step: Callable[..., Any] = optimizer.step
        self.updates = 0
        """In-backward updates run so far (all parameters)."""
        self.deferred = False
        """True while the ``opt.step(closure)`` during whose closure the optimizer was
        attached still runs (`defer_to_running_step`): gradients are handed to that step."""

    def defer_to_running_step(self) -> None:
        """The optimizer is being attached inside its own ``step(closure)``: the closure's
        forward made the first call of the compiled model (PyTorch Lightning's loop). That
        step was entered before `_install_step`, so it is the optimizer's own and will
        update every parameter from ``.grad`` once the closure returns: until it ends,
        `update` accumulates each gradient into ``.grad`` as autograd would, instead of
        applying it. A step post-hook (torch runs them after the step, hooks added during
        it included) ends the deferral."""
        self.deferred = True

        def resume(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.deferred = False
            handle.remove()

        handle = self.optimizer.register_step_post_hook(resume)

    def params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def check_claim(self, param: torch.Tensor, name: str, frame: str) -> None:
        """Raise if a Dynamo frame other than ``frame`` already updates ``param`` in its
        backward (the parameter's gradient would come from two backwards: a graph break
        or a weight shared across regions)."""
        other = self._regions.get(param)
        if other is not None and other != frame:
            raise MemoptOptimizerError(
                f"optimizer_in_backward: parameter {name} (shape {tuple(param.shape)}) receives gradients in two "
                f"compiled regions (frames {other} and {frame}: a graph break inside the model, or a weight "
                "shared across compiled regions), so no one backward holds its whole gradient. Fix: remove the "
                "graph break (torch.compile(..., fullgraph=True) shows where it is), untie the weight, or drop "
                "optimizer_in_backward."
            )

    def claim(self, param: torch.Tensor, frame: str) -> None:
        """Record that the compiled code of Dynamo frame ``frame`` updates ``param`` in
        its backward (after `check_claim`, once the update is in its graph)."""
        self._regions[param] = frame

    def _locate(self, param: torch.Tensor) -> tuple[dict[str, Any], int]:
        groups = self.optimizer.param_groups
        where = self._where.get(id(param))
        if where is not None:
            gi, position = where
            offset = position - 1 - sum(len(g["params"]) for g in groups[:gi]) if gi < len(groups) else -1
            if 0 <= offset < len(groups[gi]["params"]) and groups[gi]["params"][offset] is param:
                return groups[gi], position
        self._where = {}
        position = 0
        for gi, group in enumerate(groups):
            for p in group["params"]:
                position += 1
                self._where[id(p)] = (gi, position)
        gi, position = self._where[id(param)]
        return groups[gi], position

    def update(self, grad: torch.Tensor, param: torch.Tensor, name: str) -> None:
        """Apply ``param``'s update from ``grad`` now (module docstring, steps 2-3)."""
        current = param.grad
        if param in self._pending:
            raise MemoptOptimizerError(
                f"optimizer_in_backward: parameter {name} (shape {tuple(param.shape)}) was about to be updated "
                "a second time before opt.step(): its backward ran twice in one step (gradient accumulation "
                "over micro-batches, the compiled region called twice per step, or its gradient coming from "
                "two compiled regions), and each update would use a partial gradient. Fix: call opt.step() "
                "after every backward (it is a no-op for parameters updated in backward), or drop "
                "optimizer_in_backward to accumulate gradients."
            )
        if current is not None and not isinstance(current, ConsumedGrad):
            raise MemoptOptimizerError(
                f"optimizer_in_backward: parameter {name} (shape {tuple(param.shape)}) already has a .grad when "
                "its compiled backward completed its gradient: part of its gradient comes from outside the "
                "compiled region (a graph break inside the model, a weight also used eagerly), or an earlier "
                ".grad was never cleared. Fix: call opt.zero_grad() before training with optimizer_in_backward, "
                "and compile the whole model in one region (fullgraph=True shows graph breaks)."
            )
        if self.deferred:
            if current is None:
                param.grad = grad
            else:
                current.add_(grad)
            return
        group, position = self._locate(param)
        param.grad = grad
        try:
            with torch.no_grad():
                self._update(self.optimizer, group, param, position)
        finally:
            param.grad = ConsumedGrad(param, name)
        self._pending[param] = name
        self.updates += 1

    def step(self, *args: Any, **kwargs: Any) -> Any:
        """``opt.step()``: the optimizer's step over the parameters not updated in
        backward since the last step.

        ``opt.step(closure)`` (PyTorch Lightning's automatic optimization, loops written
        for LBFGS-style optimizers) with no update pending: the closure runs first, with
        gradients enabled (its backward updates the compiled parameters), then the step
        over the others, and the closure's loss is returned; every optimizer
        `check_fusable` accepts evaluates a closure once, before its update, so this is
        its ``step(closure)``. With updates pending (backward ran before the call) it
        raises: the closure's backward would update those parameters a second time."""
        closure = args[0] if args else kwargs.get("closure")
        if closure is not None:
            if len(self._pending):
                raise MemoptOptimizerError(
                    "opt.step(closure) with optimizer_in_backward after a backward: the closure would recompute "
                    "the loss and gradients, but the parameters updated in backward already took this step's "
                    "update. Fix: run the backward inside the closure only, or call opt.step() without a "
                    "closure, or drop optimizer_in_backward."
                )
            with torch.enable_grad():
                loss = closure()
            self.step(*args[1:], **{key: value for key, value in kwargs.items() if key != "closure"})
            return loss
        if not len(self._pending):
            return self.previous_step(*args, **kwargs)
        for param in list(self._pending.keys()):
            if isinstance(param.grad, ConsumedGrad):
                param.grad = None
        self._pending = WeakIdKeyDictionary()
        return self.previous_step(*args, **kwargs)


def _install_step(optimizer: torch.optim.Optimizer) -> None:
    """Set ``optimizer.step`` to `InBackward.step`, as a bound method (LR schedulers
    re-bind ``opt.step.__func__``); if an LR scheduler already wrapped the step, ours
    carries its marker (it calls the scheduler's wrapper, which still records the call)."""

    def step(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        return getattr(opt, _ATTR).step(*args, **kwargs)

    if getattr(optimizer.step, "_wrapped_by_lr_sched", False):
        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = types.MethodType(step, optimizer)  # type: ignore[method-assign]


def attach(optimizer: torch.optim.Optimizer) -> InBackward:
    """``optimizer``'s `InBackward`, made on the first call (idempotent): its parameters
    are registered for `update`, and its ``step`` is wrapped (module docstring). Raises
    as `check_fusable` does, and if a parameter already belongs to another attached
    optimizer."""
    existing = getattr(optimizer, _ATTR, None)
    if isinstance(existing, InBackward):
        _register(existing, take_over=True)
        return existing
    check_fusable(optimizer)
    state = InBackward(optimizer)
    _register(state, take_over=True)
    _STATES.add(state)
    setattr(optimizer, _ATTR, state)
    _install_step(optimizer)
    if _inside_step(optimizer):
        state.defer_to_running_step()
    return state


def _inside_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether this thread is inside ``optimizer``'s own ``step`` (a frame named ``step``
    whose ``self`` is it): the model is being compiled by the first forward of a closure
    passed to ``opt.step(closure)``. Read once, when the optimizer is attached."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "step" and frame.f_locals.get("self") is optimizer:
            return True
        frame = frame.f_back
    return False


def _register(state: InBackward, take_over: bool) -> None:
    """Record ``state`` as the owner of its optimizer's parameters. ``take_over`` (a
    compile with this optimizer as ``optimizer_in_backward``): a parameter another
    optimizer owned moves to this one, as when a training loop replaces its optimizer
    (resuming from a checkpoint on the same model) and compiles again; it raises only
    while the other optimizer holds an update of the parameter not yet stepped (both
    in use in one step). Otherwise (new param groups found at run time) a parameter
    keeps its owner."""
    for param in state.params():
        owner = _OWNERS.get(param)
        if owner is not None and owner is not state:
            if not take_over:
                continue
            if param in owner._pending:
                raise MemoptOptimizerError(
                    f"optimizer_in_backward: a parameter of shape {tuple(param.shape)} belongs to two optimizers "
                    f"({type(owner.optimizer).__name__} and {type(state.optimizer).__name__}) given as "
                    "optimizer_in_backward, and the first has updated it in backward since its last step(); "
                    "each parameter can be updated in backward by one optimizer. Fix: put each parameter in one "
                    "optimizer, or, replacing the optimizer, call the old one's step() before "
                    "compiling with the new one."
                )
        _OWNERS[param] = state


def owner_of(param: torch.Tensor) -> InBackward | None:
    """The `InBackward` whose optimizer holds ``param`` (None if none)."""
    owner = _OWNERS.get(param)
    if owner is None:
        for state in _live_states():
            _register(state, take_over=False)  # groups added since attach
        owner = _OWNERS.get(param)
    return owner


_STATES: weakref.WeakSet[InBackward] = weakref.WeakSet()


def _live_states() -> list[InBackward]:
    return list(_STATES)


def update(grad: torch.Tensor, param: torch.Tensor, name: str) -> None:
    """The runtime of ``memopt::apply_update``: update ``param`` from ``grad`` by its
    optimizer (raises `MemoptOptimizerError` if no attached optimizer holds it)."""
    owner = owner_of(param)
    if owner is None:
        raise MemoptOptimizerError(
            f"optimizer_in_backward: parameter {name} (shape {tuple(param.shape)}) reached an in-backward update "
            "but is in no optimizer given as optimizer_in_backward (a compiled graph shared by modules whose "
            "parameters are not all in that optimizer). Fix: put every trained parameter of the compiled "
            "modules in the optimizer, or drop optimizer_in_backward."
        )
    owner.update(grad, param, name)
