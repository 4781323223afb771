"""How `memopt.fit` chooses the sizes it probes: a bracket narrowed by predictions.

`find_largest` keeps the largest size seen fitting and the smallest seen not fitting, and
probes inside that bracket where a straight line through the planner's floors predicts
the budget is crossed (`predict`), starting where one eager forward on fake tensors
predicts planning starts (`first_guess`). Predictions choose the probes, never the
answer (`find_largest`'s docstring).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from memopt.fitting.fake import planning
from memopt.fitting.floor import floor_error
from memopt.fitting.probe import Runner, as_call

__all__ = ["find_largest", "line_crossing"]

def find_largest(runner: Runner, max_units: int) -> tuple[int, bool]:
    """``(largest fitting units, capped)``: keep a bracket ``lo`` (largest size seen
    fitting; 0 before one fit) and ``hi`` (smallest seen not fitting; None before one
    failed) and probe inside it until ``hi == lo + 1``. Raises the floor error when
    even 1 unit does not fit.

    The first probe is `first_guess`'s (an eager forward on fake tensors predicts the
    first size the planner must plan), else 1 unit. Each next size is `predict`'s (the
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
    first = first_guess(runner)
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
            predicted = None if misses >= 3 else predict(runner, lo)
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
        raise floor_error(runner)
    return lo, False


def first_guess(runner: Runner) -> int | None:
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
        with planning(runner.mode, runner.training), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            inputs = runner.make_inputs(*runner.sizes.call_args(runner.sizes.step))
            runner.saw(runner.sizes.step, inputs)
            args, kwargs = as_call(inputs)
            out = runner.model(*args, **kwargs)
            outputs = sum(t.untyped_storage().nbytes() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
    except Exception:  # noqa: BLE001 - a guess: the first probe at 1 unit will tell what is wrong
        return None
    per_unit = sum(seen.values()) + outputs
    crossing = line_crossing((0, fixed + grads), (1, fixed + grads + per_unit), runner.budget)
    return None if crossing is None else max(crossing + 1, 1)


def line_crossing(a: tuple[float, float], b: tuple[float, float], budget: int) -> int | None:
    """The largest units whose value on the line through points ``a`` and ``b``
    (units, bytes) is at most ``budget``; None when the line does not rise."""
    (ua, pa), (ub, pb) = a, b
    if ub == ua or (pb - pa) / (ub - ua) <= 0:
        return None
    slope = (pb - pa) / (ub - ua)
    return int(math.floor(ua + (budget - pa) / slope))


def predict(runner: Runner, lo: int) -> int | None:
    """The largest units predicted to fit (None: no prediction), from the probes so far.

    Model: everything of a training step but the parameters and buffers (``fixed``)
    grows about linearly with the batch, so the **floor** (the smallest peak memopt can
    plan at a size) is about ``fixed + units * per_unit``. Each planned probe gives
    an estimate of its floor (`Runner.floors`): a probe that did not fit planned its
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
        crossing = line_crossing(first, unopt[-1], budget)
        return None if crossing is None else crossing + 1
    if len(floors) == 1:
        return line_crossing((0, fixed), floors[0], budget)
    below = [f for f in floors if f[1] <= budget]
    above = [f for f in floors if f[1] > budget]
    if below and above:
        pair = (below[-1], above[0])
    else:
        pair = (floors[-2], floors[-1]) if below else (floors[0], floors[1])
    crossing = line_crossing(pair[0], pair[1], budget)
    return crossing if crossing is not None else lo
