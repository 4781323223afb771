"""Which of a region's outputs the caller keeps through the step's backward.

A region's memory timeline cannot tell, from its graphs, whether the Python code
after a graph break drops an output once the next region has read it (hidden states
handed on) or keeps it (a Hugging Face model's output object holds the logits and
the key/value caches, and the user's ``out = model(**x); out.loss.backward()`` keeps
``out`` through backward). While memopt records (`memopt.explain`, `memopt.record`),
`observe_outputs` wraps a region's compiled callable to look: after each call it
takes weak references to the outputs and their storages, and when the region's
backward starts it notes in ``RegionRecord.kept_outputs`` (the latest step's
observation) which outputs the caller still holds: those whose tensor object is
alive, or whose storage is alive and not saved by the region for its own backward
(the caller keeps a view; a storage the region saves is alive then anyway). The
step's composed timeline (`memopt.analysis.memory.compose_timelines`) keeps those
outputs live after the step.

It also notes which of a region's inputs are storages an earlier region returned
(``RegionRecord.input_sources``): when the later region saves such an input for its
backward and the caller keeps the output too (GPT-2's loss region saves the logits its
model returns), the two are one storage, counted once.

The compile step can over-report: Dynamo's tracing state may still hold a region's
outputs then (a later region's example inputs), so loops that run two steps or more
see the steady state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.multiprocessing.reductions import StorageWeakRef

from memopt.backends.record import RegionRecord
from memopt.backends.wholestep import OutputRefs, _backward_node, _storage_key, _weak, kept_outputs

__all__ = ["observe_outputs"]

# The storages observed regions returned, most recent call last: storage key ->
# (weak reference, region name, output position). A key whose weak reference has
# expired (or points at another storage now) is stale.
_PRODUCED: dict[int, tuple[StorageWeakRef, str, int]] = {}
_MAX_PRODUCED = 4096


def observe_outputs(fn: Callable[..., Any], record: Callable[[], RegionRecord]) -> Callable[..., Any]:
    """``fn`` (a region's compiled callable, Dynamo's calling convention: a flat
    sequence of outputs) wrapped to fill ``record().kept_outputs`` (the region's
    current record) on every call that has a backward."""

    @functools.wraps(fn)
    def observed(*args: Any) -> Any:
        outputs = fn(*args)
        try:
            _watch(record, args, outputs)
        except Exception:  # noqa: BLE001 - an observation never breaks a step
            pass
        return outputs

    return torch._dynamo.disable(observed, reason="memopt's output observer")


def _watch(record: Callable[[], RegionRecord], args: tuple[Any, ...], outputs: Any) -> None:
    if not isinstance(outputs, (list, tuple)):
        return
    tensors = {pos: t for pos, t in enumerate(outputs) if isinstance(t, torch.Tensor)}
    if not tensors or any(isinstance(t, FakeTensor) for t in tensors.values()):
        return
    node = _backward_node(list(tensors.values()))
    if node is None:
        return  # no backward through this call
    inputs = {_storage_key(a) for a in args if isinstance(a, torch.Tensor)}
    current = record()
    current.input_sources = _sources(args)
    _remember(current.region, tensors)
    refs = {pos: r for pos, t in tensors.items() if (r := OutputRefs.of(t, inputs)) is not None}
    node.register_prehook(functools.partial(_backward_starts, record, refs, _weak(node)))


def _sources(args: tuple[Any, ...]) -> dict[int, tuple[str, int]]:
    """Input position -> (region, output position) for the inputs whose storage an
    observed region returned and still lives."""
    found = {}
    for pos, a in enumerate(args):
        if not isinstance(a, torch.Tensor) or isinstance(a, FakeTensor):
            continue
        entry = _PRODUCED.get(_storage_key(a))
        if entry is None:
            continue
        ref, region, out_pos = entry
        if not ref.expired() and ref.cdata == StorageWeakRef(a.untyped_storage()).cdata:
            found[pos] = (region, out_pos)
    return found


def _remember(region: str, tensors: dict[int, torch.Tensor]) -> None:
    for key in [k for k, (ref, _, _) in _PRODUCED.items() if ref.expired()]:
        del _PRODUCED[key]
    while len(_PRODUCED) >= _MAX_PRODUCED:
        del _PRODUCED[next(iter(_PRODUCED))]
    for pos, t in tensors.items():
        _PRODUCED[_storage_key(t)] = (StorageWeakRef(t.untyped_storage()), region, pos)


def _backward_starts(
    record: Callable[[], RegionRecord], refs: dict[int, OutputRefs], node: Callable[[], Any] | None, _: Any
) -> None:
    record().kept_outputs = kept_outputs(refs, node)
    return None
