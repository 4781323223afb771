"""Fail-soft: a failure injected into each stage memopt owns (`memopt.failsoft.STAGES`)
gives one `MemoptWarning` naming the stage, a recorded fallback, and a step whose
numbers equal the unoptimized compile's; ``strict=True`` raises instead.

(The whole-step recompile stage is tested in tests/test_wholestep.py.)"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import memopt
import memopt.backends.region as region_module
import memopt.failsoft
from memopt.backends.record import RegionRecord, recording
from memopt.config import MemoptConfig
from memopt.failsoft import STAGES, fail_soft
from memopt.passes.pipeline import pre_autograd_pipeline
from memopt.passes.precision import PrecisionLowering
from memopt.passes.schedule import MemoryAwareSchedule
from memopt.testing.numerics import assert_step_matches_eager
from memopt.testing.zoo import zoo_case

BUDGET = {"codegen": "eager", "memory_budget": 0.65, "verify": True}  # feasible: the floor is 0.63


def _raise(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("injected failure")


def _run(options: dict[str, Any]) -> tuple[list[RegionRecord], list[str]]:
    """One training step of the zoo GPT compiled with ``options``, against eager
    (same loss and gradients); the regions' records and memopt's warnings."""
    torch._dynamo.reset()
    case = zoo_case("gpt")
    torch.manual_seed(0)
    model = case.build()
    with recording() as records, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", memopt.MemoptWarning)
        assert_step_matches_eager(model, case.inputs(4), options=options, steps=1)
    return records, [str(w.message) for w in caught if issubclass(w.category, memopt.MemoptWarning)]


def _one_fallback(records: list[RegionRecord], messages: list[str], stage: str) -> memopt.failsoft.Fallback:
    assert len(messages) == 1, messages
    assert f"{stage} failed on region" in messages[0] or stage == "passes"
    assert "injected failure" in messages[0] and "strict" in messages[0]
    fallbacks = [fb for r in records for fb in r.fallbacks]
    assert len(fallbacks) == 1 and fallbacks[0].stage == stage
    return fallbacks[0]


@pytest.fixture
def inject(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[object, str], None]]:
    def patch(target: object, name: str) -> None:
        monkeypatch.setattr(target, name, _raise)

    yield patch
    torch._dynamo.reset()


def test_stages_are_named_and_unknown_stages_refused() -> None:
    assert STAGES == ("pre-autograd", "planning", "passes", "whole-step recompile", "codegen")
    with pytest.raises(ValueError, match="unknown memopt stage 'parsing'"):
        fail_soft("parsing", "0", RuntimeError("x"), strict=False, outcome="")


def test_a_failing_pre_autograd_pass_leaves_fp32(inject: Any) -> None:
    """precision="bf16" whose pass fails: the step runs in fp32, as eager does."""
    inject(PrecisionLowering, "run")
    records, messages = _run({"codegen": "eager", "precision": "bf16"})
    fallback = _one_fallback(records, messages, "passes")
    assert fallback.pass_name == "precision" and "pass 'precision' failed" in messages[0]


def test_a_failing_pre_autograd_stage_compiles_as_torch(inject: Any) -> None:
    inject(region_module, "pre_autograd_pipeline")
    records, messages = _run(BUDGET)
    fallback = _one_fallback(records, messages, "pre-autograd")
    assert "compiled as torch.compile would without memopt" in fallback.outcome


def test_a_failing_planner_leaves_torch_partition(inject: Any) -> None:
    inject(region_module, "plan_region")
    records, messages = _run(BUDGET)
    _one_fallback(records, messages, "planning")
    (record,) = records
    assert record.plan is not None and record.plan.fallbacks[0]["stage"] == "planning"
    assert all(d.policy == "save" for d in record.plan.decisions)  # unoptimized: torch's partition
    # pre-autograd only: no pass after planning ran
    assert [p.name for p in record.passes] == [p.name for p in pre_autograd_pipeline(MemoptConfig())]


def test_a_failing_pass_keeps_the_passes_before_it(inject: Any) -> None:
    """The schedule pass (last) fails: rematerialization, which ran before it, is kept."""
    inject(MemoryAwareSchedule, "run")
    records, messages = _run(BUDGET)
    fallback = _one_fallback(records, messages, "passes")
    assert fallback.pass_name == "schedule" and "keeps the passes before it (remat," in fallback.outcome
    (record,) = records
    assert {p.name: p.status for p in record.passes}["schedule"] == "failed"
    assert record.plan is not None and any(d.policy == "recompute" for d in record.plan.decisions)
    assert record.timeline_before is not None and record.timeline_after is not None
    assert record.timeline_after.peak_bytes < record.timeline_before.peak_bytes  # the remat is in the graphs


def test_a_failing_eager_codegen_compiles_as_torch(inject: Any) -> None:
    inject(region_module, "compile_eager")
    records, messages = _run(BUDGET)
    fallback = _one_fallback(records, messages, "codegen")
    assert "eager codegen" in fallback.outcome


@pytest.mark.inductor
def test_a_failing_inductor_codegen_compiles_with_inductor_as_torch(inject: Any) -> None:
    """memopt's call into Inductor's inner compile fails; torch's own compile_fx (its
    default inner compile is bound at definition) compiles the region instead."""
    import torch._inductor.compile_fx as compile_fx

    inject(compile_fx, "compile_fx_inner")
    torch._dynamo.reset()
    case = zoo_case("mlp")
    with recording() as records, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", memopt.MemoptWarning)
        assert_step_matches_eager(case.build(), case.inputs(4), options={"codegen": "inductor"}, steps=1)
    messages = [str(w.message) for w in caught if issubclass(w.category, memopt.MemoptWarning)]
    fallback = _one_fallback(records, messages, "codegen")
    assert "inductor codegen" in fallback.outcome


@pytest.mark.parametrize(
    ("target", "name", "stage"),
    [
        (region_module, "pre_autograd_pipeline", "pre-autograd"),
        (region_module, "plan_region", "planning"),
        (MemoryAwareSchedule, "run", "passes"),
        (region_module, "compile_eager", "codegen"),
    ],
)
def test_strict_raises_naming_the_stage(inject: Any, target: object, name: str, stage: str) -> None:
    inject(target, name)
    torch._dynamo.reset()
    case = zoo_case("gpt")
    compiled = torch.compile(case.build(), backend="memopt", options={**BUDGET, "strict": True})
    with pytest.raises(Exception) as info:
        compiled(*case.inputs(4)).backward()
    error = info.value
    while not isinstance(error, memopt.MemoptInternalError):  # through Dynamo's BackendCompilerFailed
        inner = getattr(error, "inner_exception", None) or error.__cause__
        if inner is None:
            break
        error = inner
    assert isinstance(error, memopt.MemoptInternalError), info.value
    assert error.stage == stage and "injected failure" in error.reason


def test_dynamo_signals_pass_through(inject: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamo's own control flow (here: restart the analysis) is not a memopt failure:
    it reaches Dynamo, which compiles the frame again."""
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis

    calls = []

    def restart_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise TensorifyScalarRestartAnalysis
        return original(*args, **kwargs)

    original = region_module.plan_region
    monkeypatch.setattr(region_module, "plan_region", restart_once)
    records, messages = _run(BUDGET)
    assert messages == [] and len(calls) == 2
    assert [fb for r in records for fb in r.fallbacks] == []
    assert len(records) == 1  # the abandoned compile took its record back
