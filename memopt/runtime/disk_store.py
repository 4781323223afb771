"""``DiskStore``: offloaded values as raw bytes in files of a private directory.

The directory. Each store makes its own, ``memopt-offload-<pid>-<random>``, under
``offload_dir`` (default: the system's temporary directory), with ``mkdir`` mode 0700,
and holds an exclusive ``flock`` on a ``.lock`` file in it while it lives. A directory
given as ``offload_dir`` is created 0700 if missing, and refused if another user owns
it or group/others can write it, unless it is sticky and owned by root or this user
(a shared temporary directory such as /tmp or /dev/shm, like the default). Clean-up:
files are deleted as they are read back, or when their handle is discarded; the
directory at interpreter exit; and a new store removes sibling directories of this
user whose owner is gone (their lock is free, or, for one still being made, its pid is
dead), so a killed process leaves nothing for long.

The files. ``<handle>.bin`` created with ``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600,
holding the tensor's bytes as they are in memory (written through a ``uint8`` view, so
every dtype works: bfloat16, bool, float8) and nothing else: no pickle, so nothing read
back can run code. Size, dtype and shape stay in memory. Reading checks the file size
and fills a preallocated tensor with ``readinto``.

The I/O thread. Writes and reads run on the store's background thread, in submission
order. The store holds the source tensor until its write completes, then drops it;
``max_pending`` writes may be queued before ``offload`` blocks, which bounds the memory
held by pending writes.

A CUDA value goes through pinned host memory (`memopt.runtime.transfers`): ``offload``
queues its device->host copy on a side stream of the value's device, after the work
queued so far on that device's current stream (the kernels that produce it), and hands
the pinned buffer to the I/O thread with the copy's event. The thread waits for the
event, drops the device tensor (its memory is free once copied, before the file is
written), then writes the pinned buffer. The copy neither reads unfinished data nor
queues behind the compute stream's later kernels (a copy made on the I/O thread, on
that thread's default stream, did both: it waited for everything queued on the
legacy default stream and held back every kernel queued after it). Reading back: the
I/O thread fills a pinned buffer; ``reload_wait`` queues its host->device copy on the
current stream. Other accelerators are copied to host memory in ``offload`` itself,
synchronously.

A failed write (a full disk) deletes its partial file and raises `MemoptOffloadError`
in the calling thread, at the store's next operation.
"""

from __future__ import annotations

import errno
import functools
import os
import secrets
import shutil
import stat
import statistics
import tempfile
import time
from typing import Any

import torch

from memopt.errors import MemoptOffloadError
from memopt.runtime.offload_store import (
    DEFAULT_MAX_PENDING,
    OffloadStore,
    _Entry,
    log,
)
from memopt.runtime.transfers import CudaTransfers
from memopt.units import format_bytes

try:
    import fcntl
except ImportError:  # not POSIX: no locks, and no sweeping of other processes' directories
    fcntl = None  # type: ignore[assignment]

__all__ = ["DiskStore", "DIR_PREFIX", "write_file", "read_file"]

DIR_PREFIX = "memopt-offload-"
_STAGING = ".new"
_LOCK_NAME = ".lock"
_O = lambda name: getattr(os, name, 0)  # noqa: E731  - flags some platforms lack
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O("O_CLOEXEC") | _O("O_NOFOLLOW") | _O("O_BINARY")
_READ_FLAGS = os.O_RDONLY | _O("O_CLOEXEC") | _O("O_NOFOLLOW") | _O("O_BINARY")


# -- raw bytes ----------------------------------------------------------------------------


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of contiguous CPU ``tensor``, as a flat memoryview sharing its memory."""
    flat = tensor.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def write_file(path: str, tensor: torch.Tensor, *, sync: bool = False) -> None:
    """Write the bytes of contiguous CPU ``tensor`` to the new file ``path`` (mode
    0600; an existing file or link is an error). A failure deletes the partial file."""
    fd = os.open(path, _WRITE_FLAGS, 0o600)
    try:
        with open(fd, "wb", buffering=0) as f:
            view = _bytes_of(tensor)
            while view:
                view = view[f.write(view):]
            if sync:
                os.fsync(f.fileno())
    except BaseException:
        _unlink(path)
        raise


def read_file(path: str, out: torch.Tensor) -> None:
    """Fill contiguous CPU ``out`` with the bytes of ``path``, whose size must match."""
    view = _bytes_of(out)
    with open(os.open(path, _READ_FLAGS), "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size != len(view):
            raise OSError(errno.EIO, f"holds {size} bytes, {len(view)} expected", path)
        while view:
            n = f.readinto(view)
            if not n:
                raise OSError(errno.EIO, "ended early", path)
            view = view[n:]


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


# -- the directory --------------------------------------------------------------------------


def _check_root(root: str) -> None:
    """Make the user's ``offload_dir`` (0700) if missing; refuse it unless private, or
    a shared temporary directory (`_shared_tmp`: /tmp, /dev/shm, a cluster's scratch)."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise MemoptOffloadError(
            f"offload_dir {root} exists and is not a directory; set offload_dir to a directory "
            "(memopt creates it if missing)"
        )
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
        st = os.stat(root)
    except OSError as exc:
        raise MemoptOffloadError(
            f"offload_dir {root} cannot be created: {exc.strerror}; set offload_dir to a "
            "directory you can write"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise MemoptOffloadError(f"offload_dir {root} is not a directory; set offload_dir to one")
    if _shared_tmp(st):
        return
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise MemoptOffloadError(
            f"offload_dir {root} is owned by uid {st.st_uid}, not by you (uid {os.geteuid()}): "
            "its owner could read or replace the offloaded tensors; set offload_dir to a "
            "directory you own (mkdir -m 700 DIR)"
        )
    if st.st_mode & 0o022:
        raise MemoptOffloadError(
            f"offload_dir {root} is writable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}) without the sticky bit: another user could "
            f"rename the store's directory and put their own in its place; run chmod go-w "
            f"{root} (or chmod +t {root}), or set offload_dir to a private directory"
        )


def _shared_tmp(st: os.stat_result) -> bool:
    """Whether ``st`` is a shared temporary directory, safe for the store as the
    default (the system's temporary directory) is: sticky (only an entry's owner, the
    directory's owner and root may rename or delete it) and owned by root or by this
    user. The store's directory in it is made 0700 by this user, so no other user can
    enter, rename or replace it. (Before, ``offload_dir="/tmp"`` was refused as
    writable by others, with the advice to run ``chmod go-w /tmp``, while the default
    ``offload_dir=None`` used that same /tmp.)"""
    if not hasattr(os, "geteuid") or not st.st_mode & stat.S_ISVTX:
        return False
    return st.st_uid in (0, os.geteuid())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_gone(path: str, name: str) -> bool:
    """Whether the process that made directory ``path`` is gone: its lock can be
    taken, or (a directory still being made, or without a lock) its pid is dead."""
    try:
        pid = int(name[len(DIR_PREFIX):].split("-")[0])
    except ValueError:
        return False
    if name.endswith(_STAGING):
        return not _pid_alive(pid)
    try:
        fd = os.open(os.path.join(path, _LOCK_NAME), _READ_FLAGS)
    except FileNotFoundError:
        return not _pid_alive(pid)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def sweep_stale(root: str) -> list[str]:
    """Remove this user's store directories under ``root`` whose process is gone; the
    paths removed. Only on POSIX (where ownership and locks can be checked)."""
    if fcntl is None or not hasattr(os, "geteuid"):
        return []
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    for entry in entries:
        if not entry.name.startswith(DIR_PREFIX):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and _owner_gone(entry.path, entry.name):
            shutil.rmtree(entry.path, ignore_errors=True)
            log.info("removed %s, left by a memopt process that is gone", entry.path)
            removed.append(entry.path)
    return removed


def _make_private_dir(root: str) -> tuple[str, int | None]:
    """A new directory under ``root`` only this user can enter, locked by this process:
    made under a staging name, locked, then renamed, so a sweeper never sees it
    unlocked. Returns its path and the lock's file descriptor."""
    name = f"{DIR_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    staging, final = os.path.join(root, name + _STAGING), os.path.join(root, name)
    try:
        os.mkdir(staging, 0o700)
    except OSError as exc:
        raise MemoptOffloadError(
            f"cannot create a directory in {root}: {exc.strerror}; set offload_dir to a "
            "directory you can write"
        ) from None
    try:
        st = os.lstat(staging)
        if hasattr(os, "geteuid") and (st.st_uid != os.geteuid() or st.st_mode & 0o077):
            raise MemoptOffloadError(f"{staging} was not created private; set offload_dir elsewhere")
        lock_fd = None
        if fcntl is not None:
            lock_fd = os.open(os.path.join(staging, _LOCK_NAME), _WRITE_FLAGS, 0o600)
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final, lock_fd


# -- the store ------------------------------------------------------------------------------


class DiskStore(OffloadStore):
    """Offloaded values in files of a private directory (module docstring)."""

    target = "disk"

    def __init__(self, store_id: str, offload_dir: str | None = None, *,
                 max_pending: int = DEFAULT_MAX_PENDING, transfers: CudaTransfers | None = None) -> None:
        super().__init__(store_id, max_pending=max_pending)
        self.transfers = transfers if transfers is not None else CudaTransfers()
        self.offload_dir = offload_dir
        self.root = offload_dir if offload_dir is not None else tempfile.gettempdir()
        if offload_dir is not None:
            _check_root(self.root)
        sweep_stale(self.root)
        self.directory, self._lock_fd = _make_private_dir(self.root)
        try:
            self._probe()
        except BaseException:
            self._close_resources()
            raise

    @property
    def location(self) -> str:
        return self.directory

    @property
    def lost(self) -> bool:
        return not os.path.isdir(self.directory)

    def _describe_root(self) -> str:
        if self.offload_dir is not None:
            return f"offload_dir {self.root}"
        return f"the temporary directory {self.root} (offload_dir is not set)"

    def _probe(self) -> None:
        """Raise unless a file can be written in the store's directory."""
        path = os.path.join(self.directory, f"probe-{secrets.token_hex(4)}")
        try:
            write_file(path, torch.zeros(1, dtype=torch.uint8))
            _unlink(path)
        except OSError as exc:
            raise MemoptOffloadError(
                f"{self._describe_root()} is not writable: {exc.strerror}; set offload_dir "
                "to a directory you can write"
            ) from None

    def preflight(self, nbytes: int) -> None:
        self._raise_pending_error()
        self._probe()
        free = shutil.disk_usage(self.directory).free
        if free < nbytes:
            raise MemoptOffloadError(
                f"{self._describe_root()} has {format_bytes(free)} free; the plan offloads "
                f"up to {format_bytes(nbytes)} per step: free space, or set offload_dir to "
                "a directory on a larger disk"
            )

    def _path(self, entry: _Entry) -> str:
        return os.path.join(self.directory, f"{entry.hid}.bin")

    def _begin_offload(self, entry: _Entry) -> None:
        """Queue the write; for a CUDA value, first its copy to pinned host memory
        (module docstring), whose event the I/O thread waits for."""
        assert entry.source is not None
        staged: tuple[torch.Tensor, Any] | None = None
        if self.transfers.supports(entry.device):
            host = self.transfers.host_empty(entry.numel, entry.dtype)
            staged = host, self.transfers.copy_async(host, entry.source.reshape(-1), entry.device)
        elif entry.device.type != "cpu":  # another accelerator: copied here, synchronously
            staged = entry.source.to("cpu"), None
        entry.slot = self._path(entry)
        self._worker.submit(functools.partial(self._write, entry, staged))

    def _write(self, entry: _Entry, staged: tuple[torch.Tensor, Any] | None) -> None:
        """Worker: write ``entry.source`` (or its host copy ``staged``, once the copy's
        event completes) to its file, then drop the source."""
        start = time.perf_counter()
        error = None
        try:
            data = entry.source
            assert data is not None
            if staged is not None:
                data, event = staged
                staged = None
                if event is not None:
                    self.transfers.synchronize(event)
                with self._lock:
                    entry.source = None  # copied: the device memory is free before the write
            write_file(entry.slot, data)
            del data
        except Exception as exc:
            _unlink(entry.slot)
            if isinstance(exc, OSError):
                error = self._io_error("writing", entry, exc)
            else:
                error = MemoptOffloadError(f"writing offloaded value {entry.name} failed: {exc!r}")
        else:
            with self._lock:
                self._count("files", 1)
            log.debug("wrote %s (%s) in %.1f ms", entry.name, format_bytes(entry.nbytes),
                      1e3 * (time.perf_counter() - start))
        finally:
            self._write_done(entry, error)

    def _io_error(self, doing: str, entry: _Entry, exc: OSError) -> MemoptOffloadError:
        """A `MemoptOffloadError` for ``exc`` that holds no frames (no tensors)."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "the disk is full: free space, or set offload_dir to a directory on a larger disk"
        else:
            fix = "check the directory, or set offload_dir to another one"
        error = MemoptOffloadError(
            f"{doing} offloaded value {entry.name} ({format_bytes(entry.nbytes)}) in "
            f"{self.directory} failed: {exc.strerror or exc}; {fix}"
        )
        error.__cause__ = OSError(exc.errno, exc.strerror, exc.filename)
        error.__suppress_context__ = True
        return error

    def _begin_reload(self, entry: _Entry) -> None:
        self._worker.submit(functools.partial(self._read, entry))

    def _read(self, entry: _Entry) -> None:
        """Worker: read ``entry``'s file into a new tensor (pinned for a CUDA value) and
        delete the file."""
        try:
            if entry.error is None:
                if self.transfers.supports(entry.device):
                    out = self.transfers.host_empty(entry.numel, entry.dtype)
                else:
                    out = torch.empty(entry.numel, dtype=entry.dtype)
                read_file(entry.slot, out)
                entry.result = out
        except OSError as exc:
            entry.error = self._io_error("reading", entry, exc)
        finally:
            self._delete(entry)
            entry.loaded.set()

    def _finish_reload(self, entry: _Entry) -> torch.Tensor:
        """The value on its device: a CUDA value's host->device copy is queued on the
        current stream (`CudaTransfers.to_device`)."""
        assert entry.result is not None
        if self.transfers.supports(entry.device):
            return self.transfers.to_device(entry.result, entry.device)
        if entry.device.type != "cpu":
            return entry.result.to(entry.device)
        return entry.result

    def _delete(self, entry: _Entry) -> None:
        """Delete ``entry``'s file, once."""
        if self._release_resident(entry) and _unlink(entry.slot):
            with self._lock:
                self._count("files", -1)

    def _discard(self, entry: _Entry) -> None:
        entry.result = None
        self._delete(entry)

    def _close_resources(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _probe_bytes(self, nbytes: int) -> int:
        """``nbytes``, or a quarter of the space free under the store's directory where
        that is less: a measurement must not fill the disk the plan offloads to (a
        32 MiB probe on an 8 MiB scratch disk failed the region's planning)."""
        free = shutil.disk_usage(self.directory).free
        return max(1, min(int(nbytes), free // 4))

    def _measure_error(self, exc: OSError) -> MemoptOffloadError:
        """A `MemoptOffloadError` for a measurement that could not write or read."""
        return MemoptOffloadError(
            f"measuring the disk under {self._describe_root()} failed: {exc.strerror or exc}; "
            "free space there, set offload_dir to another directory, or give "
            "offload_bandwidth (bytes per second) so that memopt does not measure"
        )

    def measure_copies(self, nbytes: int, rounds: int = 3) -> float:
        """The I/O thread's CPU work per byte: ``nbytes`` written into the page cache (no
        fsync: the disk writes back later, with no core's help) and read back into a
        fresh tensor, its pages faulted in, timed in this thread's CPU seconds. The
        median of ``rounds`` after one unmeasured round (the first touches cold pages).
        ``nbytes`` is capped by `_probe_bytes`; a failed write or read is a
        `MemoptOffloadError` naming the directory and the fix."""
        data = torch.ones(self._probe_bytes(nbytes), dtype=torch.uint8)
        seconds = []
        for _ in range(rounds + 1):
            path = os.path.join(self.directory, f"copies-{secrets.token_hex(4)}")
            try:
                start = time.thread_time()
                write_file(path, data)
                out = torch.empty_like(data)
                read_file(path, out)
                seconds.append(time.thread_time() - start)
            except OSError as exc:
                raise self._measure_error(exc) from None
            finally:
                _unlink(path)
        return data.numel() / max(statistics.median(seconds[1:]), 1e-9)

    def measure(self, nbytes: int, device: torch.device) -> tuple[float, float]:
        """Disk throughput: ``nbytes`` written with fsync, then read back after the file
        is dropped from the page cache (so the read is the disk's, not memory's).
        ``nbytes`` is capped by `_probe_bytes`; a failed write or read is a
        `MemoptOffloadError` naming the directory and the fix."""
        data = torch.ones(self._probe_bytes(nbytes), dtype=torch.uint8)
        path = os.path.join(self.directory, f"bandwidth-{secrets.token_hex(4)}")
        try:
            start = time.perf_counter()
            write_file(path, data, sync=True)
            write_s = time.perf_counter() - start
            if hasattr(os, "posix_fadvise"):
                fd = os.open(path, _READ_FLAGS)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
            start = time.perf_counter()
            read_file(path, data)
            read_s = time.perf_counter() - start
        except OSError as exc:
            raise self._measure_error(exc) from None
        finally:
            _unlink(path)
        return data.numel() / max(write_s, 1e-9), data.numel() / max(read_s, 1e-9)
