"""Cost model of holding saved values somewhere else between forward and backward.

A saved value is needed twice: by its forward readers and, much later, by backward.
In between (its *window*) it can be stored compressed (``compress_activations``) or
moved to host memory or disk (``offload``). This module says, for each saved storage
of a step, what that would save and cost, without rewriting anything:

* the timeline indices during which only the stored form is resident: a compressed
  value from its last forward reader to just before its first backward reader; an
  offloaded value from the point its write has finished (the compute after its last
  reader that the write hides under, at the target's write bandwidth) to the point
  its reload must start for the read to finish before the first backward reader
  (prefetch; the start of backward at the earliest);
* the modelled step time added: a compression's two kernels (each storage read and
  written once to compress and once to restore, at the device's bandwidth, plus two
  launches); an offload's launches plus the part of the read that no compute hides,
  plus, where the copies run on the cores the step computes on (a CPU step using
  every core: `Bandwidth.copy_bytes_per_s`), their CPU time, which nothing hides.

Candidates are modelled one value at a time. The transfers of the values a plan
offloads share one link (one I/O thread per store, first in first out), so
`share_link` re-times a chosen set together: writes queue in the order values become
ready, so a value waits for the writes before its own and stays resident longer;
reads are issued in order of first use as late as the link allows (each must finish
before its first use and before the next read starts), no earlier than the start of
backward nor before the writes are done, and the part no compute hides is charged.
Not modelled: ``offload`` blocking while a store has ``max_pending`` writes queued
(the model keeps the values resident instead of stalling forward).

`with_stored` turns a choice of candidates into the timeline the rewritten graphs
would have, so a planner can judge peaks by the model and leave exact rewrites for
the final check.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from memopt.analysis.aliasing import concrete_int
from memopt.analysis.compressible import (
    SavedStorage,
    choose_formats,
    last_forward_reader,
    saved_storages,
    stored_bytes,
)
from memopt.analysis.cost import copies_share_compute_cores, device_model, node_cost
from memopt.analysis.timeline import LiveInterval, MemoryTimeline, finish_timeline
from memopt.graph import meta
from memopt.graph.step import StepGraphs

__all__ = [
    "StorageCandidate", "Bandwidth", "bandwidth_for", "storage_candidates", "storage_key", "with_stored", "share_link", "MIN_OFFLOAD_BYTES",
]

MIN_OFFLOAD_BYTES = 1 << 20
"""Smaller saved values are not offloaded: a transfer's fixed cost (a file, a copy
launch) outweighs the bytes."""


@dataclass(frozen=True)
class Bandwidth:
    """Bytes per second to (write) and from (read) an offload target."""

    write: float
    read: float
    copy_bytes_per_s: float | None = None
    """Where the transfers' copies run on the cores the step computes on
    (`memopt.analysis.cost.copies_share_compute_cores`): the rate at which those cores
    move a value out and back in; each offload then adds ``nbytes / copy_bytes_per_s``
    to the step, hidden by nothing. None: the copies run beside the compute."""

    def copy_seconds(self, nbytes: int) -> float:
        """The step time an offload of ``nbytes`` spends copying on the step's cores."""
        return 0.0 if self.copy_bytes_per_s is None else nbytes / self.copy_bytes_per_s


def bandwidth_for(device: torch.device, write: float, read: float, copy_bytes_per_s: float | None = None) -> Bandwidth:
    """The planner's `Bandwidth` for a step on ``device`` with a target's ``write`` and
    ``read`` rates: the copies' CPU cost is charged where they share the step's cores,
    at ``copy_bytes_per_s`` (measured, `memopt.runtime.measure_copy_rate`) or, when it
    is None, the device model's figure (`DeviceModel.spill_copy_bytes_per_s`)."""
    if not copies_share_compute_cores(device):
        return Bandwidth(write, read)
    return Bandwidth(write, read, copy_bytes_per_s or device_model(device).spill_copy_bytes_per_s)


@dataclass(frozen=True)
class StorageCandidate:
    """Storing one saved storage as ``kind`` (``"compress"`` in ``how`` = a format, or
    ``"offload"`` to ``how`` = a target) between timeline indices ``away`` and
    ``back`` (inclusive, region-local), where only ``kept_bytes`` of its
    ``full_bytes`` are resident, at ``seconds`` of modelled step time."""

    group: SavedStorage
    kind: str
    how: str
    full_bytes: int
    kept_bytes: int
    away: int
    back: int
    seconds: float
    transfer_seconds: float = 0.0
    hidden_seconds: float = 0.0
    reload_lead: int = 0
    """Offload: backward compute nodes between the reload's start and the first use."""
    read_seconds: float = 0.0
    """Offload: the read's share of ``transfer_seconds``."""
    copy_seconds: float = 0.0
    """Offload: the copies' CPU time on the step's cores (`Bandwidth.copy_seconds`),
    part of ``seconds``."""
    last: int = -1
    """Offload: timeline index of the last forward reader."""
    first: int = -1
    """Offload: timeline index of the first backward reader."""
    clock: _Clock | None = field(default=None, compare=False, repr=False)
    """Offload: the step's modelled clock (shared by the step's candidates)."""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.group.values)

    @property
    def saved_bytes(self) -> int:
        return self.full_bytes - self.kept_bytes


def storage_candidates(
    step: StepGraphs,
    timeline: MemoryTimeline,
    *,
    compress: str | None = None,
    offload: str | None = None,
    bandwidth: Bandwidth | None = None,
    min_offload_bytes: int = MIN_OFFLOAD_BYTES,
) -> tuple[list[StorageCandidate], Counter[str]]:
    """Every way the options allow to hold ``step``'s saved storages elsewhere (at most
    one compression and one offload per storage), judged on ``timeline`` (the step's
    own, `memopt.analysis.memory.build_timeline`); and how many storages cannot be
    compressed, per reason."""
    if step.backward is None or (compress is None and offload is None):
        return [], Counter()
    places = _Places(step, timeline)
    out: list[StorageCandidate] = []
    skipped: Counter[str] = Counter()
    if compress is not None:
        chosen, skipped = choose_formats(step, compress)
        out.extend(c for group, fmt in chosen if (c := _compressed(group, fmt, places)) is not None)
    if offload is not None:
        if bandwidth is None:
            raise ValueError("offload candidates need the target's bandwidth")
        for group in saved_storages(step, "raw", min_elements=0):
            if group.eligible and group.nbytes >= min_offload_bytes:
                candidate = _offloaded(group, offload, bandwidth, places)
                if candidate is not None:
                    out.append(candidate)
    return out, skipped


def with_stored(timeline: MemoryTimeline, chosen: Sequence[StorageCandidate]) -> MemoryTimeline:
    """``timeline`` with each chosen storage resident only as its kept bytes in its
    window (the rest of its interval unchanged)."""
    by_key = {storage_key(c.group): c for c in chosen}
    intervals: list[LiveInterval] = []
    for iv in timeline.intervals:
        c = by_key.get((iv.node, iv.output_index)) if iv.saved_for_backward else None
        if c is None:
            intervals.append(iv)
            continue
        intervals.append(dataclasses.replace(iv, end=c.away - 1))
        if c.kept_bytes:
            intervals.append(dataclasses.replace(iv, nbytes=c.kept_bytes, start=c.away, end=c.back))
        intervals.append(dataclasses.replace(iv, start=c.back + 1))
    result = finish_timeline(timeline.points, intervals, timeline.device)
    result.input_saved_until = timeline.input_saved_until
    result.output_saved_until = timeline.output_saved_until
    return result


@dataclass(frozen=True)
class _Clock:
    """Modelled start time of every timeline index (``starts[i]``; ``starts[-1]`` is the
    end of the step) and the index where backward starts."""

    starts: tuple[float, ...]
    backward: int
    overhead: float

    def index_at(self, t: float, lo: int, hi: int) -> int:
        """The last index in ``lo..hi`` that starts at or before ``t`` (``lo`` if none)."""
        i = bisect.bisect_right(self.starts, t, lo, hi + 1) - 1
        return max(i, lo)

    def index_after(self, t: float, lo: int, hi: int) -> int:
        """The first index in ``lo..hi`` that starts at or after ``t`` (``hi`` if none)."""
        return min(bisect.bisect_left(self.starts, t, lo, hi + 1), hi)


class _Places:
    """Timeline positions and modelled seconds of the step's compute nodes."""

    def __init__(self, step: StepGraphs, timeline: MemoryTimeline) -> None:
        assert step.backward is not None
        device = device_model(timeline.device)
        self.device = device
        fw = [n for n in step.forward.graph.nodes if n.op not in ("placeholder", "output")]
        bw = [n for n in step.backward.graph.nodes if n.op not in ("placeholder", "output")]
        self.n_fw = len(fw)
        self.index = {n: i for i, n in enumerate(fw)} | {n: len(fw) + i for i, n in enumerate(bw)}
        self.seconds = [node_cost(n, device).seconds for n in fw + bw]
        self.clock = _Clock(tuple(itertools.accumulate(self.seconds, initial=0.0)), self.n_fw, device.op_overhead_s)
        self.bw_of = dict(step.saved_pairs())
        self.intervals = {
            (iv.node, iv.output_index): iv
            for iv in timeline.intervals
            if iv.saved_for_backward and iv.region == step.region
        }

    def window(self, group: SavedStorage) -> tuple[LiveInterval, int, int] | None:
        """The storage's interval, its last forward reader's index and its first
        backward reader's index (None when the model cannot place it)."""
        if group.storage is None or group.base is None:
            return None
        iv = self.intervals.get(storage_key(group))
        last = self.index.get(last_forward_reader(group))
        readers = [self.index[u] for v in group.values for u in self.bw_of[v].users if u in self.index]
        if iv is None or last is None or not readers:
            return None
        return iv, last, min(readers)


def storage_key(group: SavedStorage) -> tuple[object, int]:
    """The (producer, output index) a storage's `LiveInterval` has."""
    assert group.storage is not None
    return group.storage.producer, group.storage.index


def _compressed(group: SavedStorage, fmt: str, places: _Places) -> StorageCandidate | None:
    found = places.window(group)
    if found is None:
        return None
    iv, last, first = found
    numel = concrete_int(meta.tensor_value(group.base).numel())  # type: ignore[union-attr]
    kept = stored_bytes(fmt, numel)
    if first - last < 2 or kept >= iv.nbytes:
        return None
    moved = 2 * (group.nbytes + kept)
    seconds = moved / places.device.bytes_per_s + 2 * places.device.op_overhead_s
    return StorageCandidate(group, "compress", fmt, iv.nbytes, kept, last + 1, first - 1, seconds)


def _offloaded(group: SavedStorage, target: str, bandwidth: Bandwidth, places: _Places) -> StorageCandidate | None:
    found = places.window(group)
    if found is None:
        return None
    iv, last, first = found
    write_s, read_s = group.nbytes / bandwidth.write, group.nbytes / bandwidth.read
    away, spent = last + 1, 0.0
    while away < first and spent < write_s:  # the write finishes under this compute
        spent += places.seconds[away]
        away += 1
    back, hidden = first - 1, 0.0
    while back >= max(away, places.n_fw) and hidden < read_s:  # the read starts this early
        hidden += places.seconds[back]
        back -= 1
    if back < away:
        return None  # no point of the window is free of the value
    exposed = max(0.0, read_s - hidden)
    copy_s = bandwidth.copy_seconds(group.nbytes)
    seconds = exposed + 2 * places.device.op_overhead_s + copy_s
    return StorageCandidate(
        group, "offload", target, iv.nbytes, 0, away, back, seconds,
        transfer_seconds=write_s + read_s, hidden_seconds=min(hidden, read_s) + write_s, reload_lead=first - 1 - back,
        read_seconds=read_s, copy_seconds=copy_s, last=last, first=first, clock=places.clock,
    )  # fmt: skip


def share_link(chosen: Sequence[StorageCandidate]) -> tuple[list[StorageCandidate], list[StorageCandidate]]:
    """``chosen`` with its offloads re-timed on one shared link (module docstring):
    each offload's window, prefetch distance and modelled seconds as the queue makes
    them. Returns the candidates kept, in order, and the offloads dropped because the
    queue leaves no point of their window free of them. Compressions pass unchanged."""
    offloads = [c for c in chosen if c.kind == "offload" and c.clock is not None]
    if not offloads:
        return list(chosen), []
    clock = offloads[0].clock
    assert clock is not None and all(c.clock is clock for c in offloads), "one step's candidates at a time"
    away, link_free = _queued_writes(offloads, clock)
    reads = _queued_reads(offloads, away, link_free, clock)
    kept, dropped = [], []
    for c in chosen:
        key = storage_key(c.group)
        if c.kind != "offload" or c.clock is None:
            kept.append(c)
        elif key not in reads:
            dropped.append(c)
        else:
            start, stall = reads[key]
            kept.append(dataclasses.replace(
                c, away=away[key], back=start - 1, seconds=stall + 2 * clock.overhead + c.copy_seconds,
                hidden_seconds=c.transfer_seconds - stall, reload_lead=c.first - start,
            ))  # fmt: skip
    return kept, dropped


def _queued_writes(offloads: list[StorageCandidate], clock: _Clock) -> tuple[dict[tuple[object, int], int], float]:
    """Each value's first index free of it when the writes queue in the order the
    values become ready; and when the link finishes the last write."""
    link, away = 0.0, {}
    for c in sorted(offloads, key=lambda c: (c.last, c.first)):
        link = max(clock.starts[c.last + 1], link) + c.transfer_seconds - c.read_seconds
        away[storage_key(c.group)] = clock.index_after(link, c.last + 1, c.first)
    return away, link


def _queued_reads(
    offloads: list[StorageCandidate], away: dict[tuple[object, int], int], link_free: float, clock: _Clock
) -> dict[tuple[object, int], tuple[int, float]]:
    """Each value's reload start index and the stall its read causes: reads placed as
    late as the link allows in order of first use (each done before its first use and
    before the next read starts), then run first in first out, after the writes.
    Values whose window the writes leave empty are left out."""
    deadline, placed = float("inf"), []
    for c in sorted(offloads, key=lambda c: (c.first, c.last), reverse=True):
        lo = max(away[storage_key(c.group)] + 1, clock.backward)
        if lo <= c.first:
            deadline = min(clock.starts[c.first], deadline) - c.read_seconds
            placed.append((clock.index_at(deadline, lo, c.first), c))
    out: dict[tuple[object, int], tuple[int, float]] = {}
    link, stalls = link_free, []  # (index, seconds): compute waits before that index
    for start, c in sorted(placed, key=lambda p: (p[0], p[1].first)):
        link = max(clock.starts[start] + sum(s for i, s in stalls if i <= start), link) + c.read_seconds
        stall = max(0.0, link - clock.starts[c.first] - sum(s for i, s in stalls if i <= c.first))
        stalls.append((c.first, stall))
        out[storage_key(c.group)] = (start, stall)
    return out
