"""`ShardedOptimizer`: any element-wise optimizer, stepping on this rank's part of each
parameter of a sharded model (ZeRO-1/2/3 optimizer state).

    optimizer = ShardedOptimizer(lambda params: torch.optim.AdamW(params, lr=1e-3), model)
    optimizer = ShardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model)

The inner optimizer holds plain tensors that alias the rank's rows of each parameter
(`ShardedParam.optimizer_tensor`), so its state exists only for those rows (stages 1-3).
``step()`` points their gradients at the rank's rows of the reduced gradients, steps, and
at stages 1 and 2 all-gathers the updated rows into every rank's replica, several
parameters per collective (``gather_bucket_bytes``). Stage 0 steps
every rank on the whole parameter (data parallel).

Which optimizers qualify: an update of one element must depend only on that element's
gradient history, so that stepping on row pieces equals stepping on the whole. torch's
SGD, Adam, AdamW, Adamax, NAdam, RAdam, RMSprop, Adagrad, Adadelta, ASGD and Rprop do;
memopt's AdamW8bit does per quantization block: each rank's rows keep the whole
parameter's blocks, and a block that straddles two ranks' rows gets its scale from one
small all-reduce (MAX) per step, so the update is the unsharded one bit for bit
(`memopt.optim._flat_piece`). GaLoreAdamW
and SubspaceAdamW project whole matrices, MeZO perturbs the whole model from each rank's
own loss, torch's Adafactor factors rows and columns, LBFGS uses global line searches:
refused at stages 1-3 (low-rank optimizers are fine at stage 0, or with ``lowrank=False``
groups). Another optimizer: pass ``elementwise=True`` if it qualifies. An
`memopt.optim.OffloadedState` is judged by the optimizer it wraps (its update is that
optimizer's, one parameter at a time): ``ShardedOptimizer(lambda ps:
OffloadedState(torch.optim.AdamW(ps), "disk"), model)`` keeps this rank's rows' state on
disk between steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn

from memopt.distributed.api import shard_state
from memopt.distributed.checks import ShardingError
from memopt.distributed.param import GATHER_BUCKET_BYTES, ShardedParam, gather_replicas

if TYPE_CHECKING:
    from memopt.optim._flat_piece import FlatPiece

__all__ = ["ShardedOptimizer", "unwrapped", "resident"]

_ELEMENTWISE = tuple(
    getattr(torch.optim, name)
    for name in ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "ASGD", "Rprop")
    if hasattr(torch.optim, name)
)

OptimizerOrFactory = torch.optim.Optimizer | Callable[[list[torch.Tensor]], torch.optim.Optimizer]


class ShardedOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer`` (built on ``model.parameters()``, before any step) or build it
    with ``factory(local_tensors)`` (the rank's parts, in ``model.parameters()`` order),
    for a model `memopt.distributed.shard` returned. ``param_groups`` and ``state`` are
    the inner optimizer's (LR schedulers work on this object); ``state_dict()`` is the
    rank's local one (`memopt.distributed.checkpoint` saves a global one)."""

    def __init__(
        self,
        optimizer: OptimizerOrFactory,
        model: nn.Module,
        *,
        elementwise: bool = False,
        gather_bucket_bytes: int = GATHER_BUCKET_BYTES,
    ) -> None:
        if gather_bucket_bytes < 0:
            raise ValueError(
                f"ShardedOptimizer: gather_bucket_bytes={gather_bucket_bytes} is negative; give the bucket cap in "
                "bytes (0 gathers each parameter on its own)"
            )
        self.gather_bucket_bytes = gather_bucket_bytes
        """Stages 1 and 2: cap of one all-gather of updated rows after the step."""
        self._shard = shard_state(model)
        self.model = model
        self._locals: dict[int, tuple[ShardedParam, torch.Tensor]] = {}
        """id(local tensor) -> (its parameter's handle, the local tensor)."""
        inner = self._adopt(optimizer)
        _check_optimizer(unwrapped(inner), self._shard.stage, self._full_shapes(), elementwise)
        _adapt_blockwise(unwrapped(inner), self)
        self.inner = inner
        self._building = True
        super().__init__([t for _, t in self._locals.values()], dict(inner.defaults))
        self._building = False
        self.param_groups = inner.param_groups
        self.state = inner.state

    # ---- building ----------------------------------------------------------------------

    def _handle_of(self) -> dict[int, ShardedParam]:
        return {id(h.param): h for h in self._shard.params.values()}

    def _local_of(self, handle: ShardedParam) -> torch.Tensor:
        local = handle.optimizer_tensor(handle.param)
        self._locals[id(local)] = (handle, local)
        return local

    def _adopt(self, optimizer: OptimizerOrFactory) -> torch.optim.Optimizer:
        handles = self._handle_of()
        if isinstance(optimizer, torch.optim.Optimizer):
            if optimizer.state:
                raise ShardingError(
                    f"ShardedOptimizer: the {type(optimizer).__name__} already has state; wrap it "
                    "before its first step"
                )
            for group in optimizer.param_groups:
                group["params"] = [self._local_of(_handle(handles, p)) for p in group["params"]]
            return optimizer
        if not callable(optimizer):
            raise TypeError(f"ShardedOptimizer: expected an optimizer or a factory, got {type(optimizer).__name__}")
        locals_ = [self._local_of(_handle(handles, p)) for p in self.model.parameters()]
        built = optimizer(locals_)
        if not isinstance(built, torch.optim.Optimizer):
            raise TypeError(f"ShardedOptimizer: the factory returned {type(built).__name__}, not a torch optimizer")
        return built

    def _full_shapes(self) -> dict[int, tuple[int, ...]]:
        return {key: handle.shape for key, (handle, _) in self._locals.items()}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_building", False):
            super().add_param_group(param_group)
            return
        raise ShardingError(
            "ShardedOptimizer.add_param_group: build the optimizer with all its groups before wrapping it"
        )

    # ---- stepping ----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Step the inner optimizer on this rank's parts, then (stages 1 and 2) all-gather
        the updated rows into every rank's replica."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pairs = list(self._locals.values())
        for handle, local in pairs:
            _check_ready(handle, local)
            local.grad = handle.optimizer_grad(handle.param)
        try:
            self.inner.step()
        finally:
            for _, local in pairs:
                local.grad = None
        gather_replicas((handle for handle, _ in pairs), self.gather_bucket_bytes)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (or drop) the gradients of the parameters this optimizer steps, and the
        gradients accumulated for them without sync."""
        for handle, _ in self._locals.values():
            param = handle.param
            if param.grad is not None:
                if set_to_none:
                    param.grad = None
                else:
                    param.grad.zero_()
            handle.discard_accumulated()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

    def parameter_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """The model's registered parameter (a DTensor) whose rows ``tensor``, one of
        this optimizer's tensors, is: what the compiled graphs take as the parameter
        (memopt's plan counts the state there, `memopt.analysis.optimizer_memory`)."""
        found = self._locals.get(id(tensor))
        if found is None or found[1] is not tensor:
            raise ShardingError(
                f"ShardedOptimizer.parameter_of: a tensor of shape {tuple(tensor.shape)} is not one this "
                "optimizer steps; pass one of its param_groups' tensors"
            )
        return found[0].param

    def local_tensors(self) -> list[tuple[ShardedParam, torch.Tensor]]:
        """(handle, the tensor the inner optimizer steps) for each parameter it holds."""
        return list(self._locals.values())


def unwrapped(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer whose math steps: the one an `OffloadedState` wraps (its state
    streamed from a store, its update that optimizer's own), else ``optimizer``."""
    from memopt.optim import OffloadedState

    return optimizer.optimizer if isinstance(optimizer, OffloadedState) else optimizer


def resident(optimizer: ShardedOptimizer) -> contextlib.AbstractContextManager[None]:
    """A block in which the inner optimizer's ``state`` holds all of its state: an
    `OffloadedState` reads its store back for the block (`OffloadedState.resident`);
    any other optimizer holds it already."""
    from memopt.optim import OffloadedState

    inner = optimizer.inner
    return inner.resident() if isinstance(inner, OffloadedState) else contextlib.nullcontext()


def _handle(handles: dict[int, ShardedParam], param: torch.Tensor) -> ShardedParam:
    handle = handles.get(id(param))
    if handle is None:
        raise ShardingError(
            f"ShardedOptimizer: a parameter of shape {tuple(param.shape)} is not a parameter of the "
            "sharded model; build the optimizer on model.parameters() after memopt.distributed.shard"
        )
    return handle


def _check_ready(handle: ShardedParam, local: torch.Tensor) -> None:
    if handle.has_unreduced():
        raise ShardingError(
            f"ShardedOptimizer.step: parameter {handle.fqn!r} has gradients accumulated with "
            "set_requires_gradient_sync(False) that no backward reduced; run the last micro-step's "
            "backward after model.set_requires_gradient_sync(True)"
        )
    current = handle.optimizer_tensor(handle.param)
    if current.data_ptr() != local.data_ptr() or current.shape != local.shape:
        raise ShardingError(
            f"ShardedOptimizer.step: parameter {handle.fqn!r} no longer lives where the optimizer "
            "was built (was the model moved or its parameters replaced?); build the optimizer again"
        )


def _check_optimizer(
    optimizer: torch.optim.Optimizer, stage: int, shapes: dict[int, tuple[int, ...]], elementwise: bool
) -> None:
    """Refuse optimizers whose update of one element reads others (see the module docstring)."""
    from memopt.optim import AdamW8bit, MeZO
    from memopt.optim._lowrank import LowRankAdamW

    name = type(optimizer).__name__
    if isinstance(optimizer, MeZO):
        raise ShardingError(
            "ShardedOptimizer: MeZO estimates the gradient from each process's own forward losses, "
            "so data-parallel ranks would diverge; train with a gradient optimizer (AdamW, AdamW8bit)"
        )
    if stage == 0 or elementwise or type(optimizer) in (*_ELEMENTWISE, AdamW8bit):
        return  # exact types: a subclass may change the update
    if isinstance(optimizer, LowRankAdamW):
        for group in optimizer.param_groups:
            for local in group["params"]:
                shape = shapes[id(local)]
                if bool(group["lowrank"]) and len(shape) == 2 and group["rank"] < min(shape):
                    raise ShardingError(
                        f"ShardedOptimizer: {name} projects whole {shape[0]}x{shape[1]} matrices, which "
                        f"stage {stage} splits over the ranks; use stage=0 (every rank keeps whole "
                        "matrices; the low-rank state is already small), or AdamW8bit / torch AdamW, "
                        "which update each rank's rows on their own"
                    )
        return
    raise ShardingError(
        f"ShardedOptimizer: memopt does not know whether {name} updates each element from that "
        f"element's gradient alone, which stage {stage} needs (each rank steps its own rows); "
        "pass elementwise=True if it does, or use stage=0"
    )


def _adapt_blockwise(optimizer: torch.optim.Optimizer, sharded: ShardedOptimizer) -> None:
    """AdamW8bit decides 8-bit moments by a parameter's size: make it decide by the whole
    parameter's, not the rank's rows; and declare each rank's rows a piece of the whole
    (`AdamW8bit.set_piece`), so that it quantizes in the whole parameter's blocks and
    steps as the unsharded optimizer does, where a block straddles two ranks' rows too."""
    from memopt.optim import AdamW8bit

    if not isinstance(optimizer, AdamW8bit):
        return
    full_numel = {key: _numel(handle.shape) for key, (handle, _) in sharded._locals.items()}
    optimizer.uses_8bit = lambda param, group: full_numel[id(param)] >= group["min_8bit_size"]  # type: ignore[method-assign]
    for group in optimizer.param_groups:
        for local in group["params"]:
            handle, _ = sharded._locals[id(local)]
            if handle.stage > 0 and optimizer.uses_8bit(local, group):
                optimizer.set_piece(local, _piece(handle))


def _piece(handle: ShardedParam) -> FlatPiece:
    """Where this rank's rows of ``handle``'s parameter lie in the whole, flattened."""
    from memopt.optim._flat_piece import FlatPiece

    lay, row = handle.layout, _numel(handle.shape[1:])
    starts = (min(rank * lay.chunk, lay.rows) * row for rank in range(1, lay.world))
    group = handle.state.mesh.get_group()

    def reduce_max(values: torch.Tensor) -> None:
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)

    return FlatPiece(offset=lay.start * row, total=_numel(handle.shape), cuts=tuple(starts), reduce_max=reduce_max)


def _numel(shape: Iterable[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total
