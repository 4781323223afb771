"""`Explanation`: what memopt did to the regions compiled while it recorded
(`memopt.explain`, `memopt.record`), and what that means for the step's memory.

It holds, per compiled region, the forward and backward graphs after each pass (readable
code), the passes with their timing and op-count changes, the plan and the fallbacks with
their reasons. Its queries pick the regions of one step out of those recorded
(`memopt.step_regions`) and compose their timelines; ``report()`` renders it all as
text, ``to_dict()`` as JSON, ``plot()`` as a picture and ``memory_snapshot()`` in torch's
memory-snapshot format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from tabulate import tabulate

from memopt.analysis.compose import compose_calls, compose_repeated_calls, compose_timelines
from memopt.analysis.optimizer_memory import OptimizerMemory
from memopt.analysis.timeline import MemoryTimeline
from memopt.backends.graph_breaks import skipped_frames_text
from memopt.backends.record import RegionRecord
from memopt.config import MemoptConfig
from memopt.passes.instruments import op_counts
from memopt.failsoft import Fallback
from memopt.graph import meta
from memopt.plan.plan import TensorDecision
from memopt.plan.advice import OptionSaving, ParameterShare, dominant_parameters, option_savings, step_parameters
from memopt.plan.report import (
    WIDTH, breakdown_table, decisions_table, dominant_table, lines_table, savings_table, storage_table, summary_table,
    tradeoff_table, wrap,
)
from memopt.precision_report import precision_lines
from memopt.step_regions import calls_in_order, input_sources, parameter_ids, regions_of_step, same_model
from memopt.units import format_bytes

__all__ = ["Explanation"]

SCHEMA_VERSION = 1

_NOTHING_COMPILED = (
    "nothing reached memopt while this explanation recorded: memopt explains a region when Dynamo compiles it, "
    "and a function compiled before memopt.record() (its first call outside the `with`, as a warm-up step) runs "
    "its cached code unseen; enter record() before the first call, or call torch._dynamo.reset() first. A frame "
    "past Dynamo's recompile_limit (Dynamo warns of it) runs eagerly, without memopt. A torch.nn container "
    "compiled in place (nn.Sequential(...).compile(...)) is not compiled at all: torch skips its frames; use "
    "compiled = torch.compile(model, ...) for it, or call model.compile() on a module class of your own"
)


@dataclass
class Explanation:
    """What memopt did to every region compiled during one `explain` call."""

    regions: list[RegionRecord] = field(default_factory=list)
    config: MemoptConfig | None = None
    optimizer: Any = None
    """The training step's optimizer, if known (`attach_optimizer`): its state is
    reported next to the step's estimate."""
    graph_breaks: list[str] = field(default_factory=list)
    """Why Dynamo broke the graph while this explanation recorded (each reason once,
    with Dynamo's hints): the regions in ``regions`` are the pieces."""
    skipped_frames: list[str] = field(default_factory=list)
    """Frames Dynamo skipped whole while this explanation recorded (a graph break
    inside a loop), each with the graph break that caused it: they ran eagerly, and
    nothing in them reached memopt (`memopt.backends.graph_breaks`)."""
    one_step: bool = False
    """Made by `memopt.explain`, which runs one step: a step of several regions was not
    planned as a whole (a training loop plans it so from its second step)."""
    unsupported: list[str] = field(default_factory=list)
    """Constructs Dynamo did not support while this explanation recorded, beyond the
    graph breaks and skipped frames (`memopt.backends.graph_breaks`): when no region
    reached memopt, the likely reason (an ``nn.LSTM``: Dynamo ran its caller eagerly)."""
    sharded_model: Any = None
    """The model `memopt.distributed.shard` sharded, when `explain` was given it (or a
    bound method of it): ``report()`` adds its per-rank section
    (`memopt.distributed.report`). Set it by hand for `record`."""

    def attach_optimizer(self, optimizer: Any) -> Explanation:
        """Report ``optimizer``'s state bytes (read when the report is rendered, so
        after the first ``optimizer.step()`` they are the real ones)."""
        self.optimizer = optimizer
        return self

    @property
    def optimizer_state_bytes(self) -> int | None:
        """Bytes of tensors in the step's optimizer's state now: the one attached
        (`attach_optimizer`, ``record(optimizer=)``), else the one given in the compile
        options (``optimizer``, ``optimizer_in_backward``); None when neither is known
        (0 before the optimizer's first step)."""
        optimizer = self.optimizer if self.optimizer is not None else self._config().step_optimizer
        if optimizer is None:
            return None
        from memopt.optim import optimizer_state_bytes

        return optimizer_state_bytes(optimizer)

    @property
    def ran_backward(self) -> bool:
        """Whether any region's backward graph was compiled (and so run)."""
        return any("backward" in r.compiled_graphs for r in self.regions)

    @property
    def codegen(self) -> str:
        return self._config().codegen

    def _config(self) -> MemoptConfig:
        """The options the report reads: `explain`'s own; for `record`, the options of
        the step's regions (`_step_config`)."""
        if self.config is not None:
            return self.config
        return _step_config([r.config for r in self.step_regions()] or [r.config for r in self.regions])

    @property
    def fallbacks(self) -> list[Fallback]:
        return [fb for r in self.regions for fb in r.fallbacks]

    def region(self, index: int = 0) -> RegionRecord:
        if not self.regions:
            raise IndexError("no region was compiled (did the function run any tensor op?)")
        return self.regions[index]

    def graph_code(self, graph: str = "forward", *, region: int = 0, after: str | None = None) -> str:
        """Readable code of ``graph`` in region ``region`` after pass ``after``."""
        return self.region(region).graph_code(graph, after)

    # -- memory ---------------------------------------------------------------------

    def step_regions(self) -> list[RegionRecord]:
        """The regions one step runs, in frame order (`memopt.step_regions.regions_of_step`):
        of each frame, its latest compile for each model, and none whose latest call
        belongs to an earlier step."""
        return regions_of_step(self.regions)

    def timeline(self, *, optimized: bool = True) -> MemoryTimeline:
        """The step's estimated memory timeline across the regions of one step (after
        memopt's passes, or before them with ``optimized=False``). The outputs of a
        region the caller was seen keeping through backward (a model's output object:
        logits, key/value caches; `memopt.backends.steptracker`) stay live after the step,
        as the last region's do; other outputs of earlier regions are handed on. A
        step whose regions ran again before their backward (``RegionRecord.repeats``)
        is those calls, each where it ran (``RegionRecord.earlier_calls``:
        `memopt.analysis.compose.compose_calls`; a layer's frame called once per
        layer is that many calls of it alone), or, where that was not observed, that
        many calls of every region (`memopt.analysis.compose.compose_repeated_calls`)."""
        parts, regions = [], []
        for r in self.step_regions():
            step, tl = (r.step, r.timeline_after) if optimized else (r.step_before, r.timeline_before)
            if step is not None and tl is not None:
                parts.append((step, tl))
                regions.append(r)
        if not parts:
            raise ValueError(
                "no region was compiled by memopt's pipeline, so there is no timeline"
                + (f"; {self._skipped_text()}" if self.skipped_frames else "" if self.regions else f"; {self._nothing_text()}")
            )
        repeats = max(r.repeats for r in regions)  # several calls before one backward
        kept, sources = [r.kept_outputs for r in regions], input_sources(regions)
        calls = calls_in_order(regions) if repeats else None
        if calls is not None:  # each region's calls where they ran (a layer's frame called per layer)
            return compose_calls(parts, calls, kept, sources)
        return compose_repeated_calls(parts, repeats, kept, sources)

    @property
    def estimated_peak_bytes(self) -> int:
        """Peak live tensor bytes of the step on its device (parameters, buffers,
        inputs, activations, gradients, temporaries), after memopt."""
        return self.timeline().peak_bytes

    @property
    def baseline_bytes(self) -> int:
        """Bytes live when the step starts (parameters, buffers, inputs, and the
        ``.grad`` a region planned under gradient accumulation counts as held)."""
        return self.timeline().baseline_bytes

    def step_optimizer(self) -> OptimizerMemory | None:
        """The step's optimizer memory as the plan counted it (``optimizer`` or
        ``optimizer_in_backward`` given), else None."""
        found = [r.step.optimizer for r in self.step_regions() if r.step is not None and r.step.optimizer is not None]
        return found[0] if found else None

    def fused_peaks(self) -> tuple[int, int] | None:
        """The step's modelled peak with a separate ``opt.step()`` and with each update
        in backward, both on the graphs before memopt's passes (None without an
        optimizer, or without a training region)."""
        regions = [r for r in self.step_regions() if r.step_before is not None and len(r.timelines_by_update) == 2]
        if not regions:
            return None
        peaks = []
        for in_backward in (False, True):
            parts = [(r.step_before, r.timelines_by_update[in_backward]) for r in regions]
            kept = [r.kept_outputs for r in regions]
            peaks.append(compose_timelines(parts, kept, input_sources(regions)).peak_bytes)  # type: ignore[arg-type]
        return peaks[0], peaks[1]

    def savings(self) -> list[OptionSaving]:
        """What each memory option saves or would save at the step's estimated peak
        (`memopt.plan.advice.option_savings`)."""
        steps = [r.step for r in self.step_regions() if r.step is not None]
        after = self.timeline()
        return option_savings(self.timeline(optimized=False), after, self.decisions(), step_parameters(steps),
                              self._known_optimizer(), self.fused_peaks(), self._config(),
                              self._state_outside(after) or 0)  # fmt: skip

    def _known_optimizer(self) -> OptimizerMemory | None:
        """`step_optimizer`, else the attached optimizer's memory (``record(optimizer=)``,
        `attach_optimizer`: its state, not counted in the timelines)."""
        counted = self.step_optimizer()
        if counted is not None or not isinstance(self.optimizer, torch.optim.Optimizer):
            return counted
        from memopt.analysis.optimizer_memory import optimizer_memory

        return optimizer_memory(self.optimizer, in_backward=False)

    def dominant_parameters(self, share: float = 0.05) -> list[ParameterShare]:
        """Parameters whose weight, gradient and optimizer state exceed ``share`` of
        the step's estimated peak, plus the attached optimizer's state when the peak
        does not count it (`memopt.plan.advice.dominant_parameters`)."""
        steps = [r.step for r in self.step_regions() if r.step is not None]
        after = self.timeline()
        return dominant_parameters(after, step_parameters(steps), self._known_optimizer(), share,
                                   self._state_outside(after) or 0)  # fmt: skip

    def _state_outside(self, timeline: MemoryTimeline) -> int | None:
        """The attached optimizer's state bytes when the timeline does not count it (one
        given in the options is in the timeline as the plan counts it)."""
        if self.optimizer is None or any(iv.category == "optimizer_state" for iv in timeline.intervals):
            return None
        return self.optimizer_state_bytes

    def decisions(self) -> list[TensorDecision]:
        """The decisions about values backward needs of the step's regions
        (`step_regions`, whose memory the summary adds up), largest first: an earlier
        compile of a recompiled frame is not in the step, and its values are not either
        (each region's own stay in its ``plan``)."""
        found = [d for r in self.step_regions() if r.plan is not None for d in r.plan.decisions]
        return sorted(found, key=lambda d: -d.bytes)

    def plot(self, path: str, *, title: str | None = None) -> str:
        """Write the memory timeline plot (PNG or SVG by extension); returns ``path``."""
        from memopt.plan.plot import plot_timeline

        return plot_timeline(self.timeline(), path, title=title, budget_bytes=self._budget())

    def plot_tradeoff(self, path: str, *, region: int = 0) -> str:
        """Write the planner's peak/recompute trade-off curve for a region (index into
        `regions`). A region the planner did not run for has none: the error says why
        and names the regions that have one."""
        from memopt.plan.plot import plot_tradeoff

        record = self.region(region)
        plan = record.plan
        if plan is None or not plan.tradeoff:
            raise ValueError(f"region {region} ({record.region}) has no trade-off curve: {self._no_tradeoff(record)}")
        return plot_tradeoff(plan.tradeoff, path, chosen_peak=plan.estimated_peak_after, budget_bytes=plan.budget_bytes)

    def _no_tradeoff(self, record: RegionRecord) -> str:
        """Why ``record`` has no trade-off curve, and the fix: a budget when it had
        none, else the regions the planner drew one for."""
        plan = record.plan
        if plan is None or plan.budget_bytes is None:
            why = "it was compiled without a memory_budget, and the budget planner draws the curve"
            if record.kind == "inference":
                why += " (a fractional budget does not apply to an inference region: give one in bytes)"
            why += "; set options={'memory_budget': ...}"
        else:
            why = (
                f"the budget planner did not run for it under memory_budget {format_bytes(plan.budget_bytes)}"
                + (f" ({'; '.join(plan.notes)})" if plan.notes else "")
            )
        others = [f"region={i} ({r.region})" for i, r in enumerate(self.regions) if r.plan is not None and r.plan.tradeoff]
        return why + (f". Regions with a curve: {', '.join(others)}." if others else ".")

    def memory_snapshot(self) -> dict[str, Any]:
        """The estimated timeline in PyTorch's memory-snapshot format (open it with
        torch's memory visualizer, https://pytorch.org/memory_viz, or
        ``torch.cuda._memory_viz``)."""
        from memopt.plan.snapshot import timeline_to_snapshot

        return timeline_to_snapshot(self.timeline())

    def save_memory_snapshot(self, path: str) -> str:
        """Pickle `memory_snapshot` to ``path`` (the format torch's visualizer loads)."""
        import pickle

        with open(path, "wb") as f:
            pickle.dump(self.memory_snapshot(), f)
        return path

    def _sharded_scope(self) -> str:
        """For a sharded model: whose bytes the report's figures are (one rank's)."""
        if self.sharded_model is None:
            return ""
        from memopt.distributed.api import shard_state

        state = shard_state(self.sharded_model)
        return f"; sharded (stage {state.stage}): every figure is rank {state.rank} of {state.world}'s"

    def _sharding_lines(self) -> list[str]:
        """The per-rank section of a sharded model (`memopt.distributed.report`), with
        the attached optimizer or the one the options name; none for other models."""
        if self.sharded_model is None:
            return []
        from memopt.distributed.report import report as sharding_report

        optimizer = self.optimizer if self.optimizer is not None else self._config().step_optimizer
        text = sharding_report(self.sharded_model, self if self._has_memory() else None, optimizer)
        return ["", "sharding (memopt.distributed.report, this rank):", text]

    def _region_budgets(self) -> dict[str, int]:
        """The budget each region of the step was planned under (regions with one)."""
        return {
            r.region: r.plan.budget_bytes
            for r in self.step_regions()
            if r.plan is not None and r.plan.budget_bytes is not None
        }

    def _budget(self) -> int | None:
        """The step's budget: the one its regions were planned under (None when there
        is none, or when they were planned under different ones)."""
        budgets = set(self._region_budgets().values())
        return budgets.pop() if len(budgets) == 1 else None

    def _budget_note(self) -> list[str]:
        """A line when the step's regions were planned under different budgets (each a
        fraction of the peak it saw when it compiled: planned alone, or by `memopt.explain`,
        which does not plan a step as a whole; or models compiled with different
        ``memory_budget`` options, each planned under its own): the step has no one
        budget to show."""
        budgets = self._region_budgets()
        if len(set(budgets.values())) < 2:
            return []
        options = {r.region: r.config.memory_budget for r in self.step_regions() if r.region in budgets}
        if len(set(options.values())) > 1:  # models compiled with their own budgets (a student's, a teacher's)
            shown = {region: "" if isinstance(o, int) else f" (memory_budget={o!r})" for region, o in options.items()}
            each = ", ".join(f"{region}: {format_bytes(b)}{shown[region]}" for region, b in budgets.items())
            return [wrap(
                f"regions compiled with different memory_budget options ({each}): each is planned under its own, "
                "no budget for the step as a whole"
            )]  # fmt: skip
        each = ", ".join(f"{region}: {format_bytes(b)}" for region, b in budgets.items())
        text = (
            f"regions planned under different budgets ({each}), each a fraction of the peak its region saw when "
            "it compiled: no budget for the step as a whole"
        )
        dynamic = [r.region for r in self.step_regions() if r.region in budgets and _dynamic_shapes(r)]
        if dynamic:
            text += (
                f" ({', '.join(dynamic)} compiled for dynamic shapes, after an input changed shape or with "
                "dynamic=True: memopt does not plan such a region again for its step; compile with dynamic=False, "
                "or pad the inputs to one size, for one budget)"
            )
        elif self.one_step:
            text += (
                " (memopt.explain runs one step; a training loop plans a step of several regions as a whole, "
                "under one budget, from its second step: memopt.record over a few steps shows that plan)"
            )
        return [wrap(text)]

    def _other_model_lines(self) -> list[str]:
        """A line naming the training regions of another model whose step ran before
        the summarized one (two models trained in turn inside one `record`): they share
        no parameter with the step's regions, and are not in its summary."""
        step = self.step_regions()
        in_step = frozenset().union(*(parameter_ids(r) for r in step))
        others = [
            r for i, r in enumerate(self.regions)
            if r.kind == "training" and not any(r is s for s in step)
            and parameter_ids(r) and not parameter_ids(r) & in_step
            and not any(same_model(r, n) for n in self.regions[i + 1 :])  # its latest compile only
        ]  # fmt: skip
        if not others:
            return []
        names = ", ".join(r.region for r in others)
        return [wrap(
            f"not in this summary: region{'s' if len(others) > 1 else ''} {names}, training another model "
            f"(no parameter in common with region{'s' if len(step) > 1 else ''} "
            f"{', '.join(r.region for r in step)}) whose step ran before the one summarized. The summary is "
            "the last model's step alone: the other model's step peak is not in it, nor the parameters, "
            "gradients and optimizer state it keeps meanwhile. Record one model's loop at a time "
            "(docs/usage.md).",
        )]  # fmt: skip

    def _graph_break_lines(self) -> list[str]:
        """Where the step is split by graph breaks: its regions and Dynamo's reasons.
        Keyed on Dynamo's reasons, not on the number of frames: under `record`, two models
        compiled one by one are two frames with no graph break between them."""
        if not self.graph_breaks:
            return []
        frames = {r.region.split("/", 1)[0] for r in self.regions}
        names = ", ".join(r.region for r in self.step_regions())
        out = [wrap(
            f"graph breaks: Dynamo split the code into {len(frames)} regions ({names}), compiled one by one; "
            "TORCH_LOGS=graph_breaks shows where (docs/remat.md, \"Graph breaks\").",
        )]  # fmt: skip
        out += [wrap(f"Dynamo's reason: {reason}", indent="    ", first="  ") for reason in self.graph_breaks]
        return out

    def _skipped_text(self) -> str:
        return skipped_frames_text(self.skipped_frames)

    def _nothing_text(self) -> str:
        """Why no region reached memopt: the unsupported constructs Dynamo met, if it
        met any, else the usual causes."""
        if not self.unsupported:
            return _NOTHING_COMPILED
        met = "; ".join(reason.rstrip(".") for reason in self.unsupported)
        return (
            "nothing reached memopt while this explanation recorded: Dynamo met code it does not support and "
            f"ran the frame holding it eagerly, without memopt (no plan, no memory_budget): {met}. Follow "
            "Dynamo's hint, or compile the supported parts (the modules around it) separately"
        )

    def _skipped_frame_lines(self) -> list[str]:
        """The frames Dynamo skipped whole (nothing in them compiled, planned or budgeted)."""
        return [wrap(self._skipped_text() + ".")] if self.skipped_frames else []

    def _savings_lines(self) -> list[str]:
        """The savings table, or for a step of inference regions only (nothing saved for
        backward, no gradients, no update: every row would read 0 B) why there is none."""
        if all(r.kind == "inference" for r in self.regions):
            return [wrap(
                "what each option saves: nothing, in a step of inference regions only. They save no activations "
                "for backward (rematerialization, compression and offload act on those) and have no gradients or "
                "optimizer update; their peak is parameters, outputs and temporaries (above)."
            )]  # fmt: skip
        return [
            wrap("what each option saves or would save at the estimated peak (modelled, docs/whole_step.md):"),
            savings_table(self.savings()),
        ]

    def _has_memory(self) -> bool:
        return any(r.timeline_after is not None for r in self.regions)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (schema in docs/usage.md)."""
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "config": self._config().to_dict(),
            "ran_backward": self.ran_backward,
            "regions": [_region_dict(r) for r in self.regions],
            "fallbacks": [fb.to_dict() for fb in self.fallbacks],
            "graph_breaks": list(self.graph_breaks),
            "skipped_frames": list(self.skipped_frames),
        }
        if self._has_memory():
            before, after = self.timeline(optimized=False), self.timeline()
            out.update(
                {
                    "estimated_peak_bytes": after.peak_bytes,
                    "baseline_bytes": after.baseline_bytes,
                    "estimated_peak_bytes_unoptimized": before.peak_bytes,
                    "budget_bytes": self._budget(),
                    "device": str(after.device),
                    "peak_breakdown": after.peak_breakdown,
                    "peak_at": _point_dict(after),
                    "decisions": [d.to_dict() for d in self.decisions()],
                    "optimizer_state_bytes": self.optimizer_state_bytes,
                    "savings": [dataclasses.asdict(x) for x in self.savings()],
                    "dominant_parameters": [
                        {**dataclasses.asdict(x), "total_bytes": x.total_bytes} for x in self.dominant_parameters()
                    ],
                }
            )
        return out

    def report(self, *, top: int = 10) -> str:
        """Human-readable report: the memory summary, the breakdown at the peak, the
        ``top`` largest values backward needs with memopt's decision, then per region
        the passes run and any fallback."""
        if isinstance(top, bool) or not isinstance(top, int) or top < 0:
            raise ValueError(f"report(top={top!r}): top is how many saved values to list, an int >= 0 (0 lists none).")
        if not self.regions and not self.skipped_frames:
            return "memopt explanation: 0 region(s)\n" + wrap(self._nothing_text() + ".")
        lines = [
            f"memopt explanation: {len(self.regions)} region(s), codegen={self.codegen}"
            + ("" if self.ran_backward else " (forward only)")
            + self._sharded_scope()
        ]
        lines += self._graph_break_lines()
        lines += self._skipped_frame_lines()
        if self._has_memory():
            before, after = self.timeline(optimized=False), self.timeline()
            lines += [
                "",
                summary_table(before, after, self._budget(), self._state_outside(after)),
                *self._budget_note(),
                *self._other_model_lines(),
                "",
                breakdown_table(after),
                "",
                *self._savings_lines(),
            ]
            dominant = self.dominant_parameters()
            if dominant:
                lines += [
                    "",
                    wrap("parameters that dominate the step (weight + gradient + optimizer state over 5% of the peak):"),
                    dominant_table(dominant, after.peak_bytes),
                ]
            decisions = self.decisions()
            if decisions and top:
                lines += ["", "values saved for backward (largest first):", decisions_table(decisions, top)]
            elif decisions:
                lines += ["", f"values saved for backward: {decisions_table(decisions, top)}"]
            lines_of_code = {(d.source_file, d.source_line) for d in decisions}
            if top and len(lines_of_code) < len(decisions):  # some line made several values (layers)
                lines += [
                    "",
                    wrap(f"the same values by the source line that made them ({len(decisions)} values, "
                         f"{format_bytes(sum(d.bytes for d in decisions))}, from {len(lines_of_code)} "
                         f"line{'' if len(lines_of_code) == 1 else 's'}):"),
                    lines_table(decisions, top),
                ]  # fmt: skip
            for r in self.regions:
                stored = None if r.plan is None else storage_table(
                    r.plan.decisions, float(r.plan.solver.get("recompute_seconds_model", 0.0))
                )
                if stored:
                    lines += ["", f"region {r.region}: where saved values wait for backward:", stored]
                if r.plan is not None and r.plan.tradeoff:
                    lines += [
                        "",
                        wrap(
                            f"region {r.region} peak/recompute trade-off the planner saw "
                            f"({r.plan.solver.get('method')}, {r.plan.solver.get('seconds', 0):.2f}s, "
                            f"{r.plan.solver.get('segments')} segments; peaks as its per-segment model "
                            f"adds them up, which the exact estimate of a plan can differ from):"
                        ),
                        tradeoff_table(r.plan.tradeoff, r.plan.estimated_peak_after),
                    ]
        lines += self._sharding_lines()
        for r in self.regions:
            lines.append("")
            lines.append(f"region {r.region} ({r.kind}): graphs {_graph_sizes(r)}")
            rows = [[p.name, p.status, "yes" if p.modified else "no", f"{p.seconds * 1e3:.1f}"] for p in r.passes]
            if rows:
                headers = ["pass", "status", "changed", "ms"]
                room = max(WIDTH - len(tabulate(rows, headers=headers).splitlines()[1]) - 2, 30)
                for row, p in zip(rows, r.passes):
                    row.append(_delta(p.op_delta, room))
                lines.append(tabulate(rows, headers=[*headers, "op-count change"]))
            lines.extend(precision_lines(r.passes))  # numerics-changing passes (docs/precision.md)
            for fb in r.fallbacks:
                what = f"pass {fb.pass_name!r}" if fb.stage == "passes" else fb.stage
                lines.append(wrap(f"FALLBACK: {what} failed: {fb.reason}; {fb.outcome}"))
        return "\n".join(lines)


def _graph_sizes(r: RegionRecord) -> str:
    if r.step is None:
        return "(not compiled by memopt's pipeline)"
    parts = [f"{name} {sum(op_counts(gm).values())} ops" for name, gm in r.step.graphs()]
    return ", ".join(parts)


def _delta(delta: Mapping[str, int], room: int = WIDTH) -> str:
    """The largest op-count changes first, as many as fit in ``room`` characters with
    a count of the rest (every change is in ``to_dict()``'s ``op_delta``)."""
    items = [f"{k} {v:+d}" for k, v in sorted(delta.items(), key=lambda kv: -abs(kv[1]))]
    for shown in range(len(items), 0, -1):
        rest = len(items) - shown
        text = ", ".join(items[:shown]) + (f", ... ({rest} more)" if rest else "")
        if len(text) <= room:
            return text
    return f"{len(items)} ops changed" if items else ""


def _point_dict(timeline: MemoryTimeline) -> dict[str, Any]:
    if not timeline.points:
        return {}
    point = timeline.points[timeline.peak_index]
    return {"index": timeline.peak_index, "region": point.region, "graph": point.graph, "node": point.node}


def _region_dict(r: RegionRecord) -> dict[str, Any]:
    return {
        "plan": None if r.plan is None else r.plan.to_dict(),
        "region": r.region,
        "kind": r.kind,
        "pipeline_seconds": round(r.pipeline_seconds, 6),
        "passes": [p.to_dict() for p in r.passes],
        "fallbacks": [fb.to_dict() for fb in r.fallbacks],
        "graphs": [s.to_dict() for s in r.snapshots],
        "op_counts": {}
        if r.step is None
        else {name: dict(op_counts(gm)) for name, gm in r.step.graphs()},
    }


def _dynamic_shapes(record: RegionRecord) -> bool:
    """The region was compiled for dynamic shapes: its forward takes a size symbol."""
    step = record.step
    return step is not None and any(meta.is_symbolic(ph) for ph in step.forward.graph.find_nodes(op="placeholder"))


_STEP_OPTIONS: tuple[tuple[str, ...], ...] = (
    ("memory_budget",),
    ("precision",),
    ("compress_activations",),
    ("offload", "offload_dir"),
    ("optimizer_in_backward", "optimizer"),
)
"""The memory options a recorded step's report reads (`Explanation.savings`, the
optimizer's state), each group taken together from one region (they are checked
together: ``offload='host'`` refuses an ``offload_dir``)."""


def _step_config(configs: list[MemoptConfig]) -> MemoptConfig:
    """One config for a step whose regions may have been compiled with different
    options (two models in one step: a student under a ``memory_budget``, a teacher
    in ``precision='bf16'``): the first region's, with each memory option
    (`_STEP_OPTIONS`) taken from the first region that sets it, so that the report says
    an option is in use when a region of the step uses it. Precondition: ``configs``
    in the step's forward order; empty gives the defaults."""
    if not configs:
        return MemoptConfig()
    merged = configs[0]
    for group in _STEP_OPTIONS:
        if any(getattr(merged, name) is not None for name in group):
            continue
        source = next((c for c in configs if any(getattr(c, name) is not None for name in group)), None)
        if source is not None:
            merged = dataclasses.replace(merged, **{name: getattr(source, name) for name in group})
    return merged
