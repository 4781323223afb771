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

CPU steps on Linux also get the operating system's view (`memopt.testing.os_memory`):
the growth of the resident set's high-water mark during the step, which does see
Python objects, oneDNN scratch and allocator slack. It is only trustworthy in a
process started with glibc's malloc thresholds fixed (``os_note`` says when it was
not); `measure_in_fresh_process` runs a step in such a process. See docs/memory.md
("The operating system's view") for how many warm-up steps it needs to settle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from memopt.testing.fresh_process import FreshProcessResult, Workload, measure_in_fresh_process
from memopt.testing.os_memory import OsSample, OsViewUnavailable, malloc_env_note, read_status_kib, reset_peak_rss

__all__ = ["FreshProcessResult", "PeakMeasurement", "Workload", "measure_in_fresh_process", "measure_os_growth", "measure_peak"]


@dataclass(frozen=True)
class PeakMeasurement:
    """Peak and final live bytes of one call, relative to the bytes live at its start.

    ``peak_growth_bytes``/``end_growth_bytes`` are the allocator's view (c10 or the
    CUDA caching allocator). ``os_peak_growth_bytes``/``os_end_growth_bytes`` are the
    operating system's (resident set: peak during the call, and at its end, minus the
    resident set at its start); None where the OS gives no such figure, with the reason
    in ``os_note``. A measured OS view with a non-empty ``os_note`` carries a caveat
    (the process's malloc settings let freed memory stay resident)."""

    peak_growth_bytes: int
    end_growth_bytes: int
    device: str
    method: str
    events: int = 0
    os_peak_growth_bytes: int | None = None
    os_end_growth_bytes: int | None = None
    os_note: str = ""
    os_warm_peak_growth_bytes: int | None = None
    """`measure_in_fresh_process` only: the OS view of the same step with glibc's heap
    left as the previous step left it (a training loop's steady state), where
    ``os_peak_growth_bytes`` is measured right after ``malloc_trim(0)`` and so also
    counts every heap page the step's small allocations touch. None elsewhere."""

    @property
    def os_reliable(self) -> bool:
        """The OS view was measured in a process with glibc's malloc thresholds fixed."""
        return self.os_peak_growth_bytes is not None and not self.os_note


def measure_peak(step_fn: Callable[[], Any], device: str | torch.device = "cpu") -> PeakMeasurement:
    """Run ``step_fn()`` once and measure its peak memory growth on ``device``.

    On CPU the allocator view (torch.profiler memory events) sees only allocations and
    frees made on the thread that runs the step: an offload store's I/O thread
    releases what it has written and allocates what it reads back, unseen. Measure an
    offloaded step inside `memopt.runtime.synchronous_io` (the copies made on the
    step's thread, instantaneous: the allocator's view of memopt's plan), or with the
    OS view (``os_peak_growth_bytes``, in a fresh process: `measure_in_fresh_process`)
    for the copies as they run."""
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
    return PeakMeasurement(
        peak, end, str(device), "torch.cuda.max_memory_allocated",
        os_note="the OS view (host resident set) is measured for CPU steps only",
    )


def _measure_cpu(step_fn: Callable[[], Any]) -> PeakMeasurement:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        start = _start_os_view()  # inside the profiler: its start-up is not the step's
        step_fn()
        os_view = _end_os_view(start)  # before the profiler collects its events
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
    return PeakMeasurement(peak, live, "cpu", "torch.profiler memory events", len(events), *os_view)


def measure_os_growth(step_fn: Callable[[], Any]) -> tuple[int | None, int | None, str]:
    """Run ``step_fn()`` once with no profiler and return the OS view of it alone:
    (peak growth, end growth, note) of the resident set, as `PeakMeasurement`'s
    ``os_*`` fields. `measure_peak` reads the OS view inside the profiler, whose event
    records are resident memory of the step too; this leaves them out."""
    start = _start_os_view()
    step_fn()
    return _end_os_view(start)


def _start_os_view() -> OsSample | str:
    """The resident set just after resetting its peak, or why the OS view is unavailable."""
    try:
        return reset_peak_rss()
    except OsViewUnavailable as e:
        return str(e)


def _end_os_view(start: OsSample | str) -> tuple[int | None, int | None, str]:
    """(peak growth, end growth, note) of the resident set since ``start``."""
    if isinstance(start, str):
        return None, None, start
    try:
        end = read_status_kib()
    except OSError as e:
        return None, None, f"cannot read the resident set after the step: {e}"
    return end.hwm - start.rss, end.rss - start.rss, malloc_env_note()


def settled_estimate_and_measure(
    model: Any, loss: Callable[[Any], Any], options: dict[str, Any]
) -> tuple[Any, int]:
    """``model`` compiled with memopt under ``options``: the `memopt.Explanation` recorded
    over two training steps ``loss(compiled).backward()`` (the plan a loop settles on)
    and the peak growth measured on a third, gradients set to None before each."""
    import torch

    import memopt

    compiled = torch.compile(model, backend="memopt", options=options)
    with memopt.record() as explanation:
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            loss(compiled).backward()
    model.zero_grad(set_to_none=True)
    return explanation, measure_peak(lambda: loss(compiled).backward()).peak_growth_bytes
