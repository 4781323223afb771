"""Replace one saved-for-backward value by others, in both graphs of a step.

Passes that change *how* a value crosses from forward to backward (compressed codes
instead of the value, a cast's source instead of the cast, later an offload
handle) all make the same edit:

* forward: in the output node's saved section (after ``num_fwd_outputs``), the value
  is replaced by the new forward values, at the same position (values already saved
  are not saved twice);
* backward: the value's placeholder is replaced by placeholders for the new values,
  inserted at the same position so forward outputs and backward inputs stay in the
  same order (`StepGraphs.saved_pairs`), and a caller-built expression recreating the
  value from them is inserted right before the first use.

AOTAutograd counts saved values from the forward outputs after the partitioner
returns, so the bookkeeping stays consistent without touching ``num_fwd_outputs``.
Saved SymInts (first among the backward inputs) are never touched.
"""

from __future__ import annotations

import difflib
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.fx as fx

from memopt.analysis.compressible import SavedStorage, last_forward_reader, only_saved_views, saved_storages
from memopt.graph import meta
from memopt.graph.step import StepGraphs

__all__ = [
    "replace_saved_values",
    "store_after_last_reader",
    "rebuild_from_base",
    "erase_dead_views",
    "planned_storages",
    "planned_decision",
    "run_fake",
    "fake_mode_of_step",
    "is_half",
    "BackwardSymbols",
]

Rebuild = Callable[[fx.Graph, list[fx.Node]], list[fx.Node]]
A = TypeVar("A")


def run_fake(node: fx.Node, fake_mode: Any) -> Any:
    """Compute and record the fake value of a freshly inserted ``call_function`` node
    from its inputs' recorded values."""
    args = fx.node.map_arg(node.args, meta.fake_value)
    kwargs = fx.node.map_arg(node.kwargs, meta.fake_value)
    with meta.running_fake(fake_mode):
        value = node.target(*args, **kwargs)  # type: ignore[operator]
    meta.set_fake_value(node, value)
    return value


def replace_saved_values(
    step: StepGraphs,
    values: Sequence[fx.Node],
    replacements: Sequence[fx.Node],
    rebuild: Rebuild,
    *,
    names: Sequence[str] | None = None,
) -> list[fx.Node]:
    """Save ``replacements`` (forward nodes with fake values) instead of the saved
    forward ``values``, and recreate those values in backward with
    ``rebuild(backward_graph, placeholders)``, which returns one node per value (its
    insertion point is before the earliest first user of the values' placeholders;
    the nodes it makes need fake values). Returns the rebuilt nodes.

    The replacements take the position of the first of ``values`` in the forward
    outputs and backward inputs; replacements already saved are not saved twice.
    ``names`` optionally names the new backward placeholders (aligned with
    ``replacements``). Raises ``ValueError`` if a value is not saved.
    """
    assert step.backward is not None, "replace_saved_values needs a training step"
    pairs = dict(step.saved_pairs())
    missing = [v.name for v in values if v not in pairs]
    if missing:
        raise ValueError(f"region {step.region}: {missing} are not saved for backward")
    fw_out = step.forward.graph.find_nodes(op="output")[0]
    outputs = list(fw_out.args[0])
    positions = sorted(outputs.index(v, step.num_fwd_outputs) for v in values)
    fresh = [r for r in dict.fromkeys(replacements) if r not in pairs]
    anchor_ph = pairs[outputs[positions[0]]]
    for position in reversed(positions[1:]):
        del outputs[position]
    outputs[positions[0] : positions[0] + 1] = fresh
    fw_out.args = (type(fw_out.args[0])(outputs), *fw_out.args[1:])

    bw_graph = step.backward.graph
    placeholders: dict[fx.Node, fx.Node] = {}
    for k, r in enumerate(replacements):  # in forward-output order, like `fresh`
        if r in fresh and r not in placeholders:
            with bw_graph.inserting_before(anchor_ph):
                ph = bw_graph.placeholder(names[k] if names is not None else r.name)
            meta.set_fake_value(ph, meta.fake_value(r))
            placeholders[r] = ph
    old = [pairs[v] for v in values]
    users = [u for ph in old for u in ph.users]
    order = {n: i for i, n in enumerate(bw_graph.nodes)}
    with bw_graph.inserting_before(min(users, key=order.__getitem__) if users else anchor_ph):
        rebuilt = rebuild(bw_graph, [placeholders.get(r) or pairs[r] for r in replacements])
    for ph, new in zip(old, rebuilt):
        ph.replace_all_uses_with(new)
        bw_graph.erase_node(ph)
    return rebuilt


Encode = Callable[[fx.Graph, fx.Node], fx.Node]
"""Inserts (at the graph's insertion point) the node storing a dense value."""
Decode = Callable[[fx.Graph, list[fx.Node], list[Any]], fx.Node]
"""Inserts the node restoring a dense value of the given size from the stored nodes
(each dim an int, or a backward node holding a symbolic size: `BackwardSymbols`)."""


def _expr(value: int | torch.SymInt) -> Any:
    """What identifies a size without asking for its value (which would add a guard):
    the int, or the SymInt's expression."""
    return value if isinstance(value, int) else value.node.expr


def _same_geometry(a: Sequence[int | torch.SymInt], b: Sequence[int | torch.SymInt]) -> bool:
    """``a`` and ``b`` are the same sizes, compared by expression (no guards added)."""
    return len(a) == len(b) and all(_expr(x) == _expr(y) for x, y in zip(a, b))


_SYM_OPS = {
    "size": torch.ops.aten.sym_size.int,
    "stride": torch.ops.aten.sym_stride.int,
    "offset": torch.ops.aten.sym_storage_offset.default,
}


class BackwardSymbols:
    """Backward nodes holding the symbolic sizes of forward values, so that a value
    rebuilt in backward (a reload) gets its runtime size in a dynamic-shape compile,
    where one graph serves every shape.

    `of` answers an int with itself; a SymInt with the backward placeholder of a saved
    SymInt of the same expression (already saved by AOTAutograd or by an earlier call),
    else it saves one: ``aten.sym_size.int`` / ``sym_stride.int`` /
    ``sym_storage_offset`` of a forward tensor holding it, placed right after that
    tensor, appended to the forward outputs (AOTAutograd takes saved SymInts from the
    end of them) and received by a new backward placeholder after the saved SymInts
    (backward takes them first). AOTAutograd counts saved SymInts after the
    partitioner returns, so nothing else needs updating.

    Preconditions: ``step`` is a training step whose forward and backward share one
    shape environment (AOTAutograd's); one instance per step, used by one rewrite
    after another (it caches the SymInts it saved).
    """

    def __init__(self, step: StepGraphs) -> None:
        assert step.backward is not None, "BackwardSymbols needs a training step"
        self.step = step
        self.saved: dict[Any, fx.Node] = {}
        for fw, bw in step.saved_symbols().items():
            value = meta.fake_value(fw)
            if isinstance(value, torch.SymInt):
                self.saved.setdefault(_expr(value), bw)

    def of(self, value: int | torch.SymInt, candidates: Sequence[fx.Node]) -> int | fx.Node:
        """``value`` for a backward graph: itself if an int, else a backward node
        holding it at run time, read (if not yet saved) from the first of the
        forward ``candidates`` whose size, stride or storage offset it is.

        Raises ``ValueError`` naming the expression when no candidate holds it."""
        if isinstance(value, int):
            return value
        key = _expr(value)
        if key in self.saved:
            return self.saved[key]
        for source in candidates:
            found = _holding(meta.tensor_value(source), key)
            if found is not None:
                self.saved[key] = self._save(source, value, *found)
                return self.saved[key]
        raise ValueError(
            f"region {self.step.region}: no forward value among {[c.name for c in candidates]} has the symbolic "
            f"size {key} as a size, stride or offset, so backward cannot be given it."
        )

    def _save(self, source: fx.Node, value: torch.SymInt, kind: str, dim: int | None) -> fx.Node:
        forward, backward = self.step.forward.graph, self.step.backward.graph  # type: ignore[union-attr]
        anchor = source
        if source.op == "placeholder":
            anchor = forward.find_nodes(op="placeholder")[-1]
        with forward.inserting_after(anchor):
            node = forward.call_function(_SYM_OPS[kind], (source,) if dim is None else (source, dim))
        meta.set_fake_value(node, value)
        out = forward.find_nodes(op="output")[0]
        out.args = (type(out.args[0])([*out.args[0], node]), *out.args[1:])
        symbols = [n for n in self.step.saved_inputs() if meta.is_symbolic(n)]
        first = backward.find_nodes(op="placeholder")[0]
        with backward.inserting_after(symbols[-1]) if symbols else backward.inserting_before(first):
            placeholder = backward.placeholder(f"{source.name}_{kind}{'' if dim is None else dim}")
        meta.set_fake_value(placeholder, value)
        return placeholder


def _holding(tensor: torch.Tensor | None, key: Any) -> tuple[str, int | None] | None:
    """Where ``tensor``'s metadata holds expression ``key``: ("size", dim),
    ("stride", dim) or ("offset", None); None if nowhere."""
    if tensor is None:
        return None
    for kind, values in (("size", tensor.shape), ("stride", tensor.stride())):
        for dim, v in enumerate(values):
            if _expr(v) == key:
                return kind, dim
    return ("offset", None) if _expr(tensor.storage_offset()) == key else None


def store_after_last_reader(
    group: SavedStorage, encode: Encode, fake_mode: Any, tag: tuple[str, str], parts: int = 1
) -> list[fx.Node]:
    """Forward nodes storing the group's dense base (read in storage order) right after
    the last forward reader of its storage (`last_forward_reader`): the node
    ``encode`` makes, or its ``parts`` outputs. Each is tagged ``tag``."""
    base = group.base
    assert base is not None
    graph = base.graph
    source, anchor = base, last_forward_reader(group)
    if list(group.order) != sorted(group.order):  # read the storage in its own order
        with graph.inserting_after(anchor):
            source = anchor = graph.call_function(torch.ops.aten.permute.default, (base, list(group.order)))
        run_fake(source, fake_mode)
    with graph.inserting_after(anchor):
        stored = encode(graph, source)
    meta.copy_meta(base, stored)
    meta.set_memopt_tag(stored, *tag)
    value = run_fake(stored, fake_mode)
    if parts == 1:
        return [stored]
    outputs, anchor = [], stored
    for i in range(parts):
        with graph.inserting_after(anchor):
            anchor = graph.call_function(operator.getitem, (stored, i))
        meta.set_fake_value(anchor, value[i])
        outputs.append(anchor)
    return outputs


def rebuild_from_base(
    group: SavedStorage, decode: Decode, fake_mode: Any, tag: tuple[str, str], symbols: BackwardSymbols | None = None
) -> Rebuild:
    """A ``rebuild`` callback for `replace_saved_values`: restore the group's base once
    with ``decode`` (in storage order, permuted back to the original dims), then each
    saved value (the base itself, or a view of it rebuilt with ``as_strided``).

    Symbolic sizes, strides and offsets reach backward through ``symbols`` (read from
    the base or the value); without it they must be static (``ValueError`` otherwise)."""
    base = group.base
    original = meta.tensor_value(base) if base is not None else None
    assert base is not None and original is not None
    order = list(group.order)

    def rebuild(graph: fx.Graph, inputs: list[fx.Node]) -> list[fx.Node]:
        restored = decode(graph, inputs, [_for_backward(original.shape[d], symbols, [base]) for d in order])
        meta.copy_meta(base, restored)
        meta.set_memopt_tag(restored, *tag)
        run_fake(restored, fake_mode)
        if order != sorted(order):  # back to the original dims: the original strides
            inverse = sorted(range(len(order)), key=order.__getitem__)
            restored = graph.call_function(torch.ops.aten.permute.default, (restored, inverse))
            run_fake(restored, fake_mode)
        return [_view_of(graph, restored, value, fake_mode, symbols, base) for value in group.values]

    return rebuild


def _for_backward(value: int | torch.SymInt, symbols: BackwardSymbols | None, candidates: Sequence[fx.Node]) -> Any:
    """``value`` as a backward-graph argument (`BackwardSymbols.of`)."""
    if symbols is None:
        if not isinstance(value, int):
            raise ValueError(f"symbolic size {value} in a rewrite without BackwardSymbols: this rewrite needs static shapes")
        return value
    return symbols.of(value, candidates)


def _view_of(
    graph: fx.Graph, restored: fx.Node, value: fx.Node, fake_mode: Any, symbols: BackwardSymbols | None, base: fx.Node
) -> fx.Node:
    """``value`` rebuilt from the restored base (itself if it has the base's layout)."""
    want, have = meta.tensor_value(value), meta.tensor_value(restored)
    assert want is not None and have is not None
    if (
        _same_geometry(want.shape, have.shape)
        and _same_geometry(want.stride(), have.stride())
        and _same_geometry([want.storage_offset()], [0])
    ):
        return restored
    args = [[_for_backward(v, symbols, [base, value]) for v in values] for values in (want.shape, want.stride())]
    geometry = (*args, _for_backward(want.storage_offset(), symbols, [base, value]))
    node = graph.call_function(torch.ops.aten.as_strided.default, (restored, *geometry))
    meta.copy_meta(value, node)
    run_fake(node, fake_mode)
    return node


def erase_dead_views(group: SavedStorage) -> None:
    """Remove the only-saved views of the group's storage that a rewrite left without
    users."""
    for node in sorted(only_saved_views(group), key=list(group.values[0].graph.nodes).index, reverse=True):
        if not node.users:
            node.graph.erase_node(node)


def planned_storages(
    step: StepGraphs, planned: Mapping[str, A], fmt_of: Callable[[A], str]
) -> tuple[list[tuple[SavedStorage, A]], list[str]]:
    """The saved storages a plan's actions name (by any saved value on the storage or
    its dense base), each with its action, grouped for the storage format
    ``fmt_of(action)`` (`memopt.analysis.compressible.saved_storages`); and the planned
    names no saved storage answers to (another pass replaced those values)."""
    out: list[tuple[SavedStorage, A]] = []
    found: set[str] = set()
    for fmt in sorted({fmt_of(a) for a in planned.values()}):
        for group in saved_storages(step, fmt, min_elements=0):
            names = [v.name for v in group.values] + ([group.base.name] if group.base is not None else [])
            action = next((planned[n] for n in names if n in planned and fmt_of(planned[n]) == fmt), None)
            if action is not None:
                found.update(n for n in names if n in planned)
                out.append((group, action))
    missing = sorted(set(planned) - found)
    _refuse_unknown_names(step, missing)
    return out, missing


def _refuse_unknown_names(step: StepGraphs, names: Sequence[str]) -> None:
    """Raise ``ValueError`` for planned names that no graph of ``step`` has (a
    hand-written plan's slip, which would otherwise be carried out as nothing). A name
    the joint graph has is a real value some pass stopped saving: not an error."""
    if not names:
        return  # the usual case (a planner's plan): no graph walked
    known = {n.name for n in step.forward.graph.nodes}
    if step.joint is not None:
        known |= {n.name for n in step.joint.module.graph.nodes}
        known |= {n.name for n in step.joint.recomputable().module.graph.nodes}
    unknown = [name for name in names if name not in known]
    if not unknown:
        return
    saved = sorted(
        {n.name for g in saved_storages(step, "raw", min_elements=0) for n in (*g.values, g.base) if n is not None}
    )
    hints = {name: difflib.get_close_matches(name, saved, n=2) for name in unknown}
    hinted = "; ".join(f"did you mean {' or '.join(map(repr, h))} for {name!r}?" for name, h in hints.items() if h)
    raise ValueError(
        f"the plan names value(s) {unknown} that region {step.region}'s graphs do not have. A decision names a "
        f"value as TensorDecision.node_name does ('tanh' for 'forward:tanh'); the values this step saves for "
        f"backward are {saved}" + (f"; {hinted}" if hinted else ".")
    )


def planned_decision(decisions: Sequence[Any], group: SavedStorage) -> Any:
    """The plan's `TensorDecision` about ``group`` (named by a saved value or the base)."""
    names = {v.name for v in group.values} | ({group.base.name} if group.base is not None else set())
    return next(d for d in decisions if d.node_name in names)


def fake_mode_of_step(step: StepGraphs) -> Any:
    """The fake mode of the step's recorded values (forward placeholders)."""
    mode = meta.fake_mode_of(step.forward.graph.find_nodes(op="placeholder"))
    if mode is None:
        raise ValueError(
            f"region {step.region}: the forward graph carries no fake values; saved-value "
            f"rewrites need AOTAutograd's graphs (node.meta['val'])."
        )
    return mode


def is_half(value: Any) -> bool:
    """A bfloat16 or float16 tensor."""
    return isinstance(value, torch.Tensor) and value.dtype in (torch.bfloat16, torch.float16)
