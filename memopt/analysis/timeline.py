"""The memory timeline's types: what `memopt.analysis.memory.build_timeline` produces
and what composing, storage modelling and the planner's reports read.

A `MemoryTimeline` is the step's executed nodes in order (`TimelinePoint`), the live
interval of every storage on them (`LiveInterval`: its category, bytes, first and last
timeline index), and the figures they add up to: the baseline (what is live when the step
starts, intervals starting at `BEFORE`), the live bytes at each point, the peak and the
bytes left at the end (`finish_timeline`).
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from memopt.analysis.aliasing import concrete_int
from memopt.graph import meta

__all__ = [
    "BEFORE",
    "CATEGORIES",
    "OPTIMIZER_GRAPH",
    "LiveInterval",
    "TimelinePoint",
    "MemoryTimeline",
    "finish_timeline",
]

CATEGORIES = (
    "parameters",
    "buffers",
    "inputs",
    "gathered_parameters",
    "saved_activations",
    "gradients",
    "optimizer_state",
    "outputs",
    "temporaries",
)
OPTIMIZER_GRAPH = "optimizer"
"""`TimelinePoint.graph` of the separate ``opt.step()`` after backward."""
BEFORE = -1  # interval start for values live before the step


@dataclass
class LiveInterval:
    """One storage's lifetime: live at timeline indices ``start..end`` inclusive
    (``start == BEFORE``: live when the step starts; ``end is None``: live after)."""

    graph: str
    node: fx.Node
    category: str
    nbytes: int
    start: int
    end: int | None
    workspace: bool = False
    """True for scratch memory inside one op's kernel (see analysis/workspace.py)."""
    region: str = ""
    identity: int | None = None
    """For step inputs: id() of the user's tensor, so inputs shared by several regions
    (parameters across a graph break) are counted once."""
    output_index: int = 0
    """Which of ``node``'s outputs the storage is (ops like ``native_layer_norm`` make
    several)."""
    saved: bool = False
    """Kept from forward for backward where the category does not say so (a gathered
    parameter the plan keeps); read `saved_for_backward`."""

    @property
    def saved_for_backward(self) -> bool:
        """A value forward keeps for backward: a saved activation or a kept gathered
        parameter (what remat, offload and compression may act on)."""
        return self.saved or self.category == "saved_activations"

    @property
    def value_node(self) -> fx.Node:
        """The node that names this storage's value: ``node`` itself, or for one output
        of a multi-output op (``native_dropout``, ``native_layer_norm``) the
        ``getitem`` that takes it out (the name the dumped graphs and a planned
        region's decisions use), when the graph has one."""
        if isinstance(meta.fake_value(self.node), (tuple, list)):
            for user in self.node.users:
                if user.target is operator.getitem and user.args[1] == self.output_index:
                    return user
        return self.node

    @property
    def name(self) -> str:
        return f"{self.graph}:{self.value_node.name}"

    def live_at(self, index: int) -> bool:
        return self.start <= index and (self.end is None or index <= self.end)

    def to_dict(self) -> dict[str, Any]:
        value = meta.tensor_value(self.value_node)
        loc = meta.source_location(self.node)
        return {
            "name": self.name,
            "region": self.region,
            "category": self.category,
            "bytes": self.nbytes,
            "start": self.start,
            "end": self.end,
            "workspace": self.workspace,
            "shape": None if value is None else [concrete_int(s) for s in value.shape],
            "dtype": None if value is None else str(value.dtype).replace("torch.", ""),
            "source": None if loc is None else loc.to_dict(),
        }


@dataclass(frozen=True)
class TimelinePoint:
    """One executed node and the bytes live while it runs."""

    graph: str
    node: str
    live_bytes: int
    region: str = ""


@dataclass
class MemoryTimeline:
    """Live bytes across the step, the intervals behind them, and the peak."""

    points: list[TimelinePoint]
    intervals: list[LiveInterval]
    device: torch.device
    baseline_bytes: int = 0
    peak_bytes: int = 0
    peak_index: int = 0
    end_bytes: int = 0
    input_saved_until: dict[fx.Node, int] = field(default_factory=dict)
    """Forward placeholders saved for backward -> last timeline index using them."""
    output_saved_until: dict[fx.Node, int] = field(default_factory=dict)
    """Producers of user outputs the region also saves for its own backward -> last
    timeline index using them (the interval itself lives past the step)."""

    def live_at(self, index: int) -> list[LiveInterval]:
        return [iv for iv in self.intervals if iv.live_at(index)]

    def breakdown_at(self, index: int) -> dict[str, int]:
        """Live bytes by category at timeline index ``index``."""
        out = dict.fromkeys(CATEGORIES, 0)
        for iv in self.live_at(index):
            out[iv.category] += iv.nbytes
        return out

    @property
    def peak_breakdown(self) -> dict[str, int]:
        return self.breakdown_at(self.peak_index)

    @property
    def peak_growth_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes

    def saved_activations(self) -> list[LiveInterval]:
        """Saved-for-backward storages (gathered parameters kept for backward too),
        largest first."""
        saved = [iv for iv in self.intervals if iv.saved_for_backward]
        return sorted(saved, key=lambda iv: -iv.nbytes)

    def by_category(self, category: str) -> list[LiveInterval]:
        return [iv for iv in self.intervals if iv.category == category]


def finish_timeline(points: list[TimelinePoint], intervals: list[LiveInterval], device: torch.device) -> MemoryTimeline:
    """The timeline of ``intervals`` over ``points``: live bytes at each point, the
    baseline, the peak and the bytes left at the end."""
    n = len(points)
    delta = [0] * (n + 1)
    baseline = 0
    for iv in intervals:
        if iv.start == BEFORE:
            baseline += iv.nbytes
            continue
        start = min(iv.start, n)  # a value made after the last op never overlaps one
        delta[start] += iv.nbytes
        if iv.end is not None:
            delta[min(max(iv.end, start - 1), n - 1) + 1] -= iv.nbytes
    live = baseline
    filled = []
    for i, p in enumerate(points):
        live += delta[i]
        filled.append(dataclasses.replace(p, live_bytes=live))
    peak_index = max(range(n), key=lambda i: filled[i].live_bytes) if n else 0
    peak = filled[peak_index].live_bytes if n else baseline
    end = baseline + sum(iv.nbytes for iv in intervals if iv.start != BEFORE and iv.end is None)
    return MemoryTimeline(filled, intervals, device, baseline, max(peak, baseline), peak_index, end)
