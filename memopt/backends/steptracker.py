"""The observation of region calls through autograd: which runs of watched regions form
one training step, which of a region's outputs the caller keeps, and which of its inputs
an earlier region returned.

`StepTracker` observes the calls of a `Watched` region (`memopt.backends.watched`),
forwards in order, then each backward. It knows regions only by that narrow protocol,
and the whole-step decision only by the callback it is given (``step_done``), which it
calls when a step of tracking regions completes (the decision and the process's
tracker, ``TRACKER``, are `memopt.backends.wholestep`'s). What it observes fills the
records of recording regions and feeds that decision.

Observing a call. The tracker observes a call of a `WatchedRegion` that is
``tracking`` (a `CompiledRegion` until its step is decided, and while its step is
watched, `memopt.backends.wholestep`, move 4) or ``recording`` (below). A call with a
backward is observed in full (on fake tensors only while recording: `memopt report`,
`memopt.fit`); a call without one (inference, fake tensors not recorded) only for its
inputs' sources and its outputs' storages (the second item), which is all a recorded
estimate needs of it:

* its outputs, by weak reference: the tensor, and its storages that are not the
  call's inputs. When the region's backward starts (an autograd pre-hook on its
  backward node) an output is *kept* by the caller if the tensor object is alive, or
  a storage of it that the region does not save for its own backward is (the caller
  keeps a view; a storage the region saves is alive then anyway). The graphs cannot
  tell: the Python code after a graph break may drop an output once the next region
  has read it (hidden states handed on) or keep it (a Hugging Face model's output
  object holds the logits and the key/value caches, and the user's
  ``out = model(**x); out.loss.backward()`` keeps ``out`` through backward);
* its inputs that are a live output storage of an earlier observed call, of this
  step or an earlier one (GPT-2's loss region saves the logits its first region
  returns: when the caller keeps them too, the two are one storage, counted once).

Recording. While memopt records (`memopt.explain`, `memopt.record`), a region
compiled then is ``recording``: every call of it is observed, for as long as the
compiled region lives (after the ``record()`` block too: its record holds the latest
observation), through a `CompiledRegion`, or a `WatchedRegion` around the compiled
callable of a region planned without one, and the observation goes to the region's
current record (a region compiled again has a new one): ``RegionRecord.input_sources``
at the forward
(inference calls and calls on fake tensors included: an inference step's loss region
takes the logits the region before it returned),
``RegionRecord.kept_outputs`` (the latest step's) when its backward starts. The
step's composed timeline (`memopt.analysis.compose.compose_timelines`) keeps the kept
outputs live after the step and counts each such input once. A call that is only
recorded takes no part in step decisions (it neither joins, restarts nor holds up the
step of the tracking regions), and an error in observing it is dropped: the
observation never breaks a step. The compile step's observation can over-report
(Dynamo's tracing state may still hold a region's outputs then); loops that run two
steps or more record the steady state.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from memopt.backends.record import RegionRecord

__all__ = ["OutputRefs", "Run", "Source", "StepTracker", "Watched", "backward_node", "kept_outputs", "round_length"]

log = logging.getLogger("memopt")


class Watched(Protocol):
    """A region whose calls the tracker observes (`memopt.backends.watched.WatchedRegion`
    and its subclass `CompiledRegion`, the only one that tracks)."""

    tracking: bool
    """Whether its calls take part in whole-step decisions."""

    @property
    def name(self) -> str: ...

    def record_to(self) -> RegionRecord | None:
        """The record a call's observation goes to, or None when it is not recording."""
        ...


@dataclass(frozen=True)
class Source:
    """An output of an earlier run, as a later run's input."""

    run: int
    """The producing run's `Run.serial`."""
    region: str
    output: int
    """Its output position."""


@dataclass(eq=False)
class Run:
    """One forward run of a watched region: one whose backward is expected (``node``
    set), or, only while recording, one without (inference, fake tensors), kept for
    where later runs' inputs came from."""

    region: Watched
    serial: int
    """Distinct for every run the tracker has seen."""
    outputs: dict[int, OutputRefs]
    """Output position -> weak references to the output (`OutputRefs`)."""
    sources: dict[int, Source]
    """Input position -> the earlier run's output it was, for the inputs that were a
    live output storage of a watched run (of this step or an earlier one)."""
    node: Callable[[], Any] | None = None
    """Weak reference to the region's backward node (None: not weakly referable)."""
    kept: frozenset[int] | None = None
    """Set when its backward starts, for a run of the tracked step: the output
    positions the caller still held."""

    @property
    def abandoned(self) -> bool:
        """Its autograd graph is gone before its backward started (a forward whose
        result was dropped, e.g. an evaluation with gradients enabled)."""
        return self.kept is None and self.node is not None and self.node() is None


@dataclass(frozen=True)
class OutputRefs:
    """Weak references to one output of a region call: the tensor, and the plain
    storages holding it that are not the call's inputs."""

    tensor: Callable[[], Any]
    storages: tuple[StorageWeakRef, ...]

    @classmethod
    def of(cls, t: torch.Tensor, inputs: set[int]) -> OutputRefs | None:
        """None when every storage of ``t`` is an input (returned as it came in)."""
        storages = tuple(StorageWeakRef(p.untyped_storage()) for p in _plain(t) if _storage_key(p) not in inputs)
        return cls(weakref.ref(t), storages) if storages else None

    def kept(self, own: Callable[[], set[int]]) -> bool:
        """Whether the caller holds this output as its region's backward starts: the
        tensor object, or a storage of it that the region (whose saved storages
        ``own()`` returns, asked only when a storage outlived the tensor) does not save
        for its own backward, is alive."""
        if self.tensor() is not None:
            return True
        alive = [s for s in self.storages if not s.expired()]
        return bool(alive) and any(s.cdata not in own() for s in alive)


def kept_outputs(outputs: dict[int, OutputRefs], node: Callable[[], Any] | None) -> frozenset[int]:
    """The positions of ``outputs`` the caller holds when the backward of ``node`` (a
    weak reference to the region's backward node) starts."""
    owner = node() if node is not None else None

    @functools.cache
    def own() -> set[int]:  # unpacks every saved tensor: only when a storage outlived its output
        return _saved_storages(owner) if owner is not None else set()

    return frozenset(pos for pos, refs in outputs.items() if refs.kept(own))


MAX_PRODUCED = 4096
"""Output storages `StepTracker.produced` holds at most (the oldest go first)."""


@dataclass
class StepTracker:
    """Observes the calls of watched regions, forward then backward: fills the
    records of those that are recording, and calls for whole-step re-planning when a
    step of several tracking regions completes, or a step planned so keeps more
    outputs than its plan assumed (`memopt.backends.wholestep`; what it observes: the
    module docstring)."""

    step_done: Callable[[list[Run], list[Run]], None]
    """Called when every run of the current step has started its backward, with the
    step's runs in forward order and in the order their backwards started (from the
    autograd hook of the last to start, outside the lock): the whole-step decision."""
    runs: list[Run] = field(default_factory=list)
    """The current step's runs of tracking regions, in forward order."""
    backward_order: list[Run] = field(default_factory=list)
    produced: dict[int, tuple[StorageWeakRef, Source]] = field(default_factory=dict)
    """The live output storages of watched runs, most recent last: storage
    (`StorageWeakRef.cdata`) -> (a weak reference to it, the output)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    serials: Iterator[int] = field(default_factory=itertools.count)
    """`Run.serial`s, in order; also the time of a recording region's backward start
    (`RegionRecord.last_backward`)."""

    def waiting(self) -> list[Watched]:
        """Regions of the current step whose forward ran and whose backward has not
        started, in forward order (tracking regions: `CompiledRegion`s)."""
        with self.lock:
            self._forget_abandoned()
            return [r.region for r in self.runs if r.kept is None]

    def forward_ran(self, region: Watched, args: Sequence[Any], outputs: Any) -> None:
        """``region`` returned ``outputs`` for ``args``. Observed when the region is
        tracking or recording: a recording one's input sources go to its record now
        (for every call, inference and fake tensors included), and, when the call has
        a backward, its kept outputs when that backward starts (on fake tensors too:
        `memopt report` and `memopt.fit` then count outputs the caller holds, such as a
        Hugging Face model's logits, as a real run does); a tracking region's run with a
        backward joins the current step, on fake tensors too, so that a later region of
        the step is planned with it in place as on real tensors (`memopt.fit`'s probes
        planned such a region alone, over the budget the real step meets). For a region
        that is only recording, an error is logged and dropped: its observation never
        breaks a step."""
        record = region.record_to()
        if not region.tracking and record is None:
            return
        try:
            self._observe(region, record, args, outputs)
        except Exception:  # noqa: BLE001 - see the docstring
            if region.tracking:
                raise
            log.debug("region %s: its call was not observed", region.name, exc_info=True)

    def _observe(self, region: Watched, record: RegionRecord | None, args: Sequence[Any], outputs: Any) -> None:
        tensors = [t for t in tree_leaves(outputs) if isinstance(t, torch.Tensor)]
        fake = any(isinstance(t, FakeTensor) for t in tensors)
        node = None if fake and record is None else backward_node(tensors)
        if node is None:
            # No backward to watch: no gradient flows back through this call (inference),
            # or it ran on fake tensors in a region that is not recording.
            # While recording, where its inputs came from is noted, for the step estimate:
            # an input that an earlier region returned is not a step input.
            if record is not None:
                with self.lock:
                    run = Run(region, next(self.serials), _output_refs(args, outputs), self._sources(args))
                    self._remember(run)
                record.input_sources = {pos: (s.region, s.output) for pos, s in run.sources.items()}
                record.last_forward = run.serial
            return
        with self.lock:
            run = Run(region, next(self.serials), _output_refs(args, outputs), self._sources(args), _weak(node))
            self._remember(run)
            if region.tracking:
                self._forget_abandoned()
                if any(r.region is region for r in self.runs) and not _next_round(self.runs, self.backward_order, region):
                    self.runs, self.backward_order = [], []  # again before its backward: not one clean step
                self.runs.append(run)
        if record is not None:
            record.input_sources = {pos: (s.region, s.output) for pos, s in run.sources.items()}
            record.last_forward = run.serial
        # The hook reaches the node through the run's weak reference: a strong one would
        # make a cycle (node -> hook -> node) that keeps an abandoned graph alive.
        node.register_prehook(functools.partial(self._backward_starts, run))

    def _forget_abandoned(self) -> None:
        """Drop runs whose autograd graph is gone (call with the lock held)."""
        self.runs = [r for r in self.runs if not r.abandoned]

    def _sources(self, args: Sequence[Any]) -> dict[int, Source]:
        """Input position -> the live output of a watched run that the input's storage
        is (call with the lock held)."""
        found = {}
        for pos, a in enumerate(args):
            if isinstance(a, torch.Tensor) and not is_traceable_wrapper_subclass(a):
                entry = self.produced.get(StorageWeakRef(a.untyped_storage()).cdata)
                if entry is not None and not entry[0].expired():
                    found[pos] = entry[1]
        return found

    def _remember(self, run: Run) -> None:
        """Note ``run``'s output storages, for the inputs of later runs; forget the
        storages that died (call with the lock held)."""
        for key in [k for k, (ref, _) in self.produced.items() if ref.expired()]:
            del self.produced[key]
        for pos, out in run.outputs.items():
            for ref in out.storages:
                self.produced.pop(ref.cdata, None)  # its place: most recent last
                self.produced[ref.cdata] = (ref, Source(run.serial, run.region.name, pos))
        while len(self.produced) > MAX_PRODUCED:
            del self.produced[next(iter(self.produced))]

    def _backward_starts(self, run: Run, grad_outputs: Any) -> None:
        kept = kept_outputs(run.outputs, run.node)
        if (record := run.region.record_to()) is not None:
            record.kept_outputs = kept  # the latest step's observation
            record.last_backward = next(self.serials)
        with self.lock:
            if run.kept is not None or not any(r is run for r in self.runs):
                return None
            run.kept = kept
            self.backward_order.append(run)
            self._forget_abandoned()
            if any(r.kept is None for r in self.runs):
                return None
            runs, order = self.runs, self.backward_order
            self.runs, self.backward_order = [], []
        self.step_done(runs, order)
        return None



def round_length(runs: Sequence[Run]) -> int:
    """How many regions one call of the step runs: ``runs`` is whole calls of the same
    regions in the same order (``loss = f(model(a), model(b))`` over a model a graph
    break splits: A, B, A, B), or one call (A, B: its length)."""
    first = runs[0].region if runs else None
    return next((i for i, r in enumerate(runs) if i and r.region is first), len(runs))


def _next_round(runs: list[Run], backward_order: list[Run], region: Watched) -> bool:
    """``region``, called again while its earlier run waits for its backward, continues
    whole calls of the step's regions (`round_length`): no backward has started, and it
    is the region the earlier call ran at this position."""
    if backward_order or not runs:
        return False
    return runs[len(runs) - round_length(runs)].region is region


def backward_node(tensors: list[torch.Tensor]) -> Any:
    """The autograd node of the compiled region's backward (AOTAutograd's
    ``CompiledFunctionBackward``), reached from the outputs; None if no output needs
    a gradient."""
    nodes = [t.grad_fn for t in tensors if t.grad_fn is not None]
    for node in nodes:
        if "CompiledFunction" in type(node).__name__:
            return node
    return nodes[0] if nodes else None


def _weak(node: Any) -> Callable[[], Any] | None:
    try:
        return weakref.ref(node)
    except TypeError:  # a C++ autograd node
        return None


def _saved_storages(node: Any) -> set[int]:
    """The storages (`StorageWeakRef.cdata`) of what ``node`` saved for backward."""
    try:
        saved = node.saved_tensors
    except (AttributeError, RuntimeError):  # not a custom Function, or already freed
        return set()
    return {StorageWeakRef(t.untyped_storage()).cdata for t in saved if isinstance(t, torch.Tensor)}


def _output_refs(args: Sequence[Any], outputs: Any) -> dict[int, OutputRefs]:
    """Output position -> `OutputRefs` of a call's tensor outputs (those not returned as
    they came in)."""
    inputs = {_storage_key(p) for a in args if isinstance(a, torch.Tensor) for p in _plain(a)}
    outs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return {pos: r for pos, t in enumerate(outs) if isinstance(t, torch.Tensor) and (r := OutputRefs.of(t, inputs))}


def _storage_key(t: torch.Tensor) -> int:
    """The identity of ``t``'s storage (a fake tensor's too, whose data pointers are
    all 0), as `StorageWeakRef.cdata` gives it."""
    return StorageWeakRef(t.untyped_storage()).cdata


def _plain(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s memory: itself, or for a wrapper subclass
    (a DTensor) the inner tensors it flattens to."""
    if not is_traceable_wrapper_subclass(t):
        return [t]
    names, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
    inner = [getattr(t, name) for name in names]
    return [p for i in inner if isinstance(i, torch.Tensor) for p in _plain(i)]

