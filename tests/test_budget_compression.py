"""``memory_budget`` with ``compress_activations``: the planner chooses compression per
value. Exact rematerialization is kept when it is cheaper or compression would not
help; otherwise the fewest, largest values live at the peak are compressed."""

from __future__ import annotations

import warnings

import pytest
import torch

import memopt
from memopt.errors import MemoptBudgetError
from memopt.testing.measure import measure_peak
from memopt.testing.numerics import run_training_step
from memopt.testing.zoo import zoo_case

BASE = {"codegen": "eager", "verify": True}


def _run(options: dict, batch: int = 4):
    torch._dynamo.reset()
    torch.manual_seed(0)
    case = zoo_case("gpt")
    model = case.build()
    torch.manual_seed(1)
    inputs = case.inputs(batch)
    compiled = torch.compile(model, backend="memopt", options={**BASE, **options})
    with memopt.record() as explanation:
        result = run_training_step(model, inputs, runner=compiled)
    model.zero_grad(set_to_none=True)
    measured = measure_peak(lambda: compiled(*inputs).backward()).peak_growth_bytes
    region = explanation.regions[0]
    compress = next(p for p in region.passes if p.name == "compress_activations")
    return result, region.plan, compress, measured + region.plan.baseline_bytes


def _grad_error(got, want) -> float:
    flat = lambda g: torch.cat([g[n].flatten() for n in sorted(g)])  # noqa: E731
    return float((flat(got) - flat(want)).norm() / flat(want).norm())


def test_budget_with_compression_compresses_only_what_it_needs():
    reference, _, _, unbudgeted_peak = _run({})
    _, _, every, _ = _run({"compress_activations": "fp8"})
    result, plan, chosen, measured = _run({"memory_budget": 0.62, "compress_activations": "fp8", "strict": True})
    assert plan.feasible and plan.estimated_peak_after <= plan.budget_bytes
    assert measured <= 1.05 * plan.budget_bytes, (measured, plan.budget_bytes)
    n_chosen = len(chosen.details["compressed"])
    assert 0 < n_chosen < len(every.details["compressed"])
    assert plan.solver["storage"]["compress"] == n_chosen  # the planner chose them all
    assert plan.estimated_peak_before > plan.budget_bytes
    compressed = [d for d in plan.decisions if d.policy == "compress"]
    assert compressed and all("to meet the budget" in d.reason for d in compressed)
    assert torch.equal(result.loss, reference.loss)  # forward values are not rounded
    assert _grad_error(result.grads, reference.grads) < 0.05


def test_budget_exact_remat_needs_no_compression_keeps_gradients_bitwise():
    reference, _, _, _ = _run({})
    result, plan, compress, _ = _run({"memory_budget": 0.8, "compress_activations": "fp8", "strict": True})
    assert plan.feasible
    assert not compress.modified and not compress.applied  # the pass left the graphs alone
    for name, grad in reference.grads.items():
        assert torch.equal(grad, result.grads[name]), name


def test_compression_lowers_the_floor_remat_alone_reaches():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, exact, _, _ = _run({"memory_budget": 0.45})
        _, both, _, _ = _run({"memory_budget": 0.45, "compress_activations": "fp8"})
    assert not exact.feasible and not both.feasible
    assert both.estimated_peak_after < exact.estimated_peak_after
    assert any("compressed" in note for note in both.notes)


def test_infeasible_even_with_compression_strict_raises_naming_both():
    with pytest.raises(Exception) as info:
        _run({"memory_budget": 0.3, "compress_activations": "fp8", "strict": True})
    error = info.value
    while error is not None and not isinstance(error, MemoptBudgetError):
        error = error.__cause__ or error.__context__
    assert isinstance(error, MemoptBudgetError)
    assert "rematerialization and compression" in str(error)
