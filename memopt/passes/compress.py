"""Pass ``compress_activations``: store saved activations compressed until backward.

For each chosen saved value ``v`` the forward graph computes the compressed form
right after ``v``'s last forward use and saves it instead of ``v``; backward restores
``v`` right before its first use:

* ``bf16``: ``convert_element_type(v, bfloat16)``, restored by a cast back;
* ``fp8`` / ``int8``: ``memopt::quantize_blockwise(v, block, dtype)`` (codes plus one
  float32 scale per block, docs/kernels.md), restored by
  ``memopt::dequantize_blockwise``: fused Triton kernels on CUDA, the PyTorch
  reference elsewhere.

Decide, then rewrite: `compress_saved_values` carries out a per-value decision map
(``{saved forward node: CompressionChoice}``); the pass builds that map from the
plan's `Compress` decisions (`memopt.plan.storage` decides them).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

import memopt.codegen.bitpack  # noqa: F401  - registers torch.ops.memopt.pack_bits/unpack_bits
import memopt.codegen.quantize  # noqa: F401  - registers torch.ops.memopt.*
from memopt.analysis.aliasing import concrete_int
from memopt.analysis.compressible import (
    DEFAULT_BLOCK,
    SavedStorage,
    saved_storages,
    stored_bytes,
)
from memopt.analysis.error_probe import capture_values, concrete_inputs, real_tensors, relative_error
from memopt.analysis.manager import AnalysisManager, PreservedAnalyses
from memopt.analysis.memory import build_timeline
from memopt.analysis.value_ops import cast_and_view_source
from memopt.graph import meta
from memopt.graph.step import StepGraphs
from memopt.passes.base import Pass, PassContext, PassResult
from memopt.passes.saved_rewrite import (
    erase_dead_views,
    fake_mode_of_step,
    planned_storages,
    rebuild_from_base,
    replace_saved_values,
    store_after_last_reader,
)
from memopt.plan.decisions import Compress
from memopt.plan.plan import TensorDecision, decision_for_node
from memopt.units import format_bytes

__all__ = [
    "CompressionChoice",
    "CompressedValue",
    "compress_saved_values",
    "roundtrip",
    "CompressSavedActivations",
]

_CODES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
_FORMATS = ("bf16", "fp8", "int8", "bits")
_CONVERT = torch.ops.prims.convert_element_type.default
_QUANTIZE = torch.ops.memopt.quantize_blockwise.default
_DEQUANTIZE = torch.ops.memopt.dequantize_blockwise.default
_PACK = torch.ops.memopt.pack_bits.default
_UNPACK = torch.ops.memopt.unpack_bits.default


@dataclass(frozen=True)
class CompressionChoice:
    """How to store one saved value: ``format`` ``"bf16"``, ``"fp8"`` (e4m3) or
    ``"int8"`` for floating values (``block_size`` elements share one float32 scale in
    fp8/int8), ``"bits"`` for bool masks (exact, eight per byte)."""

    format: str
    block_size: int = DEFAULT_BLOCK

    def __post_init__(self) -> None:
        if self.format not in _FORMATS:
            raise ValueError(f"compression format {self.format!r} is not one of {', '.join(map(repr, _FORMATS))}")
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size} must be positive")

    def stored_bytes(self, numel: int) -> int:
        """Bytes stored for ``numel`` elements (codes plus scales)."""
        return stored_bytes(self.format, numel, self.block_size)


@dataclass(frozen=True)
class CompressedValue:
    """One storage `compress_saved_values` compressed: its dense base, the saved values
    (the base and/or views of it) rebuilt from it in backward, and the bytes."""

    base: fx.Node
    values: tuple[fx.Node, ...]
    choice: CompressionChoice
    bytes_before: int
    bytes_after: int


def roundtrip(x: torch.Tensor, choice: CompressionChoice) -> torch.Tensor:
    """``x`` stored as ``choice`` and restored (the values backward will read)."""
    if choice.format == "bf16":
        return x.to(torch.bfloat16).to(x.dtype)
    if choice.format == "bits":
        return _UNPACK(_PACK(x), list(x.shape))
    codes, scales = _QUANTIZE(x, choice.block_size, _CODES[choice.format])
    return _DEQUANTIZE(codes, scales, list(x.shape), choice.block_size, x.dtype)


def _encode(graph: fx.Graph, source: fx.Node, choice: CompressionChoice) -> fx.Node:
    """The node computing the stored form of ``source``."""
    if choice.format == "bf16":
        return graph.call_function(_CONVERT, (source, torch.bfloat16))
    if choice.format == "bits":
        return graph.call_function(_PACK, (source,))
    return graph.call_function(_QUANTIZE, (source, choice.block_size, _CODES[choice.format]))


def _decode(graph: fx.Graph, stored: list[fx.Node], choice: CompressionChoice, original: torch.Tensor, size: list[int]) -> fx.Node:
    """The node restoring a value of ``size`` and ``original``'s dtype."""
    if choice.format == "bf16":
        return graph.call_function(_CONVERT, (stored[0], original.dtype))
    if choice.format == "bits":
        return graph.call_function(_UNPACK, (stored[0], size))
    return graph.call_function(_DEQUANTIZE, (*stored, size, choice.block_size, original.dtype))


def _insert_compress(group: SavedStorage, choice: CompressionChoice, fake_mode: Any) -> list[fx.Node]:
    """Forward nodes computing the stored form of the group's base after the last
    forward use of its storage."""
    parts = 2 if choice.format in _CODES else 1
    return store_after_last_reader(
        group, lambda graph, source: _encode(graph, source, choice), fake_mode, ("compressed", choice.format), parts
    )


def _restore(group: SavedStorage, choice: CompressionChoice, fake_mode: Any) -> Any:
    """A ``rebuild`` callback for `replace_saved_values`: restore the base once, then
    each saved value (the base itself, or a view rebuilt with ``as_strided``)."""
    original = meta.tensor_value(group.base) if group.base is not None else None
    assert original is not None

    def decode(graph: fx.Graph, inputs: list[fx.Node], size: list[int]) -> fx.Node:
        return _decode(graph, inputs, choice, original, size)

    return rebuild_from_base(group, decode, fake_mode, ("restored", choice.format))


def _groups_for(step: StepGraphs, decisions: Mapping[fx.Node, CompressionChoice]) -> list[tuple[SavedStorage, CompressionChoice]]:
    """The storage groups ``decisions`` name, each with its one choice; raises
    ``ValueError`` for values that are not saved, ineligible or decided differently."""
    chosen: list[tuple[SavedStorage, CompressionChoice]] = []
    named: set[fx.Node] = set()
    for fmt in sorted({c.format for c in decisions.values()}):
        for group in saved_storages(step, fmt, min_elements=0):
            choices = {decisions[v] for v in group.values if v in decisions and decisions[v].format == fmt}
            if not choices:
                continue
            names = [v.name for v in group.values]
            if len(choices) > 1 or any(v in decisions and decisions[v].format != fmt for v in group.values):
                raise ValueError(f"saved values {names} share one storage but were given different choices; decide them together")
            if not group.eligible:
                raise ValueError(f"cannot compress saved value(s) {names} as {fmt}: {group.reason}")
            named.update(group.values)
            chosen.append((group, choices.pop()))
    missing = [n.name for n in decisions if n not in named]
    if missing:
        raise ValueError(f"region {step.region}: {missing} are not saved tensors of the forward graph")
    position = {n: i for i, n in enumerate(step.saved_outputs())}
    return sorted(chosen, key=lambda pair: position[pair[0].values[0]])


def compress_saved_values(step: StepGraphs, decisions: Mapping[fx.Node, CompressionChoice]) -> list[CompressedValue]:
    """Store each saved forward value in ``decisions`` compressed as its choice says.

    A decision applies to the value's storage: saved views of one tensor are stored
    once (the dense base) and rebuilt in backward; values sharing a storage must get
    the same choice. Every decided storage must be eligible (`saved_storages`);
    raises ``ValueError`` naming the values and the reason otherwise, before changing
    anything. Returns what was compressed, in forward-output order.
    """
    if not decisions:
        return []
    groups = _groups_for(step, decisions)
    fake_mode = fake_mode_of_step(step)
    done = []
    for group, choice in groups:
        base = group.base
        assert base is not None
        numel = concrete_int(meta.tensor_value(base).numel())  # type: ignore[union-attr]
        stored = _insert_compress(group, choice, fake_mode)
        suffixes = ["codes", "scales"] if choice.format in _CODES else [choice.format]
        replace_saved_values(
            step, group.values, stored, _restore(group, choice, fake_mode), names=[f"{base.name}_{s}" for s in suffixes]
        )
        erase_dead_views(group)
        done.append(CompressedValue(base, group.values, choice, group.nbytes, choice.stored_bytes(numel)))
    return done


def _measured_errors(step: StepGraphs, groups: list[tuple[SavedStorage, CompressionChoice]], ctx: PassContext) -> dict[str, float] | str:
    """Relative error of each base's round trip, on the example inputs (by base name)."""
    inputs = concrete_inputs(ctx.example_inputs)
    placeholders = step.forward.graph.find_nodes(op="placeholder")
    if inputs is None or len(inputs) != len(placeholders):
        return "not measured: example inputs are fake or do not match the forward graph"
    chosen = {g.base: (g, c) for g, c in groups if g.base is not None}
    try:
        values = capture_values(step.forward, inputs, chosen)
        with real_tensors(inputs):
            stored = {n: v.permute(chosen[n][0].order) for n, v in values.items()}  # storage order
            return {n.name: relative_error(roundtrip(v, chosen[n][1]), v) for n, v in stored.items()}
    except Exception as exc:  # noqa: BLE001 - a failed measurement must not fail the pass
        return f"not measured: running the forward graph failed: {type(exc).__name__}: {exc}"


class CompressSavedActivations(Pass):
    """Store saved activations compressed (bf16, fp8 e4m3 or int8 with block scales,
    bool masks as bits), as the plan's `Compress` decisions say.

    Purpose: carry out the planner's compression decisions (`memopt.plan.storage`:
    with ``compress_activations`` and no budget every eligible value; with a budget
    the values the peak needs). Opt-in: changes numerics.

    Preconditions: a training step from AOTAutograd with fake values on every node,
    saved values listed after ``num_fwd_outputs`` (`StepGraphs.saved_pairs`);
    ``ctx.plan`` names the values (a saved value, or its storage's dense base).

    Guarantees: only eligible values are touched (`memopt.analysis.compressible`;
    a planned value that is not eligible raises); each compressed value is freed after
    its last forward use and restored, with its dtype, shape and a contiguous layout,
    right before its first backward use; forward outputs and backward inputs keep
    matching order. Planned values no longer saved (another pass replaced them) are
    listed in the details and left alone. The applied decisions carry the stored
    bytes and, with ``measure_error``, each value's round-trip error on the example
    inputs.

    Ordering: after every pass that changes which values are saved (remat) and after
    ``recompute_saved_casts``; it compresses what is still saved.
    """

    name = "compress_activations"
    numerics_preserving = False

    def run(self, step: StepGraphs, analyses: AnalysisManager, ctx: PassContext) -> PassResult:
        planned = {} if ctx.plan is None else ctx.plan.actions(Compress)
        if not planned or not step.is_training:
            return PassResult.unchanged(why="the plan compresses nothing" if step.is_training else "inference")
        decisions, missing = _decisions_from_plan(step, planned)
        carried, missing = _carry_to_sources(step, planned, missing, decisions)
        if not decisions:
            return PassResult.unchanged(not_saved=missing)
        errors = _measured_errors(step, _groups_for(step, decisions), ctx) if ctx.measure_error else None
        saved_before = _saved_bytes(step)
        done = compress_saved_values(step, decisions)
        saved_after = _saved_bytes(step)
        described = [_describe(c, errors) for c in done]
        details = {
            "compressed": described,
            "not_saved": missing,
            "saved_bytes_before": saved_before,
            "saved_bytes_after": saved_after,
            "bytes_saved": saved_before - saved_after,
        }
        if isinstance(errors, str):
            details["error"] = errors
        if carried:
            details["carried_to_source"] = {base.name: cast for base, cast in carried.items()}
        applied = tuple(_applied(ctx, step, c, d, carried.get(c.base)) for c, d in zip(done, described))
        return PassResult(True, PreservedAnalyses.none(), details, applied=applied, summary=tuple(_summary(details)))


def _decisions_from_plan(
    step: StepGraphs, planned: Mapping[str, Compress]
) -> tuple[dict[fx.Node, CompressionChoice], list[str]]:
    """The plan's compression actions as choices per saved forward node, and the
    planned names no saved storage answers to."""
    groups, missing = planned_storages(step, planned, lambda action: action.format)
    decisions = {
        v: CompressionChoice(action.format, action.block_size) for group, action in groups for v in group.values
    }
    return decisions, missing


def _carry_to_sources(
    step: StepGraphs, planned: Mapping[str, Compress], missing: list[str], decisions: dict[fx.Node, CompressionChoice]
) -> tuple[dict[fx.Node, str], list[str]]:
    """Planned dtype copies that ``recompute_saved_casts`` no longer saves: their
    compression goes to the source saved in their place (the bf16 value an fp32 copy
    was made from), when that storage is eligible in the same format and undecided.
    Adds to ``decisions``; returns {stored base: the planned copy's name} and the
    names still missing. (Left as they were, the sources stayed uncompressed: with
    ``precision="bf16"`` and ``compress_activations="fp8"`` the zoo GPT's saved bytes
    were 0.296 of fp32's, against 0.266 with fp8 alone.)"""
    nodes = {n.name: n for n in step.forward.graph.nodes}
    sources: dict[fx.Node, str] = {}
    for name in missing:
        node = nodes.get(name)
        if node is not None and (source := cast_and_view_source(node)) is not node:
            sources[source] = name
    carried: dict[fx.Node, str] = {}
    for fmt in sorted({planned[name].format for name in sources.values()}):
        for group in saved_storages(step, fmt, min_elements=0):
            names = [sources[n] for n in (*group.values, group.base) if n in sources and planned[sources[n]].format == fmt]
            if not names or not group.eligible or group.base is None or any(v in decisions for v in group.values):
                continue
            action = planned[names[0]]
            decisions.update((v, CompressionChoice(action.format, action.block_size)) for v in group.values)
            carried[group.base] = names[0]
    done = set(carried.values())
    return carried, [name for name in missing if name not in done]


def _applied(
    ctx: PassContext, step: StepGraphs, c: CompressedValue, described: dict[str, Any], copy_of: str | None
) -> TensorDecision:
    """The plan's decision about ``c`` as carried out: bytes stored, measured error.
    A storage compressed in place of its planned dtype copy ``copy_of`` gets a
    decision of its own (the copy's says it is cast again in backward)."""
    assert ctx.plan is not None
    extra = {"bytes_after": c.bytes_after, "rel_error": described["rel_error"], "format": c.choice.format}
    if copy_of is not None:
        reason = f"compressed in place of its dtype copy {copy_of}, which recompute_saved_casts casts again in backward"
        action = Compress(c.choice.format, c.choice.block_size)
        return decision_for_node(c.base, f"forward:{c.base.name}", step.region, c.bytes_before, action, reason, **extra)
    names = {c.base.name, *(v.name for v in c.values)}
    planned = next(d for d in ctx.plan.decisions if d.node_name in names)
    return dataclasses.replace(planned, details={**planned.details, **extra})


def _summary(details: Mapping[str, Any]) -> list[str]:
    """The report's lines: how many values, the saved bytes before and after, and the
    measured round-trip error (docs/precision.md)."""
    compressed = details["compressed"]
    before, after = details["saved_bytes_before"], details["saved_bytes_after"]
    formats = ", ".join(sorted({c["format"] for c in compressed}))
    lines = [
        f"compress_activations {formats}: {len(compressed)} saved tensors compressed; saved "
        f"activations {format_bytes(before)} -> {format_bytes(after)} ({after / before:.0%})"
    ]
    # bit-packed masks are exact: their zeros would pull the median of the lossy formats down
    errors = [c["rel_error"] for c in compressed if c.get("rel_error") is not None and c["format"] != "bits"]
    if errors:
        lines.append(
            f"  round-trip rel. error on the example inputs: median {statistics.median(errors):.2e}, "
            f"max {max(errors):.2e}" + (" (masks packed to bits are exact)" if "bits" in formats else "")
        )
    return lines


def _saved_bytes(step: StepGraphs) -> int:
    return sum(iv.nbytes for iv in build_timeline(step).saved_activations())


def _describe(c: CompressedValue, errors: dict[str, float] | str | None) -> dict[str, Any]:
    value = meta.tensor_value(c.base)
    loc = meta.source_location(c.base)
    return {
        "value": c.base.name,
        "saved_as": [v.name for v in c.values],
        "format": c.choice.format,
        "shape": None if value is None else [concrete_int(s) for s in value.shape],
        "dtype": None if value is None else str(value.dtype).replace("torch.", ""),
        "bytes_before": c.bytes_before,
        "bytes_after": c.bytes_after,
        "rel_error": errors.get(c.base.name) if isinstance(errors, dict) else None,
        "source": None if loc is None else str(loc),
    }
