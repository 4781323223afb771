"""``HostStore``: accelerator tensors offloaded to pinned host memory.

Offload: a pinned host buffer is allocated, a side stream (one per device) waits for
the offloading stream, and the device->host copy runs on the side stream, followed by
an event. The store keeps the source tensor referenced until that event completes
(its background thread waits on it), then drops it, which is when the device memory
is freed. No ``record_stream``: the source is allocated on the compute stream and is
only freed after the side stream is done with it.

Reload (``reload_start``): the device tensor is allocated on the current (compute)
stream, the side stream waits for the compute stream (the memory may have just been
freed by its kernels), the host->device copy runs on the side stream, followed by an
event. ``reload_wait`` makes the current stream wait on that event, without blocking
the host. The pinned buffer is dropped once the copy's event completes.

The stream and event calls go through `CudaTransfers` (`memopt.runtime.transfers`,
which states the ordering rules), so the logic can be tested with a fake on a machine
without an accelerator.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch

from memopt.errors import MemoptOffloadError
from memopt.runtime.offload_store import DEFAULT_MAX_PENDING, OffloadStore, _Entry
from memopt.runtime.transfers import CudaTransfers
from memopt.units import format_bytes

__all__ = ["HostStore", "CudaTransfers"]


class HostStore(OffloadStore):
    """Accelerator tensors in pinned host memory (module docstring)."""

    target = "host"

    def __init__(self, store_id: str, *, max_pending: int = DEFAULT_MAX_PENDING,
                 transfers: CudaTransfers | None = None) -> None:
        if transfers is None and not torch.cuda.is_available():
            raise MemoptOffloadError(
                "offload target 'host' needs an accelerator (CUDA), and this machine has "
                "none: use the 'disk' target"
            )
        super().__init__(store_id, max_pending=max_pending)
        self.transfers = transfers if transfers is not None else CudaTransfers()

    @property
    def location(self) -> str:
        return "pinned host memory"

    def _check_value(self, value: torch.Tensor) -> None:
        if not self.transfers.supports(value.device):
            raise MemoptOffloadError(
                f"offload target 'host' takes accelerator tensors; got one on {value.device}, "
                "whose memory is already host memory: use the 'disk' target"
            )

    def preflight(self, nbytes: int) -> None:
        self._raise_pending_error()
        available = _host_memory_available()
        if available is not None and available < nbytes:
            raise MemoptOffloadError(
                f"host memory has {format_bytes(available)} available; the plan offloads up "
                f"to {format_bytes(nbytes)} per step to pinned host memory: free memory, "
                "offload less (a larger memory_budget), or use the 'disk' target"
            )

    def _begin_offload(self, entry: _Entry) -> None:
        assert entry.source is not None
        host = self.transfers.host_empty(entry.numel, entry.dtype)
        event = self.transfers.copy_async(host, entry.source.reshape(-1), entry.device)
        entry.slot = host
        self._worker.submit(functools.partial(self._offloaded, entry, event))

    def _offloaded(self, entry: _Entry, event: Any) -> None:
        """Worker: once the device->host copy is done, drop the source."""
        error = None
        try:
            self.transfers.synchronize(event)
        except Exception as exc:
            error = MemoptOffloadError(f"copying offloaded value {entry.name} to host failed: {exc!r}")
        self._write_done(entry, error)

    def _begin_reload(self, entry: _Entry) -> None:
        if entry.error is None:
            out = self.transfers.device_empty(entry.numel, entry.dtype, entry.device)
            event = self.transfers.copy_async(out, entry.slot, entry.device)
            entry.result, entry.event = out, event
            self._worker.submit(functools.partial(self._reloaded, entry, event))
        entry.loaded.set()

    def _reloaded(self, entry: _Entry, event: Any) -> None:
        """Worker: once the host->device copy is done, drop the pinned buffer."""
        self.transfers.synchronize(event)
        entry.slot = None
        self._release_resident(entry)

    def _finish_reload(self, entry: _Entry) -> torch.Tensor:
        assert entry.result is not None
        self.transfers.wait_on_current(entry.event, entry.device)
        return entry.result

    def _discard(self, entry: _Entry) -> None:
        entry.result = entry.slot = None
        self._release_resident(entry)

    def measure(self, nbytes: int, device: torch.device) -> tuple[float, float]:
        """Pinned copy throughput device->host (write) and host->device (read)."""
        numel = max(int(nbytes), 1)
        host = self.transfers.host_empty(numel, torch.uint8)
        dev = self.transfers.device_empty(numel, torch.uint8, device)
        self.transfers.synchronize(self.transfers.copy_async(host, dev, device))  # warm up
        times = []
        for dst, src in ((host, dev), (dev, host)):
            start = time.perf_counter()
            self.transfers.synchronize(self.transfers.copy_async(dst, src, device))
            times.append(time.perf_counter() - start)
        return numel / max(times[0], 1e-9), numel / max(times[1], 1e-9)


def _host_memory_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes, or None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
