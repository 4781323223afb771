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

A storage is known by `storage_key` (its producer and output index), never by its
`Storage` object: the compression and offload candidates come from separate analyses
of the graphs, each with its own objects for the same storage (compared by identity,
no storage matched: without a budget every offload was also compressed and the
compression's action overwrote it, so ``compress_activations`` with ``offload``
offloaded nothing).

The offloads chosen share one link (`memopt.analysis.storage_cost.share_link`): after
every round they are re-timed together (a write waits for the writes queued before
it, a read for the reads before it), which can lengthen a window's edges, expose a
read, or leave a value no time away (it is dropped and not taken again). Without a
budget, an offload the shared link exposes is dropped, the most exposed first, until
every one left hides.

With a budget and both techniques enabled, the rounds run three times: over every
candidate, over the offloads only and over the compressions only (the order by
seconds per byte ranks each candidate alone, and the shared link can make the mixed
choice dearer than one technique), and the plan that fits at the least modelled time
is kept (none fits: the smallest peak). In the mixed run, a chosen offload whose
shared-link time exceeds its storage's compression is swapped for it when that keeps
the peak. A run that ends above the budget keeps its round with the smallest peak.

The peak is judged by ``place`` (the region's timeline in its step, when the step has
other regions: `memopt.plan.step_context`). The passes then carry the actions out
and the exact timeline of their graphs is the final check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from memopt.analysis.storage_cost import (
    Bandwidth,
    StorageCandidate,
    share_link,
    storage_candidates,
    storage_key,
    with_stored,
)
from memopt.analysis.timeline import MemoryTimeline
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
    pools = [candidates]
    kinds = sorted({c.kind for c in candidates})
    if len(kinds) > 1:
        pools += [[c for c in candidates if c.kind == k] for k in kinds]
    runs = [_rounds(pool, timeline, judge, budget) for pool in pools]
    best = min(runs, key=lambda r: (r.peak > budget, r.seconds if r.peak <= budget else r.peak))
    return StoragePlan(best.chosen, best.timeline, best.seconds, best.rounds, dict(skipped))


@dataclass
class _Run:
    chosen: list[StorageCandidate]
    timeline: MemoryTimeline
    peak: int
    rounds: int

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.chosen)


def _rounds(candidates: list[StorageCandidate], timeline: MemoryTimeline, judge: Place, budget: int) -> _Run:
    """The rounds of the module docstring over ``candidates``."""
    chosen: list[StorageCandidate] = []
    taken: set[tuple[object, int]] = set()  # storages chosen once (a dropped offload is not taken again)
    judged = judge(timeline)
    run = best = _Run([], timeline, judged.peak_bytes, 0)
    while run.peak > budget and run.rounds < len(candidates):
        resident = _resident_at_peak(judged)
        fresh = sorted(
            (c for c in candidates if storage_key(c.group) not in taken and storage_key(c.group) in resident),
            key=lambda c: (c.seconds / max(c.saved_bytes, 1), -c.saved_bytes),
        )
        if not fresh:
            break
        excess = run.peak - budget
        for c in fresh:
            if storage_key(c.group) in taken:
                continue  # its other candidate was just taken
            chosen.append(c)
            taken.add(storage_key(c.group))
            excess -= c.saved_bytes
            if excess <= 0:
                break
        chosen, _ = share_link(chosen)
        modelled = with_stored(timeline, chosen)
        judged = judge(modelled)
        run = _Run(chosen, modelled, judged.peak_bytes, run.rounds + 1)
        best = run if run.peak < best.peak else best
    if run.peak > budget and best.peak < run.peak:
        return best
    return _swap_exposed(run, candidates, timeline, judge, budget)


def _swap_exposed(run: _Run, candidates: list[StorageCandidate], timeline: MemoryTimeline, judge: Place, budget: int) -> _Run:
    """``run`` with chosen offloads swapped for their storages' compressions, the
    dearest first, while a swap lowers the modelled time and keeps the peak within
    ``max(budget, run's peak)``."""
    compress = {storage_key(c.group): c for c in candidates if c.kind == "compress"}
    limit = max(budget, run.peak)
    swapped = True
    while swapped:
        swapped = False
        dear = sorted((c for c in run.chosen if c.kind == "offload"), key=lambda c: -c.seconds)
        for c in dear:
            alternative = compress.get(storage_key(c.group))
            if alternative is None or alternative.seconds >= c.seconds:
                continue
            trial, _ = share_link([alternative if x is c else x for x in run.chosen])
            modelled = with_stored(timeline, trial)
            peak = judge(modelled).peak_bytes
            if peak <= limit and sum(x.seconds for x in trial) < run.seconds:
                run, swapped = _Run(trial, modelled, peak, run.rounds), True
                break
    return run


def _every(candidates: list[StorageCandidate]) -> list[StorageCandidate]:
    """Without a budget: offload what hides fully on the shared link, compress the rest."""
    offloads = [c for c in candidates if c.kind == "offload" and c.hidden_seconds >= c.transfer_seconds]
    while True:
        chosen, dropped = share_link(offloads)
        exposed = [c for c in chosen if c.kind == "offload" and c.hidden_seconds < c.transfer_seconds]
        if not exposed and not dropped:
            break
        gone = {storage_key(c.group) for c in dropped}
        if exposed:
            gone.add(storage_key(max(exposed, key=lambda c: c.transfer_seconds - c.hidden_seconds).group))
        offloads = [c for c in offloads if storage_key(c.group) not in gone]
    taken = {storage_key(c.group) for c in chosen}
    chosen += [c for c in candidates if c.kind == "compress" and storage_key(c.group) not in taken]
    return chosen


def _resident_at_peak(timeline: MemoryTimeline) -> set[tuple[object, int]]:
    """(producer, output index) of the saved storages resident at the peak."""
    return {
        (iv.node, iv.output_index)
        for iv in timeline.intervals
        if iv.saved_for_backward and iv.live_at(timeline.peak_index)
    }
