"""`PassManager`: runs a pipeline of passes, given as data, over one `StepGraphs`.

The loop itself only sequences passes, skips disabled ones, invalidates analyses and
falls back on failure. Everything else (verification, dumps, timing, op-count diffs,
recording for `memopt.explain`) is an `Instrument` hooked around each pass, in the
manner of TVM's ``PassInstrument`` and XLA's invariant checkers.

Fallback: if a pass raises, or an instrument (verification) rejects its output, the
pipeline stops and the step goes on as it was *before the first pass*, with one
`MemoptWarning` naming the pass and the reason; ``strict=True`` raises `PassFailure`.
"""

from __future__ import annotations

import logging
import time
import traceback
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from memopt.analysis.manager import AnalysisManager
from memopt.graph.step import StepGraphs
from memopt.passes.base import Pass, PassContext, PassFailure, PassResult
from memopt.errors import MemoptWarning

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "modified": self.modified,
            "seconds": round(self.seconds, 6),
            "op_delta": dict(self.op_delta),
            "details": self.details,
        }


@dataclass(frozen=True)
class Fallback:
    """A pass failed and the region went on unoptimized."""

    region: str
    pass_name: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"region": self.region, "pass": self.pass_name, "reason": self.reason}


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

    def after_pipeline(self, result: PipelineResult, ctx: PassContext) -> None:
        pass


class PassManager:
    """Runs ``passes`` in order with ``instruments`` around each one."""

    def __init__(
        self,
        passes: Sequence[Pass],
        instruments: Sequence[Instrument] = (),
        disabled: Iterable[str] = (),
    ) -> None:
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

    def run(self, step: StepGraphs, ctx: PassContext) -> PipelineResult:
        """Run the pipeline on ``step`` (mutated in place when it succeeds)."""
        records: list[PassRecord] = []
        enabled = [p for p in self.passes if p.name not in self.disabled]
        snapshot = step.clone() if enabled else step
        analyses = AnalysisManager(step)
        for inst in self.instruments:
            inst.before_pipeline(step, ctx)
        fallback: Fallback | None = None
        for index, p in enumerate(self.passes, start=1):
            if p.name in self.disabled:
                records.append(PassRecord(p.name, "skipped", details={"why": "disabled"}))
                log.info("region %s: pass %s disabled", ctx.region, p.name)
                continue
            record = PassRecord(p.name, "ran")
            records.append(record)
            try:
                self._run_one(index, p, step, analyses, record, ctx)
            except Exception as exc:  # noqa: BLE001 - any pass error falls back
                record.status = "failed"
                reason = f"{type(exc).__name__}: {exc}"
                if ctx.config.strict:
                    raise PassFailure(p.name, ctx.region, reason) from exc
                fallback = Fallback(ctx.region, p.name, reason)
                log.debug("pass %s failed:\n%s", p.name, traceback.format_exc())
                warnings.warn(
                    f"memopt: pass {p.name!r} failed on region {ctx.region} ({reason}); "
                    f"this region runs unoptimized. Set options={{'strict': True}} to "
                    f"raise instead, or disable_passes=[{p.name!r}] to skip it.",
                    MemoptWarning,
                    stacklevel=2,
                )
                step = snapshot
                break
        result = PipelineResult(step, records, fallback)
        for inst in self.instruments:
            inst.after_pipeline(result, ctx)
        return result

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
        if result.modified:
            step.recompile()
            analyses.invalidate(result.preserved)
        for inst in self.instruments:
            inst.after_pass(index, p, step, result, record, ctx)
