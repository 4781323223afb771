"""`memopt.fit`: the largest batch (or sequence length) whose planned peak fits a budget.

    result = memopt.fit(model, lambda b: make_batch(b), "24GiB", global_batch=256)
    result.batch, result.accumulation_steps, print(result)

Every probe is a `memopt.explain.explain_settled` of a training step (forward and backward) with
``memory_budget`` set to the budget, run on fake tensors: the step as a training loop
plans it (a step that graph breaks split into regions is run again until it is planned
as a whole, as a loop does from its second or third step); the model's parameters and the
probe's inputs are `FakeTensor` s, so nothing of the step is allocated and a model larger
than this machine can be fitted. A size fits when the step's **planned peak**
(`Explanation.estimated_peak_bytes`: parameters, buffers, inputs, activations, gradients
and temporaries live at the step's highest point, after memopt's plan; a region's outputs
across a graph break count as kept by the caller when observed so, as on real tensors) is
at most the budget. The optimizer's state counts when ``options`` names the optimizer (``optimizer``
or ``optimizer_in_backward``: each probe gets a copy over the fake parameters,
`memopt.fitting.fake.with_fake_optimizer`); otherwise pass ``reserve=`` for it (docs/fit.md).

The search (`memopt.fitting.search.find_largest`) keeps a bracket (largest size seen fitting, smallest seen not
fitting) and probes inside it where a straight line through the floors the planner found
predicts the budget is crossed, starting where an eager forward on fake tensors predicts
planning starts; a right prediction costs two probes. It assumes that fitting is
monotone: a size that does not fit has no larger size that fits (the floor memopt can
reach grows with the size; the planned peak itself need not: under a budget the planner
takes the cheapest plan that fits). Under that assumption the answer does not depend on
which sizes were probed.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import torch

from memopt.config import MIN_BUDGET_BYTES, MemoptConfig, parse_size, require_unit
from memopt.errors import MemoptFitError, MemoptWarning
from memopt.explanation import Explanation
from memopt.fitting.fake import fake_model, with_fake_optimizer
from memopt.fitting.probe import Probe, Runner, Sizes
from memopt.fitting.search import find_largest
from memopt.units import format_bytes

__all__ = ["fit", "FitResult", "Probe", "accumulation", "budget_and_reserve", "budget_bytes"]

SEARCHES: tuple[str, ...] = ("batch", "seq")
_DEFAULT_MAX = 1 << 20


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


def budget_and_reserve(budget: int | str, reserve: int | str) -> tuple[int, int]:
    """``(budget, reserve)`` in bytes, parsed by `budget_bytes`; `MemoptFitError` when
    the reserve leaves under 1 KiB of the budget for the step."""
    total, reserved = budget_bytes(budget), budget_bytes(reserve, name="reserve")
    left = total - reserved
    if left < MIN_BUDGET_BYTES:
        raise MemoptFitError(
            f"reserve={format_bytes(reserved)} leaves "
            f"{'nothing' if left <= 0 else f'only {format_bytes(left)} (under 1 KiB)'} of "
            f"budget={format_bytes(total)} for the step; lower the reserve or raise the budget."
        )
    return total, reserved


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

    Each probe plans the step as a training loop does, with `memopt.explain.explain_settled`
    (a step that graph breaks split is run two or three times, until its regions are
    planned as a whole) and ``memory_budget = budget - reserve``
    (``options`` pass through: ``precision``, ``compress_activations``, ``offload``...;
    ``codegen`` defaults to ``"eager"``; an ``optimizer`` or ``optimizer_in_backward``
    over ``model``'s parameters is planned through a copy over the fake ones, with its
    state predicted, and is itself left untouched). Sizes are multiples of ``step`` (e.g. 64 for
    sequence lengths), at most ``max_size`` (for ``search="seq"`` without one, a Hugging
    Face model's ``config.max_position_embeddings`` or ``config.n_positions``: fake tensors
    do not check position lookups, `_position_limit`). One line per probe goes to ``progress``: True
    (default) for stderr, a text stream, or False/None for silence. Dynamo's caches are reset before every probe.
    Before the first probe, ``model`` runs one eager forward at one ``step`` on fake
    tensors (no compile, no backward) to predict where to start (`memopt.fitting.search.first_guess`);
    which sizes are probed never changes the answer (`memopt.fitting.search.find_largest`).

    Precondition: fitting is monotone (no size larger than one that does not fit fits).
    Guarantees: the returned size's probe fits; unless ``capped``, the size one ``step``
    larger was probed and does not fit. Raises `MemoptFitError` when even the smallest
    size does not fit (naming its floor, the options that may lower it and the shorter
    sequence at batch 1, or smaller batch, that fits: `memopt.fitting.floor`), when
    ``make_inputs`` does not take the size, for a model with nothing to train when
    ``training=True``, and for a malformed budget.
    """
    started = time.perf_counter()
    total, reserved = budget_and_reserve(budget, reserve)
    _check_search(search, batch, seq, step, max_size, global_batch)
    stream = sys.stderr if progress is True else None if isinstance(progress, bool) else progress
    if search == "seq" and max_size is None:
        max_size = _position_limit(model, step, stream)
    _warn_past_positions(model, seq)
    _check_trainable(model, training)
    fake, mode, fakes = fake_model(model)
    config = with_fake_optimizer(_config(options, total - reserved), fakes)
    sizes = Sizes(search, batch, seq, step)
    _check_signature(make_inputs, sizes.call_args(1))
    runner = Runner(fake, make_inputs, sizes, config, mode, training, stream, total - reserved)
    found, capped = find_largest(runner, (max_size or _DEFAULT_MAX * step) // step)
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
