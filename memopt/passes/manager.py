"""`PassManager`: runs a pipeline of passes, given as data, over one `StepGraphs`.

The loop itself only sequences passes, skips disabled ones, invalidates analyses and
falls back on failure. Everything else (verification, dumps, timing, op-count diffs,
recording for `memopt.explain`) is an `Instrument` hooked around each pass, in the
manner of TVM's ``PassInstrument`` and XLA's invariant checkers.

Fallback: if a pass raises, or an instrument (verification) rejects its output, the
pipeline stops there and the step keeps what the passes *before* the failed one did:
they are replayed on a copy of the input (no cost when nothing fails) and the result
is verified; if the replay fails or does not verify, the step goes on as it was before
the first pass. One `MemoptWarning` names the pass and the reason
(`memopt.failsoft`); ``strict=True`` raises `PassFailure`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from memopt.analysis.manager import AnalysisManager
from memopt.graph.step import StepGraphs, clone_graph_module
from memopt.failsoft import Fallback, fail_soft
from memopt.graph.verify import GraphVerificationError, verify_step
from memopt.errors import MemoptOffloadError, MemoptOptimizerError
from memopt.passes.base import Pass, PassContext, PassFailure, PassResult

__all__ = [
    "PassManager",
    "Instrument",
    "PassRecord",
    "Fallback",
    "PipelineResult",
]

log = logging.getLogger("memopt.passes")


@dataclass
class PassRecord:
    """One pass of one pipeline run, as the report shows it."""

    name: str
    status: str  # "ran" | "skipped" | "failed"
    modified: bool = False
    seconds: float = 0.0
    op_delta: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    applied: tuple[Any, ...] = ()
    """`TensorDecision`s the pass carried out (`PassResult.applied`)."""
    plan_fields: dict[str, Any] = field(default_factory=dict)
    summary: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "modified": self.modified,
            "seconds": round(self.seconds, 6),
            "op_delta": dict(self.op_delta),
            "summary": list(self.summary),
            "applied": [d.to_dict() for d in self.applied],
            "details": self.details,
        }


@dataclass
class PipelineResult:
    step: StepGraphs
    records: list[PassRecord]
    fallback: Fallback | None = None


class Instrument:
    """Hooks around each pass. All hooks are optional no-ops; an instrument may raise
    from `after_pass` to reject a pass's output (the manager then falls back)."""

    def before_pipeline(self, step: StepGraphs, ctx: PassContext) -> None:
        pass

    def before_pass(self, index: int, p: Pass, step: StepGraphs, ctx: PassContext) -> None:
        pass

    def after_pass(
        self,
        index: int,
        p: Pass,
        step: StepGraphs,
        result: PassResult,
        record: PassRecord,
        ctx: PassContext,
    ) -> None:
        pass

    def pass_failed(self, index: int, p: Pass, step: StepGraphs, exc: BaseException, ctx: PassContext) -> None:
        """Pass ``p`` raised, or verification rejected its graphs (``exc``); ``step`` is
        as the pass left it, before the manager puts it back. Must not raise (what it
        raises is logged at debug and ignored)."""
        pass

    def after_pipeline(self, result: PipelineResult, ctx: PassContext) -> None:
        pass


class PassManager:
    """Runs ``passes`` in order with ``instruments`` around each one."""

    def __init__(
        self,
        passes: Sequence[Pass],
        instruments: Sequence[Instrument] = (),
        disabled: Iterable[str] = (),
        trial: bool = False,
    ) -> None:
        """``trial``: a run whose result is only measured (the region's choice between
        plans runs the pipeline on a copy), which logs what it skips at debug level: the
        real run says it once per region."""
        names = [p.name for p in passes]
        if any(not n for n in names):
            raise ValueError(f"every pass needs a non-empty name; got {passes!r}")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"pass names must be unique; repeated: {duplicates}")
        disabled = set(disabled)
        unknown = sorted(disabled - set(names))
        if unknown:
            raise ValueError(
                f"disable_passes names unknown pass(es) {unknown}; the pipeline's passes "
                f"are: {', '.join(names) or '(none)'}."
            )
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.disabled = frozenset(disabled)
        self.trial = trial

    def run(self, step: StepGraphs, ctx: PassContext) -> PipelineResult:
        """Run the pipeline on ``step`` (mutated in place when it succeeds; when a pass
        fails, ``step`` is put back as it came in, and the result holds the fallback)."""
        records: list[PassRecord] = []
        enabled = [p for p in self.passes if p.name not in self.disabled]
        snapshot = step.clone() if enabled else step
        originals = {f.name: getattr(step, f.name) for f in dataclasses.fields(step)}
        analyses = AnalysisManager(step)
        for inst in self.instruments:
            inst.before_pipeline(step, ctx)
        fallback: Fallback | None = None
        for index, p in enumerate(self.passes, start=1):
            if p.name in self.disabled:
                records.append(PassRecord(p.name, "skipped", details={"why": "disabled"}))
                # info only for the user's disable_passes: memopt's own runs (the planner's
                # trial of a plan skips the collective passes) must not claim them disabled
                user_disabled = p.name in ctx.config.disable_passes
                log.log(logging.INFO if user_disabled and not self.trial else logging.DEBUG,
                        "region %s: pass %s %s", ctx.region, p.name,
                        "disabled (disable_passes)" if user_disabled else "not run in this pipeline")
                continue
            record = PassRecord(p.name, "ran")
            records.append(record)
            try:
                self._run_one(index, p, step, analyses, record, ctx)
            except (MemoptOffloadError, MemoptOptimizerError):
                raise  # the user's setting (offload target, disk space) must change: not a memopt bug
            except Exception as exc:  # noqa: BLE001 - any pass error falls back
                record.status = "failed"
                self._tell_failure(index, p, step, exc, ctx)
                _restore(step, originals, snapshot)
                if ctx.config.strict:
                    raise PassFailure(p.name, ctx.region, f"{type(exc).__name__}: {exc}") from exc
                step, kept = self._passes_before(p, snapshot, ctx)
                outcome = (
                    f"this region keeps the passes before it ({', '.join(kept)})"
                    if kept
                    else "this region runs unoptimized"
                )
                fallback = fail_soft(
                    "passes", ctx.region, exc, strict=False, outcome=outcome, pass_name=p.name,
                    hint=f"disable_passes=[{p.name!r}] skips it.",
                )  # fmt: skip
                break
        result = PipelineResult(step, records, fallback)
        for inst in self.instruments:
            inst.after_pipeline(result, ctx)
        return result

    def _tell_failure(self, index: int, p: Pass, step: StepGraphs, exc: BaseException, ctx: PassContext) -> None:
        """`Instrument.pass_failed` on every instrument; none of them may turn the
        failure into another one."""
        for inst in self.instruments:
            try:
                inst.pass_failed(index, p, step, exc, ctx)
            except Exception as hook_exc:  # noqa: BLE001 - the pass's failure is what counts
                log.debug("region %s: %s.pass_failed raised (%s)", ctx.region, type(inst).__name__, hook_exc)

    def _passes_before(self, failed: Pass, snapshot: StepGraphs, ctx: PassContext) -> tuple[StepGraphs, list[str]]:
        """The step as the enabled passes before ``failed`` left it, replayed on a copy
        of ``snapshot`` (the pipeline's input) without instruments and verified; the
        input itself when none ran, the replay fails or its graphs do not verify."""
        earlier = [p for p in self.passes[: self.passes.index(failed)] if p.name not in self.disabled]
        if not earlier:
            return snapshot, []
        replay = snapshot.clone()
        analyses = AnalysisManager(replay)
        try:
            for p in earlier:
                result = p.run(replay, analyses, ctx)
                if result.modified:
                    replay.recompile()
                    analyses.invalidate(result.preserved)
            verify_step(replay, check_meta=False)
        except Exception as exc:  # noqa: BLE001 - then nothing is kept
            log.debug("region %s: replaying the passes before %s failed (%s)", ctx.region, failed.name, exc)
            return snapshot, []
        return replay, [p.name for p in earlier]

    def _run_one(
        self,
        index: int,
        p: Pass,
        step: StepGraphs,
        analyses: AnalysisManager,
        record: PassRecord,
        ctx: PassContext,
    ) -> None:
        for inst in self.instruments:
            inst.before_pass(index, p, step, ctx)
        start = time.perf_counter()
        result = p.run(step, analyses, ctx)
        record.seconds = time.perf_counter() - start
        record.modified = result.modified
        record.details = dict(result.details)
        record.applied = tuple(result.applied)
        record.plan_fields = dict(result.plan_fields)
        record.summary = tuple(result.summary)
        if result.modified:
            step.recompile()
            analyses.invalidate(result.preserved)
            _check_structure(p, step)
        for inst in self.instruments:
            inst.after_pass(index, p, step, result, record, ctx)


def _check_structure(p: Pass, step: StepGraphs) -> None:
    """The cheap part of verification, run after every pass that changed the graphs
    even without ``verify``: FX lint (each use defined earlier in its own graph), the
    saved values lining up, the registered step invariants; not the fake-tensor
    re-run. A broken graph then fails here, inside the pipeline's fail-soft (the pass
    is undone, the passes before it kept), not when torch compiles or runs it (a
    backward reading a forward node failed with ``KeyError: primals_3`` in backward)."""
    try:
        verify_step(step, check_meta=False)
    except GraphVerificationError as exc:
        raise GraphVerificationError(f"after pass {p.name!r}: {exc}") from exc


def _restore(step: StepGraphs, originals: dict[str, Any], snapshot: StepGraphs) -> None:
    """Put ``step`` back as the pipeline received it: its fields (a pass may have
    swapped a graph module) and its modules' graphs (one may have rewritten a graph in
    place), copied from ``snapshot``. A caller that tries pass after pass on one
    captured step, or holds its modules (a region's unoptimized step), keeps its input."""
    for name, value in originals.items():
        setattr(step, name, value)
    for (_, gm), (_, saved) in zip(step.graphs(), snapshot.graphs(), strict=True):
        gm.graph = clone_graph_module(saved).graph
        gm.recompile()
