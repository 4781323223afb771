"""`materialize`: give a model sharded on the meta device its storage, and initialise it.

    with torch.device("meta"):
        model = build_model(config)                 # nothing allocated
    model = md.shard(model, stage=3)                 # nothing allocated, nothing broadcast
    md.materialize(model)                            # this rank's shards only, initialised

A model too large for one rank's memory is built on the meta device, sharded there (and
can be planned there: `memopt.explain` on a fake world), then materialised: each rank
allocates only what its stage keeps (stage 3: its rows; stages 1 and 2: the replica;
stage 0: the whole parameter) on the mesh's device, and initialises it.

Initialisation runs module by module in ``model.modules()`` order: ``init(module)``
(default: ``module.reset_parameters()`` where the module defines it, as torch's own
modules do at construction) sees the module's parameters as plain full tensors on the
device, freshly allocated, and this rank keeps its rows of what ``init`` wrote. Every
rank runs the same ``init`` from the same RNG state, so with a seed set before
``materialize`` the values are those of an unsharded model initialised the same way
(module construction order, for torch's modules: checked in the tests). Beyond its
shards a rank holds one module's full parameters at a time (a tied parameter: the
last module to initialise it wins, as without sharding).

Buffers on the meta device are allocated uninitialised, as ``nn.Module.to_empty``
leaves them: ``init`` must set those it needs (a rotary table, a position-id range).
Build the optimizer after materialising.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from memopt.distributed.api import _HANDLES, shard_state
from memopt.distributed.checks import ShardingError
from memopt.distributed.param import ShardedParam

__all__ = ["materialize", "reset_parameters"]


def reset_parameters(module: nn.Module) -> None:
    """The default ``init``: ``module.reset_parameters()`` where the module defines it."""
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()


@torch.no_grad()
def materialize(
    model: nn.Module,
    device: torch.device | str | None = None,
    init: Callable[[nn.Module], None] | None = reset_parameters,
) -> nn.Module:
    """Allocate and initialise a model sharded on the meta device (module docstring);
    returns ``model``. ``device``: default the mesh's (``cuda`` uses the current CUDA
    device); it must be of the mesh's device type. ``init=None`` leaves values
    uninitialised (e.g. before loading a checkpoint)."""
    state = shard_state(model)
    mesh_type = state.mesh.device_type
    if device is None:
        device = torch.device(mesh_type, torch.cuda.current_device()) if mesh_type == "cuda" else torch.device(mesh_type)
    device = torch.device(device)
    if device.type != mesh_type:
        raise ShardingError(
            f"memopt.distributed.materialize: device {device} is not of the mesh's device type {mesh_type!r}; "
            f"materialise on {mesh_type}, or shard with a mesh on {device.type}"
        )
    handles = list(state.params.values())
    on_meta = [h.fqn for h in handles if not h.param.to_local().is_meta]
    if on_meta:
        raise ShardingError(
            f"memopt.distributed.materialize: parameter(s) {on_meta[:3]} already have storage; materialise a model "
            "that was sharded on the meta device (with torch.device('meta'): build it; then md.shard; then materialize)"
        )
    for handle in handles:
        new = nn.Parameter(handle.allocate(device), requires_grad=handle.param.requires_grad)
        for module, name in handle.locations:
            module._parameters[name] = new
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device=device)
    if init is not None:
        _initialise(model, init, device)
    return model


def _initialise(model: nn.Module, init: Callable[[nn.Module], None], device: torch.device) -> None:
    state = shard_state(model)
    active, state.active = state.active, False  # module.<name> reads _parameters[name] as it is
    try:
        for module in model.modules():
            owned: dict[str, ShardedParam] = module.__dict__.get(_HANDLES, {})
            sharded = {name: module._parameters[name] for name in owned}
            for name, handle in owned.items():
                full = torch.empty(handle.shape, dtype=handle.dtype, device=device)
                module._parameters[name] = nn.Parameter(full, requires_grad=sharded[name].requires_grad)
                del full
            try:
                init(module)
                written = {name: module._parameters[name] for name in owned}
            finally:
                module._parameters.update(sharded)
            for name, handle in owned.items():
                handle.load_full(written[name])
            del written  # one module's full parameters at a time
    finally:
        state.active = active
