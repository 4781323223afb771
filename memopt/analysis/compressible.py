"""Which saved-for-backward values may be stored compressed, and why the others not.

Pure (no graph mutation), so both the ``compress_activations`` pass and a planner
weighing compression against other choices can ask it.

The unit is a **storage**: several saved values may be views of one forward tensor
(AOTAutograd saves ``transpose(x)`` for a matmul's backward). Compression stores the
storage's dense *base* tensor once; backward restores it and rebuilds each saved view
with ``as_strided``. A storage is eligible when storing it compressed actually frees
its bytes and restoring it is exact in layout:

* floating values (float32, bfloat16, float16) of one dtype for the value formats;
  bool masks (dropout) only for ``"bits"``, which stores them exactly, eight per
  byte; never integer indices or symbols;
* a true activation: the storage is made in the forward graph, not a parameter, a
  buffer, an input or a view of one (those stay alive anyway), nor a dtype copy of one
  (a low-precision weight copy is a parameter in another dtype), nor a parameter
  all-gathered from its shards (`meta.is_regatherable`, `meta.is_gathered_copy`) or a
  cast of one: the planner frees those by gathering them again in backward, exactly;
* free of infinities by construction (fp8/int8): not an attention mask built with
  ``-inf`` (`memopt.analysis.value_ops.may_hold_infinities`); the block formats do not
  represent inf. (bf16 does, so it may store them.)
* not read in backward only for its signs or zeros (fp8/int8): ReLU's backward keeps
  the gradient where the saved output is positive, and a block format rounds small
  positives to 0, dropping those gradients (measured: 17-25% error in a CNN's
  BatchNorm gradients with int8). bf16 keeps every nonzero nonzero.
* not also returned to the caller (else the storage stays alive);
* a dense base exists: a node whose value covers the whole storage from offset 0,
  contiguous up to a permutation of dims (elementwise results of transposed inputs);
  it is stored in storage order and restored with the original layout;
* static shapes for the compressed formats (their kernels are planned per size);
  format ``"raw"`` takes symbolic sizes, sized by their hints;
* at least `MIN_ELEMENTS` elements: below that the bytes saved (under 3 KiB at fp8)
  do not pay for two kernel launches and a scales tensor; this keeps norm statistics
  and per-row scalars as they are;
* worth it for the format: ``bf16`` only shrinks 4-byte values.

Format ``"raw"`` asks the same question for moving the bytes elsewhere unchanged
(offload): any one dtype qualifies and the numerics rules (infinities, signs) do not
apply.

`choose_formats` is the option-driven choice (every eligible storage, with fallbacks
for masks), and `last_forward_reader` where the storage's last forward reader is: both
pure, used by the planner (`memopt.plan.storage`) and by the passes that rewrite.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx

from memopt.analysis.aliasing import GraphAliasing, Storage, analyze_aliasing, concrete_int
from memopt.analysis.value_ops import SIGN_READERS, VIEW_OPS, cast_and_view_source, may_hold_infinities
from memopt.graph import meta
from memopt.graph.step import StepGraphs, output_values

__all__ = [
    "DYNAMIC_SHAPE", "GATHERED_PARAMETER", "MIN_ELEMENTS", "SavedStorage", "saved_storages", "stored_bytes", "choose_formats", "last_forward_reader",
    "DEFAULT_BLOCK",
]  # fmt: skip

MIN_ELEMENTS = 1024
DEFAULT_BLOCK = 64
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK_FORMATS = ("fp8", "int8")


def stored_bytes(fmt: str, numel: int, block_size: int = DEFAULT_BLOCK) -> int:
    """Bytes stored for ``numel`` elements in ``fmt`` (codes plus scales)."""
    if fmt == "bf16":
        return 2 * numel
    if fmt == "bits":
        return -(-numel // 8)
    if fmt in _BLOCK_FORMATS:
        return numel + 4 * -(-numel // block_size)
    raise ValueError(f"no stored size for format {fmt!r}")


@dataclass(frozen=True)
class SavedStorage:
    """The saved values that live on one storage (forward nodes, in output order), the
    dense ``base`` node covering it (None if there is none), the storage's bytes, and
    why it cannot be compressed (None when it can)."""

    values: tuple[fx.Node, ...]
    base: fx.Node | None
    nbytes: int
    reason: str | None
    storage: Storage | None = None
    order: tuple[int, ...] = ()
    """Dims of ``base`` in storage order: ``base.permute(order)`` is contiguous."""
    aliases: tuple[fx.Node, ...] = ()
    """Every forward node whose value lives on the storage (producer, base, views)."""

    @property
    def eligible(self) -> bool:
        return self.reason is None


def storage_order(value: torch.Tensor) -> tuple[int, ...] | None:
    """The permutation of dims that makes ``value`` contiguous (identity if it is), or
    None when no permutation does (overlapping or gapped strides)."""
    order = tuple(sorted(range(value.dim()), key=lambda d: (-concrete_int(value.stride(d)), d)))
    expected = 1
    for d in reversed(order):  # on the sizes' hints: asking a symbolic tensor would add guards
        size = concrete_int(value.shape[d])
        if size != 1 and concrete_int(value.stride(d)) != expected:
            return None
        expected *= size
    return order


def _dense_base(storage: Storage, candidates: list[fx.Node]) -> tuple[fx.Node, tuple[int, ...]] | None:
    """A node whose value covers all of ``storage`` from offset 0 densely (contiguous
    up to a permutation of dims, as elementwise ops on transposed inputs produce), and
    that permutation."""
    producer = storage.producer  # preferred: defined first, before any view of it
    pool = [producer] + [
        u for u in producer.users if u.target is operator.getitem and u.args[1] == storage.index
    ] + list(candidates)
    for node in pool:
        value = meta.tensor_value(node)
        if (
            value is not None
            and concrete_int(value.storage_offset()) == 0
            and concrete_int(value.numel()) * value.element_size() == storage.nbytes
            and (order := storage_order(value)) is not None
        ):
            return node, order
    return None


GATHERED_PARAMETER = "a gathered parameter or a dtype copy of one (re-gathered in backward instead)"
"""`SavedStorage.reason` of a parameter all-gathered from its shards (a sharded model,
docs/sharding.md), or a cast of one: a parameter like any other, which the planner frees
after forward by gathering it again in backward (exact), never by rounding it or
moving it to disk."""

DYNAMIC_SHAPE = "dynamic shape (compression needs static shapes)"
"""`SavedStorage.reason` of a storage whose values have symbolic sizes, for a
compressed format (format ``"raw"``, offload, takes them: sized by their hints)."""


def saved_storages(step: StepGraphs, fmt: str, min_elements: int = MIN_ELEMENTS) -> list[SavedStorage]:
    """Every storage holding saved tensors of ``step``, with its eligibility for format
    ``fmt`` (``"bf16"``, ``"fp8"``, ``"int8"`` for floating values, ``"bits"`` for bool
    masks), in forward-output order of their first saved value."""
    if step.backward is None:
        return []
    aliasing = analyze_aliasing(step.forward.graph)
    pairs = [(fw, bw) for fw, bw in step.saved_pairs() if not meta.is_symbolic(fw)]
    groups: dict[object, list[tuple[fx.Node, fx.Node]]] = {}
    for fw, bw in pairs:
        storages = aliasing.storages_of(fw)
        key: object = storages[0] if len(storages) == 1 else fw
        groups.setdefault(key, []).append((fw, bw))
    returned = {
        s for out in output_values(step.forward)[: step.num_fwd_outputs] if out is not None for s in aliasing.storages_of(out)
    }
    infinite = may_hold_infinities(step.forward.graph) if fmt in _BLOCK_FORMATS else set()
    on_storage: dict[Storage, list[fx.Node]] = {}
    for node in step.forward.graph.nodes:
        for s in aliasing.storages_of(node):
            on_storage.setdefault(s, []).append(node)
    result = []
    for key, members in groups.items():
        storage = key if isinstance(key, Storage) else None
        values = tuple(fw for fw, _ in members)
        found = None if storage is None else _dense_base(storage, list(values))
        base, order = found if found is not None else (None, ())
        reason = _ineligible(members, storage, base, aliasing, returned, fmt, min_elements)
        if reason is None and base is not None and (base in infinite or any(v in infinite for v in values)):
            reason = "may hold infinities (e.g. a -inf attention mask)"
        if reason is None and fmt in _BLOCK_FORMATS and any(_reads_signs(bw) for _, bw in members):
            reason = "backward reads its signs or zeros (ReLU), which block rounding flips"
        aliases = tuple(on_storage.get(storage, ())) if storage is not None else ()
        result.append(SavedStorage(values, base, 0 if storage is None else storage.nbytes, reason, storage, order, aliases))
    return result


def _reads_signs(placeholder: fx.Node) -> bool:
    """A backward op reads the saved value (or a view of it) as a sign/zero mask."""
    pending, seen = list(placeholder.users), set()
    while pending:
        user = pending.pop()
        if user in seen:
            continue
        seen.add(user)
        if user.target in SIGN_READERS:
            return True
        if user.target in VIEW_OPS:
            pending.extend(user.users)
    return False


def _ineligible(
    members: list[tuple[fx.Node, fx.Node]],
    storage: Storage | None,
    base: fx.Node | None,
    aliasing: GraphAliasing,
    returned: set[Storage],
    fmt: str,
    min_elements: int,
) -> str | None:
    """Why the storage of ``members`` cannot be stored compressed in ``fmt``, or None."""
    values = [meta.tensor_value(fw) for fw, _ in members]
    kinds = (torch.bool,) if fmt == "bits" else _FLOATS
    if fmt == "raw":
        if any(v is None for v in values) or len({v.dtype for v in values}) != 1:  # type: ignore[union-attr]
            return "not one tensor dtype"
    elif any(v is None or v.dtype not in kinds for v in values) or len({v.dtype for v in values}) != 1:  # type: ignore[union-attr]
        if fmt == "bits":
            return "not a bool mask"
        return "not a floating tensor (masks, indices and symbols are kept exact)"
    if storage is None or storage.producer.op == "placeholder":
        return "parameter, input or a view of one"
    source = cast_and_view_source(storage.producer)
    if source.op == "placeholder":
        return "a dtype copy of a parameter or input"
    if meta.is_regatherable(source) or meta.is_gathered_copy(source):
        return GATHERED_PARAMETER
    if storage in returned:
        return "also returned to the caller"
    if fmt != "raw" and any(not all(isinstance(s, int) for s in v.shape) for v in values):  # type: ignore[union-attr]
        return DYNAMIC_SHAPE
    if base is None:
        return "no dense tensor covers its storage"
    value = meta.tensor_value(base)
    assert value is not None
    if concrete_int(value.numel()) < min_elements:
        return f"fewer than {min_elements} elements"
    if fmt == "bf16" and value.element_size() <= 2:
        return "already 2 bytes per element"
    if any(meta.saved_without_version_check(fw) for fw, _ in members) or not any(bw.users for _, bw in members):
        return "saved without version check, or unused in backward"
    return None


def choose_formats(
    step: StepGraphs, fmt: str, min_elements: int = MIN_ELEMENTS
) -> tuple[list[tuple[SavedStorage, str]], Counter[str]]:
    """The option-driven choice for ``compress_activations=fmt``: every eligible
    storage in ``fmt``; bool masks as bits (exact); for fp8/int8, fp32 values only the
    block formats cannot take (infinities, ReLU outputs) in bf16. Also how many
    storages were skipped (or given another format) per reason."""
    chosen: list[tuple[SavedStorage, str]] = []
    skipped: Counter[str] = Counter()
    others = ["bits"] + (["bf16"] if fmt in _BLOCK_FORMATS else [])
    fallbacks = [(other, {g.values: g for g in saved_storages(step, other, min_elements)}) for other in others]
    for group in saved_storages(step, fmt, min_elements):
        if group.eligible:
            chosen.append((group, fmt))
            continue
        found = next(
            ((o, groups[group.values]) for o, groups in fallbacks if group.values in groups and groups[group.values].eligible),
            None,
        )
        if found is not None:
            chosen.append((found[1], found[0]))
        skipped[str(group.reason) + (f": stored as {found[0]}" if found else "")] += 1
    return chosen, skipped


def only_saved_views(group: SavedStorage) -> set[fx.Node]:
    """Views of the storage that exist only to be saved (AOTAutograd puts ``detach``
    and transposes of saved values at the end of forward): every user is the output
    or another such view. They die once something else is saved instead."""
    result: set[fx.Node] = set()
    for node in reversed(group.aliases):
        if node.target in VIEW_OPS and all(u.op == "output" or u in result for u in node.users):
            result.add(node)
    return result


def last_forward_reader(group: SavedStorage) -> fx.Node:
    """The latest forward node that reads the group's storage (its dense base
    included), other than views that only exist to be saved: after it, only a
    stored copy is needed."""
    graph = group.values[0].graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    skip = only_saved_views(group)
    readers = [a for a in group.aliases if a not in skip] + [
        u for a in group.aliases for u in a.users if u.op != "output" and u not in skip
    ]
    readers.append(group.base)  # type: ignore[arg-type]
    return max(readers, key=order.__getitem__)
