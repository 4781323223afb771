"""What `memopt.distributed.shard` refuses, each with a message that names the fix:
no process group, a mesh that is not the whole world on one dimension, a model already
wrapped by DDP, FSDP or memopt, parameters that already are DTensors (tensor
parallelism), parameters on the meta device or on another device than the mesh."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

__all__ = ["ShardingError", "check_stage", "resolve_mesh", "check_model", "device_type_of"]


class ShardingError(RuntimeError):
    """A model, mesh or optimizer that `memopt.distributed` cannot shard as asked."""


STAGES = (0, 1, 2, 3)


def check_stage(stage: object) -> int:
    if isinstance(stage, bool) or stage not in STAGES:
        raise ValueError(
            f"memopt.distributed.shard: stage={stage!r} is not one of 0 (replicate, all-reduce "
            "gradients), 1 (shard optimizer state), 2 (and gradients), 3 (and parameters)"
        )
    return int(stage)  # type: ignore[call-overload]


def device_type_of(model: nn.Module) -> str:
    """The device type of the model's parameters ("cpu" if it has none; "meta" if every
    parameter is on the meta device); refuses a model spread over several device types."""
    types = {p.device.type for p in model.parameters()}
    if len(types) > 1:
        hint = (
            "; a model on the meta device is sharded whole (every parameter on meta), for planning"
            if "meta" in types
            else ""
        )
        raise ShardingError(
            f"memopt.distributed.shard: the model's parameters are on several device types "
            f"({sorted(types)}); move the whole model to one device first{hint}"
        )
    return types.pop() if types else "cpu"


def resolve_mesh(mesh: DeviceMesh | None, device_type: str) -> DeviceMesh:
    """``mesh``, or a 1-D mesh over the default process group; refuses a missing process
    group and a mesh that is not the whole world on one dimension of ``device_type``."""
    if not dist.is_available() or not dist.is_initialized():
        raise ShardingError(
            "memopt.distributed.shard needs an initialised process group: call "
            "torch.distributed.init_process_group() first (torchrun sets RANK, WORLD_SIZE, "
            "MASTER_ADDR and MASTER_PORT; use backend 'gloo' on CPU, 'nccl' on CUDA)"
        )
    world = dist.get_world_size()
    if mesh is None:
        # A meta-device model (planning only) gets a mesh on the host: meta has no mesh.
        # Built outside any FakeTensorMode (`memopt report` builds models under one): the
        # mesh reads its rank map back as numbers.
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            return init_device_mesh("cpu" if device_type == "meta" else device_type, (world,))
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"memopt.distributed.shard: mesh must be a DeviceMesh or None, got {type(mesh).__name__}")
    if mesh.ndim != 1:
        raise ShardingError(
            f"memopt.distributed.shard: the mesh has {mesh.ndim} dimensions {tuple(mesh.shape)}; "
            "memopt shards over a 1-D mesh (HSDP and TP meshes are not supported yet): pass "
            "mesh=None or init_device_mesh(device_type, (world_size,))"
        )
    if mesh.size() != world:
        raise ShardingError(
            f"memopt.distributed.shard: the mesh has {mesh.size()} ranks but the world has {world}; "
            "memopt shards over every rank of the default process group (sub-meshes are not "
            "supported yet): pass mesh=None"
        )
    if mesh.device_type != device_type and device_type != "meta":
        raise ShardingError(
            f"memopt.distributed.shard: the mesh is on device type {mesh.device_type!r} but the "
            f"model's parameters are on {device_type!r}; move the model or build the mesh on {device_type!r}"
        )
    return mesh


def _wrapper_name(module: nn.Module) -> str | None:
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        return "DistributedDataParallel"
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - FSDP is part of every torch memopt supports
        return None
    if isinstance(module, FSDPModule):
        return "FSDP2 (fully_shard)"
    if isinstance(module, FullyShardedDataParallel):
        return "FullyShardedDataParallel (FSDP1)"
    from memopt.distributed.api import _HANDLES, ShardedModule

    if isinstance(module, ShardedModule):
        return "memopt.distributed.shard"
    if _HANDLES in module.__dict__:  # a submodule of a model memopt sharded
        return "memopt.distributed.shard (it is part of a sharded model)"
    if type(module).__name__.startswith("SimpleFSDP"):
        return "torchtitan's SimpleFSDP"
    return None


def check_model(model: nn.Module) -> None:
    """Refuse a model (or a submodule) already wrapped by a data-parallel wrapper, and
    parameters that already are DTensors."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"memopt.distributed.shard: expected an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        wrapper = _wrapper_name(module)
        if wrapper is not None:
            where = f"submodule {name!r}" if name else "the model"
            raise ShardingError(
                f"memopt.distributed.shard: {where} is already wrapped by {wrapper}; pass the "
                "plain, unwrapped model (memopt.distributed.shard replaces DDP and FSDP: its "
                "collectives are compiled into the graphs)"
            )
    _check_no_dtensors(model.named_parameters())


def _check_no_dtensors(named: Iterable[tuple[str, torch.Tensor]]) -> None:
    for name, param in named:
        if isinstance(param, DTensor):
            raise ShardingError(
                f"memopt.distributed.shard: parameter {name!r} is already a DTensor (placements "
                f"{tuple(param.placements)} on a mesh of shape {tuple(param.device_mesh.shape)}); "
                "tensor or expert parallel layouts are not supported yet: shard a model whose "
                "parameters are plain tensors"
            )
