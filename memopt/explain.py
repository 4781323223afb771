"""`memopt.explain`: compile and run a function once, and say what memopt did; `record`:
say it of every region memopt compiles inside a context.

Both return an `Explanation` (`memopt.explanation`), with Dynamo's graph-break reasons
seen meanwhile. ``explain`` runs the backward of the function's loss itself, over the
autograd leaves the loss reaches, so that both graphs of each region exist.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree

from memopt._compat import COMPILE_ISOLATES_RECOMPILES
from memopt.backends.graph_breaks import dynamo_counts, warn_skipped_frames
from memopt.backends.record import recording
from memopt.config import MemoptConfig
from memopt.explanation import Explanation

__all__ = ["explain", "explain_settled", "record", "backward_with_forward", "Explanation"]


def explain(
    fn: Callable[..., Any],
    *args: Any,
    options: Mapping[str, Any] | MemoptConfig | None = None,
    **kwargs: Any,
) -> Explanation:
    """Compile ``fn(*args, **kwargs)`` with memopt, run it once, and explain.

    If the output requires grad, the backward of the loss (the output if it is a
    scalar, else the sum of every output element, dataclass fields included) is run too, so both graphs exist.
    Gradients are computed with ``torch.autograd.grad``: ``.grad`` fields are left
    untouched. Side effects of running ``fn`` once (BatchNorm running statistics, RNG
    state) do happen.
    """
    from memopt.backends.watched import one_step

    compiled, config, counts = _compile_for_explain(fn, options)
    with recording() as records, one_step():
        _run_step(compiled, args, kwargs)
    return _explanation(fn, records, config, counts, one_step=True)


MAX_SETTLING_STEPS = 6
"""Steps `explain_settled` runs at most (whole-step planning settles within three: the
compile step, a step observed, a step run with the regions planned again)."""


def explain_settled(
    fn: Callable[..., Any],
    *args: Any,
    options: Mapping[str, Any] | MemoptConfig | None = None,
    **kwargs: Any,
) -> Explanation:
    """As `explain`, for the plan a training loop settles on: ``fn(*args, **kwargs)``
    and its backward run again until memopt's whole-step planning is done with the
    step's regions (`memopt.backends.watched.planned_for_their_step`; at most
    `MAX_SETTLING_STEPS` steps). Under a ``memory_budget`` a step that graph breaks
    split into regions is planned as a whole once a step of them has been observed
    (`memopt.backends.wholestep`): from the second step, or the third when the caller
    keeps a region's outputs (the compile step's observation of those is not used).
    The explanation is that of the latest step: each region as last compiled. A step
    of one region, or none under a budget, runs once, as under `explain`. What
    `memopt.fit`'s probes and ``memopt report`` plan (on fake tensors, where a step
    allocates nothing and each step after the first costs little more than the
    re-plan it carries out). Side effects of ``fn`` happen once per step run."""
    from memopt.backends.watched import planned_for_their_step, regions_compiled

    compiled, config, counts = _compile_for_explain(fn, options)
    with recording() as records, regions_compiled() as regions:
        for _ in range(MAX_SETTLING_STEPS):
            _run_step(compiled, args, kwargs)
            if planned_for_their_step(regions):
                break
    return _explanation(fn, records, config, counts, one_step=False)


def _explanation(fn: Any, records: Any, config: MemoptConfig, counts: Any, *, one_step: bool) -> Explanation:
    """The explanation of the regions ``records`` holds, with what Dynamo did since
    ``counts`` (graph breaks, skipped frames, unsupported constructs)."""
    warn_skipped_frames(recording=True)  # the explanation names them: no warning later
    return Explanation(
        list(records), config, graph_breaks=counts.new_graph_breaks(),
        skipped_frames=counts.new_skipped_frames(), unsupported=counts.new_unsupported(),
        sharded_model=_sharded_model(fn), one_step=one_step,
    )


def _compile_for_explain(
    fn: Callable[..., Any], options: Mapping[str, Any] | MemoptConfig | None
) -> tuple[Callable[..., Any], MemoptConfig, Any]:
    """``fn`` compiled with memopt under ``options`` (warning when ``fn`` is compiled
    already and no options say how), its config, and Dynamo's counters from now on."""
    from memopt.backends.dynamo import memopt_backend

    in_place = _compiled_in_place(fn)
    if options is None and (in_place or hasattr(fn, "_torchdynamo_orig_callable")):
        _warn_compiled(fn, in_place)
    config = MemoptConfig.from_options(options)
    backend = functools.partial(memopt_backend, options=config)
    # A module compiled in place calls its own compiled code, under its compile's options
    # (or cached, compiling nothing): compile its uncompiled call, as model.compile does.
    target = fn._call_impl if in_place else fn
    # kept apart from the caller's compiles of fn: otherwise each explain's entry counts against
    # Dynamo's recompile_limit of fn's code, and the 9th explain or compile runs fn eagerly
    compiled = torch.compile(target, backend=backend, **({"isolate_recompiles": True} if COMPILE_ISOLATES_RECOMPILES else {}))
    return compiled, config, dynamo_counts()


def _run_step(compiled: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """One call of ``compiled`` and, when its output requires grad, the backward of its
    loss (`_loss_of`) over the autograd leaves it reaches (``.grad`` left untouched).
    The output stays alive through the backward, as ``out = model(x);
    out.loss.backward()`` keeps it."""
    out = compiled(*args, **kwargs)
    loss = _loss_of(out)
    if loss is not None:
        leaves = list(_autograd_leaves(loss))
        if leaves:
            torch.autograd.grad(loss, leaves, allow_unused=True)
    del out


def _compiled_in_place(fn: Any) -> bool:
    """``fn`` is a module compiled in place (``model.compile(...)``): calling it runs
    the compiled ``_call_impl`` that ``model.compile`` made, with that compile's options."""
    return isinstance(fn, torch.nn.Module) and getattr(fn, "_compiled_call_impl", None) is not None


def _warn_compiled(fn: Any, in_place: bool = False) -> None:
    """Say that ``fn``, made by ``torch.compile`` (or a module compiled in place by
    ``model.compile``), is compiled again with explain's own options: those given to
    that compile (a ``memory_budget``, ``codegen``) are not read, and the report would
    show a step without them."""
    from memopt.errors import MemoptWarning

    name = getattr(fn, "__name__", None)
    described = type(fn).__name__ + (f" {name}" if isinstance(name, str) else "")
    made = "compiled in place (model.compile)" if in_place else "made by torch.compile"
    warnings.warn(
        f"memopt.explain was given {described} {made} and no "
        f"options: explain compiles it again with its own options (the defaults: codegen='inductor', no "
        f"memory_budget), not those of that compile, which it cannot read. Pass them: memopt.explain(fn, ..., "
        f"options={{...}}), or record your training steps with memopt.record() to explain the compile as it runs.",
        MemoptWarning,
        stacklevel=3,
    )


@contextlib.contextmanager
def backward_with_forward() -> Iterator[None]:
    """Inside, AOTAutograd compiles each region's backward graph with its forward
    (``torch._functorch.config.force_non_lazy_backward_lowering``) instead of when
    backward first runs. Use it around a step run under a `FakeTensorMode`: the lazy
    path deep-copies the backward graph at that moment, under the fake mode, and a graph
    holding a real constant (a ``torch.tensor`` literal that memopt's plan recomputes in
    backward) fails to copy there ("Attempted to set the storage of a tensor on device
    'meta' to a storage on different device 'cpu'"). The eager path copies it outside
    the fake mode. Same graphs and plans either way; only when the backward compiles."""
    import torch._functorch.config as functorch_config

    with functorch_config.patch(force_non_lazy_backward_lowering=True):
        yield


@contextlib.contextmanager
def record(optimizer: Any = None) -> Iterator[Explanation]:
    """Explain every region memopt compiles inside the context (for code that
    compiles and trains as usual)::

        with memopt.record() as explanation:
            loss = compiled_model(x); loss.backward()
        print(explanation.report())

    The explanation fills in as regions compile. While recording, compile caches
    are bypassed so that every region goes through memopt's pipeline. Pass the
    training ``optimizer`` to report its state bytes too.
    """
    counts = dynamo_counts()
    with recording() as records:
        explanation = Explanation(records, optimizer=optimizer)
        try:
            yield explanation
        finally:
            explanation.graph_breaks = counts.new_graph_breaks()
            explanation.skipped_frames = counts.new_skipped_frames()
            explanation.unsupported = counts.new_unsupported()
            warn_skipped_frames(recording=True)  # the explanation names them: no warning later


def _sharded_model(fn: Any) -> Any:
    """The model `memopt.distributed.shard` sharded that ``fn`` is (itself, compiled by
    ``torch.compile``, or a bound method of it), else None."""
    if not torch.distributed.is_available():
        return None
    from memopt.distributed.api import ShardedModule

    for candidate in (fn, getattr(fn, "_orig_mod", None), getattr(fn, "__self__", None)):
        if isinstance(candidate, ShardedModule):
            return candidate
    return None


def _output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors in ``out``: pytree's containers (tuples, lists, dicts, Hugging Face's
    ``ModelOutput``), and the fields of a dataclass instance, which pytree takes for a
    leaf unless it is registered (a model returning ``Output(loss=..., logits=...)``)."""
    found: list[torch.Tensor] = []
    for leaf in pytree.tree_leaves(out):
        if isinstance(leaf, torch.Tensor):
            found.append(leaf)
        elif dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            found.extend(_output_tensors([getattr(leaf, f.name) for f in dataclasses.fields(leaf)]))
    return found


def _real_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t``'s elements as a real fp32 scalar; a complex tensor's real and
    imaginary parts both (``.float()`` would drop the imaginary part, with a warning)."""
    return (torch.view_as_real(t) if t.is_complex() else t).float().sum()


def _loss_of(out: Any) -> torch.Tensor | None:
    tensors = [t for t in _output_tensors(out) if t.requires_grad]
    if not tensors:
        return None
    if len(tensors) == 1 and tensors[0].numel() == 1 and not tensors[0].is_complex():
        return tensors[0].reshape(())
    return torch.stack([_real_sum(t) for t in tensors]).sum()


def _autograd_leaves(loss: torch.Tensor) -> Iterable[torch.Tensor]:
    """Leaf tensors (parameters, inputs) the loss's autograd graph reaches."""
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    found: dict[int, torch.Tensor] = {}
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if isinstance(variable, torch.Tensor):
            found[id(variable)] = variable
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return found.values()
