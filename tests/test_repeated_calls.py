"""A compiled training region called again before its previous call's backward
(memopt/backends/repeats.py, `CompiledRegion._check_repeated_call`): a DPO or
contrastive loss over two forwards of one model holds both calls' saved activations,
which the region's plan counted once, so the budget does not hold. memopt says so,
once per region, with the figures and the fix; steps that call the region once per
backward say nothing."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import memopt
from memopt.testing.measure import measure_peak

EAGER = {"codegen": "eager"}


def _model() -> nn.Module:
    width = 256  # activations (batch 1024), not weights, dominate: a budget can be met
    return nn.Sequential(
        nn.Linear(32, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
        nn.Linear(width, 1),
    )  # fmt: skip


def _pair_loss(model: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(model(a).mean() - model(b).mean())  # DPO's shape: two forwards, one backward


def test_a_second_call_before_backward_warns_that_the_budget_does_not_hold() -> None:
    """Two forwards then one backward: the step peaks above the budget planned for one
    call (measured), and the warning names the region, the pending call, the saved bytes
    and the fix; it is given once, not at every step."""
    model, a, b = _model(), torch.randn(1024, 32), torch.randn(1024, 32)
    compiled = torch.compile(model, backend="memopt", options={**EAGER, "memory_budget": 0.7})
    start = sum(p.nbytes for p in model.parameters()) + a.nbytes + b.nbytes
    peaks = []
    with pytest.warns(memopt.MemoptBudgetWarning) as caught, memopt.record() as explanation:
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            gc.collect()
            peaks.append(start + measure_peak(lambda: _pair_loss(compiled, a, b).backward()).peak_growth_bytes)
    [plan] = [r.plan for r in explanation.regions]
    assert plan is not None and plan.feasible and plan.budget_bytes is not None
    budget = plan.budget_bytes
    repeated = [w for w in caught if "ran again before the backward" in str(w.message)]
    assert len(repeated) == 1, [str(w.message) for w in caught]
    text = str(repeated[0].message)
    assert "(1 call(s) pending)" in text and "memory_budget" in text and "torch.cat" in text, text
    assert min(peaks) > budget, (peaks, budget)  # the warning is true: the plan was for one call


def test_one_call_per_backward_does_not_warn() -> None:
    """Forward, backward; forward, backward (gradient accumulation); a forward under
    no_grad between them; the previous step's output still held at the next call (its
    backward has run): no call is pending, no warning."""
    model, a = _model(), torch.randn(1024, 32)
    compiled = torch.compile(model, backend="memopt", options={**EAGER, "memory_budget": 0.9})
    with warnings.catch_warnings():
        warnings.simplefilter("error", memopt.MemoptBudgetWarning)
        kept = None
        for _ in range(3):
            out = compiled(a)
            out.mean().backward()
            with torch.no_grad():
                compiled(a)
            kept = out  # held through the next call, its backward done
        assert kept is not None
