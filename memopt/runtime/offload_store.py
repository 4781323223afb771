"""Offload stores: where offloaded saved activations wait between forward and backward.

A store moves a tensor out (`OffloadStore.offload`, which returns a token) and brings
it back (`OffloadStore.reload_start`, then `OffloadStore.reload_wait`). Two kinds:

* ``disk`` (`memopt.runtime.disk_store.DiskStore`): raw bytes in files of a private
  directory, written and read on a background I/O thread;
* ``host`` (`memopt.runtime.host_store.HostStore`): accelerator tensors copied to
  pinned host memory on a side stream.

This module holds what they share: the life of a handle, tokens and their finalizers,
statistics, the registry of stores by id (`register_store`, `get_store`), clean-up at
exit and after ``fork``, and transfer bandwidths (`bandwidth`).

Handles and tokens. Every offload makes a fresh handle id (a process-wide counter) and
a fresh token, a CPU int64 scalar tensor holding it, so two forwards before one
backward (gradient accumulation) never share a handle. ``reload_start`` makes a second
token for the same handle. A handle ends when ``reload_wait`` hands its value back, or
when all its tokens are gone (the autograd graph that saved the token was freed
without running backward, or backward raised): the store then discards it (file
deleted, memory released). Token deaths are noticed with ``weakref.finalize``: torch
keeps a tensor's Python object alive as long as its C++ tensor lives, so the finalizer
runs when the saved token dies wherever it is held. A finalizer only enqueues work on
the store's thread (it may run inside garbage collection, on any thread).

A handle is brought back once: its file or buffer is released as it is read, so a
second backward through the same graph (``retain_graph=True``) raises a
`MemoptOffloadError` saying so.

Errors of the background thread (a full disk) are raised in the calling thread, at the
next operation of the store, as `MemoptOffloadError`.

`synchronous_io` runs every store's copies on the calling thread instead, at the moment
each is asked for: for measuring a step with the allocator's view (torch's profiler
sees only the step's thread) and for debugging, never for speed.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import json
import logging
import math
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from memopt.errors import MemoptOffloadError
from memopt.units import format_bytes

__all__ = [
    "TARGETS",
    "OffloadStore",
    "StoreStats",
    "register_store",
    "resolve_offload_dir",
    "get_store",
    "close_all",
    "synchronous_io",
    "offload",
    "reload_start",
    "reload_wait",
    "measure_bandwidth",
    "measure_copy_rate",
    "bandwidth",
]

log = logging.getLogger("memopt.offload")

TARGETS = ("disk", "host")
"""Where a store keeps offloaded values."""

DEFAULT_MAX_PENDING = 4
"""Transfers a store lets run ahead of the step before `OffloadStore.offload` blocks."""

DEFAULT_PROBE_BYTES = 32 * 2**20
"""Bytes moved each way by `measure_bandwidth`."""


@dataclass(frozen=True)
class StoreStats:
    """A snapshot of one store's traffic and footprint, for the report."""

    store_id: str
    target: str
    location: str
    """The store's directory, or ``"pinned host memory"``."""
    offloads: int
    reloads: int
    bytes_written: int
    """Bytes whose move to the target completed."""
    bytes_read: int
    """Bytes handed back by ``reload_wait``."""
    resident_bytes: int
    """Bytes held on the target now (files on disk, pinned buffers)."""
    peak_resident_bytes: int
    pending_bytes: int
    """Bytes of values whose move to the target is under way: the source tensors the
    store holds until then (a disk store holds a CUDA value's pinned copy instead,
    once the device-to-host copy is done)."""
    peak_pending_bytes: int
    handles: int
    """Handles alive: offloaded, neither brought back nor discarded."""
    files: int
    """Files on disk now (0 for host stores)."""


@dataclass(eq=False)
class _Entry:
    """One handle: an offloaded value from ``offload`` until it is reloaded or discarded."""

    hid: int
    name: str
    size: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    nbytes: int
    source: torch.Tensor | None = None
    """The value, held until its move to the target completes."""
    tokens: int = 1
    read_started: bool = False
    resident: bool = False
    """Whether the value's bytes are on the target (counted in ``resident_bytes``)."""
    result: torch.Tensor | None = None
    error: MemoptOffloadError | None = None
    loaded: threading.Event = field(default_factory=threading.Event)
    slot: Any = None
    """The store's own record: a file path, a pinned buffer."""
    event: Any = None
    """The event that ends the reload's copy (host stores)."""

    @property
    def numel(self) -> int:
        return math.prod(self.size)


class _Worker:
    """One daemon thread that runs submitted jobs in order. ``submit`` may be called
    from a finalizer (`queue.SimpleQueue.put` is reentrant)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], None]) -> None:
        self._queue.put(job)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                job()
            except Exception:  # jobs report their own errors; this is a bug in one
                log.exception("memopt offload: a background job failed")
            del job

    def _run_inline(self) -> None:
        """Run what is queued on this thread (the worker is gone: exit, fork)."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job()

    def flush(self) -> None:
        """Wait until every job submitted so far has run."""
        if not self.alive():
            self._run_inline()
            return
        done = threading.Event()
        self.submit(done.set)
        while not done.wait(0.5):
            if not self.alive():
                self._run_inline()
                return

    def stop(self, timeout: float) -> None:
        """Finish the queued jobs and end the thread (waiting at most ``timeout`` s)."""
        if self.alive():
            self._queue.put(None)
            assert self._thread is not None
            self._thread.join(timeout)
        else:
            self._run_inline()


_HANDLE_IDS = itertools.count(1)
_HANDLES: dict[int, OffloadStore] = {}


class OffloadStore:
    """What every store does; subclasses move the bytes (the ``_begin_*``, ``_finish_reload``
    and ``_discard`` hooks, run as documented on each)."""

    target: ClassVar[str]

    def __init__(self, store_id: str, *, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self.store_id = store_id
        self.max_pending = max_pending
        self._owner_pid = os.getpid()
        self._closed = False
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}
        self._slots = threading.BoundedSemaphore(max_pending)
        self._worker = _Worker(f"memopt-offload-{self.target}")
        self._error: MemoptOffloadError | None = None
        self._counts = dict.fromkeys(
            ("offloads", "reloads", "bytes_written", "bytes_read", "resident_bytes",
             "peak_resident_bytes", "pending_bytes", "peak_pending_bytes", "files"), 0)

    # -- what subclasses provide -------------------------------------------------

    @property
    def location(self) -> str:
        raise NotImplementedError

    def _check_value(self, value: torch.Tensor) -> None:
        """Raise if this store cannot take ``value`` (main thread)."""

    def _begin_offload(self, entry: _Entry) -> None:
        """Start moving ``entry.source`` out (main thread); once moved, call
        `_write_done` (any thread)."""
        raise NotImplementedError

    def _begin_reload(self, entry: _Entry) -> None:
        """Start bringing ``entry`` back (main thread); set ``entry.result`` or
        ``entry.error``, then ``entry.loaded`` (any thread)."""
        raise NotImplementedError

    def _finish_reload(self, entry: _Entry) -> torch.Tensor:
        """``entry.result`` made ready for the calling stream (main thread)."""
        assert entry.result is not None
        return entry.result

    def _discard(self, entry: _Entry) -> None:
        """Release whatever ``entry`` still holds (worker thread, after its other jobs)."""
        raise NotImplementedError

    def preflight(self, nbytes: int) -> None:
        """Raise `MemoptOffloadError` if this store cannot hold ``nbytes`` at once (the
        most the plan offloads per step). Called at compile time."""
        raise NotImplementedError

    def measure(self, nbytes: int, device: torch.device) -> tuple[float, float]:
        """``(write, read)`` bytes per second, moving ``nbytes`` each way."""
        raise NotImplementedError

    def measure_copies(self, nbytes: int) -> float | None:
        """Bytes per second of CPU time a host core spends moving a value of ``nbytes``
        out and back in (one offload's work on the store's I/O thread), or None where
        no host core does the copying (a copy engine does)."""
        return None

    # -- the three operations (main thread) ---------------------------------------

    def offload(self, value: torch.Tensor, name: str = "") -> torch.Tensor:
        """Start moving ``value`` out; return its token. Blocks while ``max_pending``
        moves are under way. A non-contiguous ``value`` is stored as its contiguous
        copy (made here), and comes back contiguous."""
        self._raise_pending_error()
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            raise TypeError(f"memopt offload takes a strided tensor, got {type(value).__name__}")
        self._check_value(value)
        source = value.detach().resolve_conj().resolve_neg().contiguous()
        hid = next(_HANDLE_IDS)
        entry = _Entry(hid, name or f"handle {hid}", tuple(value.shape), value.dtype,
                       value.device, source.numel() * source.element_size(), source=source)
        if not _synchronous_depth:
            self._worker.start()
        self._acquire_slot()
        with self._lock:
            self._entries[hid] = entry
            self._count("offloads", 1)
            self._count("pending_bytes", entry.nbytes)
        _HANDLES[hid] = self
        try:
            self._begin_offload(entry)
        except BaseException:
            with self._lock:
                entry.source = None
                self._count("pending_bytes", -entry.nbytes)
            self._forget(entry)
            self._slots.release()
            raise
        log.debug("offload %s: %s %s (%s) to %s", entry.name, entry.dtype, list(entry.size),
                  format_bytes(entry.nbytes), self.location)
        self._run_if_synchronous()
        return self._token(hid)

    def reload_start(self, hid: int) -> torch.Tensor:
        """Start bringing handle ``hid`` back; return a second token for it."""
        self._raise_pending_error()
        with self._lock:
            entry = self._entry(hid)
            entry.tokens += 1
            start = not entry.read_started
            entry.read_started = True
        if start:
            self._begin_reload(entry)
        self._run_if_synchronous()
        return self._token(hid)

    def reload_wait(self, hid: int, size: list[int], dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
        """The value of handle ``hid`` (contiguous), after which the handle is gone."""
        with self._lock:
            entry = self._entry(hid)
            _check_metadata(entry, size, dtype, device)
            start = not entry.read_started
            entry.read_started = True
        if start:
            self._begin_reload(entry)
        self._run_if_synchronous()
        while not entry.loaded.wait(0.5):
            if not self._worker.alive():
                self._worker.flush()
        if entry.error is not None:
            if self._error is entry.error:
                self._error = None
            self._forget(entry)
            raise entry.error
        self._raise_pending_error()
        value = self._finish_reload(entry)
        with self._lock:
            entry.result = None
            self._count("reloads", 1)
            self._count("bytes_read", entry.nbytes)
        self._forget(entry)
        log.debug("reload %s: %s back from %s", entry.name, format_bytes(entry.nbytes), self.location)
        return value.view(entry.size)

    # -- bookkeeping ---------------------------------------------------------------

    def flush(self) -> None:
        """Wait until the background work submitted so far (writes, reads, discards of
        dead handles) is done. For tests and measurements; the step never needs it."""
        self._worker.flush()

    def stats(self) -> StoreStats:
        with self._lock:
            counts = dict(self._counts)
            handles = len(self._entries)
        return StoreStats(store_id=self.store_id, target=self.target, location=self.location,
                          handles=handles, **counts)

    def reset_peaks(self) -> None:
        """Start the peak figures of `stats` from the current footprint."""
        with self._lock:
            self._counts["peak_resident_bytes"] = self._counts["resident_bytes"]
            self._counts["peak_pending_bytes"] = self._counts["pending_bytes"]

    def close(self) -> None:
        """Discard every handle and release the store's resources; idempotent. Stores
        close at interpreter exit; a closed store is taken out of the registry, and
        `get_store` makes a new one for its id."""
        if self._closed or os.getpid() != self._owner_pid:
            return
        self._closed = True
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            self._worker.submit(functools.partial(self._discard_entry, entry))
        self._worker.stop(timeout=10.0)
        self._close_resources()
        _forget_store(self)

    def _close_resources(self) -> None:
        """Release what the store holds beyond its handles (its directory)."""

    def _count(self, key: str, delta: int) -> None:
        """Add ``delta`` to a counter and follow its peak (caller holds the lock)."""
        self._counts[key] += delta
        peak = "peak_" + key
        if peak in self._counts:
            self._counts[peak] = max(self._counts[peak], self._counts[key])

    def _write_done(self, entry: _Entry, error: MemoptOffloadError | None = None) -> None:
        """The move of ``entry`` out ended (any thread): drop the source and free a slot."""
        with self._lock:
            entry.source = None
            self._count("pending_bytes", -entry.nbytes)
            if error is None:
                entry.resident = True
                self._count("resident_bytes", entry.nbytes)
                self._count("bytes_written", entry.nbytes)
            else:
                entry.error = self._error = error
        self._slots.release()

    def _release_resident(self, entry: _Entry) -> bool:
        """Uncount ``entry``'s bytes on the target, once; whether they were counted."""
        with self._lock:
            was = entry.resident
            if was:
                entry.resident = False
                self._count("resident_bytes", -entry.nbytes)
        return was

    def _entry(self, hid: int) -> _Entry:
        entry = self._entries.get(hid)
        if entry is None:
            raise MemoptOffloadError(_unknown_handle(hid))
        return entry

    def _forget(self, entry: _Entry) -> None:
        with self._lock:
            self._entries.pop(entry.hid, None)
        _HANDLES.pop(entry.hid, None)

    def _run_if_synchronous(self) -> None:
        """Under `synchronous_io`: run the jobs queued so far here (the store holds no
        lock at the callers)."""
        if _synchronous_depth:
            self._worker.flush()

    def _acquire_slot(self) -> None:
        while not self._slots.acquire(timeout=0.5):
            if not self._worker.alive():
                self._worker.flush()
            self._raise_pending_error()

    def _raise_pending_error(self) -> None:
        if self._closed:
            raise MemoptOffloadError(f"offload store {self.store_id!r} is closed")
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _token(self, hid: int) -> torch.Tensor:
        token = torch.full((), hid, dtype=torch.int64)
        weakref.finalize(token, self._token_died, hid).atexit = False
        return token

    def _token_died(self, hid: int) -> None:
        """A token of ``hid`` was freed (finalizer: only enqueue)."""
        if not self._closed and os.getpid() == self._owner_pid:
            self._worker.submit(functools.partial(self._drop_token, hid))

    def _drop_token(self, hid: int) -> None:
        with self._lock:
            entry = self._entries.get(hid)
            if entry is None:
                return
            entry.tokens -= 1
            if entry.tokens > 0:
                return
        self._discard_entry(entry)

    def _discard_entry(self, entry: _Entry) -> None:
        self._forget(entry)
        self._discard(entry)
        log.debug("discard %s: its tokens are gone, it was not reloaded", entry.name)


def _check_metadata(entry: _Entry, size: list[int], dtype: torch.dtype, device: torch.device) -> None:
    """Raise if ``reload_wait``'s arguments do not describe the offloaded value."""
    where = torch.device(device)
    given = (tuple(int(s) for s in size), dtype, where)
    stored = (entry.size, entry.dtype, entry.device)
    same_device = where.type == entry.device.type and (
        where.index is None or entry.device.index is None or where.index == entry.device.index)
    if given[:2] != stored[:2] or not same_device:
        raise MemoptOffloadError(
            f"reload_wait of {entry.name} asks for size/dtype/device {given}, but "
            f"{stored} was offloaded: the offload pass passed the wrong metadata"
        )


def _unknown_handle(hid: int) -> str:
    return (
        f"offload handle {hid} is unknown: it was already reloaded or discarded. An "
        "offloaded value is brought back once: backward through the same graph a second "
        "time (retain_graph=True) is not supported with offload"
    )


# -- the registry of stores ---------------------------------------------------------

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
    same store. Raises `MemoptOffloadError` now, at compile time, if the store cannot
    work: a ``disk`` directory that cannot be created, is not private or is unwritable;
    a ``host`` store for a graph on the CPU (whose values already live in host memory).

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
    get_store(store_id)
    return store_id


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
        return store


def _make_store(store_id: str) -> OffloadStore:
    target, options = _parse_store_id(store_id)
    if target == "disk":
        from memopt.runtime.disk_store import DiskStore

        return DiskStore(store_id, **options)
    from memopt.runtime.host_store import HostStore

    return HostStore(store_id, **options)


def _forget_store(store: OffloadStore) -> None:
    with _REGISTRY_LOCK:
        if _STORES.get(store.store_id) is store:
            del _STORES[store.store_id]


_synchronous_depth = 0
"""How many `synchronous_io` blocks are open (process-wide)."""


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
    global _synchronous_depth
    for store in _stores():
        store._worker.stop(timeout=60.0)
    _synchronous_depth += 1
    try:
        yield
    finally:
        _synchronous_depth -= 1
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


# -- the operations, by store id and token ------------------------------------------


def _handle_of(token: torch.Tensor) -> int:
    if not (isinstance(token, torch.Tensor) and token.dtype == torch.int64 and token.dim() == 0
            and token.device.type == "cpu"):
        raise TypeError("an offload token is a CPU int64 scalar tensor made by memopt::offload")
    return int(token.item())


def _owner(hid: int) -> OffloadStore:
    store = _HANDLES.get(hid)
    if store is None:
        raise MemoptOffloadError(_unknown_handle(hid))
    return store


def offload(value: torch.Tensor, store_id: str, name: str = "") -> torch.Tensor:
    """Start moving ``value`` to store ``store_id``; its token."""
    return get_store(store_id).offload(value, name)


def reload_start(token: torch.Tensor) -> torch.Tensor:
    """Start bringing back the value of ``token``; a second token for it."""
    hid = _handle_of(token)
    return _owner(hid).reload_start(hid)


def reload_wait(token: torch.Tensor, size: list[int], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """The value of ``token`` (either token of its handle), contiguous."""
    hid = _handle_of(token)
    return _owner(hid).reload_wait(hid, size, dtype, device)


# -- bandwidth ------------------------------------------------------------------------

_BANDWIDTHS: dict[tuple[str, str, str | None], tuple[float, float]] = {}


def measure_bandwidth(target: str, device: torch.device | str,
                      nbytes: int = DEFAULT_PROBE_BYTES, *,
                      offload_dir: str | os.PathLike[str] | None = None) -> tuple[float, float]:
    """``(write, read)`` bytes per second of ``target`` for tensors on ``device``,
    measured once per process (by moving ``nbytes`` each way: well under a second at
    the default 32 MiB) and cached. Disk: written with ``fsync`` and read back after
    dropping the file from the page cache, so both figures are the disk's own.
    Host: pinned copies device->host and host->device."""
    where = torch.device(device)
    root = resolve_offload_dir(offload_dir)
    key = (target, str(where), root)
    if key not in _BANDWIDTHS:
        store = get_store(register_store(target, root, device=where))
        write, read = store.measure(nbytes, where)
        log.info("offload bandwidth to %s (%s): write %s/s, read %s/s", store.location, where,
                 format_bytes(write), format_bytes(read))
        _BANDWIDTHS[key] = (write, read)
    return _BANDWIDTHS[key]


_COPY_RATES: dict[tuple[str, str | None], float | None] = {}


def measure_copy_rate(target: str, device: torch.device | str,
                      nbytes: int = DEFAULT_PROBE_BYTES, *,
                      offload_dir: str | os.PathLike[str] | None = None) -> float | None:
    """`OffloadStore.measure_copies` of ``target``'s store for ``device``, measured
    once per process (``nbytes`` out and back, four times: about 150 ms here at the
    default 32 MiB) and cached; None where a copy engine does the copying."""
    where = torch.device(device)
    root = resolve_offload_dir(offload_dir)
    key = (target, root)
    if key not in _COPY_RATES:
        store = get_store(register_store(target, root, device=where))
        rate = store.measure_copies(nbytes)
        if rate is not None:
            log.info("offload copies to %s: %s/s of CPU time, out and back", store.location, format_bytes(rate))
        _COPY_RATES[key] = rate
    return _COPY_RATES[key]


def bandwidth(target: str, device: torch.device | str,
              given: float | tuple[float, float] | None = None, *,
              offload_dir: str | os.PathLike[str] | None = None) -> tuple[float, float]:
    """``(write, read)`` bytes per second for the planner: ``given`` when set (one
    figure for both directions, or a pair), else `measure_bandwidth`'s."""
    if given is None:
        return measure_bandwidth(target, device, offload_dir=offload_dir)
    pair = (given, given) if isinstance(given, (int, float)) else tuple(given)
    if len(pair) != 2 or not all(isinstance(b, (int, float)) and b > 0 for b in pair):
        raise ValueError(f"offload bandwidth must be a positive number of bytes/s or a "
                         f"(write, read) pair of them, got {given!r}")
    return float(pair[0]), float(pair[1])
