"""Storage-level aliasing of one FX graph: which node outputs share a storage.

A value is a *view* of an input when the op's schema says its return aliases an
argument (``Tensor(a) self -> Tensor(a)``: view ops; ``Tensor(a!)``: in-place and
``out=`` ops), when it is an element of a multi-output node (``getitem``), or when the
fake tensors recorded during tracing share a storage with an input's (this catches
ops whose schema under-declares aliasing, such as ``aten._unsafe_view``, which is also
listed by name: `_RETURNS_ITS_INPUT`). Every other
tensor output is a fresh storage.

This is computed from the schema and the recorded fake values only, so it works on
graphs built by hand, on fake/meta inputs, and on nodes memopt's passes insert.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from memopt._compat import optimization_hint
from memopt.graph import meta

__all__ = ["Storage", "GraphAliasing", "analyze_aliasing", "concrete_int"]


def concrete_int(value: Any) -> int:
    """An int for a possibly symbolic size (the example input's value for symbols)."""
    if isinstance(value, int):
        return value
    return optimization_hint(value)


@dataclass(eq=False)
class Storage:
    """One allocation: made by ``producer`` (a placeholder for graph inputs)."""

    producer: fx.Node
    nbytes: int
    device: torch.device
    index: int = 0  # which output of a multi-output producer

    def __repr__(self) -> str:
        return f"Storage({self.producer.name}[{self.index}], {self.nbytes}B)"


@dataclass
class GraphAliasing:
    """Per node: the storages of its outputs (flattened), and the fresh ones it made."""

    outputs: dict[fx.Node, list[Storage]] = field(default_factory=dict)
    fresh: dict[fx.Node, list[Storage]] = field(default_factory=dict)

    def storages_of(self, node: fx.Node) -> list[Storage]:
        return self.outputs.get(node, [])


def _flat_tensors(value: Any) -> list[torch.Tensor | None]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        out: list[torch.Tensor | None] = []
        for v in value:
            out.extend(_flat_tensors(v) if isinstance(v, (list, tuple)) else [v if isinstance(v, torch.Tensor) else None])
        return out
    return []


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return int(t.untyped_storage()._cdata)
    except Exception:  # noqa: BLE001 - sparse/opaque tensors have no plain storage
        return None


def _storage_nbytes(t: torch.Tensor) -> int:
    try:
        return concrete_int(t.untyped_storage().nbytes())
    except Exception:  # noqa: BLE001
        return concrete_int(t.numel()) * t.element_size()


class _Tracker:
    def __init__(self) -> None:
        self.result = GraphAliasing()
        self.by_fake_key: dict[int, Storage] = {}

    def fresh(self, node: fx.Node, t: torch.Tensor, index: int) -> Storage:
        storage = Storage(node, _storage_nbytes(t), t.device, index)
        self.result.fresh.setdefault(node, []).append(storage)
        key = _storage_key(t)
        if key is not None:
            self.by_fake_key.setdefault(key, storage)
        return storage

    def input_alias(self, node: fx.Node, t: torch.Tensor) -> Storage | None:
        """A storage of one of ``node``'s inputs that ``t``'s fake storage matches."""
        key = _storage_key(t)
        if key is None or key not in self.by_fake_key:
            return None
        candidate = self.by_fake_key[key]
        if node.op == "placeholder" and candidate.producer.op == "placeholder":
            # Two graph inputs viewing one storage (a stage-2 replica and this rank's rows
            # of it, in memopt.distributed): one allocation, counted once.
            return candidate
        inputs = {s for n in node.all_input_nodes for s in self.result.storages_of(n)}
        return candidate if candidate in inputs else None


_RETURNS_ITS_INPUT = {"_c10d_functional.wait_tensor.default", "aten._unsafe_view.default"}
"""Ops whose schema declares a fresh result but which return their input tensor or a
view of it: waiting on a functional collective hands back the buffer the collective
filled; ``_unsafe_view`` is always a view (it raises where one is impossible). The
recorded fake values show the latter too, but not when a pass gave the input a new
producer: a reloaded or decompressed saved value (`memopt.passes.offload`,
``compress``) whose ``_unsafe_view`` was traced on the original."""


def _schema_alias_args(node: fx.Node) -> list[fx.Node | list[Any] | None]:
    """For each schema return, the argument it aliases (or None)."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return []
    if str(target) in _RETURNS_ITS_INPUT:
        return [node.args[0]]
    return [
        None if at is None else node.args[at[0]] if at[0] < len(node.args) else node.kwargs.get(at[1])
        for at in _alias_spec(target)
    ]


@functools.cache
def _alias_spec(target: torch._ops.OpOverload) -> tuple[tuple[int, str] | None, ...]:
    """For each return of ``target``'s schema, the (position, name) of the argument it
    aliases, or None; read once per op (a graph walk asks for every node)."""
    by_set: dict[str, tuple[int, str]] = {}
    for i, arg in enumerate(target._schema.arguments):
        if arg.alias_info is None:
            continue
        for name in arg.alias_info.before_set:
            by_set[name] = (i, arg.name)
        if "*" in arg.alias_info.after_set:  # ``Tensor(a -> *) self``: a list of its views
            by_set.setdefault("*", (i, arg.name))
    result: list[tuple[int, str] | None] = []
    for ret in target._schema.returns:
        info = ret.alias_info
        if info is not None and not info.before_set:  # ``Tensor(a)[]``: the set is on the elements
            result.append(by_set.get("*"))
            continue
        result.append(None if info is None else next((by_set.get(s) for s in info.before_set), None))
    return tuple(result)


def analyze_aliasing(graph: fx.Graph) -> GraphAliasing:
    """Storages of every node's outputs in ``graph`` (see module docstring)."""
    tracker = _Tracker()
    out = tracker.result
    for node in graph.nodes:
        if node.op == "output":
            continue
        tensors = _flat_tensors(meta.fake_value(node))
        if node.op == "call_function" and node.target is operator.getitem:
            parent, index = node.args[0], node.args[1]
            parent_storages = out.storages_of(parent) if isinstance(parent, fx.Node) else []
            if isinstance(index, int) and index < len(parent_storages) and len(tensors) == 1:
                out.outputs[node] = [parent_storages[index]]
                continue
        alias_args = _schema_alias_args(node)
        storages: list[Storage] = []
        for i, t in enumerate(tensors):
            if t is None:
                continue
            aliased = _aliased_storage(out, alias_args, i) or tracker.input_alias(node, t)
            storages.append(aliased if aliased is not None else tracker.fresh(node, t, i))
        out.outputs[node] = storages
    return out


def _aliased_storage(out: GraphAliasing, alias_args: list[Any], index: int) -> Storage | None:
    """The storage the schema says output ``index`` aliases, if any."""
    if not alias_args:
        return None
    arg = alias_args[min(index, len(alias_args) - 1)] if len(alias_args) == 1 else (
        alias_args[index] if index < len(alias_args) else None
    )
    if isinstance(arg, (list, tuple)):  # Tensor(a)[] returns alias a list argument
        arg = arg[0] if arg else None
    if isinstance(arg, fx.Node):
        storages = out.storages_of(arg)
        return storages[0] if storages else None
    return None
