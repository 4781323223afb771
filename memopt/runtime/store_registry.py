"""The registry of offload stores: one store per configuration, found by its id.

The offload pass registers a store at compile time (`register_store`) and bakes its
id into the graph; the graph's ops find the store by that id at run time (`get_store`),
which makes it on first use, so any process can rebuild a store from its id (after a
compile-cache hit or a fork). A closed store leaves the registry, and its id gets a
new one.

Clean-up of the process: `close_all` at interpreter exit (registered here, once, at
import); in a forked child the parent's stores and handles are forgotten, not closed
(their threads and files are the parent's). `synchronous_io` runs every registered
store's copies on the calling thread while it is open.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import threading
from collections.abc import Iterator
from typing import Any

import torch

from memopt.errors import MemoptOffloadError
from memopt.runtime.disk_store import DiskStore
from memopt.runtime.host_store import HostStore
from memopt.runtime.offload_store import (
    _HANDLES,
    DEFAULT_MAX_PENDING,
    OffloadStore,
    log,
    synchronous_jobs,
)

__all__ = [
    "TARGETS",
    "register_store",
    "resolve_offload_dir",
    "get_store",
    "close_all",
    "synchronous_io",
]

TARGETS = ("disk", "host")
"""Where a store keeps offloaded values."""

_STORES: dict[str, OffloadStore] = {}
_REGISTRY_LOCK = threading.RLock()


def _store_id(target: str, options: dict[str, Any]) -> str:
    """``target``, or ``target:{json of the non-default options}``: an id that says
    how to make the store, so any process can rebuild it (`get_store`)."""
    return f"{target}:{json.dumps(options, sort_keys=True, separators=(',', ':'))}" if options else target


def _parse_store_id(store_id: str) -> tuple[str, dict[str, Any]]:
    target, _, rest = store_id.partition(":")
    try:
        options = json.loads(rest) if rest else {}
    except ValueError:
        options = None
    if target not in TARGETS or not isinstance(options, dict):
        raise ValueError(f"not an offload store id: {store_id!r} (register_store makes them)")
    return target, options


def resolve_offload_dir(offload_dir: str | os.PathLike[str] | None) -> str | None:
    """``offload_dir`` as the absolute path every store and measurement uses: ``~``
    expanded, a relative path taken from the current directory (at compile time)."""
    if offload_dir is None:
        return None
    return os.path.abspath(os.path.expanduser(os.fspath(offload_dir)))


def register_store(target: str, offload_dir: str | os.PathLike[str] | None = None, *,
                   device: torch.device | str | None = None,
                   max_pending: int = DEFAULT_MAX_PENDING) -> str:
    """Make (or find) the store for this configuration and return its id, a string the
    offload pass bakes into the graph. The same configuration gives the same id and the
    same store (a new one where the old one's directory was removed). Raises
    `MemoptOffloadError` now, at compile time, if the store cannot work: a ``disk``
    directory that cannot be created, is not private or is unwritable; a ``host``
    store for a graph on the CPU (whose values already live in host memory).

    ``target``: ``"disk"`` or ``"host"``. ``offload_dir`` (disk only): the directory
    under which the store makes its private one; default the system's temporary
    directory. ``device``: the graph's device (host stores need an accelerator).
    ``max_pending``: transfers allowed to run ahead before ``offload`` blocks."""
    if target not in TARGETS:
        raise ValueError(f"unknown offload target {target!r}; valid targets: {', '.join(TARGETS)}")
    options: dict[str, Any] = {}
    if max_pending != DEFAULT_MAX_PENDING:
        options["max_pending"] = int(max_pending)
    if target == "host":
        if offload_dir is not None:
            raise ValueError("offload_dir applies to the 'disk' target only")
        _check_host_device(device)
    elif offload_dir is not None:
        options["offload_dir"] = resolve_offload_dir(offload_dir)
    store_id = _store_id(target, options)
    _replace_if_lost(get_store(store_id))
    return store_id


def _replace_if_lost(store: OffloadStore) -> None:
    """Close ``store`` and make a new one for its id if its directory was removed since
    it was made (``rm -rf`` of ``offload_dir`` between two compiles in one process):
    the registry handed the old store back, and every later compile with that
    ``offload_dir`` failed with "offload_dir ... is not writable: No such file or
    directory", though memopt creates a missing ``offload_dir``."""
    if store.lost:
        log.info("offload store %s lost its directory %s; making a new one", store.store_id, store.location)
        store.close()
        get_store(store.store_id)


def _check_host_device(device: torch.device | str | None) -> None:
    where = torch.device(device) if device is not None else None
    if where is None and torch.cuda.is_available():
        return
    if where is not None and where.type == "cuda":
        return
    on = f"on {where}" if where is not None else "on a machine without CUDA"
    raise MemoptOffloadError(
        f"offload target 'host' moves accelerator tensors to pinned host memory, but this "
        f"graph runs {on}, where its values already live in host memory: use the 'disk' "
        "target (or 'auto', which picks disk on CPU)"
    )


def get_store(store_id: str) -> OffloadStore:
    """The store of ``store_id``, made on first use (also in a process that did not
    register it, e.g. after a compile-cache hit or a fork)."""
    with _REGISTRY_LOCK:
        store = _STORES.get(store_id)
        if store is None:
            store = _STORES[store_id] = _make_store(store_id)
            store._on_close = _forget_store
        return store


def _make_store(store_id: str) -> OffloadStore:
    target, options = _parse_store_id(store_id)
    if target == "disk":
        return DiskStore(store_id, **options)
    return HostStore(store_id, **options)


def _forget_store(store: OffloadStore) -> None:
    with _REGISTRY_LOCK:
        if _STORES.get(store.store_id) is store:
            del _STORES[store.store_id]


@contextlib.contextmanager
def synchronous_io() -> Iterator[None]:
    """Run every offload store's copies on the calling thread while the block runs.

    On entering, each store finishes the work queued so far and ends its I/O thread.
    Inside, an offload's write and a reload's read run within the call that asks for
    them (``offload``, ``reload_start``), as if the copies took no time; the discards of
    handles whose tokens died run at the store's next call or ``flush``. The step's
    numerics are unchanged. After the block, a store starts its thread again at its
    next offload.

    What it is for: torch's profiler records allocations and frees on the thread that
    runs the step only, so `memopt.testing.measure.measure_peak` misses those the I/O
    thread makes (a reloaded buffer, a written value released). Inside this block it
    sees them all, at the points the memory model places them: with the copies
    instantaneous, the allocator's peak of an offloaded step is what memopt's estimate
    says for it, except where pending writes set the peak (the estimate holds a value
    until its modelled write ends). Not for training: the step waits for every copy.
    Not reentrant across threads: open it on the thread that runs the steps."""
    for store in _stores():
        store._worker.stop(timeout=60.0)
    try:
        with synchronous_jobs():
            yield
    finally:
        for store in _stores():
            store._worker.flush()  # the discards queued since the last call


def _stores() -> list[OffloadStore]:
    with _REGISTRY_LOCK:
        return list(_STORES.values())


def close_all() -> None:
    """Close every store of this process (at interpreter exit; tests)."""
    for store in _stores():
        store.close()


def _forget_after_fork() -> None:
    """In a forked child: the parent's stores, threads and files are not ours (a store
    used in the child is made anew from its id)."""
    global _REGISTRY_LOCK
    _REGISTRY_LOCK = threading.RLock()
    _STORES.clear()
    _HANDLES.clear()


atexit.register(close_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)

