"""One step's timeline from the timelines of the regions a graph break cut it into.

`compose_timelines` lays the regions' forwards end to end and their backwards in reverse
order, counts shared step inputs (parameters) once, and decides how long each value
handed from one region to the next stays live: until the forward ends, until a backward
that saved it last reads it, or through the step when the caller keeps it (observed by
`memopt.backends.steptracker`). Per-region timelines come from
`memopt.analysis.memory.build_timeline`.

`compose_repeated_calls` composes one region with earlier calls of itself whose
backwards have not started (two forwards of one model before one backward: a DPO or
contrastive loss), each holding its saved activations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from typing import NamedTuple

import torch.fx as fx

from memopt.analysis.aliasing import analyze_aliasing
from memopt.analysis.timeline import BEFORE, OPTIMIZER_GRAPH, LiveInterval, MemoryTimeline, TimelinePoint, finish_timeline
from memopt.graph.step import StepGraphs, output_values

__all__ = ["StepCall", "compose_calls", "compose_repeated_calls", "compose_timelines"]


def compose_timelines(
    regions: list[tuple[StepGraphs, MemoryTimeline]],
    kept_outputs: Sequence[Collection[int] | None] | None = None,
    input_sources: Sequence[Mapping[int, tuple[int, int]]] | None = None,
) -> MemoryTimeline:
    """One step timeline from the timelines of regions run in sequence (a graph
    break): forwards in order, then backwards in reverse order.

    Saved values stay live from their region's forward to its backward. Step inputs
    shared by regions (parameters) are counted once. The last region's outputs (the
    loss) stay live after the step. An earlier region's outputs are handed on: held by
    the user's Python code until the forward ends (they are the next region's
    inputs); if a later region, or their own, saves one for backward, it stays live
    until that backward last uses it. Except those the caller keeps:
    ``kept_outputs[i]`` lists the positions of region ``i``'s user outputs (the
    Dynamo graph's outputs) that the caller still held when the region's backward
    started (observed, `memopt.backends.steptracker`; None: not observed, all handed
    on). Those stay live after the step, like the last region's: a Hugging Face
    model's output object holds the logits and the key/value caches the region
    before the loss computed, and the user's ``out = model(**x); out.loss.backward()``
    keeps it through backward.

    ``input_sources[j]`` maps a position of region ``j``'s inputs to the earlier
    region and output position it was (observed, `memopt.backends.steptracker`): an input
    region ``j`` saves for backward that is an output the caller keeps is the kept
    storage, already live through the step, and is not counted again; and an input
    that needs no gradient (an inference step's logits handed to its loss region, a
    mask made before a break) is the earlier region's output, counted there, not a
    step input live from the start: like an activation input, it is live from the
    end of the forward only while region ``j`` saves it for backward. An earlier
    output that several regions save is one storage, counted once: by its producer's
    output when the producer saves it too (live until the producer's backward, after
    every reader's), else by one interval to the last reader's backward.
    """
    if len(regions) == 1:
        return regions[0][1]
    parts = [t for _, t in regions]
    kept = [_kept_producers(step, (kept_outputs or [None] * len(regions))[i]) for i, (step, _) in enumerate(regions)]
    kept_positions = list(kept_outputs or [None] * len(regions))
    sources = list(input_sources or [{}] * len(regions))
    earlier_outputs = {  # inputs an earlier region computed: activations, and those observed so
        ph
        for j, (step, _) in enumerate(regions)
        for pos, ph in enumerate(step.forward.graph.find_nodes(op="placeholder"))
        if step.input_kind(pos) == "activation" or _earlier_output(sources[j].get(pos), j)
    }
    already_live = {  # activation inputs that are outputs the caller keeps
        ph
        for j, (step, _) in enumerate(regions)
        for pos, ph in enumerate(step.forward.graph.find_nodes(op="placeholder"))
        if _kept_source(sources[j].get(pos), kept_positions, j)
    }
    saved_by_producer = _saved_by_producer(regions, sources)
    shared_saves: dict[tuple[int, int], list[tuple[int, fx.Node]]] = {}  # source -> (region, input) saving it
    for j, (step, t) in enumerate(regions):
        for pos, ph in enumerate(step.forward.graph.find_nodes(op="placeholder")):
            source = sources[j].get(pos)
            if ph in t.input_saved_until and (j, ph) not in saved_by_producer and _earlier_output(source, j):
                shared_saves.setdefault(source, []).append((j, ph))  # type: ignore[arg-type]
    # Of the readers that save one earlier output, the first to run its backward (the
    # last in forward order) holds the storage until the last reader's backward is done.
    counted_by_other = {reader for readers in shared_saves.values() for reader in readers[:-1]}
    opt_len = [sum(1 for p in t.points if p.graph == OPTIMIZER_GRAPH) for t in parts]
    fw_len = [sum(1 for p in t.points if p.graph not in ("backward", OPTIMIZER_GRAPH)) for t in parts]
    bw_len = [len(t.points) - f - o for t, f, o in zip(parts, fw_len, opt_len)]
    fw_off = [sum(fw_len[:i]) for i in range(len(parts))]
    total_fw = sum(fw_len)
    bw_off = [total_fw + sum(bw_len[i + 1 :]) for i in range(len(parts))]
    opt_off = [total_fw + sum(bw_len) + sum(opt_len[:i]) for i in range(len(parts))]

    def remap(i: int, local: int) -> int:
        if local < fw_len[i]:
            return fw_off[i] + local
        if local < fw_len[i] + bw_len[i]:
            return bw_off[i] + local - fw_len[i]
        return opt_off[i] + local - fw_len[i] - bw_len[i]  # the separate opt.step(): after every backward

    last_save = {
        readers[-1]: max(remap(k, parts[k].input_saved_until[ph]) for k, ph in readers)
        for readers in shared_saves.values()
    }

    points: list[TimelinePoint] = [p for i, t in enumerate(parts) for p in t.points[: fw_len[i]]]
    for i in reversed(range(len(parts))):
        points.extend(parts[i].points[fw_len[i] : fw_len[i] + bw_len[i]])
    for i in range(len(parts)):
        points.extend(parts[i].points[fw_len[i] + bw_len[i] :])
    intervals: list[LiveInterval] = []
    seen_inputs: set[int] = set()
    end_of_forward = total_fw - 1
    last = len(parts) - 1
    for i, t in enumerate(parts):
        for iv in t.intervals:
            if iv.start == BEFORE:
                if iv.node in earlier_outputs:
                    until = t.input_saved_until.get(iv.node)
                    reader = (i, iv.node)
                    counted = iv.node in already_live or reader in saved_by_producer or reader in counted_by_other
                    if until is not None and not counted:
                        end = last_save.get(reader, remap(i, until))
                        intervals.append(
                            dataclasses.replace(iv, category="saved_activations", start=end_of_forward + 1, end=end)
                        )
                    continue
                if iv.identity is not None:
                    if iv.identity in seen_inputs:
                        continue
                    seen_inputs.add(iv.identity)
                intervals.append(iv)
                continue
            end = None if iv.end is None else remap(i, iv.end)
            if iv.category == "outputs" and i != last and iv.node not in kept[i]:
                until = t.output_saved_until.get(iv.node)
                end = end_of_forward if until is None else max(end_of_forward, remap(i, until))
            intervals.append(dataclasses.replace(iv, start=remap(i, iv.start), end=end))
    return finish_timeline(points, intervals, parts[0].device)


def _earlier_output(source: tuple[int, int] | None, region: int) -> bool:
    """``source`` (region, output position) is an output of a region before ``region``."""
    return source is not None and 0 <= source[0] < region


def _kept_source(source: tuple[int, int] | None, kept: Sequence[Collection[int] | None], region: int) -> bool:
    """``source`` (region, output position) is an earlier region's output the caller keeps."""
    if source is None:
        return False
    producer, position = source
    return 0 <= producer < region and position in (kept[producer] or ())


def _kept_producers(step: StepGraphs, positions: Collection[int] | None) -> set[fx.Node]:
    """Producers of the storages of ``step``'s user outputs at ``positions`` (the user
    outputs follow the mutated inputs AOTAutograd writes back)."""
    if not positions:
        return set()
    aliasing = analyze_aliasing(step.forward.graph)
    outputs = output_values(step.forward)[: step.num_fwd_outputs]
    n_user = step.num_user_outputs if step.num_user_outputs is not None else len(outputs)
    first = max(len(outputs) - n_user, 0)
    users = outputs[first:]
    return {
        s.producer
        for pos in positions
        if 0 <= pos < len(users) and users[pos] is not None
        for s in aliasing.storages_of(users[pos])  # type: ignore[arg-type]
    }


def compose_repeated_calls(
    regions: list[tuple[StepGraphs, MemoryTimeline]],
    pending: int,
    kept_outputs: Sequence[Collection[int] | None] | None = None,
    input_sources: Sequence[Mapping[int, tuple[int, int]]] | None = None,
) -> MemoryTimeline:
    """The timeline of a step that runs its regions (``regions``, in forward order, as
    `compose_timelines` takes them) ``pending + 1`` times before one backward, every
    call under the plan of its timeline: ``loss = f(model(a), model(b))``. The calls'
    forwards in order, then their backwards in reverse order (autograd runs the latest
    call's first), as `compose_timelines` lays out regions.

    Each earlier call (`_earlier_call`) holds its saved activations from its forward to
    its backward, and its outputs as the latest call does (``kept_outputs``; not
    observed: the last region's handed on until the forwards end, the caller combining
    every call's outputs into one loss after the last forward); its batch is its own
    (counted once a call), its parameters are the same ones (counted once). Its
    backward adds its gradients into the ``.grad`` the later calls' backwards made: the
    gradients it returns die when its backward ends. ``pending == 0``:
    `compose_timelines` of ``regions``.

    Precondition: every region is a training region (forward and backward), each
    timeline its own region's, not composed."""
    n = len(regions)
    kept = list(kept_outputs or [None] * n)
    sources = list(input_sources or [{}] * n)
    parts, all_kept, all_sources = [], [], []
    for call in range(pending + 1):
        earlier = call < pending
        parts += [(step, _earlier_call(step, t, pending - call) if earlier else t) for step, t in regions]
        all_kept += kept
        all_sources += [{pos: (r + call * n, out) for pos, (r, out) in s.items()} for s in sources]
    return compose_timelines(parts, all_kept, all_sources)


class StepCall(NamedTuple):
    """One call of a region in a step (`compose_calls`)."""

    region: int
    """Its region's index in the step's regions."""
    same_parameters: bool | None = None
    """None: the region's latest call. Else an earlier call whose backward had not
    started when the latest ran, and whether it ran on the latest call's parameters."""
    sources: Mapping[int, tuple[int, int]] | None = None
    """Its inputs that were an earlier region's outputs (input position -> (region
    index, output position)), observed at this call; None: the region's."""


def compose_calls(
    regions: list[tuple[StepGraphs, MemoryTimeline]],
    calls: Sequence[StepCall],
    kept_outputs: Sequence[Collection[int] | None] | None = None,
    input_sources: Sequence[Mapping[int, tuple[int, int]]] | None = None,
) -> MemoryTimeline:
    """The timeline of a step that ran ``calls``, in forward order, before one backward:
    each region's latest call (`StepCall`; each region has one) and the calls before
    it whose backward had not started then. A region called once per
    layer (its frame called by an eager loop a graph break made Dynamo skip) runs
    ``A, L, L, B`` with other parameters each time: each earlier call holds its saved
    activations and makes its own gradients; a model called again on the same
    parameters (``A, B, A, B``: `compose_repeated_calls`, which this equals then) adds
    its gradients into the later call's. The backwards run in reverse.

    ``kept_outputs`` and ``input_sources`` are per region, as `compose_timelines` takes
    them (observed at the latest calls; a call's own sources, `StepCall.sources`, where
    given); an input's source is the producing region's call that ran last before the
    reader. Precondition: every region's timeline is its
    own, not composed; an earlier call's region is a training region."""
    n = len(regions)
    kept = list(kept_outputs or [None] * n)
    sources = list(input_sources or [{}] * n)
    later = [0] * n  # calls of each region still to come, as the sequence is walked
    for call in calls:
        later[call.region] += 1
    parts, all_kept, all_sources = [], [], []
    ran_at: dict[int, int] = {}  # region -> position of its latest call so far
    for pos, (r, same, own) in enumerate(calls):
        step, timeline = regions[r]
        later[r] -= 1
        if same is not None:
            timeline = _earlier_call(step, timeline, later[r], same_parameters=same)
        parts.append((step, timeline))
        all_kept.append(kept[r])
        read = sources[r] if own is None else own
        all_sources.append({p: (ran_at[src], out) for p, (src, out) in read.items() if src in ran_at})
        ran_at[r] = pos
    return compose_timelines(parts, all_kept, all_sources)


def _earlier_call(
    step: StepGraphs, timeline: MemoryTimeline, call: int, same_parameters: bool = True
) -> MemoryTimeline:
    """``timeline`` as the region's ``call``-th earlier call (`compose_repeated_calls`):
    points and intervals named for the call, its batch counted again, the gradients
    its backward returns dead when that backward ends, and no separate ``opt.step()``
    (the step has one, after every backward: the planned call's). A call on other
    parameters (``same_parameters`` False: another layer) counts everything live at its
    start again (its parameters, buffers, held gradients) and keeps the gradients its
    backward returns, as the latest call does."""
    points = [p for p in timeline.points if p.graph != OPTIMIZER_GRAPH]
    last = len(points) - 1
    backward = [j for j, p in enumerate(points) if p.graph == "backward"]
    end_of_backward = backward[-1] if backward else last
    name = f"{step.region} (earlier call {call})"
    intervals = []
    for iv in timeline.intervals:
        if iv.start != BEFORE and iv.start > last:
            continue  # a temporary of the optimizer step
        changes: dict[str, object] = {"region": name}
        if iv.start == BEFORE and (iv.category == "inputs" or not same_parameters):
            changes["identity"] = None  # another batch, another layer's parameters
        if same_parameters and iv.category == "gradients" and iv.start != BEFORE and iv.end is None:
            changes["end"] = end_of_backward  # added into .grad
        elif iv.end is not None and iv.end > last:
            changes["end"] = last
        intervals.append(dataclasses.replace(iv, **changes))  # type: ignore[arg-type]
    renamed = [dataclasses.replace(p, region=name) for p in points]
    finished = finish_timeline(renamed, intervals, timeline.device)
    return dataclasses.replace(
        finished, input_saved_until=timeline.input_saved_until, output_saved_until=timeline.output_saved_until
    )


def _saved_by_producer(
    regions: list[tuple[StepGraphs, MemoryTimeline]], sources: Sequence[Mapping[int, tuple[int, int]]]
) -> set[tuple[int, fx.Node]]:
    """Inputs of a region (its index, the placeholder) that are, as observed (``sources``, as
    `compose_timelines` takes them), an output of an earlier region that the earlier
    region saves for its own backward: one storage, which the producer's output
    interval holds until the producer's backward, after the reader's (backwards run in
    reverse), so the reader's saving it adds nothing."""
    found: set[tuple[int, fx.Node]] = set()
    for j, (step, _) in enumerate(regions):
        for pos, ph in enumerate(step.forward.graph.find_nodes(op="placeholder")):
            source = sources[j].get(pos)
            if not _earlier_output(source, j):
                continue
            producer_step, producer_timeline = regions[source[0]]  # type: ignore[index]
            if _kept_producers(producer_step, (source[1],)) & producer_timeline.output_saved_until.keys():  # type: ignore[index]
                found.add((j, ph))
    return found
