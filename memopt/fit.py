"""`memopt.fit`: the largest batch (or sequence length) whose planned peak fits a budget.

    result = memopt.fit(model, lambda b: make_batch(b), "24GiB", global_batch=256)
    result.batch, result.accumulation_steps, print(result)

Every probe is one `memopt.explain` of a training step (forward and backward) with
``memory_budget`` set to the budget, run on fake tensors: the model's parameters and the
probe's inputs are `FakeTensor` s, so nothing of the step is allocated and a model larger
than this machine can be fitted. A size fits when the step's **planned peak**
(`Explanation.estimated_peak_bytes`: parameters, buffers, inputs, activations, gradients
and temporaries live at the step's highest point, after memopt's plan; a region's outputs
across a graph break count as kept by the caller, `_assume_outputs_kept`) is at most the
budget. The optimizer's state counts when ``options`` names the optimizer (``optimizer``
or ``optimizer_in_backward``: each probe gets a copy over the fake parameters,
`_fake_optimizer`); otherwise pass ``reserve=`` for it (docs/fit.md).

The search (`_search`) keeps a bracket (largest size seen fitting, smallest seen not
fitting) and probes inside it where a straight line through the floors the planner found
predicts the budget is crossed, starting where an eager forward on fake tensors predicts
planning starts; a right prediction costs two probes. It assumes that fitting is
monotone: a size that does not fit has no larger size that fits (the floor memopt can
reach grows with the size; the planned peak itself need not: under a budget the planner
takes the cheapest plan that fits). Under that assumption the answer does not depend on
which sizes were probed.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import inspect
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import torch

from memopt.config import MIN_BUDGET_BYTES, MemoptConfig, parse_size, require_unit
from memopt.errors import MemoptFitError, MemoptWarning
from memopt.explain import Explanation, backward_with_forward, explain
from memopt.units import format_bytes

__all__ = ["fit", "FitResult", "Probe", "accumulation", "budget_bytes"]

SEARCHES: tuple[str, ...] = ("batch", "seq")
_DEFAULT_MAX = 1 << 20
_LOWERING_OPTIONS: dict[str, str] = {
    "precision": "precision='bf16' (matmuls in bf16: smaller activations)",
    "compress_activations": "compress_activations='int8' (saved activations quantized)",
    "offload": "offload='auto' (saved activations wait on the host or disk)",
}


@dataclass(frozen=True)
class Probe:
    """One planning run of the search."""

    size: int
    """The batch size (or sequence length) probed."""
    planned_peak_bytes: int
    """`Explanation.estimated_peak_bytes` at this size under the budget."""
    unoptimized_peak_bytes: int
    """The estimated peak without memopt's plan (for reference)."""
    fits: bool
    """``planned_peak_bytes <= budget``."""
    seconds: float


@dataclass(frozen=True)
class FitResult:
    """What `fit` found. Guarantees: ``probes`` holds a probe at ``size`` that fits and,
    unless ``capped``, one at ``size + step`` that does not."""

    search: str
    """``"batch"`` or ``"seq"``: which dimension was searched."""
    batch: int
    """The micro-batch size: the fitted size when ``search == "batch"``, else the fixed batch."""
    seq: int | None
    """The sequence length: the fitted size when ``search == "seq"``, else the fixed one (or None)."""
    estimated_peak_bytes: int
    """The planned peak at the fitted size (`Explanation.estimated_peak_bytes`)."""
    budget_bytes: int
    reserve_bytes: int
    """Bytes set aside outside the step (e.g. optimizer state); probes fit ``budget - reserve``."""
    probes: tuple[Probe, ...]
    seconds: float
    capped: bool
    """The search stopped at ``max_size`` while still fitting (a larger size may fit too)."""
    global_batch: int | None = None
    accumulation_steps: int | None = None
    """``ceil(global_batch / batch)`` micro-steps per optimizer step (None without ``global_batch``)."""
    micro_batches: tuple[int, ...] = ()
    """Sizes of the micro-batches of one optimizer step: they sum to ``global_batch``, each
    at most ``batch``, as even as possible (differ by at most 1)."""
    even_batch: int | None = None
    """The largest size at most ``batch`` that divides ``global_batch`` (equal micro-batches)."""
    explanation: Explanation | None = field(default=None, repr=False, compare=False)
    """memopt's plan at the fitted size (its ``report()`` says what is saved, recomputed...)."""

    @property
    def size(self) -> int:
        """The fitted size of the searched dimension."""
        return self.batch if self.search == "batch" else int(self.seq or 0)

    def report(self) -> str:
        """The result, the accumulation arithmetic and the probes, as text."""
        what = f"batch {self.batch}" + ("" if self.seq is None else f" x seq {self.seq}")
        lines = [
            f"memopt fit: {what} (searched: {self.search}"
            + (f", stopped at the maximum {self.size}" if self.capped else "") + ")",
            f"  planned peak {format_bytes(self.estimated_peak_bytes)} of budget {format_bytes(self.budget_bytes)}"
            + (f" (reserve {format_bytes(self.reserve_bytes)})" if self.reserve_bytes else "")
            + f"; {len(self.probes)} probes on fake tensors in {self.seconds:.1f}s",
        ]
        if self.global_batch is not None and self.accumulation_steps is not None:
            lines.append(f"  global batch {self.global_batch}: {_accumulation_text(self)}")
        lines.append("  probes (in order): " + ", ".join(
            f"{p.size}: {format_bytes(p.planned_peak_bytes)} {'fits' if p.fits else 'over'}" for p in self.probes
        ))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view (without the explanation; its ``to_dict()`` is separate)."""
        return {
            "search": self.search, "batch": self.batch, "seq": self.seq,
            "estimated_peak_bytes": self.estimated_peak_bytes, "budget_bytes": self.budget_bytes,
            "reserve_bytes": self.reserve_bytes, "capped": self.capped, "seconds": round(self.seconds, 3),
            "global_batch": self.global_batch, "accumulation_steps": self.accumulation_steps,
            "micro_batches": list(self.micro_batches), "even_batch": self.even_batch,
            "probes": [dataclasses.asdict(p) for p in self.probes],
        }


def _accumulation_text(r: FitResult) -> str:
    steps, micro = r.accumulation_steps, r.micro_batches
    if len(set(micro)) <= 1:
        return f"{steps} accumulation step{'' if steps == 1 else 's'} of {micro[0] if micro else r.batch}"
    text = (
        f"{steps} accumulation steps of uneven micro-batches {'+'.join(map(str, micro))} "
        f"({r.global_batch} is not a multiple of {r.batch}; weight each micro-batch's mean loss by its size)"
    )
    if r.even_batch is not None:
        text += f"; or {r.global_batch // r.even_batch} equal steps of {r.even_batch}"
    return text


def accumulation(global_batch: int, batch: int) -> tuple[int, tuple[int, ...], int]:
    """``(steps, micro_batches, even_batch)`` that reach ``global_batch`` with micro-batches
    of at most ``batch``: ``steps = ceil(global_batch / batch)``; ``micro_batches`` sum to
    ``global_batch`` and differ by at most 1; ``even_batch`` is the largest divisor of
    ``global_batch`` at most ``batch`` (equal micro-batches, maybe more steps).

    Preconditions: ``global_batch >= 1`` and ``batch >= 1``."""
    if global_batch < 1 or batch < 1:
        raise MemoptFitError(
            f"global_batch={global_batch} and batch={batch} must both be at least 1; "
            f"pass the number of samples per optimizer step."
        )
    steps = math.ceil(global_batch / batch)
    base, extra = divmod(global_batch, steps)
    micro = tuple(base + 1 if i < extra else base for i in range(steps))
    even = max(d for d in range(1, min(batch, global_batch) + 1) if global_batch % d == 0)
    return steps, micro, even


def budget_bytes(budget: int | str, *, name: str = "budget") -> int:
    """A budget in bytes, at least `MIN_BUDGET_BYTES` (as ``memory_budget`` takes it): an
    int, or a size string parsed as ``memory_budget`` parses it (`memopt.config.parse_size`:
    ``"24GiB"``, ``"512MB"``). A fraction is refused: a fraction of the unoptimized peak
    changes with the batch size. ``name="reserve"``
    parses fit's ``reserve`` instead: errors name it, and zero is allowed (no reserve)."""
    reserve = name == "reserve"
    if isinstance(budget, (bool, float)) or (isinstance(budget, str) and budget.strip().endswith("%")):
        why = "bytes set aside outside the step" if reserve else "a fraction of the unoptimized peak changes with the batch"
        raise MemoptFitError(
            f"{name}={budget!r}: fit needs an absolute size ({why}); pass bytes as an int or a string such as "
            f"'{'2GiB' if reserve else '24GiB'}'."
        )
    if isinstance(budget, str):
        try:
            require_unit(budget)
            value = parse_size(budget)
        except ValueError as exc:
            raise MemoptFitError(f"{name}={budget!r}: {exc}") from None
    elif isinstance(budget, int):
        value = budget
    else:
        raise MemoptFitError(f"{name}={budget!r} must be bytes (int) or a size string such as '24GiB'.")
    if value < 0 or (value == 0 and not reserve):
        raise MemoptFitError(f"{name}={budget!r} must be a {'non-negative' if reserve else 'positive'} size.")
    if value < MIN_BUDGET_BYTES and not reserve:
        raise MemoptFitError(
            f"{name}={budget!r} is {value} byte(s), under 1 KiB, which no step fits in; give a size "
            f"with a unit, e.g. '{value}GiB'."
        )
    return value


def fit(
    model: Callable[..., Any],
    make_inputs: Callable[..., Any],
    budget: int | str,
    *,
    search: str = "batch",
    batch: int = 1,
    seq: int | None = None,
    global_batch: int | None = None,
    max_size: int | None = None,
    step: int = 1,
    reserve: int | str = 0,
    training: bool = True,
    options: Mapping[str, Any] | None = None,
    progress: bool | IO[str] | None = True,
) -> FitResult:
    """The largest batch size (``search="batch"``) or sequence length (``search="seq"``)
    whose planned training-step peak fits ``budget``, found on fake tensors.

    ``make_inputs(batch)`` (or ``make_inputs(batch, seq)`` when ``seq`` is given or
    ``search="seq"``) returns the step's inputs for one call of ``model``: a tensor, a
    tuple of positional arguments or a dict of keyword arguments (a Hugging Face batch).
    It is called under a `FakeTensorMode`, so ``torch.randint``/``torch.ones`` there make
    fake tensors. ``model`` is an ``nn.Module`` (real parameters are copied to fake ones;
    the model itself is not touched) or a callable of fake tensors.

    Each probe plans one step with `memopt.explain` and ``memory_budget = budget - reserve``
    (``options`` pass through: ``precision``, ``compress_activations``, ``offload``...;
    ``codegen`` defaults to ``"eager"``; an ``optimizer`` or ``optimizer_in_backward``
    over ``model``'s parameters is planned through a copy over the fake ones, with its
    state predicted, and is itself left untouched). Sizes are multiples of ``step`` (e.g. 64 for
    sequence lengths), at most ``max_size`` (for ``search="seq"`` without one, a Hugging
    Face model's ``config.max_position_embeddings`` or ``config.n_positions``: fake tensors
    do not check position lookups, `_position_limit`). One line per probe goes to ``progress``: True
    (default) for stderr, a text stream, or False/None for silence. Dynamo's caches are reset before every probe.
    Before the first probe, ``model`` runs one eager forward at one ``step`` on fake
    tensors (no compile, no backward) to predict where to start (`_first_guess`); which
    sizes are probed never changes the answer (`_search`).

    Precondition: fitting is monotone (no size larger than one that does not fit fits).
    Guarantees: the returned size's probe fits; unless ``capped``, the size one ``step``
    larger was probed and does not fit. Raises `MemoptFitError` when even the smallest
    size does not fit (naming its floor and the options that may lower it), when
    ``make_inputs`` does not take the size, for a model with nothing to train when
    ``training=True``, and for a malformed budget.
    """
    started = time.perf_counter()
    total, reserved = budget_bytes(budget), budget_bytes(reserve, name="reserve")
    left = total - reserved
    if left < MIN_BUDGET_BYTES:
        raise MemoptFitError(
            f"reserve={format_bytes(reserved)} leaves "
            f"{'nothing' if left <= 0 else f'only {format_bytes(left)} (under 1 KiB)'} of "
            f"budget={format_bytes(total)} for the step; lower the reserve or raise the budget."
        )
    _check_search(search, batch, seq, step, max_size, global_batch)
    stream = sys.stderr if progress is True else None if isinstance(progress, bool) else progress
    if search == "seq" and max_size is None:
        max_size = _position_limit(model, step, stream)
    _warn_past_positions(model, seq)
    _check_trainable(model, training)
    fake_model, mode, fakes = _fake_model(model)
    config = _with_fake_optimizer(_config(options, total - reserved), fakes)
    sizes = _Sizes(search, batch, seq, step)
    _check_signature(make_inputs, sizes.call_args(1))
    runner = _Runner(fake_model, make_inputs, sizes, config, mode, training, stream, total - reserved)
    found, capped = _search(runner, (max_size or _DEFAULT_MAX * step) // step)
    size = found * step
    probes = tuple(runner.probes)
    accum = accumulation(global_batch, sizes.batch_at(size)) if global_batch is not None else None
    return FitResult(
        search=search, batch=sizes.batch_at(size), seq=sizes.seq_at(size),
        estimated_peak_bytes=runner.peaks[found], budget_bytes=total, reserve_bytes=reserved,
        probes=probes, seconds=time.perf_counter() - started, capped=capped, global_batch=global_batch,
        accumulation_steps=None if accum is None else accum[0], micro_batches=() if accum is None else accum[1],
        even_batch=None if accum is None else accum[2], explanation=runner.explanations.get(found),
    )


def _config(options: Mapping[str, Any] | None, budget: int) -> MemoptConfig:
    options = dict(options or {})
    if "memory_budget" in options:
        raise MemoptFitError(
            f"options sets memory_budget={options['memory_budget']!r}, but fit sets it to the budget it "
            f"searches under; pass the budget as fit's ``budget`` argument and drop it from options."
        )
    options.setdefault("codegen", "eager")
    try:
        return MemoptConfig.from_options({**options, "memory_budget": budget})
    except ValueError as exc:
        raise MemoptFitError(f"options: {exc}") from None


def _check_search(
    search: str, batch: int, seq: int | None, step: int, max_size: int | None, global_batch: int | None
) -> None:
    if search not in SEARCHES:
        raise MemoptFitError(f"search={search!r}; choose one of {', '.join(map(repr, SEARCHES))}.")
    for name, value in (("batch", batch), ("step", step), ("max_size", max_size), ("seq", seq), ("global_batch", global_batch)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise MemoptFitError(f"{name}={value!r} must be a positive int.")
    if max_size is not None and max_size < step:
        raise MemoptFitError(f"max_size={max_size} is below step={step}: no size to probe; raise max_size.")
    if search == "seq" and seq is not None:
        raise MemoptFitError(
            f"search='seq' searches the sequence length, but seq={seq} fixes it; drop seq= "
            f"(the batch is fixed by batch=, {batch})."
        )


_POSITION_FIELDS: tuple[str, ...] = ("max_position_embeddings", "n_positions")
"""Config fields of Hugging Face models that bound the sequence length (absolute
position embeddings: BERT, GPT-2; the context the model was built for: Llama, Mistral)."""


def _config_positions(model: Callable[..., Any]) -> tuple[str, int] | None:
    """``(field, value)`` of the first `_POSITION_FIELDS` set on ``model.config``, or None."""
    config = getattr(model, "config", None)
    for name in _POSITION_FIELDS:
        limit = getattr(config, name, None)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return name, limit
    return None


def _warn_past_positions(model: Callable[..., Any], seq: int | None) -> None:
    """Warn once when a fixed ``seq`` (``search="batch"``) is above ``model``'s config
    limit: the probes on fake tensors cannot see a lookup past the position table."""
    found = _config_positions(model)
    if seq is None or found is None or seq <= found[1]:
        return
    name, limit = found
    warnings.warn(
        f"seq={seq} is above {type(model).__name__}'s config.{name} = {limit}: fit plans it (fake tensors do "
        f"not check position lookups), but a model with absolute position embeddings (BERT, GPT-2) raises "
        f"IndexError when run at this length; pass seq <= {limit} unless the model takes longer sequences.",
        MemoptWarning,
        stacklevel=3,
    )


def _position_limit(model: Callable[..., Any], step: int, progress: IO[str] | None) -> int | None:
    """The longest sequence (a multiple of ``step``) ``model``'s config says it takes, to
    cap ``search="seq"`` when no ``max_size`` is given; None for a model without one.

    On fake tensors an embedding lookup past its table is not checked (its indices have
    no values), so without a cap the search ran past the position table: Hugging Face
    GPT-2 with ``n_positions=128`` fitted seq 640, which raises ``IndexError`` when run."""
    found = _config_positions(model)
    if found is None:
        return None
    name, limit = found
    if limit < step:
        raise MemoptFitError(
            f"{type(model).__name__}'s config.{name} = {limit} is below step={step}: no sequence length to probe; "
            f"lower step, or pass max_size= to search past the config's limit."
        )
    capped = limit // step * step
    if progress is not None:
        print(
            f"[memopt fit] seq at most {capped}: {type(model).__name__}'s config.{name} is {limit} "
            f"(pass max_size= to search beyond it)",
            file=progress, flush=True,
        )
    return capped


def _check_trainable(model: Callable[..., Any], training: bool) -> None:
    if not training or not isinstance(model, torch.nn.Module):
        return
    params = list(model.parameters())
    if params and not any(p.requires_grad for p in params):
        mode = "train" if model.training else "eval"
        raise MemoptFitError(
            f"{type(model).__name__} is in {mode} mode and none of its {len(params)} parameters requires grad, "
            f"but fit plans a training step (forward, backward, a gradient per parameter). For training, "
            f"call model.train() and model.requires_grad_(); to fit an inference batch, pass training=False "
            f"(then only the forward is planned, under torch.no_grad())."
        )


def _check_signature(make_inputs: Callable[..., Any], args: tuple[int, ...]) -> None:
    if not callable(make_inputs):
        raise MemoptFitError(f"make_inputs is a {type(make_inputs).__name__}, not a function of the batch size.")
    try:
        signature = inspect.signature(make_inputs)
    except (TypeError, ValueError):
        return  # a builtin without a signature: the first probe will tell
    try:
        signature.bind(*args)
    except TypeError as exc:
        wanted = "make_inputs(batch, seq)" if len(args) == 2 else "make_inputs(batch)"
        raise MemoptFitError(
            f"make_inputs{signature} cannot be called as {wanted} ({exc}); fit calls it with the "
            f"size it probes: write it as `def make_inputs(batch{', seq' if len(args) == 2 else ''}): ...`."
        ) from None


@dataclass(frozen=True)
class _Sizes:
    """How a probed size becomes ``make_inputs``'s arguments."""

    search: str
    batch: int
    seq: int | None
    step: int

    def call_args(self, size: int) -> tuple[int, ...]:
        if self.search == "seq":
            return (self.batch, size)
        return (size,) if self.seq is None else (size, self.seq)

    def batch_at(self, size: int) -> int:
        return size if self.search == "batch" else self.batch

    def seq_at(self, size: int) -> int | None:
        return size if self.search == "seq" else self.seq

    def name(self, size: int) -> str:
        return f"{self.search} {size}"


def _fake_model(model: Callable[..., Any]) -> tuple[Callable[..., Any], Any, dict[int, torch.Tensor]]:
    """``model`` with fake parameters and buffers, the fake mode to probe in, and
    ``id(real tensor) -> its fake copy`` (empty when nothing was copied). A module whose
    tensors are already fake (built under a `FakeTensorMode`) is used as is; one with
    real tensors is deep-copied with each parameter and buffer replaced by a fake one (the
    copy shares nothing writable with ``model``; nothing of the size of a parameter is
    allocated)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    if not isinstance(model, torch.nn.Module):
        return model, FakeTensorMode(allow_non_fake_inputs=True), {}
    tensors = [*model.parameters(), *model.buffers()]
    fakes = [t for t in tensors if isinstance(t, FakeTensor)]
    if tensors and len(fakes) == len(tensors):
        return model, fakes[0].fake_mode, {}
    if fakes:
        raise MemoptFitError(
            f"{type(model).__name__} mixes {len(fakes)} fake and {len(tensors) - len(fakes)} real parameters/buffers; "
            f"build it entirely under one FakeTensorMode, or entirely on real tensors."
        )
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    memo: dict[int, Any] = {}
    for t in tensors:
        fake = mode.from_tensor(t)
        if isinstance(t, torch.nn.Parameter):
            fake = torch.nn.Parameter(fake, requires_grad=t.requires_grad)
        memo[id(t)] = fake
    fakes = dict(memo)  # before deepcopy adds its own entries
    return copy.deepcopy(model, memo), mode, fakes


def _with_fake_optimizer(config: MemoptConfig, fakes: Mapping[int, torch.Tensor]) -> MemoptConfig:
    """``config`` with its ``optimizer`` / ``optimizer_in_backward`` replaced by a copy
    over the fake parameters (`_fake_optimizer`), so each probe's plan counts the
    optimizer's state (predicted: `memopt.optim.state_size`) and, in backward, each
    gradient dying at its update. The user's optimizer is not touched."""
    optimizer = config.step_optimizer
    if optimizer is None:
        return config
    proxy = _fake_optimizer(optimizer, fakes)
    fused = config.optimizer_in_backward is not None
    return dataclasses.replace(
        config, optimizer=None if fused else proxy, optimizer_in_backward=proxy if fused else None
    )


def _fake_optimizer(optimizer: Any, fakes: Mapping[int, torch.Tensor]) -> Any:
    """A shallow copy of ``optimizer`` whose groups hold the fake copies of its
    parameters (``fakes``: `_fake_model`'s map; empty when the model's parameters are
    fake already and the optimizer is over them), with no state (it is predicted) and
    without memopt's in-backward attachment (the copy gets its own). Raises
    `MemoptFitError` for a parameter that is not the model's."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer  # the config's own check names the problem
    groups = []
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            fake = fakes.get(id(p)) if fakes else p
            if fake is None:
                raise MemoptFitError(
                    f"the optimizer ({type(optimizer).__name__}) holds a parameter of shape {tuple(p.shape)} that is "
                    f"not the model's: fit plans the model's step with the optimizer's state. Build the optimizer "
                    f"over model.parameters() (the model passed to fit)."
                )
            params.append(fake)
        groups.append({**group, "params": params})
    proxy = copy.copy(optimizer)
    for attribute in ("step", "_memopt_in_backward"):
        proxy.__dict__.pop(attribute, None)  # instance attributes memopt's attachment set
    proxy.param_groups = groups
    proxy.state = collections.defaultdict(dict)
    return proxy


def _reset_optimizer(config: MemoptConfig) -> None:
    """After a probe: the fake optimizer copy as it was before it (no gradients, no
    state, no update pending), so the next probe predicts its state afresh and its
    in-backward updates are not taken for a second backward before a step."""
    optimizer = config.step_optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        return
    optimizer.zero_grad(set_to_none=True)
    if config.optimizer_in_backward is not None:
        optimizer.step()  # memopt's wrapped step: clears the updates pending (no gradient is left to step)
    optimizer.state.clear()


@contextlib.contextmanager
def _planning(mode: Any, training: bool) -> Iterator[None]:
    """The context of one probe: the fake mode, memopt's warnings silenced (an infeasible
    budget is a probe that does not fit, not a problem), and the backward graph compiled
    with the forward (`memopt.explain.backward_with_forward`: the lazy backward fails to
    copy a graph holding a real constant under the fake mode)."""
    grad = contextlib.nullcontext() if training else torch.no_grad()
    with mode, backward_with_forward(), warnings.catch_warnings(), grad:
        warnings.simplefilter("ignore", MemoptWarning)
        yield


def _assume_outputs_kept(explanation: Explanation) -> Explanation:
    """Count every user output of every region as kept by the caller through the step's
    backward. On real tensors memopt observes which outputs of a region before a graph
    break the caller still holds when the region's backward starts
    (`memopt.backends.wholestep`: a Hugging Face output object holds the logits and the
    caches); on fake tensors it cannot (no storages to watch) and would take them all as
    handed on, under-counting such steps. Keeping them all is an upper bound: exact for a
    model whose only graph break is before its loss, high by the hidden states handed
    across a break inside the model."""
    for r in explanation.regions:
        if r.kept_outputs is None and r.step is not None:
            n = r.step.num_user_outputs if r.step.num_user_outputs is not None else r.step.num_fwd_outputs
            r.kept_outputs = frozenset(range(n))
    return explanation


def _floor_estimate(explanation: Explanation, peak: int) -> int | None:
    """The smallest peak memopt's planner found at this size, as a step peak: the
    step's planned ``peak`` less the most any region's plan says it could still lower
    its own peak (``estimated_peak_after - min_feasible_peak``: 0 for a plan at its
    floor, as under an infeasible budget). None when no region ran the planner (the
    unoptimized estimate fit). An estimate for choosing probes, never a verdict."""
    plans = [r.plan for r in explanation.step_regions() if r.plan is not None and r.plan.min_feasible_peak is not None]
    if not plans:
        return None
    return peak - max(max(p.estimated_peak_after - int(p.min_feasible_peak or 0), 0) for p in plans)


def _as_call(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def _shapes(inputs: Any) -> tuple[tuple[int, ...], ...]:
    import torch.utils._pytree as pytree

    return tuple(tuple(t.shape) for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor))


class _Runner:
    """Probes sizes (in units of ``step``); remembers each probe's peak and the plan of
    the largest fitting size."""

    def __init__(
        self, model: Callable[..., Any], make_inputs: Callable[..., Any], sizes: _Sizes, config: MemoptConfig,
        mode: Any, training: bool, progress: IO[str] | None, budget: int,
    ) -> None:
        self.model, self.make_inputs, self.sizes, self.config = model, make_inputs, sizes, config
        self.mode, self.training, self.progress, self.budget = mode, training, progress, budget
        self.probes: list[Probe] = []
        self.peaks: dict[int, int] = {}
        self.explanations: dict[int, Explanation] = {}
        self.floor: Explanation | None = None
        self.floors: dict[int, int] = {}
        """Units -> estimated floor bytes, for probes the planner planned (`_floor_estimate`)."""
        self.fixed_bytes = 0
        """Parameter and buffer bytes (the part of the peak that does not grow with the size)."""
        self._shapes: dict[tuple[tuple[int, ...], ...], int] = {}

    def __call__(self, units: int) -> bool:
        size = units * self.sizes.step
        started = time.perf_counter()
        torch._dynamo.reset()  # a new size is a new compile, never a dynamic-shape recompile
        explanation = self._plan(size)
        peak = explanation.estimated_peak_bytes
        fits = peak <= self.budget
        unoptimized = explanation.timeline(optimized=False).peak_bytes
        breakdown = explanation.timeline().peak_breakdown
        self.fixed_bytes = breakdown.get("parameters", 0) + breakdown.get("buffers", 0)
        floor = _floor_estimate(explanation, peak)
        if floor is not None:
            self.floors[units] = floor
        probe = Probe(size, peak, unoptimized, fits, time.perf_counter() - started)
        self.probes.append(probe)
        self.peaks[units] = peak
        if fits and all(u < units for u in self.explanations):
            self.explanations = {units: explanation}
        if units == 1 and not fits:
            self.floor = explanation
        self._say(probe)
        return fits

    def _plan(self, size: int) -> Explanation:
        what = self.sizes.name(size)
        try:
            with _planning(self.mode, self.training):
                inputs = self.make_inputs(*self.sizes.call_args(size))
                args, kwargs = _as_call(inputs)
                try:
                    explanation = _assume_outputs_kept(explain(self.model, *args, options=self.config, **kwargs))
                finally:
                    _reset_optimizer(self.config)
                explanation.timeline()  # raises if memopt compiled nothing
        except MemoptFitError:
            raise
        except Exception as exc:
            raise MemoptFitError(
                f"planning the step at {what} failed: {type(exc).__name__}: {exc}. Check that make_inputs"
                f"({', '.join(map(str, self.sizes.call_args(size)))}) returns the model's inputs and that "
                "the model runs on them."
            ) from exc
        self._check(size, inputs, explanation)
        return explanation

    def _check(self, size: int, inputs: Any, explanation: Explanation) -> None:
        if self.training and not explanation.ran_backward:
            raise MemoptFitError(
                f"at {self.sizes.name(size)} no backward was planned: the model's outputs do not require grad "
                f"(a model in eval mode under torch.no_grad, or parameters with requires_grad=False?). fit plans a "
                f"training step; make the loss require grad, or pass training=False to fit a forward only."
            )
        self.saw(size, inputs)

    def saw(self, size: int, inputs: Any) -> None:
        """Remember ``make_inputs``'s shapes at ``size``; raise if another size gave the same."""
        shapes = _shapes(inputs)
        if shapes in self._shapes and self._shapes[shapes] != size:
            raise MemoptFitError(
                f"make_inputs returned inputs of the same shapes {list(shapes)} for {self.sizes.search} "
                f"{self._shapes[shapes]} and {size}: it ignores the size it is given. Build the inputs from "
                f"its argument, e.g. torch.randint(0, vocab, (batch, seq))."
            )
        self._shapes[shapes] = size

    def _say(self, p: Probe) -> None:
        if self.progress is None:
            return
        verdict = "fits" if p.fits else "over"
        print(
            f"[memopt fit] {self.sizes.name(p.size)}: planned peak {format_bytes(p.planned_peak_bytes)} "
            f"(unoptimized {format_bytes(p.unoptimized_peak_bytes)}) {verdict} budget "
            f"{format_bytes(self.budget)} [{p.seconds:.1f}s]",
            file=self.progress, flush=True,
        )


def _search(runner: _Runner, max_units: int) -> tuple[int, bool]:
    """``(largest fitting units, capped)``: keep a bracket ``lo`` (largest size seen
    fitting; 0 before one fit) and ``hi`` (smallest seen not fitting; None before one
    failed) and probe inside it until ``hi == lo + 1``. Raises the floor error when
    even 1 unit does not fit.

    The first probe is `_first_guess`'s (an eager forward on fake tensors predicts the
    first size the planner must plan), else 1 unit. Each next size is `_predict`'s (the
    largest size predicted to fit), moved inside the bracket: a prediction at or below
    ``lo`` becomes ``lo + 1`` (verify the next size up), one at or above ``hi`` becomes
    ``hi - 1``. So a right prediction ``p`` costs two probes, ``p`` (fits) and ``p + 1``
    (does not). A predicted probe that neither halved the bracket nor (before ``hi``)
    doubled ``lo`` is a miss (half a miss when it was next to the bracket's end: a
    verification, which predictions from the floors of fitting probes, upper bounds,
    often need a few of); after three misses in a row one plain probe follows (the
    midpoint, or twice ``lo``, or 1 unit), so the search never takes more than about
    seven times bisection's probes.

    Every probe lies strictly inside the bracket, so the search ends; under fit's
    precondition (fitting is monotone in the size) its answer does not depend on which
    sizes were probed: it is the size the plain search (1, doubling, then bisection)
    returns. Predictions choose the probes, never the answer."""
    lo, hi, misses = 0, None, 0.0
    first = _first_guess(runner)
    while hi is None or hi - lo > 1:
        if hi is None and lo >= max_units:
            return lo, True
        top = max_units + 1 if hi is None else hi  # first size not allowed
        if lo == 0:
            plain = 1 if hi is None else max(hi // 2, 1)
        else:
            plain = min(2 * lo, max_units) if hi is None else (lo + hi) // 2
        if not runner.probes:
            predicted = first
        else:
            predicted = None if misses >= 3 else _predict(runner, lo)
        n = plain if predicted is None else min(max(predicted, lo + 1), top - 1)
        neighbour = n in (lo + 1, top - 1)
        if runner(n):
            halved = (2 * lo <= n) if hi is None else 2 * (hi - n) <= hi - lo
            lo = n
        else:
            halved = hi is None or 2 * (n - lo) <= hi - lo
            hi = n
        misses = 0.0 if predicted is None or halved else misses + (0.5 if neighbour else 1.0)
    if lo == 0:
        raise _floor_error(runner)
    return lo, False


def _first_guess(runner: _Runner) -> int | None:
    """Units to probe first: the size where the unoptimized peak is predicted to cross
    the budget, plus one (the first size the planner must plan, whose probe tells how
    low memopt can go), from one eager forward at 1 unit on fake tensors (no compile):
    ``parameters + buffers + gradients + units * (saved for backward + outputs)``.
    None (probe 1 unit first) when that forward fails or predicts nothing. It only
    chooses where to start."""
    from torch.multiprocessing.reductions import StorageWeakRef
    import torch.utils._pytree as pytree

    model = runner.model
    tensors = [*model.parameters(), *model.buffers()] if isinstance(model, torch.nn.Module) else []
    fixed = sum(t.numel() * t.element_size() for t in tensors)
    grads = sum(t.numel() * t.element_size() for t in tensors if t.requires_grad) if runner.training else 0
    seen: dict[Any, int] = {}
    own: set[Any] = set()  # saved parameters and buffers are counted in ``fixed``
    with contextlib.suppress(Exception):
        own = {StorageWeakRef(t.untyped_storage()) for t in tensors}

    def pack(t: torch.Tensor) -> torch.Tensor:
        with contextlib.suppress(Exception):
            key = StorageWeakRef(t.untyped_storage())
            if key not in own:
                seen[key] = t.untyped_storage().nbytes()
        return t

    try:
        with _planning(runner.mode, runner.training), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            inputs = runner.make_inputs(*runner.sizes.call_args(runner.sizes.step))
            runner.saw(runner.sizes.step, inputs)
            args, kwargs = _as_call(inputs)
            out = runner.model(*args, **kwargs)
            outputs = sum(t.untyped_storage().nbytes() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
    except Exception:  # noqa: BLE001 - a guess: the first probe at 1 unit will tell what is wrong
        return None
    per_unit = sum(seen.values()) + outputs
    crossing = _line_crossing((0, fixed + grads), (1, fixed + grads + per_unit), runner.budget)
    return None if crossing is None else max(crossing + 1, 1)


def _line_crossing(a: tuple[float, float], b: tuple[float, float], budget: int) -> int | None:
    """The largest units whose value on the line through points ``a`` and ``b``
    (units, bytes) is at most ``budget``; None when the line does not rise."""
    (ua, pa), (ub, pb) = a, b
    if ub == ua or (pb - pa) / (ub - ua) <= 0:
        return None
    slope = (pb - pa) / (ub - ua)
    return int(math.floor(ua + (budget - pa) / slope))


def _predict(runner: _Runner, lo: int) -> int | None:
    """The largest units predicted to fit (None: no prediction), from the probes so far.

    Model: everything of a training step but the parameters and buffers (``fixed``)
    grows about linearly with the batch, so the **floor** (the smallest peak memopt can
    plan at a size) is about ``fixed + units * per_unit``. Each planned probe gives
    an estimate of its floor (`_Runner.floors`): a probe that did not fit planned its
    floor; one that fit says how far below its plan the smallest plan it found lies.
    With two floors the line goes through the pair nearest the budget's crossing; with
    one, through it and ``(0, fixed)``. Before any probe needed the planner (every
    probe fit unplanned), the unoptimized peak's line (through the two largest probes,
    or the one probe and ``(0, fixed)``) predicts where planning starts; that size plus
    one (the first size the planner must plan) is returned, so the next probe brings a
    floor."""
    budget, fixed = runner.budget, runner.fixed_bytes
    floors = sorted(runner.floors.items())
    if not floors:
        unopt = sorted((p.size // runner.sizes.step, p.unoptimized_peak_bytes) for p in runner.probes)
        first = unopt[-2] if len(unopt) >= 2 else (0, fixed)
        crossing = _line_crossing(first, unopt[-1], budget)
        return None if crossing is None else crossing + 1
    if len(floors) == 1:
        return _line_crossing((0, fixed), floors[0], budget)
    below = [f for f in floors if f[1] <= budget]
    above = [f for f in floors if f[1] > budget]
    if below and above:
        pair = (below[-1], above[0])
    else:
        pair = (floors[-2], floors[-1]) if below else (floors[0], floors[1])
    crossing = _line_crossing(pair[0], pair[1], budget)
    return crossing if crossing is not None else lo


def _floor_error(runner: _Runner) -> MemoptFitError:
    explanation = runner.floor
    assert explanation is not None
    size = runner.sizes.step
    timeline = explanation.timeline()
    parts = sorted(timeline.peak_breakdown.items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in parts[:4] if v)
    config = runner.config
    untried = [text for key, text in _LOWERING_OPTIONS.items() if getattr(config, key) is None]
    if runner.sizes.search == "batch" and runner.sizes.seq is not None:
        untried.append(f"a shorter sequence than seq={runner.sizes.seq}")
    advice = "; ".join(untried) if untried else "every memory option is already on"
    return MemoptFitError(
        f"even {runner.sizes.name(size)} does not fit: its planned peak, {format_bytes(timeline.peak_bytes)}, "
        f"is the floor memopt reaches at that size, above the budget of {format_bytes(runner.budget)} "
        f"(at the peak: {shown}; live at step start: {format_bytes(timeline.baseline_bytes)}). "
        f"Options that may lower the floor: {advice}. Otherwise raise the budget."
    )
