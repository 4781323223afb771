"""measure_peak sees allocations of known size; estimates match measured peaks on
the zoo (within 10%: the issue's bar) and equal on fake and real inputs."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import memopt
from memopt.analysis.compose import compose_timelines
from memopt.analysis.memory import build_timeline
from memopt.testing.measure import measure_peak, settled_estimate_and_measure
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


def _settled_estimate_and_measure(model, inputs, options) -> tuple[int, int]:
    """The estimated step growth a loop settles on and the growth measured on a third step."""
    explanation, measured = settled_estimate_and_measure(model, lambda compiled: compiled(*inputs), options)
    return explanation.timeline().peak_growth_bytes, measured


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
@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX512"), reason="calibrated on oneDNN with AVX-512")
@pytest.mark.parametrize("budget", [None, 0.9])
def test_strided_convnet_estimate_matches_inductor(budget):
    """zoo.ConvNet(8) under Inductor peaks in its strided convolution's backward, where
    oneDNN's strided input-gradient kernel holds a padded copy of the gradient per thread
    (workspace._channels_last_strided_data_scratch). The flat rule (twice the weight +
    20 KiB) read 11% low: 294,668 against 331,040 B unbudgeted, 240,780 against 265,472
    at 0.9 (2 threads)."""
    from memopt.testing.zoo import ConvNet

    torch._dynamo.reset()
    torch.manual_seed(0)
    model, inputs = ConvNet(8).train(), (torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)))
    options = {"codegen": "inductor"} | ({"memory_budget": budget} if budget is not None else {})
    estimated, measured = _settled_estimate_and_measure(model, inputs, options)
    assert abs(estimated - measured) <= 0.01 * measured, (estimated, measured)


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


class _UNet(torch.nn.Module):
    """A small UNet: 3 -> 8 -> 16 channels down, a transposed convolution up, a skip
    concatenation and a 1x1 head (8 channels and fewer: oneDNN pads them to 16)."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.d1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.d2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.u1 = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        a = self.d1(x)
        b = self.d2(torch.nn.functional.max_pool2d(a, 2))
        u = self.u1(torch.cat([self.up(b), a], 1))
        return torch.nn.functional.mse_loss(self.out(u), target)


class _ResidualNet(torch.nn.Module):
    """A stem and one ResNet basic block of ``channels``, a linear head."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        nn = torch.nn
        self.stem, self.bn0 = nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.c1, self.b1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.c2, self.b2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        relu = torch.nn.functional.relu
        x = relu(self.bn0(self.stem(x)))
        x = relu(x + self.b2(self.c2(relu(self.b1(self.c1(x))))))
        return torch.nn.functional.cross_entropy(self.fc(x.mean((2, 3))), y)


@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX512"), reason="calibrated on oneDNN with AVX-512")
@pytest.mark.parametrize(
    "name, budget",
    [("unet", None), ("unet", "2MiB"), ("resnet_block8", None), ("resnet_block8", 0.7)],
)
def test_small_channel_convnets_estimate_within_2_percent(name, budget):
    """Convolutions of fewer than 16 channels: oneDNN computes in blocks of 16 channels,
    so its copies are padded (8 channels: twice the tensor). Estimated 15% (UNet) and
    10% (8-channel ResNet block) low when the workspace rule ignored the padding; the
    UNet under "2MiB" measured 2.43 MiB of growth and raised no warning."""
    from memopt.errors import MemoptBudgetWarning

    torch._dynamo.reset()
    torch.manual_seed(0)
    if name == "unet":
        model, inputs = _UNet(), (torch.randn(7, 3, 32, 32), torch.randn(7, 1, 32, 32))
    else:
        model, inputs = _ResidualNet(8), (torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    options = {"codegen": "eager"} | ({"memory_budget": budget} if budget is not None else {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        estimated, measured = _settled_estimate_and_measure(model, inputs, options)
    assert abs(estimated - measured) <= 0.02 * measured, (estimated, measured)
    if budget == "2MiB":  # 2.43 MiB of growth is the least memopt reaches: infeasible, and said
        assert any(isinstance(w.message, MemoptBudgetWarning) for w in caught)


class _BrokenMLP(torch.nn.Module):
    """Six Linear + ReLU layers with a graph break after each but the last: six regions,
    each saving the input it reads (for its weight's gradient), which is the ReLU output
    the region before it returned and saves too (for the ReLU's backward)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        relu, (l0, l1, l2, l3, l4, _) = torch.relu, self.layers  # unrolled: a break in a loop skips the frame
        x = relu(l0(x))
        torch._dynamo.graph_break()
        x = relu(l1(x))
        torch._dynamo.graph_break()
        x = relu(l2(x))
        torch._dynamo.graph_break()
        x = relu(l3(x))
        torch._dynamo.graph_break()
        x = relu(l4(x))
        torch._dynamo.graph_break()
        return self.layers[-1](x).square().mean()


@pytest.mark.parametrize("budget", [None, 0.8])
def test_output_saved_by_its_region_and_the_next_counts_once(budget):
    """A value one region hands on and saves, and the next region saves too, is one
    storage: composed as two (the producer's output, live until its backward, and the
    reader's saved input), the step of six regions read 65% above the measured peak
    (786,440 against 475,400 B of growth)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    options = {"codegen": "eager"} | ({"memory_budget": budget} if budget is not None else {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimated, measured = _settled_estimate_and_measure(_BrokenMLP(), (torch.randn(256, 64),), options)
    assert abs(estimated - measured) <= 0.02 * measured, (estimated, measured)
