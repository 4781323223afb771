"""Outputs the caller keeps through backward (issue 14, item 3).

Rule (`memopt.analysis.compose.compose_timelines`, `memopt.backends.steptracker`): an
earlier region's outputs are handed on (dead when the forward ends, or when the
backward that saves them last uses them) unless the caller was seen still holding
them when the region's backward started; those stay live after the step, like the
last region's outputs. A Hugging Face model's output object holds the logits and the
key/value caches, and ``out = model(**x); out.loss.backward()`` keeps it through
backward; GPT-2 computes them in the region before its loss (a graph break)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn

import memopt
from memopt.testing.measure import measure_peak


def _estimate_and_measure(model: nn.Module, call: Any, steps: int = 2) -> tuple[Any, Any, Any]:
    """Compile, run ``steps`` user steps (``out = call(compiled)``; backward of its
    loss with ``out`` alive), then measure one whose ``out`` outlives it: (timeline,
    measurement, explanation)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager"})

    def step(keep: dict[str, Any]) -> None:
        out = keep["out"] = call(compiled)
        (out[0] if isinstance(out, tuple) else out.loss).backward()

    with memopt.record() as explanation:
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            step({})
    model.zero_grad(set_to_none=True)
    measured = measure_peak(lambda: step({}))
    model.zero_grad(set_to_none=True)
    kept: dict[str, Any] = {}
    at_end = measure_peak(lambda: step(kept))  # the caller keeps ``out`` after the step
    return explanation.timeline(), (measured, at_end), explanation


class Break(nn.Module):
    def __init__(self, keep: bool) -> None:
        super().__init__()
        self.a, self.b, self.keep = nn.Linear(64, 256), nn.Linear(256, 8), keep

    def forward(self, x: torch.Tensor) -> Any:
        h = self.a(x).relu()  # region 1's output: 256 x 256 floats
        torch._dynamo.graph_break()
        loss = self.b(h).pow(2).mean()
        return (loss, h) if self.keep else (loss,)


@pytest.mark.parametrize("keep", [True, False])
def test_a_region_output_the_caller_keeps_lives_through_the_step(keep: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    timeline, (measured, at_end), explanation = _estimate_and_measure(Break(keep), lambda c: c(x))
    first, second = explanation.step_regions()
    assert (0 in first.kept_outputs) == keep
    # h is the second region's input, which its Linear saves for backward: one storage
    # with the first region's output, counted once when the caller keeps it too.
    h_position = next(p for p, (name, _) in second.input_sources.items() if name == first.region)
    assert second.input_sources[h_position] == (first.region, 0)
    assert abs(timeline.peak_growth_bytes - measured.peak_growth_bytes) <= 0.03 * measured.peak_growth_bytes
    h_bytes = 256 * 256 * 4
    end = timeline.end_bytes - timeline.baseline_bytes
    assert abs(end - at_end.end_growth_bytes) < h_bytes // 4, (end, at_end.end_growth_bytes)


def test_an_inference_step_counts_a_handed_on_output_once() -> None:
    """Under ``torch.no_grad()`` the second region's input (the first one's output)
    needs no gradient, so nothing marks it as an activation: it was counted as a step
    input live from the start and again as the first region's output. The recorded
    sources say it is the same storage."""
    torch.manual_seed(0)
    model, x = Break(False), torch.randn(256, 64)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager"})
    with torch.no_grad():
        with memopt.record() as explanation:
            compiled(x)
        measured = measure_peak(lambda: compiled(x))
    first, second = explanation.step_regions()
    assert second.kind == "inference" and set(second.input_sources.values()) == {(first.region, 0)}
    timeline = explanation.timeline()
    held = sum(p.numel() * p.element_size() for p in model.parameters()) + x.numel() * x.element_size()
    assert timeline.baseline_bytes == held  # h is not live before the step
    assert abs(timeline.peak_growth_bytes - measured.peak_growth_bytes) <= 0.03 * measured.peak_growth_bytes


class MaskBreak(nn.Module):
    """Region 1 returns a mask without a gradient, which region 2 saves for backward;
    region 2's backward, where its weight's 4 MiB gradient appears, holds the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.w = nn.Linear(64, 1024), nn.Parameter(torch.randn(1024, 1024) / 32)

    def forward(self, x: torch.Tensor) -> Any:
        h = self.a(x)
        mask = (h > 0).float()  # no grad_fn: not an "activation" input of region 2
        torch._dynamo.graph_break()
        return ((h * mask).sum(0) @ self.w).pow(2).mean(),


def test_a_saved_input_without_a_gradient_lives_until_its_backward() -> None:
    """The mask is region 1's output and region 2's input, saved for the product's
    backward: counted once, live from the forward through region 2's backward."""
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    timeline, (measured, _), explanation = _estimate_and_measure(MaskBreak(), lambda c: c(x))
    first, second = explanation.step_regions()
    assert (first.region, 1) in second.input_sources.values()
    assert abs(timeline.peak_growth_bytes - measured.peak_growth_bytes) <= 0.03 * measured.peak_growth_bytes, (
        timeline.peak_growth_bytes, measured.peak_growth_bytes)


def _hf(name: str, use_cache: bool) -> tuple[Any, Any, Any, Any]:
    pytest.importorskip("transformers")
    from memopt.testing.hf import build

    model, inputs = build(name, batch=4, seq=64, use_cache=use_cache)
    timeline, measurements, _ = _estimate_and_measure(model, lambda c: c(**inputs))
    return model.config, timeline, *measurements


@pytest.mark.parametrize("name", ["gpt2"])  # two regions: logits and caches come from the first
def test_default_config_lm_estimate_counts_the_kv_cache(name: str) -> None:
    """Within 3% of the measured peak of the user's loop with ``use_cache=True`` (the
    default), and the key/value caches (2 * layers * batch * kv_heads * seq *
    head_dim * 4 bytes) live after the step, held by the output."""
    config, with_cache, measured, at_end = _hf(name, True)
    assert abs(with_cache.peak_growth_bytes - measured.peak_growth_bytes) <= 0.03 * measured.peak_growth_bytes
    assert with_cache.end_bytes - with_cache.baseline_bytes == at_end.end_growth_bytes
    _, without, measured_nc, _ = _hf(name, False)
    assert abs(without.peak_growth_bytes - measured_nc.peak_growth_bytes) <= 0.03 * measured_nc.peak_growth_bytes
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    cache = 2 * config.num_hidden_layers * 4 * kv_heads * 64 * (config.hidden_size // heads) * 4
    assert with_cache.end_bytes - without.end_bytes == cache


def test_an_observation_that_fails_never_breaks_a_recorded_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Observing a call of a region that is only recorded (no budget) may fail: the
    step runs on, its gradients as without the observation, and the record is left
    unobserved."""
    from memopt.backends.steptracker import OutputRefs

    def broken(*args: Any) -> Any:
        raise RuntimeError("injected")

    torch.manual_seed(0)
    model, x = Break(keep=False), torch.randn(8, 64)
    model(x)[0].backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    monkeypatch.setattr(OutputRefs, "of", broken)
    with memopt.record() as explanation:
        torch.compile(model, backend="memopt", options={"codegen": "eager"})(x)[0].backward()
    assert all(torch.allclose(p.grad, expected[n]) for n, p in model.named_parameters())
    assert [r.kept_outputs for r in explanation.regions] == [None, None]
