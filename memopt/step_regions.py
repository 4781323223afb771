"""Which of the regions memopt recorded make up one step, and how they hand values on.

A recording (`memopt.record`, `memopt.explain`) keeps every region compiled inside it:
earlier compiles of a frame Dynamo recompiled, the regions of another model trained in
turn, and those of an earlier step that a later compile no longer breaks into.
`regions_of_step` picks the regions of the latest step; `input_sources` says which of
their inputs an earlier one of them returned, so that composing their timelines
(`memopt.analysis.compose`) counts a value handed on once.
"""

from __future__ import annotations

from memopt.analysis.compose import StepCall
from memopt.backends.record import RegionRecord

__all__ = ["calls_in_order", "input_sources", "parameter_ids", "regions_of_step", "same_model"]


def regions_of_step(regions: list[RegionRecord]) -> list[RegionRecord]:
    """The regions of ``regions`` that one step runs, in frame order: when Dynamo
    recompiled a frame (a guard failed, e.g. a shape or attribute changed), only its
    latest compile.

    A later compile of a frame replaces an earlier one only when both are of the
    same model: they share a parameter (or neither has one). Two models whose
    forward is the same code (two ``nn.Sequential``, a teacher and a student of
    one class) are compiles of one frame that Dynamo numbers as recompiles; each
    runs in the step and is counted. A region whose latest call ran before a
    backward that started before the latest step's last forward is not of that step
    (train, eval, train again: the first step's regions of frames the later
    compile no longer breaks into). An inference compile of a model that has a
    training compile before it (validation under ``torch.no_grad()`` between training
    steps) is not of the training step and does not replace that compile."""
    kept: list[RegionRecord] = []
    for r in regions:
        if r.kind == "inference" and any(k.kind == "training" and same_model(k, r) for k in kept):
            continue
        kept = [k for k in kept if not same_model(k, r)]
        kept.append(r)
    latest = _latest_forward(kept)
    return [r for r in regions if any(r is k for k in kept) and not _ran_before(r, latest, kept)]


def parameter_ids(r: RegionRecord) -> frozenset[int]:
    """The identities (``id()``) of the parameters ``r``'s graphs take as inputs."""
    step = r.step if r.step is not None else r.step_before
    if step is None:
        return frozenset()
    return frozenset(i.identity for i in step.inputs if i.kind == "parameter" and i.identity is not None)


def same_model(earlier: RegionRecord, later: RegionRecord) -> bool:
    """``later`` is a recompile of ``earlier``'s frame for the same model (it replaces
    it in the step): the same frame, and a parameter in common or none in either."""
    if earlier.region.split("/", 1)[0] != later.region.split("/", 1)[0]:
        return False
    a, b = parameter_ids(earlier), parameter_ids(later)
    return bool(a & b) or not (a or b)


def _latest_forward(regions: list[RegionRecord]) -> int | None:
    """When the latest observed forward among ``regions`` ran (among their training
    regions, when there are some: an evaluation after the last training step does not
    hide that step); None when no call was observed."""
    training = [r for r in regions if r.kind == "training"] or regions
    return max((r.last_forward for r in training if r.last_forward is not None), default=None)


def _ran_before(region: RegionRecord, latest: int | None, regions: list[RegionRecord]) -> bool:
    """Whether ``region``'s latest call belongs to an earlier step than the forward at
    ``latest`` (`_latest_forward`): a backward of one of ``regions`` started between
    the two. False when calls were not observed."""
    if region.last_forward is None or latest is None:
        return False
    return any(r.last_backward is not None and region.last_forward < r.last_backward < latest for r in regions)


def input_sources(regions: list[RegionRecord]) -> list[dict[int, tuple[int, int]]]:
    """Each region's observed `RegionRecord.input_sources` with the producing region
    named by its index in ``regions`` (sources outside ``regions`` are dropped)."""
    index = {r.region: i for i, r in enumerate(regions)}
    return [
        {pos: (index[name], out) for pos, (name, out) in r.input_sources.items() if name in index}
        for r in regions
    ]


def calls_in_order(regions: list[RegionRecord]) -> list[StepCall] | None:
    """The calls of ``regions`` (one step's) in the order they ran, as
    `memopt.analysis.compose.compose_calls` takes them: each region's latest call, and
    the earlier calls pending then (`RegionRecord.earlier_calls`), with where their
    inputs came from. None when that was not observed: a region's calls unrecorded, or
    ``repeats`` counting calls the record does not list (under a budget, the calls its
    plan counts)."""
    index = {r.region: i for i, r in enumerate(regions)}
    timed: list[tuple[int, StepCall]] = []
    for i, r in enumerate(regions):
        if r.last_forward is None or len(r.earlier_calls) != r.repeats:
            return None
        for call in r.earlier_calls:
            if call.forward is None:
                return None
            sources = {pos: (index[name], out) for pos, (name, out) in call.input_sources.items() if name in index}
            timed.append((call.forward, StepCall(i, call.same_parameters, sources)))
        timed.append((r.last_forward, StepCall(i)))
    timed.sort(key=lambda c: c[0])
    return [call for _, call in timed]
