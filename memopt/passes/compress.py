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
(``{saved forward node: CompressionChoice}``); the option-driven pass calls it with
"every eligible value" (`memopt.analysis.compressible`), a planner can call it with
its own choice per value.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

import memopt.codegen.quantize  # noqa: F401  - registers torch.ops.memopt.*
from memopt.codegen.bitpack import packed_bytes
from memopt.analysis.aliasing import concrete_int
from memopt.analysis.compressible import MIN_ELEMENTS, SavedStorage, saved_storages
from memopt.analysis.error_probe import capture_values, concrete_inputs, real_tensors, relative_error
from memopt.analysis.manager import AnalysisManager, PreservedAnalyses
from memopt.analysis.cost import device_model
from memopt.analysis.memory import build_timeline, main_device
from memopt.analysis.value_ops import VIEW_OPS
from memopt.graph import meta
from memopt.graph.step import StepGraphs
from memopt.passes.base import Pass, PassContext, PassResult
from memopt.passes.saved_rewrite import fake_mode_of_step, replace_saved_values, run_fake
from memopt.plan.compression import choose_for_budget

__all__ = [
    "CompressionChoice",
    "CompressedValue",
    "compress_saved_values",
    "compress_every_eligible",
    "compression_for_planning",
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
DEFAULT_BLOCK = 64


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
        if self.format == "bf16":
            return 2 * numel
        if self.format == "bits":
            return packed_bytes(numel)
        return numel + 4 * -(-numel // self.block_size)


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


def _only_saved(group: SavedStorage) -> set[fx.Node]:
    """Views of the storage that exist only to be saved (AOTAutograd puts ``detach``
    and transposes of saved values at the end of forward): every user is the output
    or another such view. They die once the codes are saved instead."""
    result: set[fx.Node] = set()
    for node in reversed(group.aliases):
        if node.target in VIEW_OPS and all(u.op == "output" or u in result for u in node.users):
            result.add(node)
    return result


def _last_use_of_storage(group: SavedStorage) -> fx.Node:
    """The latest forward node that reads the group's storage, other than views that
    only exist to be saved: after it, only the compressed copy is needed."""
    graph = group.values[0].graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    skip = _only_saved(group)
    readers = [a for a in group.aliases if a not in skip] + [
        u for a in group.aliases for u in a.users if u.op != "output" and u not in skip
    ]
    readers.append(group.base)  # type: ignore[arg-type]  # the compressed form reads it
    return max(readers, key=order.__getitem__)


def _erase_dead_views(group: SavedStorage) -> None:
    """Remove the only-saved views that the rewrite left without users."""
    for node in sorted(_only_saved(group), key=list(group.values[0].graph.nodes).index, reverse=True):
        if not node.users:
            node.graph.erase_node(node)


def _insert_compress(group: SavedStorage, choice: CompressionChoice, fake_mode: Any) -> list[fx.Node]:
    """Forward nodes computing the stored form of the group's base after the last
    forward use of its storage."""
    base = group.base
    assert base is not None
    graph = base.graph
    source, anchor = base, _last_use_of_storage(group)
    if list(group.order) != sorted(group.order):  # read the storage in its own order
        with graph.inserting_after(anchor):
            source = anchor = graph.call_function(torch.ops.aten.permute.default, (base, list(group.order)))
        run_fake(source, fake_mode)
    with graph.inserting_after(anchor):
        stored = _encode(graph, source, choice)
    meta.copy_meta(base, stored)
    meta.set_memopt_tag(stored, "compressed", choice.format)
    parts = run_fake(stored, fake_mode)
    if choice.format not in _CODES:  # one output
        return [stored]
    outputs, anchor = [], stored
    for i in range(2):
        with graph.inserting_after(anchor):
            anchor = graph.call_function(operator.getitem, (stored, i))
        meta.set_fake_value(anchor, parts[i])
        outputs.append(anchor)
    return outputs


def _restore(group: SavedStorage, choice: CompressionChoice, fake_mode: Any) -> Any:
    """A ``rebuild`` callback for `replace_saved_values`: restore the base once, then
    each saved value (the base itself, or a view rebuilt with ``as_strided``)."""
    base = group.base
    original = meta.tensor_value(base) if base is not None else None
    assert base is not None and original is not None

    order = list(group.order)

    def rebuild(graph: fx.Graph, inputs: list[fx.Node]) -> list[fx.Node]:
        restored = _decode(graph, inputs, choice, original, [concrete_int(original.shape[d]) for d in order])
        meta.copy_meta(base, restored)
        meta.set_memopt_tag(restored, "restored", choice.format)
        run_fake(restored, fake_mode)
        if order != sorted(order):  # back to the original dims: the original strides
            inverse = sorted(range(len(order)), key=order.__getitem__)
            restored = graph.call_function(torch.ops.aten.permute.default, (restored, inverse))
            run_fake(restored, fake_mode)
        return [_view_of(graph, restored, value, fake_mode) for value in group.values]

    return rebuild


def _view_of(graph: fx.Graph, restored: fx.Node, value: fx.Node, fake_mode: Any) -> fx.Node:
    """``value`` rebuilt from the restored base (itself if it has the base's layout)."""
    want, have = meta.tensor_value(value), meta.tensor_value(restored)
    assert want is not None and have is not None
    geometry = (list(want.shape), list(want.stride()), concrete_int(want.storage_offset()))
    if geometry == (list(have.shape), list(have.stride()), 0):
        return restored
    node = graph.call_function(torch.ops.aten.as_strided.default, (restored, *geometry))
    meta.copy_meta(value, node)
    run_fake(node, fake_mode)
    return node


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
        _erase_dead_views(group)
        done.append(CompressedValue(base, group.values, choice, group.nbytes, choice.stored_bytes(numel)))
    return done


def compress_every_eligible(
    step: StepGraphs, fmt: str, min_elements: int = MIN_ELEMENTS
) -> tuple[dict[fx.Node, CompressionChoice], Counter[str]]:
    """The option-driven decisions: every saved value on an eligible storage in
    ``fmt``; bool masks as bits (exact); for fp8/int8, fp32 values only the block
    formats cannot take (infinities, ReLU outputs) in bf16. Also how many storages
    were skipped (or given another format) per reason."""
    decisions: dict[fx.Node, CompressionChoice] = {}
    skipped: Counter[str] = Counter()
    others = ["bits"] + (["bf16"] if fmt in _CODES else [])
    fallbacks = [(other, {g.values: g for g in saved_storages(step, other, min_elements)}) for other in others]
    for group in saved_storages(step, fmt, min_elements):
        if group.eligible:
            decisions.update(dict.fromkeys(group.values, CompressionChoice(fmt)))
            continue
        other = next((o for o, groups in fallbacks if group.values in groups and groups[group.values].eligible), None)
        if other is not None:
            decisions.update(dict.fromkeys(group.values, CompressionChoice(other)))
        skipped[str(group.reason) + (f": stored as {other}" if other else "")] += 1
    return decisions, skipped


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
    """Store saved activations compressed (bf16, fp8 e4m3 or int8 with block scales).

    Purpose: shrink the values held from forward to backward, which dominate a training
    step's peak, when ``compress_activations`` is set (opt-in: changes numerics).

    Preconditions: a training step from AOTAutograd with fake values on every node,
    saved values listed after ``num_fwd_outputs`` (`StepGraphs.saved_pairs`).

    Guarantees: only eligible values are touched (`memopt.analysis.compressible`:
    never parameters, inputs or views of them, masks, integers, tiny, shared or
    returned values); each compressed value is freed after its last forward use and
    restored, with its dtype, shape and a contiguous layout, right before its first
    backward use; forward outputs and backward inputs keep matching order. With
    ``measure_error`` the details give each value's round-trip error on the example
    inputs. With a memory budget (``ctx.plan.budget_bytes``) only the values
    `memopt.plan.compression.choose_for_budget` picks are compressed: none if the
    peak already fits, else the largest live at the peak until it does.

    Ordering: after every pass that changes which values are saved (remat) and after
    ``recompute_saved_casts``; it compresses what is still saved.
    """

    name = "compress_activations"
    numerics_preserving = False

    def run(self, step: StepGraphs, analyses: AnalysisManager, ctx: PassContext) -> PassResult:
        fmt = ctx.config.compress_activations
        if fmt is None or not step.is_training:
            return PassResult.unchanged(why="compress_activations=None" if fmt is None else "inference")
        decisions, skipped = compress_every_eligible(step, fmt)
        budget = None if ctx.plan is None else ctx.plan.budget_bytes
        planned: dict[str, Any] = {}
        if decisions and budget is not None:
            decisions, planned = _within_budget(step, decisions, budget, ctx.step_context)
        if not decisions:
            return PassResult.unchanged(format=fmt, skipped=dict(skipped), **planned)
        errors = _measured_errors(step, _groups_for(step, decisions), ctx) if ctx.measure_error else None
        saved_before = _saved_bytes(step)
        done = compress_saved_values(step, decisions)
        saved_after = _saved_bytes(step)
        details = {
            "format": fmt,
            "block_size": DEFAULT_BLOCK,
            "compressed": [_describe(c, errors) for c in done],
            "skipped": dict(skipped),
            "saved_bytes_before": saved_before,
            "saved_bytes_after": saved_after,
            "bytes_saved": saved_before - saved_after,
            **planned,
        }
        if isinstance(errors, str):
            details["error"] = errors
        return PassResult(True, PreservedAnalyses.none(), details)


def compression_for_planning(fmt: str) -> Callable[[StepGraphs], float]:
    """The planner's view of ``compress_activations=fmt``: compress every eligible
    saved value of a candidate step in place (`compress_every_eligible`) and return
    the modelled seconds of the kernels (each storage read and written once to
    compress and once to restore, at the device's bandwidth, plus two launches)."""

    def shrink(step: StepGraphs) -> float:
        decisions, _ = compress_every_eligible(step, fmt)
        done = compress_saved_values(step, decisions)
        device = device_model(main_device(step))
        moved = sum(2 * (c.bytes_before + c.bytes_after) for c in done)
        return moved / device.bytes_per_s + 2 * len(done) * device.op_overhead_s

    return shrink


def _within_budget(
    step: StepGraphs, decisions: dict[fx.Node, CompressionChoice], budget: int, context: Any = None
) -> tuple[dict[fx.Node, CompressionChoice], dict[str, Any]]:
    """The subset of ``decisions`` that brings the estimated peak within ``budget``
    (`memopt.plan.compression`), and what to report about the choice."""
    storages = []
    for group, choice in _groups_for(step, decisions):
        numel = concrete_int(meta.tensor_value(group.base).numel())  # type: ignore[union-attr]
        storages.append((group.values, group.aliases, group.nbytes - choice.stored_bytes(numel)))
    outcome = choose_for_budget(step, decisions, storages, budget, compress_saved_values, context)  # type: ignore[arg-type]
    planned = {
        "budget_bytes": budget,
        "peak_before": outcome.peak_before,
        "peak_after": outcome.peak_after,
        "candidates": len(storages),
        "rounds": outcome.rounds,
    }
    return outcome.decisions, planned  # type: ignore[return-value]


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
