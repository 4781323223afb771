"""Gradient accumulation under a memory budget (memopt/backends/watched.py,
`CompiledRegion._count_held_grads`; memopt/analysis/memory.py, `StepGraphs.grads_held`):
a micro-batch after the first starts with every parameter's ``.grad`` set and adds its
gradients into them, so it holds one parameter-sized gradient more than the first
micro-batch throughout its step. The budget holds, measured, on every micro-batch."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
import torch.nn as nn

import memopt
from memopt.testing.measure import measure_peak
from memopt.testing.zoo import zoo_case


def _bytes(tensors: list[torch.Tensor]) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


@pytest.mark.parametrize("alone", [False, True], ids=["whole-step", "plan_across_graph_breaks=False"])
def test_budget_holds_on_every_micro_batch_of_gradient_accumulation(alone: bool) -> None:
    case = zoo_case("gpt")
    model, inputs = case.build(), case.inputs(8)
    params = list(model.parameters())
    unbudgeted = memopt.explain(model, *inputs, options={"codegen": "eager"}).estimated_peak_bytes
    grads = _bytes(params)  # what a later micro-batch holds from its start
    budget = int(0.85 * unbudgeted)
    options = {"codegen": "eager", "memory_budget": budget, "plan_across_graph_breaks": not alone}
    compiled = torch.compile(model, backend="memopt", options=options)

    def step() -> None:
        compiled(*inputs).backward()

    peaks: list[int] = []
    with memopt.record() as explanation, warnings.catch_warnings():
        warnings.simplefilter("error", memopt.MemoptWarning)
        for _ in range(2):  # two optimizer steps of three micro-batches each
            model.zero_grad(set_to_none=True)
            for _ in range(3):
                gc.collect()
                start = _bytes(params) + _bytes(list(inputs)) + _bytes([p.grad for p in params if p.grad is not None])
                peaks.append(start + measure_peak(step).peak_growth_bytes)
    first, later = peaks[3], peaks[4:6]
    assert later[0] == later[1], peaks
    # The later micro-batches hold the gradients throughout: without planning for them
    # they peaked `grads` above the first micro-batch (above the budget). The plan now
    # counts them, and its estimate is theirs.
    assert max(peaks) <= budget, (peaks, budget, grads)
    assert later[0] >= first, peaks
    assert abs(explanation.estimated_peak_bytes - later[0]) <= 0.01 * later[0], (explanation.estimated_peak_bytes, peaks)
    assert explanation.baseline_bytes == _bytes(params) + _bytes(list(inputs)) + grads


def test_an_infeasible_budget_warns_again_for_the_micro_batches_that_hold_gradients() -> None:
    """The first micro-batch's plan warns once (at its first backward); the second
    micro-batch, planned again with the gradients held, warns once more, its floor the
    parameters' gradient bytes higher; later micro-batches keep that plan, silently."""
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "memory_budget": 1024})
    x = torch.randn(128, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            compiled(x).sum().backward()
    floors = [w.message.min_feasible_peak for w in caught if issubclass(w.category, memopt.MemoptBudgetWarning)]
    assert len(floors) == 2, floors
    assert floors[1] - floors[0] == _bytes(list(model.parameters())), floors


def test_a_region_that_cannot_be_planned_again_warns_once_that_held_gradients_are_not_counted() -> None:
    """A region of dynamic shapes is never traced again, so it cannot be planned with
    the gradients a later micro-batch holds: its first such call warns, once, naming
    the bytes the peak may exceed the budget by; a step without held gradients does not."""
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    options = {"codegen": "eager", "memory_budget": 0.9}
    compiled = torch.compile(model, backend="memopt", options=options, dynamic=True)
    x = torch.randn(128, 64)
    grad_bytes = _bytes(list(model.parameters()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # no accumulation: each step starts without .grad
            model.zero_grad(set_to_none=True)
            compiled(x).sum().backward()
        assert not [w for w in caught if ".grad set" in str(w.message)], [str(w.message) for w in caught]
        for _ in range(3):  # accumulation
            compiled(x).sum().backward()
    held = [w for w in caught if issubclass(w.category, memopt.MemoptBudgetWarning) and ".grad set" in str(w.message)]
    assert len(held) == 1, [str(w.message) for w in caught]
    message = str(held[0].message)
    assert "4 parameters' .grad set" in message and memopt.units.format_bytes(grad_bytes) in message, message
    assert "dynamic=False" in message, message


def test_a_budget_warning_made_an_error_by_the_filter_is_raised_not_reported_as_a_memopt_failure() -> None:
    """With the user's filter turning ``MemoptBudgetWarning`` into an error, the
    micro-batch whose held gradients make the region compile again raises that
    warning itself. It was caught as a failed whole-step recompile and reported as
    "This is a memopt bug" (a `MemoptWarning`), the old plan kept."""
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    x = torch.randn(512, 64)
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "memory_budget": 1024})
    with warnings.catch_warnings():
        warnings.simplefilter("always", memopt.MemoptWarning)
        warnings.simplefilter("error", memopt.MemoptBudgetWarning)  # the later filter is matched first
        with pytest.raises(memopt.MemoptBudgetWarning, match="is infeasible"):
            compiled(x).sum().backward()  # the first backward emits the compile's held warning (and stops)
        model(x).sum().backward()  # a micro-batch's gradients, held by the next call
        with warnings.catch_warnings(record=True) as others:
            warnings.simplefilter("always", memopt.MemoptWarning)
            warnings.simplefilter("error", memopt.MemoptBudgetWarning)
            with pytest.raises(memopt.MemoptBudgetWarning, match="is infeasible"):
                compiled(x).sum().backward()  # .grad held: compiled again, not holding its warning
        assert not [str(w.message) for w in others if "memopt bug" in str(w.message)]


class _LossAfterBreak(nn.Module):
    """A graph break before the loss: the second region holds no parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 32))

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        torch._dynamo.graph_break()
        return torch.nn.functional.mse_loss(h, target)


def test_a_later_region_without_parameters_is_planned_again_with_the_held_gradients() -> None:
    """zero_grad(set_to_none=False) under a fractional budget, the step split by a graph
    break before the loss (as Hugging Face GPT-2's is): the first region counts its held
    gradients and is planned again, its budget the fraction of the higher step peak. The
    loss region finds no gradient of its own to count and kept the budget of the step
    without them: the plans stated two budgets, the step's warning said "different
    budgets or peaks" and the report "no budget for the step as a whole". It is now
    planned again in the step, and both state one budget."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _LossAfterBreak()
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "memory_budget": 0.7})
    x, target = torch.randn(64, 32), torch.randn(64, 32)
    with memopt.record() as explanation, warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptBudgetWarning)
        for _ in range(4):
            compiled(x, target).backward()
            model.zero_grad(set_to_none=False)
    step = explanation.step_regions()
    assert len(step) == 2 and all(r.plan is not None for r in step)
    budgets = {r.region: r.plan.budget_bytes for r in step}  # type: ignore[union-attr]
    assert len(set(budgets.values())) == 1, budgets
    assert explanation.to_dict()["budget_bytes"] == next(iter(budgets.values()))
