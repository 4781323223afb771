"""Checkpoints of a sharded model and its `ShardedOptimizer` with torch.distributed.checkpoint.

    md.checkpoint.save("ckpt/step100", model, optimizer)            # each rank writes its rows
    md.checkpoint.load("ckpt/step100", model, optimizer)            # in new processes

``full=False`` (default): the state dict holds DTensors (``Shard(0)`` pieces, or
``Replicate``), and DCP writes each rank's rows once. ``full=True``: every tensor is
gathered to its full value (DCP writes it once, from one rank) and loading reads full
tensors on every rank and keeps each rank's rows. Both resume training exactly.

The optimizer's state dict is keyed by parameter name (not by position):
``{"state": {fqn: {key: value}}, "param_groups": [{..., "params": [fqn, ...]}]}``. A state
tensor shaped like the rank's rows of its parameter (Adam's moments, SGD's momentum) is a
DTensor of the parameter's full shape; a 0-d tensor or a number (steps) is the same on
every rank; anything else (AdamW8bit's codes and scales) is the rank's own, stored under
``key@rank<r>``, which ties a sharded checkpoint to its world size (loading refuses
another) and cannot be saved ``full``.

``load`` also takes a plain (unsharded) model and a plain optimizer over its parameters,
in one process with or without a process group: each gets the full values.

A parameter the saved optimizer held no state for (saved before the first step, or a
parameter that never had a gradient) has none after a load either, as in the run that
saved it: its first step initialises it.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.tensor import DTensor

from memopt.distributed.api import shard_state
from memopt.distributed.checks import ShardingError
from memopt.distributed.optimizer import ShardedOptimizer, resident
from memopt.distributed.param import ShardedParam, _contiguous_stride, gather_replicas

__all__ = ["get_state_dict", "set_state_dict", "save", "load"]

_RANK_TAG = "@rank"
_STATE_PREFIX = "optim.state."
"""How DCP flattens a key of the optimizer's state: ``optim.state.<fqn>.<key>``."""


def _full(value: Any) -> Any:
    return value.full_tensor() if isinstance(value, DTensor) else value


# ---- model -------------------------------------------------------------------------------


def _model_state(model: nn.Module, full: bool) -> dict[str, Any]:
    state = model.state_dict()
    if not full:
        return state
    return {key: _full(value) for key, value in state.items()}


@torch.no_grad()
def _load_full_model(model: nn.Module, loaded: dict[str, Any]) -> None:
    """Copy each full tensor's rows of this rank into the model."""
    handles = {id(h.param): h for h in shard_state(model).params.values()}
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, target in model.state_dict().items():
        value = loaded[key]
        handle = handles.get(id(params.get(key)))
        if handle is None:
            target.copy_(value)
        else:
            handle.load_full(value)


# ---- optimizer ---------------------------------------------------------------------------


def _entries(optimizer: ShardedOptimizer) -> Iterator[tuple[ShardedParam, torch.Tensor, dict[str, Any]]]:
    for handle, local in optimizer.local_tensors():
        state = optimizer.inner.state.get(local)
        if state:
            yield handle, local, state


def _state_value(handle: ShardedParam, local: torch.Tensor, value: Any, full: bool) -> tuple[str, Any] | None:
    """How one state value is stored: (kind, value) with kind "dtensor", "same" (equal on
    every rank) or "rank" (this rank's own)."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return "same", value
    if value.shape == local.shape and local.dim() > 0:
        dtensor = DTensor.from_local(
            value, handle.state.mesh, [handle.optimizer_placement], run_check=False,
            shape=torch.Size(handle.shape), stride=_contiguous_stride(handle.shape),
        )  # fmt: skip
        return "dtensor", dtensor.full_tensor() if full else dtensor
    return "rank", value


def _optimizer_state(optimizer: ShardedOptimizer, full: bool) -> dict[str, Any]:
    with resident(optimizer):  # an offloaded state's tensors, read back; the dict keeps them
        return _resident_optimizer_state(optimizer, full)


def _resident_optimizer_state(optimizer: ShardedOptimizer, full: bool) -> dict[str, Any]:
    rank = optimizer._shard.rank
    state: dict[str, dict[str, Any]] = {}
    for handle, local, entry in _entries(optimizer):
        saved = state.setdefault(handle.fqn, {})
        for key in sorted(entry):
            kind, value = _state_value(handle, local, entry[key], full)  # type: ignore[misc]
            if kind == "rank":
                if full:
                    raise ShardingError(
                        f"memopt.distributed.checkpoint: {type(optimizer.inner).__name__}'s state "
                        f"{key!r} of {handle.fqn!r} (shape {tuple(entry[key].shape)}) is laid out per "
                        "rank, not by parameter rows, so it has no full form; save with full=False"
                    )
                key = f"{key}{_RANK_TAG}{rank}"
            saved[key] = value
    names = {id(local): handle.fqn for handle, local in optimizer.local_tensors()}
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": [names[id(p)] for p in group["params"]]}
        for group in optimizer.param_groups
    ]
    return {"state": state, "param_groups": groups}


def _init_state(optimizer: ShardedOptimizer, saved: Callable[[str], bool]) -> None:
    """Create the optimizer's state (the template a load fills) for the parameters whose
    name ``saved`` accepts (those the checkpoint holds state for)."""
    _zero_step(
        optimizer.inner,
        [local for handle, local in optimizer.local_tensors() if handle.param.requires_grad and saved(handle.fqn)],
    )


@torch.no_grad()
def _zero_step(inner: torch.optim.Optimizer, tensors: list[torch.Tensor]) -> None:
    """One step of ``inner`` with zero gradients for ``tensors`` (and none for its other
    parameters) and learning rate 0, as torch.distributed.checkpoint.state_dict does to
    create the state a load fills: state for ``tensors`` only. Every parameter's own
    gradient (a load between backward and step) is put back after."""
    if inner.state:
        return
    params = [p for group in inner.param_groups for p in group["params"]]
    grads = [p.grad for p in params]
    chosen = {id(t) for t in tensors}
    for p in params:
        p.grad = torch.zeros_like(p) if id(p) in chosen else None
    rates = [group.get("lr") for group in inner.param_groups]
    for group in inner.param_groups:
        if "lr" in group:
            group["lr"] = torch.tensor(0.0) if isinstance(group["lr"], torch.Tensor) else 0.0
    try:
        inner.step()
    finally:
        for group, rate in zip(inner.param_groups, rates):
            if rate is not None:
                group["lr"] = rate
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad


@torch.no_grad()
def _load_optimizer(optimizer: ShardedOptimizer, loaded: dict[str, Any]) -> None:
    """Write the loaded values into the inner optimizer's state (tensors in place; an
    offloaded state is read back, written and stored again)."""
    with resident(optimizer):
        _load_resident_optimizer(optimizer, loaded)


def _load_resident_optimizer(optimizer: ShardedOptimizer, loaded: dict[str, Any]) -> None:
    rank = optimizer._shard.rank
    for handle, local, entry in _entries(optimizer):
        saved = loaded["state"].get(handle.fqn)
        if saved is None:  # the saved optimizer held none for it: its first step initialises it
            optimizer.inner.state.pop(local, None)
            continue
        for key in list(entry):
            value = saved.get(key, saved.get(f"{key}{_RANK_TAG}{rank}"))
            current = entry[key]
            if isinstance(current, torch.Tensor) and current.dim() > 0:
                value = value.to_local() if isinstance(value, DTensor) else value
                if value.shape != current.shape and value.shape == torch.Size(handle.shape):
                    value = value.narrow(0, handle.layout.start, handle.layout.length)  # a full tensor
                current.copy_(value)
            elif isinstance(current, torch.Tensor):
                current.copy_(value)
            else:
                entry[key] = value
    for group, saved_group in zip(optimizer.param_groups, loaded["param_groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "params"})


# ---- public ------------------------------------------------------------------------------


def get_state_dict(model: nn.Module, optimizer: ShardedOptimizer | None = None, *, full: bool = False) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` (``"optim"`` only with an optimizer); see the
    module docstring. Collective when ``full``: call it on every rank."""
    state: dict[str, Any] = {"model": _model_state(model, full)}
    if optimizer is not None:
        state["optim"] = _optimizer_state(optimizer, full)
    return state


def set_state_dict(
    model: nn.Module, optimizer: ShardedOptimizer | None, state_dict: dict[str, Any], *, full: bool = False
) -> None:
    """Load a state dict of the form `get_state_dict` makes (sharded values are loaded in
    place already when they came through `load`)."""
    if full:
        _load_full_model(model, state_dict["model"])
    else:
        model.load_state_dict(state_dict["model"])
    gather_replicas(shard_state(model).params.values())
    if optimizer is not None and "optim" in state_dict:
        _load_optimizer(optimizer, state_dict["optim"])


def save(
    checkpoint_id: str | os.PathLike[str],
    model: nn.Module,
    optimizer: ShardedOptimizer | None = None,
    *,
    full: bool = False,
    overwrite: bool = False,
) -> None:
    """Save with ``torch.distributed.checkpoint.save`` (every rank calls it).

    A directory that already holds a checkpoint (its ``.metadata``) is refused with a
    `ShardingError` on every rank, unless ``overwrite=True``: then the new checkpoint is
    written beside it (``<dir>.memopt-saving``) and moved in only once every rank has
    written it, its ``.metadata`` last, after the old checkpoint's files are deleted
    (other files in the directory are kept). A save that fails midway leaves the old
    checkpoint whole, never the old metadata over new data, which DCP's own overwrite (a
    warning, then rewriting the files in place) could leave. Rank 0 decides, for every
    rank. A checkpoint id that is not a local path (an fsspec URL) goes to DCP as it is."""
    if "://" in os.fspath(checkpoint_id):
        dcp.save(get_state_dict(model, optimizer, full=full), checkpoint_id=checkpoint_id)
        return
    path = Path(checkpoint_id)
    staging = path.with_name(path.name + ".memopt-saving")
    replace = _agree_to_replace(path, staging, overwrite)
    dcp.save(get_state_dict(model, optimizer, full=full), checkpoint_id=staging if replace else path)
    if replace:
        if _rank() == 0:
            _move_checkpoint(staging, path)
        _barrier()  # no rank reads the directory before the new checkpoint is in place


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _agree_to_replace(path: Path, staging: Path, overwrite: bool) -> bool:
    """Rank 0's answer, for every rank: whether ``path`` holds a checkpoint that this
    save replaces (then it writes to ``staging``, cleared first); raises on every rank
    when it holds one and ``overwrite`` is False."""
    import torch.distributed as dist

    decision: list[Any] = [None]
    if _rank() == 0:
        exists = (path / ".metadata").exists()
        decision[0] = "refuse" if exists and not overwrite else "replace" if exists else "write"
        if decision[0] == "replace" and staging.exists():
            shutil.rmtree(staging)  # left by a save that failed midway
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(decision, src=0)
    if decision[0] == "refuse":
        raise ShardingError(
            f"memopt.distributed.checkpoint.save: {os.fspath(path)!r} already holds a checkpoint; save to a new "
            "directory (e.g. one per step), or pass overwrite=True to replace it (the new one is written beside "
            "it and moved in once complete)"
        )
    return decision[0] == "replace"


def _move_checkpoint(staging: Path, path: Path) -> None:
    """Replace the checkpoint in ``path`` by the complete one in ``staging``: the old
    ``.metadata`` goes first (from then on ``path`` holds no checkpoint, never a mixed
    one), then the old data files, then the new files, the new ``.metadata`` last."""
    (path / ".metadata").unlink()
    for old in path.glob("*.distcp"):
        old.unlink()
    for new in sorted(staging.iterdir(), key=lambda f: f.name == ".metadata"):
        os.replace(new, path / new.name)
    staging.rmdir()


def load(
    checkpoint_id: str | os.PathLike[str], model: nn.Module, optimizer: ShardedOptimizer | None = None, *, full: bool = False
) -> None:
    """Load what `save` wrote (with the same ``full``) into ``model`` and ``optimizer``, in
    new processes or the same ones (every rank calls it), with any number of ranks.

    ``model`` may also be a plain, unsharded model and ``optimizer`` a plain torch
    optimizer over its parameters (one process, with or without a process group): each
    gets the full values (`_load_unsharded`)."""
    if getattr(model, "_memopt_shard_state", None) is None:
        _load_unsharded(checkpoint_id, model, optimizer)
        return
    keys = _saved_keys(checkpoint_id)
    if optimizer is not None:
        saved = _has_state(checkpoint_id, keys)
        _init_state(optimizer, saved)
        _check_world(checkpoint_id, optimizer._shard.world, keys)
    state = get_state_dict(model, optimizer, full=full)
    if optimizer is not None:
        state["optim"]["state"] = {fqn: entry for fqn, entry in state["optim"]["state"].items() if saved(fqn)}
    dcp.load(state, checkpoint_id=checkpoint_id)
    set_state_dict(model, optimizer, state, full=full)


def _saved_keys(checkpoint_id: str | os.PathLike[str]) -> set[str] | None:
    """The flattened keys a file-system checkpoint holds; None for another storage (DCP
    reports any mismatch itself)."""
    try:
        return set(dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata)
    except Exception:  # not a file-system checkpoint
        return None


def _has_state(checkpoint_id: str | os.PathLike[str], keys: set[str] | None) -> Callable[[str], bool]:
    """Whether the checkpoint holds optimizer state for a parameter (by name): a
    parameter without any had none when it was saved (before the first step, or never
    a gradient). Raises `ShardingError` when it holds no optimizer at all."""
    if keys is None:
        return lambda fqn: True
    if not any(key.startswith("optim.") for key in keys):
        raise ShardingError(
            f"memopt.distributed.checkpoint.load: {os.fspath(checkpoint_id)!r} holds no optimizer (it was saved "
            "without one); load the model alone, load(path, model), and step a new optimizer"
        )
    names = {key[len(_STATE_PREFIX) :] for key in keys if key.startswith(_STATE_PREFIX)}
    return lambda fqn: any(name.startswith(fqn + ".") for name in names)


def _check_world(checkpoint_id: str | os.PathLike[str], world: int, keys: set[str] | None) -> None:
    """Refuse a sharded checkpoint with per-rank state written by another world size."""
    if keys is None:
        return
    ranks = {key.rsplit(_RANK_TAG, 1)[1] for key in keys if _RANK_TAG in key}
    if ranks and len(ranks) != world:
        raise ShardingError(
            f"memopt.distributed.checkpoint.load: {os.fspath(checkpoint_id)!r} holds optimizer state "
            f"laid out per rank for {len(ranks)} ranks; this world has {world}. Load it with "
            f"{len(ranks)} ranks"
        )


@torch.no_grad()
def _load_unsharded(
    checkpoint_id: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> None:
    """A checkpoint of a sharded model, loaded into a model `shard` never touched (and a
    plain optimizer over its parameters): DCP reads the full value of each DTensor."""
    if isinstance(optimizer, ShardedOptimizer):
        raise ShardingError(
            "memopt.distributed.checkpoint.load: the model is not sharded but the optimizer is a "
            "ShardedOptimizer; load a sharded model with its ShardedOptimizer, or a plain model with a "
            "plain optimizer over its parameters"
        )
    import torch.distributed as dist

    state: dict[str, Any] = {"model": model.state_dict()}
    names = {id(p): name for name, p in model.named_parameters()}
    if optimizer is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        unknown = [tuple(p.shape) for p in params if id(p) not in names]
        if unknown:
            raise ShardingError(
                f"memopt.distributed.checkpoint.load: the optimizer holds tensors of shapes {unknown} that are "
                "not parameters of the model; build it on model.parameters()"
            )
        keys = _saved_keys(checkpoint_id)
        saved = _has_state(checkpoint_id, keys)
        _zero_step(optimizer, [p for p in params if p.requires_grad and saved(names[id(p)])])
        state["optim"] = {
            "state": {
                names[id(p)]: dict(optimizer.state[p]) for p in params if optimizer.state.get(p) and saved(names[id(p)])
            },
            "param_groups": [
                {**{k: v for k, v in group.items() if k != "params"}, "params": [names[id(p)] for p in group["params"]]}
                for group in optimizer.param_groups
            ],
        }
        _check_world(checkpoint_id, 1, keys)
    no_dist = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():  # DCP warns that it loads in one process: asked for here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=checkpoint_id, no_dist=no_dist)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        loaded = state["optim"]
        for p in params:
            if not saved(names[id(p)]):  # the saved optimizer held none for it
                optimizer.state.pop(p, None)
            for key, value in loaded["state"].get(names[id(p)], {}).items():
                if not isinstance(optimizer.state[p].get(key), torch.Tensor):  # tensors were loaded in place
                    optimizer.state[p][key] = value
        for group, saved_group in zip(optimizer.param_groups, loaded["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
