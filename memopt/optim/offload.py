"""`OffloadedState`: an optimizer whose state waits on disk (or in pinned host memory)
between steps and is streamed through the update one parameter at a time.

    opt = OffloadedState(torch.optim.AdamW(model.parameters()), "disk", offload_dir="/scratch")

Between steps every state tensor of one or more dimensions (Adam's moments, GaLore's
projector and low-rank moments, 8-bit codes and scales, SGD's momentum) lives in an
offload store of `memopt.runtime` (`DiskStore`: raw-bytes files in a private directory,
written and read on the store's I/O thread; or `HostStore`); 0-dim tensors and Python
numbers (step counters, seeds) stay in memory. ``step()`` walks the parameters that have
a gradient in ``param_groups`` order: it starts reading the next ``prefetch`` parameters'
state on the I/O thread, waits for the current one's, runs the wrapped optimizer's own
update for that parameter alone, and hands the updated tensors back to the store (whose
thread writes them and then drops them). At most the state of ``1 + prefetch``
parameters, plus ``max_pending`` tensors waiting to be written, is in memory at once.

The update is the wrapped optimizer's, so the parameters come out bitwise equal to the
plain optimizer's:

* memopt's optimizers (`GaLoreAdamW`, `SubspaceAdamW`, `AdamW8bit`): their per-parameter
  ``_update``, with the parameter's position over all groups (Subspace's seeds depend on
  it) and its own step count (so GaLore's projector refreshes every ``update_proj_gap``
  steps as before);
* any other ``torch.optim.Optimizer`` whose update is per parameter (AdamW, Adam, SGD,
  ...): its ``step`` with the parameter's group temporarily holding that parameter alone
  (the step's undecorated function: the wrapped optimizer's step hooks do not run; the
  wrapper's own do, once per step). torch's ``foreach`` and ``fused`` implementations
  compute each element as the single-tensor one does, so one tensor at a time gives the
  same bits (tested on CPU for both).

Refused: `MeZO` (its step perturbs every parameter with one closure),
``torch.optim.LBFGS`` (its update couples all parameters) and a
`memopt.distributed.ShardedOptimizer` (it gives its inner optimizer the gradients inside
its own step: wrap the inner optimizer, ``ShardedOptimizer(lambda ps:
OffloadedState(AdamW(ps)), model)``).

Before the first step (at wrap time, and for groups added or state loaded later) the
store's ``preflight`` checks that the state fits (`estimate_state_bytes`), so a full disk
or an unwritable ``offload_dir`` is a `MemoptOffloadError` before anything is updated.
Files are deleted as they are read back; `close` (or garbage collection, or interpreter
exit) removes the store's directory.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from memopt.errors import MemoptOffloadError

from memopt.optim._checks import is_sharded_optimizer
from memopt.optim._per_param import per_param_update
from memopt.optim.mezo import MeZO
from memopt.optim.state_size import state_bytes_of
from memopt.runtime.disk_store import DiskStore
from memopt.runtime.host_store import HostStore
from memopt.runtime.offload_store import DEFAULT_MAX_PENDING, OffloadStore, StoreStats
from memopt.runtime.store_registry import resolve_offload_dir

__all__ = ["OffloadedState", "OffloadedStateStats", "estimate_state_bytes"]

_HOOK_DICTS = (
    "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)  # fmt: skip


def _offloaded(value: Any) -> bool:
    """Whether a state value goes to the store: tensors of one or more dimensions."""
    return isinstance(value, torch.Tensor) and value.dim() > 0


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def estimate_state_bytes(optimizer: torch.optim.Optimizer, param: torch.Tensor,
                         group: Mapping[str, Any]) -> int:
    """Bytes of ``param``'s state that `OffloadedState` keeps in its store: exact when the
    state exists; otherwise what the optimizer will make at its first step
    (`memopt.optim.state_size.state_bytes_of`)."""
    return state_bytes_of(optimizer, param, group)


@dataclass(frozen=True)
class OffloadedStateStats:
    """Where an `OffloadedState`'s state is, in bytes."""

    offloaded_bytes: int
    """State in the store now."""
    in_memory_bytes: int
    """State kept in memory between steps (0-dim tensors such as torch's step counts)."""
    peak_step_bytes: int
    """Most offloadable state in memory at once during the last ``step()``: the
    parameter being updated, the reads started ahead for the next ones, and the store's
    writes still pending."""
    largest_param_bytes: int
    """The largest one parameter's offloaded state."""
    store: StoreStats


@dataclass(eq=False)
class _Stashed:
    """One offloaded state tensor: its store handle and what it looked like."""

    hid: int
    token: torch.Tensor
    size: tuple[int, ...]
    stride: tuple[int, ...] | None
    """The strides to restore, for a non-contiguous tensor (it is stored contiguous)."""
    dtype: torch.dtype
    device: torch.device
    nbytes: int
    reading: list[torch.Tensor] = field(default_factory=list)
    """The second token, once the read has started."""


class OffloadedState(torch.optim.Optimizer):
    """``optimizer`` with its state in an offload store, streamed per parameter (module
    docstring).

    Args:
        optimizer: the optimizer to wrap; its update must be per parameter. Its
            ``param_groups`` and ``state`` are shared (LR schedulers built on the wrapper
            edit the same groups); keep stepping through the wrapper only.
        target: ``"disk"`` (a private directory under ``offload_dir``), ``"host"``
            (pinned host memory; CUDA parameters only), or an `OffloadStore` to use
            (not closed by the wrapper).
        offload_dir: the directory for ``"disk"``; default the system's temporary one.
        prefetch: parameters whose state is read ahead while one updates (0: none).
        max_pending: writes the store lets run behind before the step waits.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, target: str | OffloadStore = "disk",
                 offload_dir: str | os.PathLike[str] | None = None, *, prefetch: int = 1,
                 max_pending: int = DEFAULT_MAX_PENDING) -> None:
        _check_wrappable(optimizer)
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"OffloadedState: prefetch must be an int >= 0, got {prefetch!r}")
        self.optimizer = optimizer
        self.prefetch = prefetch
        self.target = target if isinstance(target, str) else target.target
        for name in _HOOK_DICTS:
            setattr(self, name, OrderedDict())
        self._patch_step_function()
        self._per_param = per_param_update(optimizer)
        self._stash: dict[torch.Tensor, dict[str, _Stashed]] = {}
        self._order: dict[torch.Tensor, tuple[str, ...]] = {}
        self._started_bytes = 0
        self._peak = 0
        self._closed = False
        self.store = _open_store(target, offload_dir, max_pending, self._params())
        owned = not isinstance(target, OffloadStore)
        self._close_store: Callable[[], Any] = (
            weakref.finalize(self, self.store.close) if owned else lambda: None)
        try:
            self._preflight(self._params())
            self._stash_all()
        except BaseException:
            self._close_store()
            raise

    # -- what torch.optim.Optimizer users touch -----------------------------------------

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        """The wrapped optimizer's state: between steps, only what stays in memory."""
        return self.optimizer.state

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    def __repr__(self) -> str:
        where = self.store.location
        return f"OffloadedState({self.optimizer!r}, target={self.target!r}, location={where!r})"

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("an OffloadedState cannot be pickled: save its state_dict() instead")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As the wrapped optimizer's, after checking the store can hold the new state."""
        self.optimizer.add_param_group(param_group)
        self._preflight(self.param_groups[-1]["params"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step over every parameter that has a gradient, streaming each one's state
        from the store and back. ``closure``, if given, runs first with gradients
        enabled; its value is returned."""
        self._check_open()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._work()
        self._peak = ahead = 0
        for i, (group, param, position) in enumerate(work):
            while ahead < min(i + self.prefetch + 1, len(work)):
                self._start(work[ahead][1])
                ahead += 1
            self._load(param)
            try:
                self._per_param(self.optimizer, group, param, position)
                self._note_peak(self._state_bytes(param))
            finally:
                self._stash_param(param)
            self._note_peak(0)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict, with the offloaded state read back (the
        whole state is in memory while the dict lives; the store keeps its copy)."""
        with self.resident():
            packed = self.optimizer.state_dict()
            packed["state"] = {k: dict(v) for k, v in packed["state"].items()}
            return packed

    @contextlib.contextmanager
    def resident(self) -> Iterator[None]:
        """The whole state back in the wrapped optimizer's ``state`` inside the block,
        handed to the store again at its end (also on an error): for code that reads or
        writes every parameter's state directly, such as a checkpoint
        (`memopt.distributed.checkpoint` of a `ShardedOptimizer` whose inner optimizer
        is an `OffloadedState`). Tensors changed in place inside the block are stored as
        they are at its end; the whole state is in memory meanwhile."""
        self._check_open()
        params = list(self._stash)
        for param in params:
            self._start(param)
        try:
            for param in params:
                self._load(param)
            yield
        finally:
            self._stash_all()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Check that the store can hold the loaded state in place of the current one
        (which is kept if not), load it into the wrapped optimizer, and move it to the
        store. A dict the wrapped optimizer refuses (its groups do not match) raises its
        error and leaves the current state in place, as the plain optimizer does."""
        self._check_open()
        loaded = sum(_nbytes(v) for s in state_dict["state"].values() for v in s.values() if _offloaded(v))
        self.store.preflight(max(0, loaded - self.stats().offloaded_bytes))
        kept = self._stash, self._order
        self._stash, self._order = {}, {}
        try:
            self.optimizer.load_state_dict(state_dict)  # type: ignore[arg-type]
        except BaseException:  # torch refused the dict and left its state as it was: so do we
            self._stash, self._order = kept
            raise
        del kept  # the replaced state's handles die before the new state is written: its files go first
        self._stash_all()

    # -- the store ----------------------------------------------------------------------

    def stats(self) -> OffloadedStateStats:
        in_store = [sum(r.nbytes for r in recs.values()) for recs in self._stash.values()]
        in_memory = sum(_nbytes(v) for s in self.optimizer.state.values() for v in s.values()
                        if isinstance(v, torch.Tensor) and not _offloaded(v))
        return OffloadedStateStats(
            offloaded_bytes=sum(in_store), in_memory_bytes=in_memory, peak_step_bytes=self._peak,
            largest_param_bytes=max(in_store, default=0), store=self.store.stats(),
        )  # fmt: skip

    def close(self) -> None:
        """Drop the offloaded state and close the store if the wrapper made it (its
        directory is removed; a given store is left open); idempotent. The optimizer
        cannot step afterwards: save ``state_dict()`` first to keep the state."""
        if self._closed:
            return
        self._closed = True
        self._stash.clear()
        self._close_store()

    def __enter__(self) -> OffloadedState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- streaming ----------------------------------------------------------------------

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _work(self) -> list[tuple[dict[str, Any], torch.Tensor, int]]:
        """``(group, param, position)`` of every parameter with a gradient, in order;
        ``position`` counts all parameters of all groups from 1 (as memopt's step does)."""
        work, position = [], 0
        for group in self.param_groups:
            for param in group["params"]:
                position += 1
                if param.grad is not None:
                    work.append((group, param, position))
        return work

    def _check_open(self) -> None:
        if self._closed:
            raise MemoptOffloadError("this OffloadedState was closed: its state is gone; "
                                     "wrap a fresh optimizer, or load a saved state_dict into one")

    def _preflight(self, params: Iterable[torch.Tensor]) -> None:
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        needed = sum(estimate_state_bytes(self.optimizer, p, group_of[p]) for p in params)
        self.store.preflight(needed)

    def _stash_all(self) -> None:
        for param in self._params():
            self._stash_param(param)

    def _stash_param(self, param: torch.Tensor) -> None:
        """Hand ``param``'s offloadable state tensors to the store; keep the rest."""
        state = self.optimizer.state.get(param)
        if not state or param in self._stash:
            return
        self._order[param] = tuple(state)
        records = {}
        for key, value in list(state.items()):
            if not _offloaded(value):
                continue
            token = self.store.offload(value, f"optimizer state[{key!r}] of a {tuple(param.shape)} parameter")
            stride = None if value.is_contiguous() else tuple(value.stride())
            records[key] = _Stashed(int(token.item()), token, tuple(value.shape), stride,
                                    value.dtype, value.device, _nbytes(value))
            del state[key]
        if records:
            self._stash[param] = records

    def _start(self, param: torch.Tensor) -> None:
        """Start reading ``param``'s state on the store's thread."""
        for record in self._stash.get(param, {}).values():
            if not record.reading:
                record.reading.append(self.store.reload_start(record.hid))
                self._started_bytes += record.nbytes

    def _load(self, param: torch.Tensor) -> None:
        """Put ``param``'s offloaded state back into the optimizer's state, in order."""
        records = self._stash.pop(param, None)
        if not records:
            return
        self._start(param)
        state = self.optimizer.state[param]
        for key, record in records.items():
            self._started_bytes -= record.nbytes
            value = self.store.reload_wait(record.hid, list(record.size), record.dtype, record.device)
            if record.stride is not None:
                value = torch.empty_strided(record.size, record.stride, dtype=record.dtype,
                                            device=record.device).copy_(value)
            state[key] = value
        merged, order = dict(state), self._order.pop(param, ())
        state.clear()  # the keys in their first order, as the plain optimizer keeps them
        state.update({key: merged[key] for key in order if key in merged})
        state.update({key: value for key, value in merged.items() if key not in state})

    def streamed_bytes(self, param: torch.Tensor) -> int:
        """Bytes of ``param``'s state that live in the store and pass through memory
        while ``step()`` updates it: the stored tensors' bytes, or, before the state
        exists, what the wrapped optimizer will make at its first step."""
        records = self._stash.get(param)
        if records:
            return sum(record.nbytes for record in records.values())
        group = next(g for g in self.param_groups if any(p is param for p in g["params"]))
        return estimate_state_bytes(self.optimizer, param, group)

    def _state_bytes(self, param: torch.Tensor) -> int:
        return sum(_nbytes(v) for v in self.optimizer.state.get(param, {}).values() if _offloaded(v))

    def _note_peak(self, loaded: int) -> None:
        held = loaded + self._started_bytes + self.store.stats().pending_bytes
        self._peak = max(self._peak, held)


# -- the per-parameter update ------------------------------------------------------------


def _check_wrappable(optimizer: torch.optim.Optimizer) -> None:
    if isinstance(optimizer, OffloadedState):
        raise TypeError("this optimizer's state is already offloaded (an OffloadedState)")
    if is_sharded_optimizer(optimizer):
        raise TypeError(
            "OffloadedState(ShardedOptimizer(...)): a ShardedOptimizer hands this rank's gradients to its inner "
            "optimizer only inside its own step(), so the wrapper would find no gradient and step nothing. "
            "Offload the inner optimizer's state instead: "
            "ShardedOptimizer(lambda params: OffloadedState(torch.optim.AdamW(params), 'disk'), model)"
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"OffloadedState wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, (MeZO, torch.optim.LBFGS)):
        raise TypeError(
            f"OffloadedState streams the state one parameter at a time, and "
            f"{type(optimizer).__name__}'s update is not per parameter "
            + ("(MeZO keeps no state to offload: a step count)" if isinstance(optimizer, MeZO)
               else "(L-BFGS couples all parameters)")
        )


def _open_store(target: str | OffloadStore, offload_dir: str | os.PathLike[str] | None,
                max_pending: int, params: list[torch.Tensor]) -> OffloadStore:
    """The caller's store, or a new one of our own for ``target``."""
    if isinstance(target, OffloadStore):
        if offload_dir is not None:
            raise ValueError("offload_dir applies to target='disk', not to a given store")
        return target
    if target == "disk":
        root = resolve_offload_dir(offload_dir)
        store: OffloadStore = DiskStore("disk (optimizer state)", root, max_pending=max_pending)
    elif target == "host":
        if offload_dir is not None:
            raise ValueError("offload_dir applies to target='disk' only")
        off_cuda = sorted({str(p.device) for p in params if p.device.type != "cuda"})
        if off_cuda:
            raise MemoptOffloadError(
                f"offload target 'host' keeps the state of CUDA parameters in pinned host "
                f"memory, but parameters live on {', '.join(off_cuda)}, whose memory is "
                "already host memory: use target='disk'"
            )
        store = HostStore("host (optimizer state)", max_pending=max_pending)
    else:
        raise ValueError(f"unknown offload target {target!r}; valid targets: 'disk', 'host', or an OffloadStore")
    return store
