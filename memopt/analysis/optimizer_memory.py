"""What the training step's optimizer holds, as the memory timeline counts it.

`optimizer_memory` reads an optimizer (``optimizer_in_backward`` or the read-only
``optimizer`` option) once per compile into an `OptimizerMemory`: per parameter (by
the identity of the real tensor, as `memopt.graph.step.InputInfo.identity`), the bytes
of its state, measured when the state exists and predicted before the first step
(`memopt.optim.state_size`), and a model of the update's temporaries. A frozen
parameter (``requires_grad=False``) with no state holds none: it never gets a gradient,
and torch's optimizers and memopt's step only parameters that have one (freezing a base
model and passing all of ``model.parameters()`` to the optimizer is common), nor does
its update make temporaries; unfreezing it recompiles (Dynamo guards on
``requires_grad``), and the plan then predicts its state. One frozen after it trained
keeps its state (counted) but is not updated: no temporaries for it.

`memopt.analysis.memory.build_timeline` uses it so the plan sees the whole step:

* each parameter's state is live throughout the step (category ``optimizer_state``);
* with the update in backward, a parameter's gradient dies at its update (before the
  ``optimizer_in_backward`` pass has run: where the pass will put the update), and
  each update's temporaries are live while it runs;
* with a separate ``opt.step()``, one more point after backward: every gradient,
  the state, and the step's temporaries at once.

A `memopt.optim.OffloadedState` keeps its state in an offload store (a file or pinned
host memory) between steps, so none of it is on the device through forward and
backward: its parameters' state counts 0, and its step's temporaries are the state it
streams (the updated parameter's and ``prefetch`` more read ahead, each at most the
largest parameter's, plus ``max_pending`` tensors waiting to be written, each at most
the largest state tensor) and the wrapped optimizer's update of one piece.

The temporaries are a model, not a measurement: torch's single-tensor Adam/AdamW
makes two tensors of the parameter's size (``exp_avg_sq.sqrt() / bias_correction``),
its foreach path one list of the size of the whole group (the ``sqrt`` of every
second moment), fused none; SGD one parameter-sized tensor with weight decay, else
none; any other optimizer is taken as the single-tensor Adam, and so are memopt's, but
for `AdamW8bit`'s PyTorch reference step, which holds 32 bytes per element of a
quantized parameter (`ADAM8BIT_REFERENCE_BYTES_PER_ELEMENT`).
Updates memopt runs itself go over pieces of the parameter (`memopt.codegen._chunks`):
every in-backward update but a fused one, and memopt's optimizers' own ``step``; their
temporaries are of one piece (``piece_bytes``), not of the parameter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from memopt.codegen._chunks import update_piece_bytes

__all__ = ["OptimizerMemory", "optimizer_memory", "state_identity"]


def state_identity(identity: int) -> int:
    """The `LiveInterval.identity` of the state of the parameter whose identity is
    ``identity``: distinct from the parameter's own (so regions that share the
    parameter count its state once, and never confuse the two)."""
    return ~identity


@dataclass(frozen=True)
class OptimizerMemory:
    """One optimizer's memory, per parameter (module docstring). Pure data."""

    name: str
    """The optimizer's class name."""
    state_bytes: Mapping[int, int] = field(default_factory=dict)
    """id(parameter) -> bytes of its state tensors (0-dim step counts excluded)."""
    measured: bool = False
    """True when every parameter's state existed when read (else some are predicted)."""
    in_backward: bool = False
    """True when each update runs inside backward (``optimizer_in_backward``)."""
    update_factor: int = 2
    """Temporaries of one parameter's update, in units of its size."""
    step_temporaries: int = 0
    """Bytes of temporaries alive at once during a separate ``opt.step()``."""
    piece_bytes: int | None = None
    """Bytes of one piece of an in-backward update (`memopt.codegen._chunks`): its
    temporaries are ``update_factor`` of these at most. None: of the whole parameter."""
    sharded: bool = False
    """A `memopt.distributed.ShardedOptimizer` (``optimizer_in_backward`` refuses it)."""
    rows_split: bool = False
    """A `ShardedOptimizer` at stages 1-3, each rank stepping its own rows of each
    parameter (low-rank optimizers, which project whole matrices, refuse it)."""

    def update_temporaries(self, param_bytes: int) -> int:
        """Bytes of temporaries while one in-backward update of a parameter of
        ``param_bytes`` runs."""
        if self.piece_bytes is not None:
            param_bytes = min(param_bytes, self.piece_bytes)
        return self.update_factor * param_bytes

    def holds(self, identity: int | None) -> bool:
        """Whether the parameter with this identity is in the optimizer."""
        return identity is not None and identity in self.state_bytes

    def stepped_separately(self) -> OptimizerMemory:
        """The same optimizer with its update outside backward (the region's
        ``optimizer_in_backward`` pass did not run)."""
        return dataclasses.replace(self, in_backward=False)


def optimizer_memory(optimizer: torch.optim.Optimizer, in_backward: bool) -> OptimizerMemory:
    """Read ``optimizer``'s memory now (module docstring). ``in_backward``: the
    update runs inside backward.

    A `memopt.distributed.ShardedOptimizer` steps tensors that are this rank's rows of
    the model's parameters: its state is counted on the parameters the compiled graphs
    take (the registered DTensors, `ShardedOptimizer.parameter_of`), in the bytes of
    this rank's rows, with its inner optimizer's state sizes and temporaries (an inner
    `OffloadedState`'s as it alone: no state on the device, its step streams it)."""
    from memopt.optim._checks import is_sharded_optimizer
    from memopt.optim.offload import OffloadedState
    from memopt.optim.state_size import state_bytes_of

    if isinstance(optimizer, OffloadedState):
        return _offloaded_memory(optimizer, in_backward)
    sharded = is_sharded_optimizer(optimizer)
    stepping: torch.optim.Optimizer = optimizer.inner if sharded else optimizer  # type: ignore[attr-defined]
    if isinstance(stepping, OffloadedState):  # a ShardedOptimizer's rows' state in a store
        memory = _offloaded_memory(stepping, in_backward)
        keyed = {id(optimizer.parameter_of(p)): 0 for g in stepping.param_groups for p in g["params"]}  # type: ignore[attr-defined]
        return dataclasses.replace(memory, state_bytes=keyed, sharded=True)
    state: dict[int, int] = {}
    measured = True
    step_temporaries = 0
    factors = []
    for group in optimizer.param_groups:
        params = list(group["params"])
        stepped = []  # what a step updates: frozen parameters never have a gradient
        for p in params:
            registered = optimizer.parameter_of(p) if sharded else p  # type: ignore[attr-defined]
            if registered.requires_grad or stepping.state.get(p):
                state[id(registered)] = state_bytes_of(stepping, p, group)
                measured = measured and bool(stepping.state.get(p))
            else:
                state[id(registered)] = 0  # frozen: never a gradient, so never state (module docstring)
            if registered.requires_grad:  # frozen after training: its state stays, its update does not run
                stepped.append(p)
        group_factor, group_temps = _update_temporaries(stepping, group, stepped)
        factors.append(group_factor)
        step_temporaries = max(step_temporaries, group_temps)
    factor = max(factors, default=2)  # groups differ only by options: the largest, to be safe
    piece = update_piece_bytes(p for g in optimizer.param_groups for p in g["params"])
    rows_split = sharded and optimizer._shard.stage > 0  # type: ignore[attr-defined]
    return OptimizerMemory(
        type(stepping).__name__, state, measured, in_backward, factor, step_temporaries, piece, sharded, rows_split
    )


def _offloaded_memory(optimizer: Any, in_backward: bool) -> OptimizerMemory:
    """An `OffloadedState`'s memory (module docstring): no state between steps; during
    its step, the streamed state and one piece's update temporaries."""
    inner: torch.optim.Optimizer = optimizer.optimizer
    params = [p for g in optimizer.param_groups for p in g["params"]]
    streamed = [optimizer.streamed_bytes(p) for p in params]
    largest_state = max(streamed, default=0)
    # A state tensor is at most its parameter's size for every optimizer memopt predicts
    # (moments, codes, projectors), and at most the parameter's whole state.
    largest_tensor = min(largest_state, max((p.numel() * p.element_size() for p in params), default=0))
    piece = update_piece_bytes(params)
    update = max((_update_temporaries(inner, g, list(g["params"]))[0] for g in inner.param_groups), default=2)
    update_bytes = update * min(piece, max((p.numel() * p.element_size() for p in params), default=0))
    step_temporaries = ((1 + optimizer.prefetch) * largest_state + optimizer.store.max_pending * largest_tensor
                        + update_bytes)
    state = {id(p): 0 for p in params}
    name = f"OffloadedState({type(inner).__name__})"
    return OptimizerMemory(name, state, True, in_backward, update, step_temporaries, piece)


def _update_temporaries(optimizer: torch.optim.Optimizer, group: Mapping[str, Any], params: list[torch.Tensor]) -> tuple[int, int]:
    """(temporaries of one parameter's own update, in parameter sizes; bytes of a
    separate step's temporaries at once over ``group``)."""
    from memopt.optim._per_param import uses_memopt_step

    sizes = [p.numel() * p.element_size() for p in params]
    largest = max(sizes, default=0)
    if uses_memopt_step(optimizer):  # memopt's own step: each parameter in pieces
        factor = _memopt_update_factor(optimizer, group, params)
        return factor, factor * min(largest, update_piece_bytes(params))
    if isinstance(optimizer, torch.optim.SGD):
        factor = 1 if group.get("weight_decay", 0) else 0
        return factor, factor * largest
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        if group.get("fused"):
            return 0, 0
        foreach = group.get("foreach")
        if foreach is None:
            foreach = bool(params) and all(p.device.type != "cpu" for p in params)
        if foreach:
            return 2, sum(sizes)
    return 2, 2 * largest


ADAM8BIT_REFERENCE_BYTES_PER_ELEMENT: int = 32
"""Temporaries of `memopt.codegen.adam8bit`'s PyTorch reference step (CPU, or
``kernel="torch"``) per element of the piece it updates, whatever the parameter's dtype:
fp32 copies of the gradient, both moments and the parameter, the update's intermediates
and the int64 code indices of the requantization (measured: 32.0 bytes per element for
fp32, bf16 and fp16 parameters). The Triton kernel holds one block at a time."""


def _memopt_update_factor(optimizer: torch.optim.Optimizer, group: Mapping[str, Any], params: list[torch.Tensor]) -> int:
    """Temporaries of one update by memopt's own step, in units of the parameter's size
    (of one piece of it). Plain AdamW in pieces makes two (its ``sqrt`` and ``div``); the
    low-rank step's projected gradient and moments' update are smaller than the weight
    (measured under 0.4 of it), so two bounds them too. `AdamW8bit`'s reference step on a
    quantized parameter holds `ADAM8BIT_REFERENCE_BYTES_PER_ELEMENT` per element: 8 for
    fp32 parameters, 16 for bf16 (taken as 2, they left the step's measured peak up to
    20% above the estimate and a ``memory_budget`` unmet)."""
    from memopt.codegen._triton import use_triton
    from memopt.optim.adamw8bit import AdamW8bit

    factor = 2
    if isinstance(optimizer, AdamW8bit):
        for p in params:
            if AdamW8bit.uses_8bit(p, group) and not use_triton(group["kernel"], p):
                factor = max(factor, ADAM8BIT_REFERENCE_BYTES_PER_ELEMENT // p.element_size())
    return factor
