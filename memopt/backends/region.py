"""`RegionCompiler`: compiles one Dynamo region through memopt's pipeline.

AOTAutograd calls back into it at three points, and the same object holds the state
shared between them:

* ``partition``: the joint forward+backward graph is split by torch's min-cut
  partitioner (so, with no memory options, memopt saves no more than torch would),
  then memopt's pass pipeline runs over the forward/backward pair;
* ``compile_forward`` / ``compile_backward``: codegen of the pair;
* ``compile_inference``: no gradient needed, the pipeline runs over the single graph,
  then codegen.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._functorch.partitioners import min_cut_rematerialization_partition

from memopt.analysis.memory import build_timeline, main_device

from memopt.analysis.optimizer_memory import OptimizerMemory, optimizer_memory
from memopt.analysis.timeline import MemoryTimeline
from memopt.backends.meta_device import check_backward_reaches_inputs
from memopt.backends.ranks import RanksCompiledOtherGraphs, agree_across_ranks, rank0_value
from memopt.backends.record import RegionRecord, active_recorders
from memopt.codegen.eager import compile_eager
from memopt.config import MemoptConfig
from memopt.errors import PASSED_THROUGH, MemoptWarning
from memopt.failsoft import Fallback, fail_soft, is_torch_signal
from memopt.graph import meta
from memopt.graph.partition import JointGraph, pin_reads_of_mutated_inputs
from memopt.graph.step import InputInfo, StepGraphs, output_values, placeholder_inputs
from memopt.passes.base import Pass, PassContext
from memopt.passes.instruments import (
    DumpInstrument,
    GraphSnapshot,
    OpCountInstrument,
    RecordInstrument,
    VerifyInstrument,
)
from memopt.passes.manager import Instrument, PassManager, PipelineResult
from memopt.passes.pipeline import default_pipeline, disabled_in, pre_autograd_pipeline
from memopt.plan.decisions import Offload
from memopt.plan.plan import MemoryPlan, finish_plan
from memopt.plan.planner import base_plan, check_final_budget, plan_region
from memopt.units import format_bytes
from memopt.plan.step_context import StepContext, placed
from memopt.plan.storage import StorageOptions

__all__ = ["RegionCompiler", "describe_inputs", "grads_held"]

log = logging.getLogger("memopt")


def describe_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[InputInfo, ...]:
    """Classify a Dynamo graph's inputs (parameters, buffers, user inputs, activations
    from an earlier region, symbols) from Dynamo's sources and the example values."""
    infos = []
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        name = meta.dynamo_source_name(node) or node.name
        if isinstance(value, (int, torch.SymInt)):
            kind = "symbol"
        elif not isinstance(value, torch.Tensor):
            kind = "other"
        elif isinstance(value, torch.nn.Parameter) or "._parameters[" in name:
            kind = "parameter"
        elif "._buffers[" in name:
            kind = "buffer"
        elif value.grad_fn is not None:
            kind = "activation"
        else:
            kind = "input"
        infos.append(InputInfo(kind, name, id(value) if isinstance(value, torch.Tensor) else None))
    return tuple(infos)


def grads_held(inputs: Sequence[InputInfo], values: Sequence[Any]) -> frozenset[int]:
    """The identities of the leaves among ``values`` (a region's inputs, described by
    ``inputs``: parameters, or inputs that require a gradient) whose ``.grad`` is set: a
    step starting now adds its gradients into them (gradient accumulation) instead of
    creating them. A sharded parameter (a DTensor) counts by its local gradient, and so
    does the full-size accumulator `memopt.distributed` reads as an input while gradient
    sync is off. Only real tensors count: not fake example inputs, nor
    `memopt.optim.in_backward.ConsumedGrad` (a marker that holds no memory)."""
    from torch.distributed.tensor import DTensor

    def holds(value: Any) -> bool:
        if not isinstance(value, torch.Tensor) or not value.is_leaf:
            return False
        grad = value.grad
        if type(value) is DTensor:
            return type(grad) is DTensor and type(grad.to_local()) is torch.Tensor
        return type(value) in (torch.Tensor, torch.nn.Parameter) and type(grad) is torch.Tensor

    return frozenset(
        info.identity
        for info, value in zip(inputs, values)
        if info.kind in ("parameter", "input") and info.identity is not None and holds(value)
    )  # fmt: skip


_COLLECTIVE_PASSES = ("dedupe_collectives", "bucket_collectives", "overlap_collectives")


class RegionCompiler:
    """Compiles one region. Create one per Dynamo graph."""

    def __init__(
        self,
        config: MemoptConfig,
        region: str,
        inputs: tuple[InputInfo, ...] = (),
        num_user_outputs: int | None = None,
        context: StepContext | None = None,
        recorders: list[list[RegionRecord]] | None = None,
    ) -> None:
        self.config = config
        self.region = region
        self.inputs = inputs
        self.num_user_outputs = num_user_outputs
        self.context = context
        """The other regions of the step when planned for the whole step (see
        `memopt.backends.wholestep`); None: planned alone."""
        self.record = RegionRecord(region=region, config=config)
        if recorders is None:
            recorders = list(active_recorders())
            for records in recorders:
                records.append(self.record)
        self._recorders = recorders
        self.example_inputs: tuple[Any, ...] = ()
        self.grads_held: frozenset[int] = frozenset()
        """Parameters (identities) whose ``.grad`` the plan counts as existing when the
        step starts (`StepGraphs.grads_held`): seen set at a call (`watched`), or in
        the example inputs."""
        self._pre_autograd = RegionRecord(region=region, config=config)  # its passes' records
        self.recompiles = 0
        """How many times the region was compiled again for its step before this
        compile (its dumps go to their own folder)."""
        self.stage = "pre-autograd"
        """The stage of `memopt.failsoft.STAGES` the compile is in (what a failure the
        backend catches is attributed to)."""

    @property
    def recording(self) -> bool:
        """Whether `memopt.explain`/`memopt.record` was recording when the region compiled."""
        return bool(self._recorders)

    def replanned(self, context: StepContext | None, example_inputs: tuple[Any, ...]) -> RegionCompiler:
        """A compiler for the same region planned in ``context``, to compile once more
        the graph `optimize_pre_autograd` returned (that stage is not run again: its
        records are carried over). The new record takes this one's place in the
        recorders this one was added to."""
        fresh = RegionCompiler(
            self.config, self.region, self.inputs, self.num_user_outputs, context, recorders=self._recorders
        )
        done = self._pre_autograd
        fresh.record.passes, fresh.record.snapshots = list(done.passes), list(done.snapshots)
        fresh.record.fallbacks = list(done.fallbacks)
        fresh._pre_autograd = done
        fresh.example_inputs = example_inputs
        fresh.grads_held = self.grads_held
        fresh.recompiles = self.recompiles + 1
        self._swap_record(self.record, fresh.record)
        return fresh

    @property
    def keeps_earlier_plan(self) -> bool:
        """A region compiled again for the whole step: a planning failure then
        propagates, so that the region keeps the plan it runs (`watched`)."""
        return self.recompiles > 0

    def hand_back_record(self, original: RegionCompiler) -> None:
        """Undo `replanned`: ``original``'s record takes this one's place again (the
        second compile failed)."""
        self._swap_record(self.record, original.record)

    def withdraw_record(self) -> None:
        """Take this region's record out of the recorders: the compile was abandoned
        (Dynamo restarts its analysis of the frame, and compiles it again under the
        same compile id)."""
        for records in self._recorders:
            records[:] = [r for r in records if r is not self.record]

    def _swap_record(self, old: RegionRecord, new: RegionRecord) -> None:
        for records in self._recorders:
            records[:] = [new if r is old else r for r in records]

    def place_in(self, context: StepContext) -> None:
        """Another region of the step was planned again: restate this region's plan
        estimates (peak after, its breakdown) for the step as it is planned now."""
        record = self.record
        self.context = context
        if record.plan is None or record.step is None or record.timeline_after is None:
            return
        in_step = context.place(record.step, record.timeline_after)
        record.plan = dataclasses.replace(
            record.plan, estimated_peak_after=in_step.peak_bytes, peak_breakdown_after=in_step.peak_breakdown
        )

    # -- the pipeline -------------------------------------------------------------

    def optimize(self, step: StepGraphs) -> StepGraphs:
        """Run memopt's pipeline over ``step``; return the graphs to hand to codegen.

        Fail-soft (`memopt.failsoft`): a failing pass keeps the passes before it; a
        failure of the analyses or the planner (or of anything else here) returns
        ``step`` as it came, unoptimized, with one warning and a recorded fallback."""
        start = time.perf_counter()
        pristine = step.clone()
        self.record.kind = "training" if step.is_training else "inference"
        try:
            optimized = self._optimize(step)
        except PASSED_THROUGH:
            raise  # strict=True, or what the user must change (offload target, disk space, ranks apart)
        except RanksCompiledOtherGraphs as exc:  # the user's inputs, not a memopt failure
            if self.config.strict or self.keeps_earlier_plan:
                raise
            outcome = "this region runs unoptimized on every rank (the same collectives in traced order)"
            warnings.warn(f"memopt: {exc}; {outcome}", MemoptWarning, stacklevel=2)
            optimized = self._unoptimized(pristine, Fallback(self.region, "planning", str(exc), "planning", outcome))
        except Exception as exc:  # noqa: BLE001 - fail soft, see memopt.failsoft
            if self.keeps_earlier_plan or is_torch_signal(exc):
                raise
            fallback = fail_soft(
                "planning", self.region, exc, strict=self.config.strict,
                outcome="this region runs unoptimized (torch's partition)",
            )  # fmt: skip
            optimized = self._unoptimized(pristine, fallback)
        self.record.pipeline_seconds = time.perf_counter() - start
        fell_back = self.record.fallbacks[-1].reason if self.record.fallbacks else ""
        log.info(
            "region %s: %s pipeline ran %d pass(es) in %.3fs%s",
            self.region,
            self.record.kind,
            sum(r.status == "ran" for r in self.record.passes),
            self.record.pipeline_seconds,
            f" (fell back: {fell_back})" if fell_back else "",
        )
        return optimized

    def _optimize(self, step: StepGraphs) -> StepGraphs:
        passes = default_pipeline(self.config)
        manager = PassManager(passes, self._instruments(), disabled=disabled_in(passes, self.config))
        before = build_timeline(step)
        if step.optimizer is not None and step.is_training:
            other = dataclasses.replace(step.optimizer, in_backward=not step.optimizer.in_backward)
            self.record.timelines_by_update = {
                step.optimizer.in_backward: before, other.in_backward: build_timeline(dataclasses.replace(step, optimizer=other))
            }
        unoptimized = dataclasses.replace(step)  # passes may swap the graphs of ``step``
        plan = self._choose_plan(step, before, passes)
        wait = self.config.rank_agreement_timeout
        ctx = dataclasses.replace(
            self._context(plan=plan), agree=lambda decision, topic: rank0_value(decision, unoptimized, topic, wait)
        )
        result = manager.run(step, ctx)
        fused = result.step.optimizer
        if fused is not None and fused.in_backward and not any(
            r.name == "optimizer_in_backward" and r.modified for r in result.records
        ):  # the pass fell back or was skipped: gradients are returned, opt.step() updates
            result.step = dataclasses.replace(result.step, optimizer=fused.stepped_separately())
        after = build_timeline(result.step)
        self.record.passes = self.record.passes + result.records  # after pre-autograd's
        self.record.step = result.step
        self.record.step_before = unoptimized
        self.record.repeats = self.context.repeats if self.context is not None else 0
        self.record.timeline_before = before
        self.record.timeline_after = after
        plan = finish_plan(ctx.plan, placed(self.context, result.step, after), result)
        self.record.plan = plan if result.fallback is not None else check_final_budget(plan, self.config, result.step)
        if result.fallback is not None:
            self.record.fallbacks.append(result.fallback)
        return result.step

    def _choose_plan(self, step: StepGraphs, before: MemoryTimeline, passes: Sequence[Pass]) -> MemoryPlan:
        """The plan the pipeline runs: the planner's, unless the pipeline without it
        (every saved value saved) meets the budget, or reaches a lower peak than the
        pipeline does with the planner's plan.

        The planner judges its candidates on the graphs as partitioned; the passes
        after it (the memory-aware schedule above all) then lower each candidate's
        peak by a different amount. A budget the passes alone would meet must not
        cost recomputation, and asking for a budget must never give a higher peak
        than asking for none. Each comparison runs the pipeline on a copy of ``step``
        (no instruments but the verifier: nothing recorded or dumped); in a sharded
        step every rank follows rank 0's choice (`memopt.backends.ranks`)."""
        base = base_plan(step, before, self.config, self.context)
        budget = base.budget_bytes
        storage = self._storage_options(passes, step)
        if budget is None:  # no solver, no time limit: every rank plans its own graph alike
            return plan_region(step, before, self.config, storage, self.context)
        wait = self.config.rank_agreement_timeout
        if not step.is_training or step.joint is None or base.estimated_peak_before <= budget:
            return agree_across_ranks(plan_region(step, before, self.config, storage, self.context), step, wait)
        alone = self._trial_peak(step, base)
        if rank0_value(alone <= budget, step, "whether the passes alone meet the budget", wait):
            note = f"the passes alone reach {format_bytes(alone)} with every saved value kept: nothing to recompute"
            return dataclasses.replace(base, notes=(*base.notes, note))
        plan = agree_across_ranks(plan_region(step, before, self.config, storage, self.context), step, wait)
        if plan.actions(Offload):  # a trial would open the plan's offload store
            return plan
        planned = self._trial_peak(step, plan)
        if rank0_value(alone < planned, step, "whether the passes alone beat the plan", wait):
            note = (
                f"no plan meets the budget; the passes alone reach {format_bytes(alone)} with every saved "
                f"value kept, below the {format_bytes(planned)} of the planner's best plan after them"
            )
            return dataclasses.replace(
                base, notes=(*base.notes, note), feasible=False, min_feasible_peak=alone, blockers=plan.blockers
            )
        return plan

    def _trial_peak(self, step: StepGraphs, plan: MemoryPlan) -> int:
        """The step's estimated peak after the pipeline runs ``plan`` on a copy of
        ``step``. Quiet: a pass that fails here warns when the chosen plan runs.

        Without the collective passes: each keeps the peak within ``max(budget, peak
        before it)`` (`memopt.passes.budget_guard`), so they cannot decide whether a plan
        meets the budget, and their searches under a budget cost seconds per region."""
        passes = default_pipeline(self.config)
        instruments: list[Instrument] = [VerifyInstrument()] if self.config.verify else []
        disabled = (*disabled_in(passes, self.config), *_COLLECTIVE_PASSES)
        manager = PassManager(passes, instruments, disabled=disabled, trial=True)
        ctx = PassContext(self.config, self.region, plan=plan, example_inputs=self.example_inputs, step_context=self.context)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MemoptWarning)
            result = manager.run(step.clone(), ctx)
        return placed(self.context, result.step, build_timeline(result.step)).peak_bytes

    def _unoptimized(self, step: StepGraphs, fallback: Fallback) -> StepGraphs:
        """Record ``step`` as this region's graphs, unoptimized after ``fallback``."""
        self.record.fallbacks.append(fallback)
        if step.optimizer is not None:  # gradients are returned: the update is opt.step()'s
            step = dataclasses.replace(step, optimizer=step.optimizer.stepped_separately())
        try:
            timeline = build_timeline(step)
        except Exception as exc:  # noqa: BLE001 - the report then has no estimate
            log.debug("region %s: no timeline for the unoptimized graphs (%s)", self.region, exc)
            self.record.step = self.record.plan = None
            return step
        plan = MemoryPlan.unplanned(self.region, timeline, self.config.budget_bytes(timeline.peak_bytes))
        self.record.plan = dataclasses.replace(plan, fallbacks=(fallback.to_dict(),))
        self.record.step = self.record.step_before = step
        self.record.timeline_before = self.record.timeline_after = timeline
        return step

    def _instruments(self) -> list[Instrument]:
        instruments: list[Instrument] = []
        if self.config.verify:
            instruments.append(VerifyInstrument())
        instruments.append(OpCountInstrument())
        if self.config.dump_dir:
            instruments.append(DumpInstrument(self.config.dump_dir, self.recompiles))
        if self._recorders:
            instruments.append(RecordInstrument(on_finish=self._keep_snapshots))
        return instruments

    def _keep_snapshots(self, result: PipelineResult, snapshots: list[GraphSnapshot]) -> None:
        self.record.snapshots = self.record.snapshots + list(snapshots)

    def _storage_options(self, passes: Sequence[Pass], step: StepGraphs) -> StorageOptions:
        """Where the planner may hold saved values (the options whose pass is enabled)."""
        disabled = disabled_in(passes, self.config)
        fmt = self.config.compress_activations
        compress = None if fmt is None or "compress_activations" in disabled else fmt
        offload = bandwidth = None
        if self.config.offload is not None and "offload" not in disabled and step.is_training:
            from memopt.passes.offload import offload_target_and_bandwidth

            offload, bandwidth = offload_target_and_bandwidth(self.config, main_device(step))
        return StorageOptions(compress, offload, bandwidth, self.config.offload_min_bytes)

    def _context(self, plan: Any = None) -> PassContext:
        return PassContext(
            self.config,
            self.region,
            plan=plan,
            example_inputs=self.example_inputs,
            measure_error=bool(self._recorders),  # explain/record: report measured errors
            step_context=self.context,
        )

    # -- the pre-autograd stage (precision lowering, docs/precision.md) ------------

    def optimize_pre_autograd(self, gm: fx.GraphModule) -> fx.GraphModule:
        """Run the pre-autograd pipeline over the Dynamo graph ``gm`` (rewritten in
        place); return the graph AOTAutograd should trace (after a fallback, an
        unchanged copy). Its records come first in the region's record."""
        self.stage = "pre-autograd"
        passes = pre_autograd_pipeline(self.config)
        manager = PassManager(passes, self._instruments(), disabled=disabled_in(passes, self.config))
        n = len(output_values(gm))
        step = StepGraphs(gm, None, n, self.region, self.inputs, n, single_graph_name="dynamo")
        result = manager.run(step, self._context())
        self.record.passes = self.record.passes + result.records
        if result.fallback is not None:
            self.record.fallbacks.append(result.fallback)
        self._pre_autograd.passes = list(self.record.passes)
        self._pre_autograd.snapshots = list(self.record.snapshots)
        self._pre_autograd.fallbacks = list(self.record.fallbacks)
        return result.step.forward

    # -- AOTAutograd callbacks ----------------------------------------------------

    def partition(
        self,
        joint_module: fx.GraphModule,
        joint_inputs: Sequence[Any],
        *,
        num_fwd_outputs: int,
        static_lifetime_input_indices: list[int] | None = None,
        **_: Any,
    ) -> tuple[fx.GraphModule, fx.GraphModule]:
        """AOTAutograd ``partition_fn``: min-cut split, then memopt's pipeline."""
        self.stage = "planning"
        pin_reads_of_mutated_inputs(joint_module)  # before any partition: torch's and the planner's
        forward, backward = min_cut_rematerialization_partition(
            joint_module,
            joint_inputs,
            compiler="inductor",
            num_fwd_outputs=num_fwd_outputs,
            static_lifetime_input_indices=static_lifetime_input_indices,
        )
        step = StepGraphs(
            forward,
            backward,
            num_fwd_outputs,
            self.region,
            placeholder_inputs(self.inputs, forward),
            joint=JointGraph(
                joint_module,
                num_fwd_outputs,
                None if static_lifetime_input_indices is None else tuple(static_lifetime_input_indices),
            ),
            fused_codegen=self.config.codegen == "inductor",
            num_user_outputs=self.num_user_outputs,
            optimizer=self._optimizer_memory(),
            grads_held=self.grads_held | grads_held(self.inputs, self.example_inputs),
        )
        check_backward_reaches_inputs(step)
        step = self.optimize(step)
        assert step.backward is not None
        return step.forward, step.backward

    def _optimizer_memory(self) -> OptimizerMemory | None:
        """The step's optimizer memory for the timeline (None without an optimizer)."""
        optimizer = self.config.step_optimizer
        if optimizer is None:
            return None
        in_backward = self.config.optimizer_in_backward is not None and "optimizer_in_backward" not in set(
            self.config.disable_passes
        )
        return optimizer_memory(optimizer, in_backward)

    def entering_codegen(self, graph: str) -> None:
        """Codegen of ``graph`` ("forward", "backward" or "inference") starts."""
        self.stage = "codegen"
        self.record.compiled_graphs.append(graph)

    def compile_forward(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        self.entering_codegen("forward")
        return compile_eager(gm)

    def compile_backward(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        self.entering_codegen("backward")
        return compile_eager(gm)

    def compile_inference(
        self, gm: fx.GraphModule, example_inputs: Sequence[Any]
    ) -> Callable[..., Any]:
        self.stage = "planning"
        step = self.optimize(self.inference_step(gm))
        self.entering_codegen("inference")
        return compile_eager(step.forward)

    def inference_step(self, gm: fx.GraphModule) -> StepGraphs:
        n = len(output_values(gm))
        return StepGraphs(
            gm, None, n, self.region, placeholder_inputs(self.inputs, gm),
            fused_codegen=self.config.codegen == "inductor", num_user_outputs=n,
        )
