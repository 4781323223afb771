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
budget. Optimizer state is not in the step's graphs and is not counted: pass
``reserve=`` for it (docs/fit.md).

The search grows the size exponentially (1, 2, 4, ...) until a probe does not fit, then
bisects the bracket. It assumes that fitting is monotone: a size that does not fit has no
larger size that fits (the floor memopt can reach grows with the size; the planned peak
itself need not: under a budget the planner takes the cheapest plan that fits).
"""

from __future__ import annotations

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

from memopt.config import MemoptConfig, parse_size
from memopt.errors import MemoptFitError, MemoptWarning
from memopt.explain import Explanation, explain
from memopt.plan.report import format_bytes

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


def budget_bytes(budget: int | str) -> int:
    """A budget in bytes: an int, or a size string parsed as ``memory_budget`` parses it
    (`memopt.config.parse_size`: ``"24GiB"``, ``"512MB"``). A fraction is refused: a
    fraction of the unoptimized peak changes with the batch size."""
    if isinstance(budget, bool) or isinstance(budget, float):
        raise MemoptFitError(
            f"budget={budget!r}: fit needs an absolute size (a fraction of the unoptimized peak "
            f"changes with the batch); pass bytes as an int or a string such as '24GiB'."
        )
    if isinstance(budget, str):
        try:
            value = parse_size(budget)
        except ValueError as exc:
            raise MemoptFitError(f"budget={budget!r}: {exc}") from None
    elif isinstance(budget, int):
        value = budget
    else:
        raise MemoptFitError(f"budget={budget!r} must be bytes (int) or a size string such as '24GiB'.")
    if value <= 0:
        raise MemoptFitError(f"budget={budget!r} must be a positive size.")
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
    ``codegen`` defaults to ``"eager"``). Sizes are multiples of ``step`` (e.g. 64 for
    sequence lengths), at most ``max_size``. One line per probe goes to ``progress``: True
    (default) for stderr, a text stream, or False/None for silence. Dynamo's caches are reset before every probe.

    Precondition: fitting is monotone (no size larger than one that does not fit fits).
    Guarantees: the returned size's probe fits; unless ``capped``, the size one ``step``
    larger was probed and does not fit. Raises `MemoptFitError` when even the smallest
    size does not fit (naming its floor and the options that may lower it), when
    ``make_inputs`` does not take the size, for a model with nothing to train when
    ``training=True``, and for a malformed budget.
    """
    started = time.perf_counter()
    total, reserved = budget_bytes(budget), (budget_bytes(reserve) if reserve else 0)
    if reserved >= total:
        raise MemoptFitError(
            f"reserve={format_bytes(reserved)} leaves nothing of budget={format_bytes(total)} for the step; "
            f"lower the reserve or raise the budget."
        )
    config = _config(options, total - reserved)
    _check_search(search, batch, seq, step, max_size, global_batch)
    _check_trainable(model, training)
    fake_model, mode = _fake_model(model)
    sizes = _Sizes(search, batch, seq, step)
    _check_signature(make_inputs, sizes.call_args(1))
    stream = sys.stderr if progress is True else None if isinstance(progress, bool) else progress
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


def _fake_model(model: Callable[..., Any]) -> tuple[Callable[..., Any], Any]:
    """``model`` with fake parameters and buffers, and the fake mode to probe in. A module
    whose tensors are already fake (built under a `FakeTensorMode`) is used as is; one with
    real tensors is deep-copied with each parameter and buffer replaced by a fake one (the
    copy shares nothing writable with ``model``; nothing of the size of a parameter is
    allocated)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    if not isinstance(model, torch.nn.Module):
        return model, FakeTensorMode(allow_non_fake_inputs=True)
    tensors = [*model.parameters(), *model.buffers()]
    fakes = [t for t in tensors if isinstance(t, FakeTensor)]
    if tensors and len(fakes) == len(tensors):
        return model, fakes[0].fake_mode
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
    return copy.deepcopy(model, memo), mode


@contextlib.contextmanager
def _planning(mode: Any, training: bool) -> Iterator[None]:
    """The context of one probe: the fake mode, memopt's warnings silenced (an infeasible
    budget is a probe that does not fit, not a problem), and the backward graph compiled
    with the forward. The last matters: AOTAutograd compiles the backward lazily by
    default, deep-copying it when backward first runs, under the fake mode; a backward
    graph holding a real constant (a recomputed ``torch.tensor`` literal) then fails to
    copy. The eager path copies outside the fake mode."""
    import torch._functorch.config as functorch_config

    grad = contextlib.nullcontext() if training else torch.no_grad()
    with mode, functorch_config.patch(force_non_lazy_backward_lowering=True), warnings.catch_warnings(), grad:
        warnings.simplefilter("ignore", MemoptWarning)
        yield


def _assume_outputs_kept(explanation: Explanation) -> Explanation:
    """Count every user output of every region as kept by the caller through the step's
    backward. On real tensors memopt observes which outputs of a region before a graph
    break the caller still holds when the region's backward starts
    (`memopt.backends.observe`: a Hugging Face output object holds the logits and the
    caches); on fake tensors it cannot (no storages to watch) and would take them all as
    handed on, under-counting such steps. Keeping them all is an upper bound: exact for a
    model whose only graph break is before its loss, high by the hidden states handed
    across a break inside the model."""
    for r in explanation.regions:
        if r.kept_outputs is None and r.step is not None:
            n = r.step.num_user_outputs if r.step.num_user_outputs is not None else r.step.num_fwd_outputs
            r.kept_outputs = frozenset(range(n))
    return explanation


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
        self._shapes: dict[tuple[tuple[int, ...], ...], int] = {}

    def __call__(self, units: int) -> bool:
        size = units * self.sizes.step
        started = time.perf_counter()
        torch._dynamo.reset()  # a new size is a new compile, never a dynamic-shape recompile
        explanation = self._plan(size)
        peak = explanation.estimated_peak_bytes
        fits = peak <= self.budget
        unoptimized = explanation.timeline(optimized=False).peak_bytes
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
                explanation = _assume_outputs_kept(explain(self.model, *args, options=self.config, **kwargs))
                explanation.timeline()  # raises if memopt compiled nothing
        except MemoptFitError:
            raise
        except Exception as exc:
            raise MemoptFitError(
                f"planning the step at {what} failed: {type(exc).__name__}: {exc}. Check that make_inputs"
                f"{self.sizes.call_args(size)} returns the model's inputs and that the model runs on them."
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
    """Exponential growth from 1 unit until a probe does not fit, then bisection of the
    bracket: ``(largest fitting units, capped)``. Each next size is the plain choice
    (twice the largest fit; the bracket's midpoint) unless `_guess` predicts a better one
    from the probes' peaks, which saves probes on models whose peak grows linearly; a
    guess that fails to halve the bracket is followed by a plain midpoint, so the search
    never takes more than about twice bisection's probes."""
    if not runner(1):
        raise _floor_error(runner)
    lo, hi = 1, None
    while hi is None:
        if lo >= max_units:
            return lo, True
        n = min(max(2 * lo, _guess(runner, lo, None)), max_units)
        lo, hi = (n, None) if runner(n) else (lo, n)
    guessed = False
    while hi - lo > 1:
        width = hi - lo
        mid = (lo + hi) // 2 if guessed else min(max(_guess(runner, lo, hi), lo + 1), hi - 1)
        lo, hi = (mid, hi) if runner(mid) else (lo, mid)
        guessed = not guessed and 2 * (hi - lo) > width
    return lo, False


def _guess(runner: _Runner, lo: int, hi: int | None) -> int:
    """The largest units predicted to fit, by a straight line through two probes' peaks
    (0 when there is no line to draw). Without a probe that failed (``hi`` None) the line
    is the unoptimized peak's: the plan never exceeds it, so its crossing is a size that
    fits (if the peak is linear). Once probes failed, it is the planned peaks' line through
    the two smallest failing probes (the floor memopt reaches grows about linearly); with
    one failing probe, through it and the first probe (whose planned peak is at least its
    floor, so the line is shallower and its guess errs towards a size that fits)."""
    budget = runner.budget
    unopt = sorted((p.size // runner.sizes.step, p.unoptimized_peak_bytes) for p in runner.probes)
    if hi is None:
        if len(unopt) < 2:
            return 0
        (a, pa), (b, pb) = unopt[-2], unopt[-1]
        slope = (pb - pa) / (b - a)
        return 0 if slope <= 0 else b + int((budget - pb) // slope)
    over = sorted((u, peak) for u, peak in runner.peaks.items() if peak > budget)
    if len(over) >= 2:
        (a, pa), (b, pb) = over[0], over[1]
    else:  # the first probe's peak is at least its floor: a shallower line, a guess that fits
        (a, pa), (b, pb) = (1, runner.peaks[1]), over[0]
    slope = (pb - pa) / (b - a) if b != a else 0.0
    if slope <= 0:
        return (lo + hi) // 2
    return over[0][0] - math.ceil((over[0][1] - budget) / slope)


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
