"""Offload stores: where offloaded saved activations wait between forward and backward.

A store moves a tensor out (`OffloadStore.offload`, which returns a token) and brings
it back (`OffloadStore.reload_start`, then `OffloadStore.reload_wait`). Two kinds:

* ``disk`` (`memopt.runtime.disk_store.DiskStore`): raw bytes in files of a private
  directory, written and read on a background I/O thread;
* ``host`` (`memopt.runtime.host_store.HostStore`): accelerator tensors copied to
  pinned host memory on a side stream.

This module holds what they share: the life of a handle, tokens and their finalizers,
statistics, and the process-wide table of live handles. Beside it: the background
thread (`memopt.runtime.io_worker`); the registry of stores by id (`register_store`,
`get_store`), clean-up at exit and after ``fork``, and `synchronous_io`
(`memopt.runtime.store_registry`); the operations the compiled graphs call, by store
id and token (`memopt.runtime.offload_ops`); transfer bandwidths (`bandwidth`, in
`memopt.runtime.store_bandwidth`).

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
sees only the step's thread) and for debugging, never for speed. Stores honour it
here (`synchronous_jobs`, process-wide); the registry's `synchronous_io` opens it
after ending the threads of the stores it holds.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from memopt.errors import MemoptOffloadError
from memopt.runtime.io_worker import IOWorker
from memopt.units import format_bytes

__all__ = ["DEFAULT_MAX_PENDING", "OffloadStore", "StoreStats", "synchronous_jobs"]

log = logging.getLogger("memopt.offload")

DEFAULT_MAX_PENDING = 4
"""Transfers a store lets run ahead of the step before `OffloadStore.offload` blocks."""


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


_HANDLE_IDS = itertools.count(1)
_HANDLES: dict[int, OffloadStore] = {}

_synchronous_depth = 0
"""How many `synchronous_io` blocks are open (process-wide)."""


@contextlib.contextmanager
def synchronous_jobs() -> Iterator[None]:
    """While the block runs, no store starts its I/O thread, and each runs the jobs
    queued so far on the calling thread within ``offload``, ``reload_start`` and
    ``reload_wait``. The mode of `synchronous_io`, which ends the registered stores'
    threads before it opens this block and flushes them after. Process-wide."""
    global _synchronous_depth
    _synchronous_depth += 1
    try:
        yield
    finally:
        _synchronous_depth -= 1


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
        self._worker = IOWorker(f"memopt-offload-{self.target}")
        self._error: MemoptOffloadError | None = None
        # run at the end of `close`: the registry's, which takes the store out of it
        self._on_close: Callable[[OffloadStore], None] | None = None
        self._counts = dict.fromkeys(
            ("offloads", "reloads", "bytes_written", "bytes_read", "resident_bytes",
             "peak_resident_bytes", "pending_bytes", "peak_pending_bytes", "files"), 0)

    # -- what subclasses provide -------------------------------------------------

    @property
    def location(self) -> str:
        raise NotImplementedError

    @property
    def lost(self) -> bool:
        """Whether the store's place is gone from under it (a disk store's directory
        removed by someone else): nothing can be written there again."""
        return False

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
        if self._on_close is not None:
            self._on_close(self)

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
