"""Measure the real peak memory of a step, to hold memopt's estimates to account.

    from memopt.testing.measure import measure_peak
    m = measure_peak(lambda: model(x, y).backward())
    m.peak_growth_bytes   # peak live bytes above what was live when the step started

How it works:

* CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated`` minus the
  bytes allocated at the start: exact for allocations through PyTorch's caching
  allocator (the allocator's block rounding included).
* CPU: the PyTorch profiler with ``profile_memory=True`` records every allocation and
  free that goes through c10's CPU allocator, with its size and timestamp, including
  those made inside Inductor-generated C++ code (its buffers come from the same
  allocator). The running sum of those events, in time order, is the live-bytes curve
  of the step relative to its start; its maximum is the peak growth. Memory that does
  not go through c10 (Python objects, oneDNN scratch buffers, allocator slack) is not
  seen; the test suite checks the method against allocations of known sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["PeakMeasurement", "measure_peak"]


@dataclass(frozen=True)
class PeakMeasurement:
    """Peak and final live bytes of one call, relative to the bytes live at its start."""

    peak_growth_bytes: int
    end_growth_bytes: int
    device: str
    method: str
    events: int = 0


def measure_peak(step_fn: Callable[[], Any], device: str | torch.device = "cpu") -> PeakMeasurement:
    """Run ``step_fn()`` once and measure its peak memory growth on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return _measure_cuda(step_fn, device)
    if device.type != "cpu":
        raise ValueError(
            f"measure_peak supports 'cpu' and 'cuda' devices, got {device}; "
            f"measure on one of those (meta tensors allocate nothing)."
        )
    return _measure_cpu(step_fn)


def _measure_cuda(step_fn: Callable[[], Any], device: torch.device) -> PeakMeasurement:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    step_fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - start
    end = torch.cuda.memory_allocated(device) - start
    return PeakMeasurement(peak, end, str(device), "torch.cuda.max_memory_allocated")


def _measure_cpu(step_fn: Callable[[], Any]) -> PeakMeasurement:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step_fn()
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e[0])
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return PeakMeasurement(peak, live, "cpu", "torch.profiler memory events", len(events))
