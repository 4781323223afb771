"""Model-state memory per rank: what a sharded model and its optimizer hold, measured
from their tensors, and what ZeRO's formula says they should hold.

For ``Psi`` parameter elements over ``N`` ranks, with ``p``, ``g`` and ``s`` bytes per
element of parameter, gradient and optimizer state (fp32 AdamW: 4, 4, 8; AdamW8bit's
moments: ``s = 2 + 8 / block_size``), ZeRO (Rajbhandari et al., 2020) keeps per rank:

    stage 0   Psi * (p + g + s)               everything replicated (data parallel)
    stage 1   Psi * (p + g) + Psi * s / N     optimizer state sharded
    stage 2   Psi * p + Psi * (g + s) / N     and gradients
    stage 3   Psi * (p + g + s) / N           and parameters

A ``param_dtype`` policy does not change these: the low-precision copies are gathered per
step (in the step's peak, like activations), the sharded parameters stay in their dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from memopt.distributed.api import shard_state

__all__ = ["ModelStateBytes", "model_state_bytes", "zero_model_state_bytes"]


@dataclass(frozen=True)
class ModelStateBytes:
    """Bytes of parameters, gradients and optimizer state on one rank."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def _storages(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages under ``tensors``, told apart by the storage itself,
    not its address: meta and fake tensors have none (every address reads 0)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


def model_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> ModelStateBytes:
    """What this rank holds for a sharded ``model`` (each storage once: a stage-2 shard is
    a view of its replica): parameters with replicas, gradients (with any accumulated
    without sync) and the optimizer's state tensors."""
    from torch.distributed.tensor import DTensor

    from memopt.optim import optimizer_state_bytes

    params, grads = [], []
    for handle in shard_state(model).params.values():
        param = handle.param
        params.append(param.to_local())
        if handle.replica is not None:
            params.append(handle.replica)
        if param.grad is not None:
            grad = param.grad
            grads.append(grad.to_local() if isinstance(grad, DTensor) else grad)
        extra = [handle.pending, handle.accumulator.grad if handle.accumulator is not None else None]
        grads.extend(t for t in extra if t is not None)
    state = optimizer_state_bytes(optimizer) if optimizer is not None else 0
    return ModelStateBytes(_storages(params), _storages(grads), state)


def zero_model_state_bytes(
    numel: int, world: int, stage: int, *, param_bytes: float = 4, grad_bytes: float = 4, state_bytes: float = 8
) -> ModelStateBytes:
    """ZeRO's per-rank model state for ``numel`` parameter elements (module docstring)."""
    shard = 1.0 / world
    p = numel * param_bytes * (shard if stage >= 3 else 1.0)
    g = numel * grad_bytes * (shard if stage >= 2 else 1.0)
    s = numel * state_bytes * (shard if stage >= 1 else 1.0)
    return ModelStateBytes(round(p), round(g), round(s))
