"""The standard instruments: verification, dumps, op-count diffs and recording.

Each is independent and optional; `memopt.backends.region.RegionCompiler` picks them
from the config.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from memopt.graph.step import StepGraphs
from memopt.graph.verify import GraphVerificationError, StepInterface, check_interface, step_interface, verify_step
from memopt.passes.base import Pass, PassContext, PassResult
from memopt.passes.manager import Instrument, PassRecord, PipelineResult

__all__ = [
    "VerifyInstrument",
    "DumpInstrument",
    "OpCountInstrument",
    "RecordInstrument",
    "GraphSnapshot",
    "op_counts",
    "readable_code",
]

log = logging.getLogger("memopt.passes")


def op_counts(gm: fx.GraphModule) -> Counter[str]:
    """How many times each op (by overload name) is called in ``gm``."""
    counts: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_function":
            counts[_op_name(node)] += 1
    return counts


def _op_name(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    if hasattr(target, "_overloadpacket"):
        name = str(target)  # "aten.mm.default"
    return name


def readable_code(gm: fx.GraphModule) -> str:
    """The graph as Python with shapes and dtypes annotated (torch's print_readable).
    A class name that is no identifier (AOTAutograd names an inference graph's module
    ``<lambda>``) is written ``GraphModule``, so the code parses."""
    code = gm.print_readable(print_output=False, include_stride=False, include_device=False)
    return _CLASS_LINE.sub(lambda m: m.group(0) if m.group(2).isidentifier() else f"{m.group(1)}GraphModule(", code)


_CLASS_LINE = re.compile(r"^(\s*class )([^\s(]+)\(", re.MULTILINE)


class VerifyInstrument(Instrument):
    """Verify the step before the pipeline and after every pass that modified it.

    If the *input* graphs already fail the fake-tensor metadata check (a graph torch
    produced that memopt's checker cannot re-run), metadata checks are switched off for
    this pipeline with a debug log, and lint plus step invariants still run.

    After each pass the values the step returns to its caller (user outputs and
    gradients, `memopt.graph.verify.step_interface`) must also be those of the input:
    the fake re-run checks each node against its own metadata, not which node the
    output returns. A pass that reports no change must leave every graph's nodes as
    they were (the manager recompiles and verifies only what a pass says it changed).
    """

    def __init__(self) -> None:
        self.check_meta = True
        self.interface: StepInterface = {}
        self._before: list[tuple[Any, ...]] = []

    def before_pass(self, index: int, p: Pass, step: StepGraphs, ctx: PassContext) -> None:
        self._before = _structure(step)

    def before_pipeline(self, step: StepGraphs, ctx: PassContext) -> None:
        self.check_meta = True
        self.interface = step_interface(step)
        try:
            verify_step(step, check_meta=True)
        except GraphVerificationError as exc:
            log.debug("region %s: input graphs not re-checkable (%s); lint only", ctx.region, exc)
            self.check_meta = False
            verify_step(step, check_meta=False)

    def after_pass(
        self,
        index: int,
        p: Pass,
        step: StepGraphs,
        result: PassResult,
        record: PassRecord,
        ctx: PassContext,
    ) -> None:
        if not result.modified:
            if _structure(step) != self._before:
                raise GraphVerificationError(
                    f"pass {p.name!r} changed the graphs but returned PassResult(modified=False): the "
                    f"manager neither recompiled nor verified them, and analyses kept stale results. "
                    f"Return PassResult(True, ...) when the pass rewrites anything."
                )
            return
        try:
            verify_step(step, check_meta=self.check_meta)
            check_interface(step, self.interface)
        except GraphVerificationError as exc:
            raise GraphVerificationError(f"after pass {p.name!r}: {exc}") from exc


def _structure(step: StepGraphs) -> list[tuple[Any, ...]]:
    """Each graph's nodes (op, name, target, arguments), in order: what a pass that
    reports no change must leave as it was (it may put back an equal copy, as a pass
    undoing its own rewrite does)."""
    return [
        (name, tuple((n.op, n.name, str(n.target), str(n.args), str(n.kwargs)) for n in gm.graph.nodes))
        for name, gm in step.graphs()
    ]


class DumpInstrument(Instrument):
    """Write each graph as readable Python before the pipeline (``000_input.py``) and
    after every pass (``NNN_<pass>.py``) under ``<dump_dir>/<region>/<graph>/``, with a
    header naming the pass that produced it; a pass that fails (raises, or its graphs
    fail verification) leaves ``NNN_<pass>_failed.py``, what it produced, beside the
    ``999_fallback.py`` the region uses instead. The ``recompile``-th compile of a region
    compiled again for its step (whole-step planning) writes under
    ``<region>.recompile<N>/`` instead, beside the first compile's files. In a process
    group of several ranks each rank writes under ``<dump_dir>/rank<R>/``: the ranks
    compile the same regions, with the same compile ids, and would write (and
    interleave) the same files."""

    def __init__(self, dump_dir: str, recompile: int = 0) -> None:
        rank = _rank_of_several()
        self.dump_dir = dump_dir if rank is None else os.path.join(dump_dir, f"rank{rank}")
        self.suffix = f".recompile{recompile}" if recompile else ""

    def before_pipeline(self, step: StepGraphs, ctx: PassContext) -> None:
        self._dump(step, 0, "input", "the graph as memopt received it (before any pass)")

    def after_pass(
        self,
        index: int,
        p: Pass,
        step: StepGraphs,
        result: PassResult,
        record: PassRecord,
        ctx: PassContext,
    ) -> None:
        change = "modified the graph" if result.modified else "left the graph unchanged"
        self._dump(step, index, p.name, f"after pass {p.name!r} (#{index}), which {change}")

    def pass_failed(self, index: int, p: Pass, step: StepGraphs, exc: BaseException, ctx: PassContext) -> None:
        what = f"as pass {p.name!r} (#{index}) left it before it failed, NOT used: {type(exc).__name__}: {exc}"
        self._dump(step, index, f"{p.name}_failed", what)

    def after_pipeline(self, result: PipelineResult, ctx: PassContext) -> None:
        if result.fallback is not None:
            fb = result.fallback
            self._dump(
                result.step,
                999,
                "fallback",
                f"graphs used after pass {fb.pass_name!r} failed ({fb.outcome}): {fb.reason}",
            )

    def _dump(self, step: StepGraphs, index: int, name: str, what: str) -> None:
        for graph_name, gm in step.graphs():
            folder = os.path.join(self.dump_dir, _safe(step.region) + self.suffix, graph_name)
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{index:03d}_{_safe(name)}.py")
            header = _comment(f"memopt dump: region {step.region}, {graph_name} graph, {what}.") + _DUMP_IMPORTS
            with open(path, "w", encoding="utf-8") as f:
                f.write(header + readable_code(gm))
        log.debug("region %s: dumped %s to %s", step.region, name, self.dump_dir)


def _comment(text: str) -> str:
    """``text`` as Python comment lines: a failure's reason spans several lines (torch's
    "While executing ..." and its traceback), and a dump must stay runnable Python."""
    return "".join(f"# {line}".rstrip() + "\n" for line in text.splitlines())


_DUMP_IMPORTS = (
    "import torch\n"
    "from torch import device, inf, nan  # names the printed code uses\n"
    "import memopt  # registers torch.ops.memopt.* for graphs that call memopt's ops\n\n"
)
"""Makes a dump a Python file that runs on its own (``runpy.run_path``, ``exec``)."""


def _rank_of_several() -> int | None:
    """This process's rank in the default process group when it has several ranks."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank()
    return None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


class OpCountInstrument(Instrument):
    """Compute each pass's op-count diff (recorded, and logged at INFO)."""

    def __init__(self) -> None:
        self._before: dict[str, Counter[str]] = {}

    def before_pass(self, index: int, p: Pass, step: StepGraphs, ctx: PassContext) -> None:
        self._before = {name: op_counts(gm) for name, gm in step.graphs()}

    def after_pass(
        self,
        index: int,
        p: Pass,
        step: StepGraphs,
        result: PassResult,
        record: PassRecord,
        ctx: PassContext,
    ) -> None:
        if not result.modified:
            return
        delta: Counter[str] = Counter()
        for name, gm in step.graphs():
            delta.update(op_counts(gm))
            delta.subtract(self._before.get(name, Counter()))
        record.op_delta = {k: v for k, v in sorted(delta.items()) if v}
        if record.op_delta:
            log.info("region %s: pass %s op-count diff %s", ctx.region, p.name, record.op_delta)


@dataclass
class GraphSnapshot:
    """The readable code of one graph after one pass."""

    graph: str
    after: str
    code: str

    def to_dict(self) -> dict[str, str]:
        return {"graph": self.graph, "after": self.after, "code": self.code}


@dataclass
class RecordInstrument(Instrument):
    """Keep the readable code of every graph before the pipeline and after each pass
    that modified it (for `memopt.explain`)."""

    snapshots: list[GraphSnapshot] = field(default_factory=list)
    on_finish: Callable[[PipelineResult, list[GraphSnapshot]], None] | None = None

    def before_pipeline(self, step: StepGraphs, ctx: PassContext) -> None:
        self.snapshots = [GraphSnapshot(g, "input", readable_code(gm)) for g, gm in step.graphs()]

    def after_pass(
        self,
        index: int,
        p: Pass,
        step: StepGraphs,
        result: PassResult,
        record: PassRecord,
        ctx: PassContext,
    ) -> None:
        if result.modified:
            self.snapshots += [GraphSnapshot(g, p.name, readable_code(gm)) for g, gm in step.graphs()]

    def after_pipeline(self, result: PipelineResult, ctx: PassContext) -> None:
        if result.fallback is not None:
            self.snapshots += [
                GraphSnapshot(g, "fallback", readable_code(gm)) for g, gm in result.step.graphs()
            ]
        if self.on_finish is not None:
            self.on_finish(result, self.snapshots)
