"""Export a `MemoryTimeline` in PyTorch's memory-snapshot format.

``torch.cuda.memory._snapshot()`` returns ``{"segments": [...], "device_traces":
[[event, ...]]}``; torch's visualizer (https://pytorch.org/memory_viz, and
``torch.cuda._memory_viz``) reads that. memopt writes its compile-time estimate in the
same shape: one trace event per allocation and free on the timeline, in timeline
order, with the producing node and the user's source line as the stack frames, so
the visualizer's "Active Memory Timeline" shows the estimated step. Addresses are
synthetic (a bump pointer); values live before the step are allocated first.
"""

from __future__ import annotations

from typing import Any

from memopt.analysis.timeline import BEFORE, LiveInterval, MemoryTimeline
from memopt.graph import meta

__all__ = ["timeline_to_snapshot"]


def _frames(iv: LiveInterval) -> list[dict[str, Any]]:
    frames = [{"filename": f"memopt:{iv.graph}", "line": 0, "name": f"{iv.value_node.name} [{iv.category}]"}]
    loc = meta.source_location(iv.node)
    if loc is not None:
        frames.append({"filename": loc.filename, "line": loc.lineno, "name": loc.function})
    return frames


def timeline_to_snapshot(timeline: MemoryTimeline) -> dict[str, Any]:
    """The estimated timeline as a memory snapshot dict (see module docstring)."""
    intervals = [iv for iv in timeline.intervals if iv.nbytes > 0]
    addr: dict[int, int] = {}
    next_addr = 0
    for i, iv in enumerate(intervals):
        addr[i] = next_addr
        next_addr += iv.nbytes
    starts: dict[int, list[int]] = {}
    ends: dict[int, list[int]] = {}
    for i, iv in enumerate(intervals):
        starts.setdefault(iv.start, []).append(i)
        if iv.end is not None:
            ends.setdefault(max(iv.end, iv.start), []).append(i)
    trace: list[dict[str, Any]] = []

    def event(action: str, i: int, time: int) -> None:
        iv = intervals[i]
        trace.append(
            {
                "action": action,
                "addr": addr[i],
                "size": iv.nbytes,
                "stream": 0,
                "frames": _frames(iv),
                "time_us": time,
                "category": iv.category,
            }
        )

    for index in [BEFORE, *range(len(timeline.points))]:
        for i in starts.get(index, []):
            event("alloc", i, index + 1)
        for i in ends.get(index, []):
            event("free_requested", i, index + 1)
            event("free_completed", i, index + 1)
    live_at_end = [i for i, iv in enumerate(intervals) if iv.end is None]
    blocks = [
        {"address": addr[i], "size": intervals[i].nbytes, "requested_size": intervals[i].nbytes,
         "state": "active_allocated", "frames": _frames(intervals[i])}
        for i in live_at_end
    ]
    segment = {
        "device": 0,
        "address": 0,
        "total_size": next_addr,
        "allocated_size": sum(b["size"] for b in blocks),
        "active_size": sum(b["size"] for b in blocks),
        "requested_size": sum(b["size"] for b in blocks),
        "stream": 0,
        "segment_type": "large",
        "blocks": blocks,
    }
    return {"segments": [segment], "device_traces": [trace]}
