"""measure_peak sees allocations of known size; estimates match measured peaks on
the zoo (within 10%: the issue's bar) and equal on fake and real inputs."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import memopt
from memopt.analysis.compose import compose_timelines
from memopt.analysis.memory import build_timeline
from memopt.testing.measure import measure_peak
from memopt.testing.zoo import ZOO, zoo_case


def test_measure_peak_known_allocations():
    def step():
        a = torch.empty(1000, dtype=torch.float32)  # 4000 B
        b = torch.empty(500, dtype=torch.float64)  # 4000 B
        del a
        c = torch.empty(250, dtype=torch.float32)  # 1000 B
        return b, c

    kept = {}
    m = measure_peak(lambda: kept.setdefault("out", step()))
    assert m.peak_growth_bytes == 8000
    assert m.end_growth_bytes == 5000


def test_measure_peak_rejects_meta():
    with pytest.raises(ValueError, match="supports 'cpu' and 'cuda'"):
        measure_peak(lambda: None, device="meta")


def _estimate_and_measure(name: str, batch: int) -> tuple[int, int]:
    case = zoo_case(name)
    model = case.build().train()
    inputs = case.inputs(batch)
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager"})
    with memopt.record() as explanation:
        compiled(*inputs).backward()
    model.zero_grad(set_to_none=True)
    measured = measure_peak(lambda: compiled(*inputs).backward())
    timeline = compose_timelines([(r.step, build_timeline(r.step)) for r in explanation.regions])
    return timeline.peak_growth_bytes, measured.peak_growth_bytes


@pytest.mark.parametrize("name", sorted(ZOO))
def test_estimated_growth_within_10_percent_of_measured(name):
    estimated, measured = _estimate_and_measure(name, zoo_case(name).default_batch * 4)
    assert measured > 0
    assert abs(estimated - measured) <= 0.10 * measured, (estimated, measured)


@pytest.mark.parametrize("name", ["gpt", "cnn_bn"])
def test_estimate_on_fake_inputs_equals_real(name):
    case = zoo_case(name)
    results = []
    for fake in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        mode = FakeTensorMode() if fake else None
        with mode if mode else torch.device("cpu"):
            model = case.build().train()
            inputs = case.inputs(8)
            with memopt.record() as explanation:
                compiled = torch.compile(model, backend="memopt", options={"codegen": "eager"})
                compiled(*inputs).backward()
        timeline = build_timeline(explanation.regions[0].step)
        results.append((timeline.baseline_bytes, timeline.peak_bytes, len(timeline.points)))
    assert results[0] == results[1]


@pytest.mark.inductor
@pytest.mark.parametrize("name, batch", [("mlp", 256), ("cnn_bn", 64), ("transformer_block", 64)])
def test_estimate_within_5_percent_with_inductor_codegen(name: str, batch: int):
    """With codegen="inductor" the estimate models Inductor: pointwise values fused into
    their consumers are never materialized, kernels overwrite dead buffers in place,
    convolution inputs are copied channels-last (the CNN), oneDNN's channels-last
    scratch."""
    torch._dynamo.reset()
    case = zoo_case(name)
    model = case.build().train()
    inputs = case.inputs(batch)
    compiled = torch.compile(model, backend="memopt", options={"codegen": "inductor"})
    with memopt.record() as explanation:
        compiled(*inputs).backward()
    model.zero_grad(set_to_none=True)
    measured = measure_peak(lambda: compiled(*inputs).backward()).peak_growth_bytes
    estimated = explanation.timeline().peak_growth_bytes
    assert abs(estimated - measured) <= 0.05 * measured, (estimated, measured)
    assert explanation.regions[0].step.fused_codegen


@pytest.mark.inductor
def test_max_pool_backward_estimate_matches_inductor():
    """A max-pool backward under Inductor. On torch 2.13 it scatters the gradient into
    zeros that Inductor allocates once (the out-of-place scatter_add is an in-place
    update of a clone with the zeros inlined): the estimate counted the zeros and the
    scatter's result as two buffers and read 55% above the measured peak (1440 against
    928 KiB here). On torch 2.11 the backward is ``max_pool2d_with_indices_backward``,
    which Inductor fuses as a gather loop into its consumers: the estimate counted it and
    its indices as buffers and read 114% above the measured peak (1440 against 672 KiB)."""

    class Pool(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.randn(8, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.nn.functional.max_pool2d((x * self.scale).relu(), 2)
            return (y * y).sum()

    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = Pool(), torch.randn(4, 8, 64, 64)
    compiled = torch.compile(model, backend="memopt")
    with memopt.record() as explanation:
        compiled(x).backward()
    model.zero_grad(set_to_none=True)
    measured = measure_peak(lambda: compiled(x).backward()).peak_growth_bytes
    estimated = explanation.timeline().peak_growth_bytes
    assert abs(estimated - measured) <= 0.02 * measured, (estimated, measured)
