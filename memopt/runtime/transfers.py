"""`CudaTransfers`: the stream and event operations the offload stores make on CUDA.

Both stores move accelerator tensors through pinned host memory: `HostStore` keeps
them there, `DiskStore` writes them on to a file. The rules, for every copy:

* **Device to host** (`CudaTransfers.copy_async`): the copy runs on a side stream of
  the *tensor's* device (one per device, made on first use), which first waits for
  that device's current stream, so it reads the value only after the kernels queued
  to produce it. An event recorded on the side stream after the copy marks its end.
  The source is not handed to ``record_stream``: the store keeps it referenced until
  it has seen that event complete, and only then drops it, so the caching allocator
  never hands its block to another tensor while the copy may still read it.
* **Host to device** into memory allocated on the current stream: `copy_async` too
  (the side stream waits for the current stream first, since the block may have been
  freed by kernels still queued there); the consumer then makes its stream wait on
  the event (`CudaTransfers.wait_on_current`) before it reads the value.
* **Host to device on the current stream** (`CudaTransfers.to_device`): a
  non-blocking copy queued on the current stream of the target device, ordered before
  everything queued there afterwards. The pinned source may be dropped at once: torch's
  pinned-memory allocator records an event for a non-blocking copy and reuses the
  block only after it completes.
* Events the store's background thread waits on (`CudaTransfers.synchronize`) are
  made with ``blocking=True`` (``cudaEventBlockingSync``): that thread sleeps until
  the copy ends instead of spinning a core the step's own thread may need.

Everything goes through one object so that the ordering can be tested with a fake on
a machine without an accelerator (``tests/runtime/test_offload_transfers.py``).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["CudaTransfers"]


class CudaTransfers:
    """The stream and event operations the offload stores need, on CUDA (module
    docstring). Making one touches no device: streams are made on first use."""

    def __init__(self) -> None:
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}

    def supports(self, device: torch.device) -> bool:
        """Whether tensors on ``device`` move through these operations (CUDA ones)."""
        return device.type == "cuda"

    def host_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A pinned host buffer (from torch's caching pinned-memory allocator)."""
        return torch.empty(numel, dtype=dtype, pin_memory=True)

    def device_empty(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor on ``device``, allocated on that device's current stream."""
        return torch.empty(numel, dtype=dtype, device=device)

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._side_streams:
            self._side_streams[device] = torch.cuda.Stream(device=device)
        return self._side_streams[device]

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, device: torch.device) -> Any:
        """Copy ``src`` into ``dst`` on ``device``'s side stream, after the work queued
        so far on ``device``'s current stream; the event that marks the copy's end.
        Preconditions: one of ``dst``/``src`` is on ``device``, the other pinned; both
        stay referenced by the caller until the event completes."""
        side = self._side_stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event(blocking=True)
            event.record(side)
        return event

    def to_device(self, src: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``src`` (pinned host memory) copied to a new tensor on ``device``, queued on
        ``device``'s current stream (work queued there later sees the value)."""
        return src.to(device, non_blocking=True)

    def wait_on_current(self, event: Any, device: torch.device) -> None:
        """Make ``device``'s current stream wait for ``event`` (the host does not)."""
        torch.cuda.current_stream(device).wait_event(event)

    def synchronize(self, event: Any) -> None:
        """Block the calling thread until ``event`` completes."""
        event.synchronize()
