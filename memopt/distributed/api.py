"""`shard`: replace a model's parameters by sharded DTensors, in place, so that
``torch.compile(model, backend="memopt")`` sees the collectives in its graphs.

    model = memopt.distributed.shard(model, stage=3)
    optimizer = memopt.distributed.ShardedOptimizer(lambda p: torch.optim.AdamW(p), model)
    compiled = torch.compile(model, backend="memopt")

As torchtitan's SimpleFSDP does, each module whose parameters are sharded gets a
subclass with one property per parameter: ``module.weight`` reads the registered
DTensor (``module._parameters["weight"]``) through its `ShardedParam`, which returns
the full tensor (all-gathered at stage 3) and reduces the gradient in backward. The
registered parameters stay DTensors, so ``state_dict()`` and torch.distributed.checkpoint
see the sharded values, never a gathered copy. The root also becomes a `ShardedModule`
(as FSDP2's ``fully_shard`` makes an ``FSDPModule``): gradient sync on or off, and a
``zero_grad`` that also drops gradients accumulated without sync.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy

from memopt.distributed.checks import check_model, check_stage, device_type_of, resolve_mesh
from memopt.distributed.param import ShardedParam, ShardState

__all__ = ["shard", "ShardedModule", "shard_state", "MixedPrecisionPolicy"]

_HANDLES = "_memopt_sharded_params"
_STATE = "_memopt_shard_state"


class ShardedModule:
    """Mixed into the root of a model `shard` has sharded (``isinstance(model,
    ShardedModule)``); the original class follows it in the MRO."""

    def set_requires_gradient_sync(self, requires_gradient_sync: bool) -> None:
        """Whether backward reduces gradients (FSDP2's method of that name). Off, each
        backward adds its local, unreduced gradient to a full-size accumulator per
        parameter (in ``reduce_dtype``) and runs no collective; turned back on, the next
        backward adds the accumulated gradient to its own before its one reduction.

            model.set_requires_gradient_sync(False)
            for batch in micro_batches[:-1]:
                model(batch).backward()
            model.set_requires_gradient_sync(True)
            model(micro_batches[-1]).backward()      # reduces all of them at once
            optimizer.step()
        """
        state = shard_state(self)  # type: ignore[arg-type]
        state.sync = bool(requires_gradient_sync)
        for handle in state.params.values():
            if state.sync:
                handle.settle_accumulated()
            else:
                handle.make_accumulator()  # here, not in a compiled forward: a new leaf breaks the graph

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``nn.Module.zero_grad``; also drops gradients accumulated without sync."""
        super().zero_grad(set_to_none)  # type: ignore[misc]
        for handle in shard_state(self).params.values():  # type: ignore[arg-type]
            handle.discard_accumulated()

    @contextlib.contextmanager
    def local_parameters(self) -> Iterator[None]:
        """Inside, ``module.weight`` is the registered DTensor, not the gathered tensor (no
        collective): for initialisation and inspection outside the forward."""
        state = shard_state(self)  # type: ignore[arg-type]
        previous, state.active = state.active, False
        try:
            yield
        finally:
            state.active = previous


def shard_state(model: nn.Module) -> ShardState:
    """The `ShardState` of a model `shard` returned; ``TypeError`` for any other."""
    state = getattr(model, _STATE, None)
    if not isinstance(state, ShardState):
        raise TypeError(
            f"{type(model).__name__} is not sharded by memopt.distributed.shard; call "
            "memopt.distributed.shard(model, ...) first"
        )
    return state


def shard(
    model: nn.Module,
    mesh: DeviceMesh | None = None,
    *,
    stage: int = 3,
    mp_policy: MixedPrecisionPolicy | None = None,
) -> nn.Module:
    """Shard ``model``'s parameters over ``mesh`` (a 1-D DeviceMesh over the whole world;
    default: one over the default process group), in place, and return it.

    ``stage``: 0 replicates parameters and all-reduces gradients (data parallel); 1 also
    shards optimizer state (with `ShardedOptimizer`); 2 also reduce-scatters gradients;
    3 also shards the parameters, all-gathered in forward (ZeRO-1/2/3). Parameters are
    split along their first dimension in ``torch.chunk`` pieces (uneven sizes are padded
    in the collectives); rank 0's values are broadcast first, as DDP does. Gradients are
    averaged over the ranks.

    ``mp_policy``: torch's FSDP2 ``MixedPrecisionPolicy``. ``param_dtype`` casts each
    parameter before its all-gather (compute in that dtype, the sharded parameter and the
    optimizer stay in the original dtype); ``reduce_dtype`` (default ``param_dtype``) is
    the dtype of the gradient reduction; ``cast_forward_inputs`` casts the model's
    floating-point inputs to ``param_dtype``, ``output_dtype`` its floating-point outputs.
    """
    stage = check_stage(stage)
    check_model(model)
    mp_policy = mp_policy or MixedPrecisionPolicy()
    if not isinstance(mp_policy, MixedPrecisionPolicy):
        raise TypeError(
            f"memopt.distributed.shard: mp_policy must be a torch.distributed.fsdp.MixedPrecisionPolicy, "
            f"got {type(mp_policy).__name__}"
        )
    mesh = resolve_mesh(mesh, device_type_of(model))
    state = ShardState(mesh, stage, mp_policy.param_dtype, mp_policy.reduce_dtype)
    _broadcast_from_first_rank(model, mesh)
    _replace_parameters(model, state)
    _make_root(model, state, mp_policy)
    return model


@torch.no_grad()
def _broadcast_from_first_rank(model: nn.Module, mesh: DeviceMesh) -> None:
    group = mesh.get_group()
    source = dist.get_global_rank(group, 0)
    seen: set[int] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen and tensor.numel() > 0 and not tensor.is_meta:  # meta: no values
            seen.add(id(tensor))
            dist.broadcast(tensor.data, src=source, group=group)


def _replace_parameters(model: nn.Module, state: ShardState) -> None:
    """Register a DTensor for every parameter (one per distinct tensor: tied parameters
    stay tied) and give each owning module the properties that read them."""
    fqns = {id(p): name for name, p in model.named_parameters()}
    made: dict[int, tuple[ShardedParam, nn.Parameter]] = {}
    for module in model.modules():
        names = [n for n, p in module._parameters.items() if p is not None]
        if not names:
            continue
        handles: dict[str, ShardedParam] = {}
        for name in names:
            old = module._parameters[name]
            assert old is not None
            if id(old) not in made:
                handle = ShardedParam(fqns[id(old)], old, state)
                new = nn.Parameter(handle.build(old), requires_grad=old.requires_grad)
                made[id(old)] = (handle, new)
                state.params[handle.fqn] = handle
            handle, new = made[id(old)]
            module._parameters[name] = new
            handles[name] = handle
            handle.locations.append((module, name))
        module.__dict__[_HANDLES] = handles
        if module is not model:  # the root is swapped by _make_root
            _swap_class(module, tuple(names), root=False)


_CLASSES: dict[tuple[type, tuple[str, ...], bool], type] = {}


def _read_param(name: str) -> property:
    def getter(self: nn.Module) -> torch.Tensor:
        return self.__dict__[_HANDLES][name](self._parameters[name])

    return property(getter)


def _swap_class(module: nn.Module, names: tuple[str, ...], *, root: bool, forward: Callable[..., Any] | None = None) -> None:
    """Give ``module`` a cached subclass of its class with a property per parameter name
    (and, for the root, `ShardedModule` and the casting ``forward``)."""
    base = type(module)
    key = (base, names, root, forward is not None)
    cls = _CLASSES.get(key)  # type: ignore[call-overload]
    if cls is None:
        namespace: dict[str, Any] = {name: _read_param(name) for name in names}
        if forward is not None:
            namespace["forward"] = forward
        bases = (ShardedModule, base) if root else (base,)
        cls = type(f"Sharded{base.__name__}", bases, namespace)
        _CLASSES[key] = cls  # type: ignore[index]
    module.__class__ = cls


def _make_root(model: nn.Module, state: ShardState, mp_policy: MixedPrecisionPolicy) -> None:
    model.__dict__[_STATE] = state
    names = tuple(model.__dict__.get(_HANDLES, {}))
    _swap_class(model, names, root=True, forward=_casting_forward(type(model), mp_policy))


def _casting_forward(cls: type, mp_policy: MixedPrecisionPolicy) -> Callable[..., Any] | None:
    """A ``forward`` that casts floating-point inputs to ``param_dtype`` and outputs to
    ``output_dtype`` (None when the policy casts neither)."""
    to_input = mp_policy.param_dtype if mp_policy.cast_forward_inputs else None
    to_output = mp_policy.output_dtype
    if to_input is None and to_output is None:
        return None
    original = cls.forward

    def cast(dtype: torch.dtype | None, tree: Any) -> Any:
        if dtype is None:
            return tree
        return pytree.tree_map_only(torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, tree)

    @functools.wraps(original)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = cast(to_input, (args, kwargs))
        return cast(to_output, original(self, *args, **kwargs))

    return forward
