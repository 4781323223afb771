"""What `memopt.fit` says when even the smallest size does not fit: the floor memopt
reaches there, what is live at it, the options that may lower it, and the size of the
*other* dimension that does fit.

A batch search at a fixed sequence that fails at batch 1 asks a shorter sequence at
batch 1; a sequence search at a fixed batch above 1 that fails at its first length asks
a smaller batch at that length. The size is predicted by a straight line through
``(0, fixed)`` and the floor found (``fixed``: what no size changes, the parameters,
buffers, gradients and optimizer state), which is on the safe side where the floor grows
faster than linearly (attention in the sequence), and verified by planning it: at most
`MAX_PROBES` probes, so the hint costs a compile or two, never a search. When ``fixed``
alone is above the budget, no size fits and the message says so instead.
"""

from __future__ import annotations

import math

from memopt.errors import MemoptFitError
from memopt.fitting.probe import Runner, Sizes
from memopt.units import format_bytes

__all__ = ["LOWERING_OPTIONS", "MAX_PROBES", "fixed_bytes", "floor_error"]

LOWERING_OPTIONS: dict[str, str] = {
    "precision": "precision='bf16' (matmuls in bf16: smaller activations)",
    "compress_activations": "compress_activations='int8' (saved activations quantized)",
    "offload": "offload='auto' (saved activations wait on the host or disk)",
}

MAX_PROBES = 2
"""Probes spent on the smaller size that fits (the first prediction, then one more)."""


def fixed_bytes(runner: Runner) -> tuple[int, str]:
    """Bytes every size of the step holds at once, and what they are: the parameters
    and buffers, the gradients of a training step (all live after backward unless each
    update runs in backward) and the optimizer's state the plan counts."""
    model = runner.model
    params = list(model.parameters()) if hasattr(model, "parameters") else []
    buffers = list(model.buffers()) if hasattr(model, "buffers") else []
    weights = sum(t.numel() * t.element_size() for t in (*params, *buffers))
    parts = [f"parameters and buffers {format_bytes(weights)}"]
    total = weights
    if runner.training and runner.config.optimizer_in_backward is None:
        grads = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        total += grads
        parts.append(f"gradients {format_bytes(grads)}")
    optimizer = runner.floor.step_optimizer() if runner.floor is not None else None
    if optimizer is not None:
        state = sum(optimizer.state_bytes.values())
        total += state
        parts.append(f"optimizer state {format_bytes(state)}")
    return total, ", ".join(parts)


def floor_error(runner: Runner) -> MemoptFitError:
    """The error for a search whose smallest size does not fit (``runner.floor`` is its
    plan, at its floor): the floor, what is live at it, the options not yet on that may
    lower it and the smaller size of the other dimension that fits (`_other_size`)."""
    explanation = runner.floor
    assert explanation is not None
    size = runner.sizes.step
    timeline = explanation.timeline()
    parts = sorted(timeline.peak_breakdown.items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in parts[:4] if v)
    head = (
        f"even {runner.sizes.name(size)} does not fit: its planned peak, {format_bytes(timeline.peak_bytes)}, "
        f"is the floor memopt reaches at that size, above the budget of {format_bytes(runner.budget)} "
        f"(at the peak: {shown}; live at step start: {format_bytes(timeline.baseline_bytes)}). "
    )
    fixed, what = fixed_bytes(runner)
    if fixed >= runner.budget:
        return MemoptFitError(
            head + f"No batch or sequence fits: {what} alone take {format_bytes(fixed)}, which no size changes. "
            "Raise the budget, or shard the parameters across ranks (memopt.distributed.shard, docs/sharding.md)."
        )
    config = runner.config
    untried = [text for key, text in LOWERING_OPTIONS.items() if getattr(config, key) is None]
    other = _other_size(runner, fixed, timeline.peak_bytes)
    if other:
        untried.append(other)
    advice = "; ".join(untried) if untried else "every memory option is already on"
    return MemoptFitError(head + f"Options that may lower the floor: {advice}. Otherwise raise the budget.")


def _other_size(runner: Runner, fixed: int, floor: int) -> str | None:
    """The advice about the dimension the search held fixed: a shorter sequence at
    batch 1, or a smaller batch at the first sequence length, verified by planning it
    (at most `MAX_PROBES` probes); None when that dimension is already at 1."""
    sizes = runner.sizes
    if sizes.search == "batch" and sizes.seq is not None and sizes.seq > 1:
        dim, current, other = "seq", sizes.seq, Sizes("seq", batch=1, seq=None, step=1)
        where, retry = "at batch 1", "search='seq', batch=1, or --search seq --batch 1, finds the longest"
        fallback, found = f"a shorter sequence than seq={sizes.seq}", "a shorter sequence"
    elif sizes.search == "seq" and sizes.batch > 1:
        dim, current, other = "batch", sizes.batch, Sizes("batch", batch=1, seq=sizes.step, step=1)
        where = f"at seq {sizes.step}"
        retry = f"search='batch', seq={sizes.step}, or --seq {sizes.step}, finds the largest"
        fallback, found = f"a smaller batch than batch={sizes.batch}", "a smaller batch"
    else:
        return None
    probe = Runner(runner.model, runner.make_inputs, other, runner.config, runner.mode, runner.training,
                   runner.progress, runner.budget)  # fmt: skip
    point = (current, floor)
    tried: set[int] = set()
    for _ in range(MAX_PROBES):
        guess = _predict(fixed, point, runner.budget, dim)
        if guess is None or guess < 1 or guess >= current or guess in tried:
            break
        tried.add(guess)
        try:
            fits = probe(guess)
        except MemoptFitError:
            break
        if fits:
            return (f"{found}: {dim} {guess} {where} fits, planned peak "
                    f"{format_bytes(probe.peaks[guess])} ({retry})")  # fmt: skip
        point = (guess, probe.floors.get(guess, probe.peaks[guess]))
    if tried:
        over = " and ".join(str(t) for t in sorted(tried, reverse=True))
        return f"{fallback} ({dim} {over} {where} planned over the budget too)"
    return fallback


def _predict(fixed: int, point: tuple[int, int], budget: int, dim: str) -> int | None:
    """The largest size on the line through ``(0, fixed)`` and ``point`` (size, floor
    bytes) at most ``budget``; a sequence of 64 or more rounded down to a multiple of 8."""
    size, floor = point
    if floor <= fixed:
        return None
    guess = math.floor(size * (budget - fixed) / (floor - fixed))
    if dim == "seq" and guess >= 64:
        guess -= guess % 8
    return guess
