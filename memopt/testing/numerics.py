"""Numerics checks for users' own tests: a compiled training step against eager."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

__all__ = ["StepResult", "run_training_step", "assert_step_matches_eager"]


@dataclass
class StepResult:
    """Loss, gradients (by parameter name), buffers and inputs after one step."""

    loss: torch.Tensor
    grads: dict[str, torch.Tensor | None]
    buffers: dict[str, torch.Tensor]
    inputs: list[torch.Tensor] = field(default_factory=list)


def run_training_step(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    *,
    runner: Callable[..., torch.Tensor] | None = None,
    seed: int = 0,
) -> StepResult:
    """Run ``runner(*inputs)`` (default: ``model``) and backward once from zeroed
    grads, seeding the RNG first; inputs are cloned so in-place mutations are kept."""
    model.zero_grad(set_to_none=True)
    args = [x.clone() for x in inputs]
    torch.manual_seed(seed)
    loss = (model if runner is None else runner)(*args)
    loss.backward()
    return StepResult(
        loss=loss.detach().clone(),
        grads={
            n: None if p.grad is None else p.grad.detach().clone()
            for n, p in model.named_parameters()
        },
        buffers={n: b.detach().clone() for n, b in model.named_buffers()},
        inputs=[a.detach().clone() for a in args],
    )


def assert_step_matches_eager(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    *,
    options: Mapping[str, Any] | None = None,
    backend: str = "memopt",
    steps: int = 2,
    compile_kwargs: Mapping[str, Any] | None = None,
    exact: bool = False,
    rtol: float | None = None,
    atol: float | None = None,
) -> list[StepResult]:
    """Train a copy of ``model`` eagerly and a copy compiled with ``backend``
    (``options``) for ``steps`` steps on the same inputs and seeds; assert loss, every
    gradient, every buffer and every (possibly mutated) input match after each step.

    ``exact=True`` uses ``torch.equal``; otherwise ``torch.testing.assert_close``.
    Returns the compiled copy's results.
    """
    eager_model = copy.deepcopy(model)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend=backend, options=dict(options or {}), **dict(compile_kwargs or {}))
    results = []
    for step in range(steps):
        want = run_training_step(eager_model, inputs, seed=step)
        got = run_training_step(compiled_model, inputs, runner=compiled, seed=step)
        assert_same_step(f"step {step}", want, got, exact=exact, rtol=rtol, atol=atol)
        results.append(got)
    return results


def assert_same_step(
    where: str, want: StepResult, got: StepResult, *, exact: bool = False, rtol: float | None = None,
    atol: float | None = None,
) -> None:
    """Assert two steps' loss, gradients, buffers and inputs match (``torch.equal`` with
    ``exact``, else ``torch.testing.assert_close``); failures name ``where`` and the tensor."""
    def check(name: str, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        if a is None or b is None:
            assert a is None and b is None, f"{where}: {name} is None in one run only"
            return
        if exact:
            assert torch.equal(a, b), f"{where}: {name} differs (max abs diff {(a - b).abs().max()})"
        else:
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m: f"{where}: {name}: {m}")

    check("loss", want.loss, got.loss)
    for name in want.grads:
        check(f"grad of {name}", want.grads[name], got.grads[name])
    for name in want.buffers:
        check(f"buffer {name}", want.buffers[name], got.buffers[name])
    for i, (a, b) in enumerate(zip(want.inputs, got.inputs)):
        check(f"input {i}", a, b)
