"""Where each saved value waits for backward: in memory, compressed, or offloaded.

After rematerialization has chosen which values to save, each saved storage can still
be held elsewhere between its last forward reader and its first backward reader
(`memopt.analysis.storage_cost`). This planner decides which, from the cost model
alone (no rewrite):

* without a budget, the options are orders: ``offload`` moves every eligible value
  whose reload the model can hide under backward compute, ``compress_activations``
  compresses every eligible value not offloaded;
* with a budget, only what the peak needs: in rounds, the candidates resident at the
  current (modelled) peak are taken in order of modelled seconds per byte saved,
  until their bytes cover the excess; the peak is then judged again, since it moves
  as values leave. A value never gets two actions.

The peak is judged by ``place`` (the region's timeline in its step, when the step has
other regions: `memopt.plan.step_context`). The passes then carry the actions out
and the exact timeline of their graphs is the final check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from memopt.analysis.memory import MemoryTimeline
from memopt.analysis.storage_cost import Bandwidth, StorageCandidate, storage_candidates, storage_key, with_stored
from memopt.graph.step import StepGraphs
from memopt.plan.decisions import Action, Compress, Offload

__all__ = ["StorageOptions", "StoragePlan", "plan_storage"]

Place = Callable[[MemoryTimeline], MemoryTimeline]


@dataclass(frozen=True)
class StorageOptions:
    """What the planner may do with saved values: compress as ``compress`` (a format),
    offload to ``offload`` (``"host"`` or ``"disk"``) at ``bandwidth``."""

    compress: str | None = None
    offload: str | None = None
    bandwidth: Bandwidth | None = None
    min_offload_bytes: int = 1 << 20

    @property
    def enabled(self) -> bool:
        return self.compress is not None or self.offload is not None


@dataclass
class StoragePlan:
    """The chosen candidates, the modelled timeline (region-local) and seconds."""

    chosen: list[StorageCandidate] = field(default_factory=list)
    timeline: MemoryTimeline | None = None
    seconds: float = 0.0
    rounds: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """Storages compression cannot take, per reason."""

    def actions(self) -> dict[str, Action]:
        """Saved value name -> its action (every value on a chosen storage)."""
        out: dict[str, Action] = {}
        for c in self.chosen:
            action: Action = (
                Compress(c.how) if c.kind == "compress" else Offload(c.how, reload_lead=c.reload_lead)
            )
            out.update(dict.fromkeys(c.names, action))
        return out

    def by_kind(self, kind: str) -> list[StorageCandidate]:
        return [c for c in self.chosen if c.kind == kind]


def plan_storage(
    step: StepGraphs,
    timeline: MemoryTimeline,
    options: StorageOptions,
    budget: int | None,
    place: Place | None = None,
) -> StoragePlan:
    """The storage plan for ``step`` (see module docstring); ``timeline`` is the step's
    own. Never mutates ``step``."""
    candidates, skipped = storage_candidates(
        step, timeline, compress=options.compress, offload=options.offload, bandwidth=options.bandwidth,
        min_offload_bytes=options.min_offload_bytes,
    )  # fmt: skip
    judge = place or (lambda t: t)
    if budget is None:
        chosen = _every(candidates)
        return StoragePlan(chosen, with_stored(timeline, chosen), sum(c.seconds for c in chosen), 0, dict(skipped))
    chosen, rounds = [], 0
    modelled = timeline
    judged = judge(modelled)
    while judged.peak_bytes > budget and rounds < len(candidates):
        taken = {c.group.storage for c in chosen}
        resident = _resident_at_peak(judged)
        fresh = sorted(
            (c for c in candidates if c.group.storage not in taken and storage_key(c.group) in resident),
            key=lambda c: (c.seconds / max(c.saved_bytes, 1), -c.saved_bytes),
        )
        if not fresh:
            break
        excess = judged.peak_bytes - budget
        for c in fresh:
            if c.group.storage in taken:
                continue  # its other candidate was just taken
            chosen.append(c)
            taken.add(c.group.storage)
            excess -= c.saved_bytes
            if excess <= 0:
                break
        rounds += 1
        modelled = with_stored(timeline, chosen)
        judged = judge(modelled)
    return StoragePlan(chosen, modelled, sum(c.seconds for c in chosen), rounds, dict(skipped))


def _every(candidates: list[StorageCandidate]) -> list[StorageCandidate]:
    """Without a budget: offload what hides fully, compress the rest."""
    chosen = [c for c in candidates if c.kind == "offload" and c.hidden_seconds >= c.transfer_seconds]
    taken = {c.group.storage for c in chosen}
    chosen += [c for c in candidates if c.kind == "compress" and c.group.storage not in taken]
    return chosen


def _resident_at_peak(timeline: MemoryTimeline) -> set[tuple[object, int]]:
    """(producer, output index) of the saved storages resident at the peak."""
    return {
        (iv.node, iv.output_index)
        for iv in timeline.intervals
        if iv.category == "saved_activations" and iv.live_at(timeline.peak_index)
    }
