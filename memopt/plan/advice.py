"""What each memory option would save, and which parts dominate the step.

Modelled from the analyses (the step's memory timelines, the plan's decisions and
the optimizer's memory), never measured: every number is a saving *at an estimated
peak*, so it is an upper bound on what the peak drops (another part of the step may
become the peak). A technique not in use is modelled at the step's peak as it is now;
one in use, at the peak of the step without memopt's passes (the plan's decisions took
its bytes off that peak: counted against the current peak, a plan that moved the peak
elsewhere would read as saving more than the whole peak). `option_savings` gives one
`OptionSaving` per technique; `dominant_parameters` the parameters whose weight,
gradient and optimizer state take a large share of the peak (embeddings and LM heads
in language models), named by their module path. `memopt.explanation.Explanation.report`
renders both (`memopt.plan.report.savings_table`, `dominant_table`).

Rules (one per technique; "at the peak" means live at the step's peak point):

* rematerialization: up to every saved activation at the peak (a segment boundary
  stays saved, so less in practice); in use: the bytes of the values recomputed that
  the step without memopt's passes holds at its peak. Saved dtype copies cast again in
  backward (`recompute_saved_casts`, exact and always on) are not rematerialization
  under a budget: they count in no row (the report's decisions list them);
* precision ``bf16``: half of each fp32 saved activation at the peak; in use, not
  modelled (the step is traced lowered, so neither timeline has the fp32 values);
* compression ``int8``/``fp8``: each saved activation at the peak down to one byte
  per element; in use: the bytes saved by storing compressed the values the step
  without memopt's passes holds at its peak;
* offload: every saved activation at the peak; in use: the bytes moved off, of the
  values the step without memopt's passes holds at its peak;
* fused update (``optimizer_in_backward``): the peak of the step with a separate
  ``opt.step()`` minus the peak with the updates in backward, both modelled on the
  graphs before memopt's passes (needs the optimizer; not modelled for a
  `ShardedOptimizer`, which ``optimizer_in_backward`` refuses);
* 8-bit state (``AdamW8bit``, default block size and size threshold) and low-rank
  state (``GaLoreAdamW``, default rank, GaLore's side rule, weights of two
  dimensions larger than the rank): the optimizer's state now minus that
  optimizer's formula (`memopt.optim.state_size`); state is live throughout, so
  all of it is at the peak.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

from memopt.analysis.aliasing import concrete_int
from memopt.analysis.optimizer_memory import OptimizerMemory
from memopt.analysis.timeline import MemoryTimeline
from memopt.config import MemoptConfig
from memopt.graph import meta
from memopt.graph.step import StepGraphs, parameter_name
from memopt.plan.decisions import Recompute
from memopt.plan.plan import TensorDecision
from memopt.units import format_bytes

__all__ = ["OptionSaving", "ParameterShare", "StepParameter", "option_savings", "dominant_parameters", "step_parameters"]


@dataclass(frozen=True)
class OptionSaving:
    """One technique: whether the step uses it, and the bytes it takes off the
    step's estimated peak (what it saves now if in use, else what it would save)."""

    technique: str
    option: str
    in_use: bool
    saved_bytes: int | None
    """None: cannot be modelled here (``basis`` says why)."""
    basis: str
    peak_bytes: int
    """The estimated peak the saving is counted at: the step's peak now for an option
    not in use; for one in use, the peak it took its bytes off (without memopt's
    passes for the plan's decisions; the peak now plus the saving for a saving
    modelled as a difference of peaks)."""
    option_on: bool = False
    """The option is set though the technique is not in use: the plan, which decides
    per value, chose it for none (``compress_activations`` under a budget the step
    meets without compressing)."""


@dataclass(frozen=True)
class ParameterShare:
    """One parameter of the step and what it holds at the step's peak."""

    name: str
    shape: tuple[int, ...]
    weight_bytes: int
    gradient_bytes: int
    """Its gradient's bytes if the gradient is live at the peak, else 0."""
    state_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.gradient_bytes + self.state_bytes


@dataclass(frozen=True)
class StepParameter:
    """A parameter of the step: its identity (id() of the real tensor), module path,
    shape, elements and bytes; ``trains``: it gets a gradient in the step (False for a
    frozen parameter, ``requires_grad=False``)."""

    identity: int | None
    name: str
    shape: tuple[int, ...]
    numel: int
    nbytes: int
    trains: bool = True


def step_parameters(steps: Sequence[StepGraphs]) -> list[StepParameter]:
    """The parameters of the step's regions, each once (by identity), named by
    module path; one trains if any region gives it a gradient."""
    seen: dict[int, int] = {}  # identity -> index in out
    out: list[StepParameter] = []
    for step in steps:
        with_gradient = step.inputs_with_gradient()
        for i, ph in enumerate(step.forward.graph.find_nodes(op="placeholder")):
            if step.input_kind(i) != "parameter":
                continue
            info, value = step.inputs[i], meta.tensor_value(ph)
            if value is None:
                continue
            if info.identity in seen:
                if i in with_gradient:  # a parameter shared across regions, trained in this one
                    index = seen[info.identity]
                    out[index] = dataclasses.replace(out[index], trains=True)
                continue
            if info.identity is not None:
                seen[info.identity] = len(out)
            shape = tuple(concrete_int(s) for s in value.shape)
            numel = concrete_int(value.numel())
            out.append(StepParameter(info.identity, parameter_name(info.name), shape, numel, numel * value.element_size(),
                                     i in with_gradient))  # fmt: skip
    return out


def _saved_at_peak(timeline: MemoryTimeline) -> list[tuple[int, int]]:
    """(bytes, element size) of every saved activation live at the peak."""
    out = []
    for iv in timeline.live_at(timeline.peak_index):
        if iv.saved_for_backward:
            value = meta.tensor_value(iv.node)
            out.append((iv.nbytes, value.element_size() if value is not None else 4))
    return out


def _cast_again(decision: TensorDecision) -> bool:
    """A saved dtype copy cast again in backward (`recompute_saved_casts`), not a
    value the rematerialization planner recomputes."""
    return isinstance(decision.action, Recompute) and decision.action.is_cast


def _decided_at_peak(before: MemoryTimeline, decisions: Sequence[TensorDecision]) -> dict[str, int]:
    """Per policy, the bytes the plan's decisions take off ``before``'s peak: each
    decided value live there (matched by region and forward node) counts its bytes,
    less what it still stores when compressed."""
    live = {(iv.region, iv.value_node.name) for iv in before.live_at(before.peak_index) if iv.graph == "forward"}
    out = {"recompute": 0, "compress": 0, "offload": 0}
    for d in decisions:
        if d.policy in out and (d.region, d.node_name) in live and not _cast_again(d):
            out[d.policy] += d.bytes - (d.details.get("stored_bytes", 0) if d.policy == "compress" else 0)
    return out


def option_savings(
    before: MemoryTimeline,
    after: MemoryTimeline,
    decisions: Sequence[TensorDecision],
    params: Sequence[StepParameter],
    optimizer: OptimizerMemory | None,
    fused_peaks: tuple[int, int] | None,
    config: MemoptConfig,
    state_outside: int = 0,
) -> list[OptionSaving]:
    """One `OptionSaving` per technique (module docstring). ``before``/``after``: the
    step's timelines without and with memopt's passes. ``fused_peaks``: the step's
    modelled peaks (separate step, updates in backward), or None without an optimizer.
    ``config``: the `MemoptConfig` in force. ``state_outside``: bytes of optimizer state
    the timelines do not count (an optimizer given to ``record``, not to the options):
    the state rows' savings are counted at the peak plus that state."""
    now, unoptimized = after.peak_bytes, before.peak_bytes
    saved = _saved_at_peak(after)
    total_saved = sum(b for b, _ in saved)
    planned = [d for d in decisions if not _cast_again(d)]
    in_use = {k: any(d.policy == k for d in planned) for k in ("recompute", "compress", "offload")}
    taken = _decided_at_peak(before, decisions)
    fp32 = sum(b for b, size in saved if size == 4)
    one_byte = sum(b - b // size for b, size in saved)
    budget = _shown_budget(config.memory_budget)
    compress = config.compress_activations or "int8"
    rows = [
        _row("rematerialization", f"memory_budget={budget}", in_use["recompute"], taken["recompute"],
             total_saved, "every saved activation at the peak (an upper bound: segment boundaries stay)", now, unoptimized,
             on=config.memory_budget is not None, verb="recomputes"),
        _precision_row(config, fp32 // 2, now),
        _row("compression", f"compress_activations={compress!r}", in_use["compress"], taken["compress"], one_byte,
             "saved activations at the peak stored at one byte per element", now, unoptimized,
             on=config.compress_activations is not None, verb="compresses"),
        _row("offload", f"offload={config.offload or 'auto'!r}", in_use["offload"], taken["offload"], total_saved,
             "every saved activation at the peak moved to host or disk", now, unoptimized,
             on=config.offload is not None, verb="offloads"),
    ]  # fmt: skip
    rows.append(_fused_row(optimizer, fused_peaks, now))
    rows.extend(_state_rows(optimizer, params, now + state_outside))
    return rows


def _counted_at(in_use: bool, saved: int | None, now: int) -> int:
    """The peak a saving not from the plan's decisions is counted at: the peak now, plus
    the saving when the option is in use (the peak it came off)."""
    return now + saved if in_use and saved is not None else now



def _shown_budget(budget: int | float | None) -> str:
    """``memory_budget`` as the savings table names it: a fraction as given, bytes as a
    size string (``'300.00 KiB'``, not the 307200 the option was parsed to)."""
    if budget is None:
        return "..."
    return repr(format_bytes(budget)) if isinstance(budget, int) else repr(budget)

def _row(
    technique: str,
    option: str,
    in_use: bool,
    taken: int | None,
    would: int,
    basis: str,
    now: int,
    unoptimized: int,
    *,
    on: bool,
    verb: str,
) -> OptionSaving:
    """A technique the plan decides per value: in use (``taken`` given), what its
    decisions took off the step's peak without memopt's passes; else what it
    ``would`` take off the peak now (``on``: its option is set, and the plan ``verb``
    no value)."""
    if in_use and taken is not None:
        return OptionSaving(technique, option, True, taken, "what the plan's decisions take off the peak without "
                            "memopt's passes (an upper bound on the drop: the peak may move)", unoptimized)  # fmt: skip
    if on and not in_use:
        basis = f"{option} is set, but the plan {verb} no value; would save: {basis}"
    return OptionSaving(technique, option, in_use, would, basis, _counted_at(in_use, would, now), option_on=on and not in_use)


def _precision_row(config: MemoptConfig, would: int, now: int) -> OptionSaving:
    """Precision lowering runs before AOTAutograd traces the step, so both timelines
    are of the lowered step: in use, its saving is not in them (the precision pass's
    report line gives the bytes it took off the forward's values)."""
    if config.precision is None:
        return OptionSaving("precision", "precision='bf16'", False, would,
                            "half of each fp32 saved activation at the peak", now)  # fmt: skip
    return OptionSaving("precision", f"precision={config.precision!r}", True, None,
                        "not modelled in use: both estimates are of the lowered step (see the precision line)", now)  # fmt: skip


_GIVE_OPTIMIZER = "options={'optimizer': opt}"


def _fused_row(optimizer: OptimizerMemory | None, fused_peaks: tuple[int, int] | None, now: int) -> OptionSaving:
    option = "optimizer_in_backward=opt"
    if optimizer is None or fused_peaks is None:
        return OptionSaving("fused update", option, False, None, f"needs the optimizer in the compile options: {_GIVE_OPTIMIZER}", now)
    if optimizer.sharded:
        return OptionSaving("fused update", option, False, None, "not for a sharded model (memopt.distributed.shard) "
                            "yet: step the ShardedOptimizer after backward", now)  # fmt: skip
    separate, fused = fused_peaks
    saved = max(separate - fused, 0)
    return OptionSaving("fused update", option, optimizer.in_backward, saved,
                        "the step's peak with a separate opt.step() minus with each update in backward",
                        _counted_at(optimizer.in_backward, saved, now))  # fmt: skip


def _state_rows(optimizer: OptimizerMemory | None, params: Sequence[StepParameter], now: int) -> list[OptionSaving]:
    from memopt.optim.adamw8bit import AdamW8bit
    from memopt.optim.galore import GaLoreAdamW
    from memopt.optim.state_size import adamw8bit_state_bytes, lowrank_state_bytes

    if optimizer is None:
        why = f"needs the optimizer: {_GIVE_OPTIMIZER}, or memopt.record(optimizer=opt)"
        return [OptionSaving("8-bit state", "AdamW8bit", False, None, why, now),
                OptionSaving("low-rank state", "GaLoreAdamW", False, None, why, now)]  # fmt: skip
    block = _default(AdamW8bit, "block_size")
    threshold = _default(AdamW8bit, "min_8bit_size")
    rank = _default(GaLoreAdamW, "rank")
    eight = lowrank = 0
    for p in params:
        state = optimizer.state_bytes.get(p.identity, 0) if p.identity is not None else 0
        if p.numel >= threshold:
            eight += max(state - adamw8bit_state_bytes(p.numel, block), 0)
        if len(p.shape) == 2 and rank < min(p.shape):
            left = p.shape[0] < p.shape[1]  # GaLore's rule: project the smaller side
            lowrank += max(state - lowrank_state_bytes(p.shape, rank, left, True), 0)
    eight_in_use = optimizer.name == "AdamW8bit"
    lowrank_in_use = optimizer.name in ("GaLoreAdamW", "SubspaceAdamW")
    eight_row = OptionSaving("8-bit state", f"AdamW8bit (block {block})", eight_in_use, eight,
                             f"state now minus AdamW8bit's for weights of at least {threshold} elements",
                             _counted_at(eight_in_use, eight, now))  # fmt: skip
    if optimizer.rows_split:
        return [eight_row, OptionSaving("low-rank state", "GaLoreAdamW", False, None,
                                        "not at sharding stages 1-3 (each rank steps its own rows; GaLore projects "
                                        "whole matrices): stage=0, or AdamW8bit", now)]  # fmt: skip
    return [
        eight_row,
        OptionSaving("low-rank state", f"GaLoreAdamW (rank {rank})", lowrank_in_use, lowrank,
                     f"state now minus GaLore's for 2-D weights wider than rank {rank}",
                     _counted_at(lowrank_in_use, lowrank, now)),
    ]  # fmt: skip


def _default(cls: type, name: str) -> int:
    return int(inspect.signature(cls.__init__).parameters[name].default)  # type: ignore[misc]


def dominant_parameters(
    after: MemoryTimeline,
    params: Sequence[StepParameter],
    optimizer: OptimizerMemory | None,
    share: float = 0.05,
    state_outside: int = 0,
) -> list[ParameterShare]:
    """The parameters whose weight + gradient (if live at the peak) + optimizer state
    exceed ``share`` of the step's estimated peak, largest first. ``state_outside``:
    optimizer state the timeline does not count (`option_savings`); the share is then
    of the peak plus that state, which holds each parameter's state counted here."""
    live_grads = _live_gradient_shapes(after)
    out = []
    for p in params:
        grad = p.nbytes if p.trains and live_grads.get(p.shape, 0) > 0 else 0  # a frozen one has none
        if grad:
            live_grads[p.shape] -= 1  # each live gradient is one parameter's
        state = optimizer.state_bytes.get(p.identity, 0) if optimizer is not None and p.identity is not None else 0
        item = ParameterShare(p.name, p.shape, p.nbytes, grad, state)
        if after.peak_bytes and item.total_bytes > share * (after.peak_bytes + state_outside):
            out.append(item)
    return sorted(out, key=lambda s: -s.total_bytes)


def _live_gradient_shapes(timeline: MemoryTimeline) -> dict[tuple[int, ...], int]:
    """Shape -> how many gradients of that shape are live at the peak (gradients are
    matched by shape to the parameters that train: the timeline does not name their
    parameter)."""
    counts: dict[tuple[int, ...], int] = {}
    for iv in timeline.live_at(timeline.peak_index):
        if iv.category == "gradients":
            value = meta.tensor_value(iv.node)
            if value is not None:
                shape = tuple(concrete_int(s) for s in value.shape)
                counts[shape] = counts.get(shape, 0) + 1
    return counts
