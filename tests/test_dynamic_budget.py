"""A region compiled for dynamic shapes is planned once, at the sizes it was traced
with. Under a budget in bytes, a later, larger call ran that plan on larger tensors
and passed the budget with nothing said (GPT-2, 2 layers, width 128, batch 8, budget
25,000,000 bytes, ``dynamic=True``: traced at sequence 64, measured peak growth 27.0 MB
at 96 and 38.2 MB at 128). Now the first larger call warns, once per region, naming
the input, both shapes and the fix (docs/remat.md, "Limits")."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import memopt

DYNAMIC = "was compiled for dynamic shapes and planned once"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 1))


def _steps(budget: int | float | str, batches: tuple[int, ...], dynamic: bool | None) -> list[list[str]]:
    """memopt's warnings at each training step of ``batches`` (the batch sizes)."""
    torch._dynamo.reset()
    model = _model()
    compiled = torch.compile(
        model, backend="memopt", options={"codegen": "eager", "memory_budget": budget}, dynamic=dynamic
    )
    said = []
    for batch in batches:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", memopt.MemoptWarning)
            model.zero_grad(set_to_none=True)  # no accumulation (tests/test_grad_accumulation.py)
            compiled(torch.randn(batch, 32)).sum().backward()
        said.append([str(w.message) for w in caught if issubclass(w.category, memopt.MemoptWarning)])
    return said


def test_a_larger_call_of_a_dynamic_region_warns_once_naming_the_shapes() -> None:
    said = _steps("4MiB", (64, 32, 64, 128, 256), dynamic=True)
    assert said[:3] == [[], [], []], said  # the traced shape and smaller ones run within the plan
    (message,) = said[3]
    assert DYNAMIC in message and "memory_budget 4.00 MiB" in message, message
    assert "(64, 32)" in message and "(128, 32)" in message, message
    assert "dynamic=False" in message, message
    assert said[4] == [], said  # once per region


@pytest.mark.parametrize("budget, dynamic", [("4MiB", False), (0.5, True)])
def test_static_compiles_and_fractional_budgets_say_nothing(budget: int | float | str, dynamic: bool) -> None:
    """A static compile plans each shape afresh; a fraction is of the peak at every shape."""
    said = _steps(budget, (64, 128), dynamic=dynamic)
    assert not any(DYNAMIC in m for step in said for m in step), said


def test_dropout_under_a_budget_keeps_a_dynamic_region_dynamic() -> None:
    """Under a budget memopt makes dropout recomputable (`memopt.graph.dropout`), which
    read the mask's size as ints: on a region compiled for dynamic shapes that added a
    shape guard, so every later size compiled the region anew (default GPT-2, batch
    2x32 then 4x64, 2x48, 3x40: the forward frame compiled 4 times, against once for
    ``aot_eager``; with Inductor a compile per size until Dynamo's recompile limit).
    At symbolic sizes dropout is now left as torch saves it: one compile serves every
    size."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Dropout(0.1), nn.GELU(), nn.Linear(64, 1))
    compiled = torch.compile(
        model, backend="memopt", options={"codegen": "eager", "memory_budget": 0.5}, dynamic=True
    )
    with memopt.record() as explanation, warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptBudgetWarning)  # the budget is not the point
        for batch in (64, 32, 96):
            model.zero_grad(set_to_none=True)
            compiled(torch.randn(batch, 32)).sum().backward()
    assert [r.region for r in explanation.regions] == ["0/0"], [r.region for r in explanation.regions]
    assert [fb for r in explanation.regions for fb in r.fallbacks] == []


def test_an_inference_region_warns_without_the_training_fixes() -> None:
    """An inference region (``torch.no_grad()``: evaluation, each decoding step of
    ``generate``, whose key/value cache grows a position per call) keeps nothing for
    backward, so no plan lowers its peak. Its larger call used to be told to compile
    with ``dynamic=False`` for a plan per shape (for ``generate``: a compile per decoding
    step, until Dynamo's recompile limit) or to give a fraction (not applied to
    inference regions): now the warning says the budget was only checked at the traced
    sizes and names the fixes that apply."""
    torch._dynamo.reset()
    model = _model()
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "memory_budget": "4MiB"}, dynamic=True)
    said = []
    for batch in (64, 32, 128, 256):
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", memopt.MemoptWarning)
            compiled(torch.randn(batch, 32))
        said.append([str(w.message) for w in caught if issubclass(w.category, memopt.MemoptWarning)])
    assert said[:2] == [[], []], said
    (message,) = said[2]
    assert message.startswith("inference region 0/0 was compiled for dynamic shapes"), message
    assert "(64, 32)" in message and "(128, 32)" in message and "memory_budget 4.00 MiB" in message, message
    assert "no plan lowers its peak" in message, message
    assert "Compile with torch.compile(..., dynamic=False)" not in message, message
    assert said[3] == [], said  # once per region
