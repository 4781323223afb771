"""A compiled training region called again before its previous call's backward
(memopt/backends/repeats.py, `CompiledRegion._plan_repeated_calls`): a DPO or
contrastive loss over two forwards of one model holds both calls' saved activations.
memopt plans the region again for that many calls; where it cannot, it says so, once
per region, with the figures and the fix; steps that call the region once per
backward say nothing."""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import memopt
from memopt.errors import MemoptOptimizerError
from memopt.testing.measure import measure_peak, settled_estimate_and_measure

EAGER = {"codegen": "eager"}


def _model() -> nn.Module:
    width = 256  # activations (batch 1024), not weights, dominate: a budget can be met
    return nn.Sequential(
        nn.Linear(32, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
        nn.Linear(width, 1),
    )  # fmt: skip


def _pair_loss(model: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(model(a).mean() - model(b).mean())  # DPO's shape: two forwards, one backward


def _run(compiled: nn.Module, model: nn.Module, a: torch.Tensor, b: torch.Tensor, steps: int = 3) -> list[int]:
    """Measured peak of each step ``pair_loss(...).backward()``, with the parameters
    and the batches counted."""
    start = sum(p.nbytes for p in model.parameters()) + a.nbytes + b.nbytes
    peaks = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        gc.collect()
        peaks.append(start + measure_peak(lambda: _pair_loss(compiled, a, b).backward()).peak_growth_bytes)
    return peaks


def test_two_forwards_before_one_backward_are_planned_within_the_budget() -> None:
    """Two forwards then one backward: at the second call the region is compiled again,
    planned for both calls' saved activations (`StepContext.repeats`); from the next
    step on the measured peak is within the budget (a plan for one call was 50% over
    it), the plan's estimate is the measured peak, the gradients are bitwise the
    unbudgeted run's, and nothing warns."""
    a, b = torch.randn(1024, 32), torch.randn(1024, 32)
    torch.manual_seed(0)
    reference = _model()
    free = _run(torch.compile(reference, backend="memopt", options=EAGER), reference, a, b, steps=1)[0]
    budget = int(0.6 * free)
    torch.manual_seed(0)
    model = _model()
    compiled = torch.compile(model, backend="memopt", options={**EAGER, "memory_budget": budget})
    with warnings.catch_warnings(), memopt.record() as explanation:
        warnings.simplefilter("error", memopt.MemoptBudgetWarning)
        peaks = _run(compiled, model, a, b)
    assert max(peaks[1:]) <= budget * 1.05, (peaks, budget)  # the first step's first call ran the one-call plan
    [plan] = [r.plan for r in explanation.regions]
    assert plan is not None and plan.feasible and plan.budget_bytes == budget
    assert any("planned for 2 calls before one backward" in note for note in plan.notes), plan.notes
    assert abs(plan.estimated_peak_after - peaks[-1]) <= 0.05 * peaks[-1], (plan.estimated_peak_after, peaks)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None and torch.equal(p.grad, q.grad)


def test_three_forwards_before_one_backward_are_planned_again() -> None:
    """A step of three calls after steps of two: planned again for three, within the
    budget from the step after."""
    a, b = torch.randn(1024, 32), torch.randn(1024, 32)
    model = _model()
    compiled = torch.compile(model, backend="memopt", options={**EAGER, "memory_budget": "9MB"})

    def three() -> None:
        loss = -F.logsigmoid(compiled(a).mean() - compiled(b).mean() + compiled(a).mean())
        loss.backward()

    with warnings.catch_warnings(), memopt.record() as explanation:
        warnings.simplefilter("error", memopt.MemoptBudgetWarning)
        _run(compiled, model, a, b, steps=2)
        start = sum(p.nbytes for p in model.parameters()) + a.nbytes + b.nbytes
        peaks = []
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            gc.collect()
            peaks.append(start + measure_peak(three).peak_growth_bytes)
    assert peaks[1] <= 9e6 * 1.05, peaks
    [plan] = [r.plan for r in explanation.regions]
    assert plan is not None and any("planned for 3 calls" in note for note in plan.notes), plan.notes


def test_a_region_that_cannot_be_planned_again_warns_that_the_budget_does_not_hold() -> None:
    """Dynamic shapes: the region cannot be traced again, so it keeps its plan for one
    call. The step peaks above the budget (measured), and the warning says so once,
    naming the region, the pending call, the saved bytes, why it is not planned again
    and the fix."""
    model, a, b = _model(), torch.randn(1024, 32), torch.randn(1024, 32)
    compiled = torch.compile(model, backend="memopt", dynamic=True, options={**EAGER, "memory_budget": 0.7})
    with pytest.warns(memopt.MemoptBudgetWarning) as caught, memopt.record() as explanation:
        peaks = _run(compiled, model, a, b)
    [plan] = [r.plan for r in explanation.regions]
    assert plan is not None and plan.feasible and plan.budget_bytes is not None
    budget = plan.budget_bytes
    repeated = [w for w in caught if "ran again before the backward" in str(w.message)]
    assert len(repeated) == 1, [str(w.message) for w in caught]
    text = str(repeated[0].message)
    assert "(1 call(s) pending)" in text and "memory_budget" in text and "torch.cat" in text, text
    assert "cannot be traced again" in text, text
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


@pytest.mark.parametrize("budget", [None, 0.7])
def test_optimizer_in_backward_refuses_a_second_call_before_backward(budget: float | None) -> None:
    """With the update in backward, the first of two pending calls' backwards would change
    the weights the other needs (torch then failed inside backward with 'modified by an
    inplace operation'): the second call raises `MemoptOptimizerError`, naming the cause and
    the fixes, before anything runs; the parameters are untouched."""
    model, a, b = _model(), torch.randn(1024, 32), torch.randn(1024, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    options = {**EAGER, "optimizer_in_backward": opt} | ({} if budget is None else {"memory_budget": budget})
    compiled = torch.compile(model, backend="memopt", options=options)
    before = [p.detach().clone() for p in model.parameters()]
    first = compiled(a)
    with pytest.raises(MemoptOptimizerError, match=r"ran again before the backward.*torch\.cat"):
        compiled(b)
    del first
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    compiled(b).mean().backward()  # one call per backward still trains
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_the_step_estimate_counts_every_pending_call_without_a_budget() -> None:
    """No budget: nothing is planned again, but `memopt.record` sees the second call and
    its step estimate holds both calls' saved activations (it counted one call: the
    measured peak was 1.5 times the estimate)."""
    model, a, b = _model(), torch.randn(1024, 32), torch.randn(1024, 32)
    compiled = torch.compile(model, backend="memopt", options=EAGER)
    with memopt.record() as explanation:
        peaks = _run(compiled, model, a, b, steps=2)
    [record] = explanation.regions
    assert record.repeats == 1
    estimate = explanation.estimated_peak_bytes
    assert abs(estimate - peaks[-1]) <= 0.05 * peaks[-1], (estimate, peaks)


class _Split(nn.Module):
    """`_model`'s layers with a graph break in the middle: two regions a step."""

    def __init__(self) -> None:
        super().__init__()
        layers = list(_model())
        self.first, self.second = nn.Sequential(*layers[:4]), nn.Sequential(*layers[4:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        torch._dynamo.graph_break()
        return self.second(h)


def test_a_step_of_several_regions_called_twice_is_planned_for_both_calls() -> None:
    """A graph break splits the model into two regions, and the step calls it twice
    before one backward. When the second step completes, both regions are planned for
    the step's two calls (`Observed.repeats`): from the third step on the measured peak
    is within the budget (each region kept its plan for one call, and warned that the
    budget did not hold), the plans say so, and the gradients are bitwise the
    unbudgeted run's."""
    a, b = torch.randn(1024, 32), torch.randn(1024, 32)
    torch.manual_seed(0)
    reference = _Split()
    torch._dynamo.reset()
    free = _run(torch.compile(reference, backend="memopt", options=EAGER), reference, a, b, steps=1)[0]
    budget = int(0.7 * free)
    torch.manual_seed(0)
    model = _Split()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="memopt", options={**EAGER, "memory_budget": budget})
    with warnings.catch_warnings(), memopt.record() as explanation:
        warnings.simplefilter("error", memopt.MemoptBudgetWarning)
        peaks = _run(compiled, model, a, b, steps=4)
    assert max(peaks[2:]) <= budget * 1.05, (peaks, budget)
    plans = [r.plan for r in explanation.step_regions()]
    assert len(plans) == 2 and all(p is not None and p.feasible for p in plans)
    assert all("2 calls before one backward" in " ".join(p.notes) for p in plans), [p.notes for p in plans]
    assert abs(explanation.estimated_peak_bytes - peaks[-1]) <= 0.05 * peaks[-1], (explanation.estimated_peak_bytes, peaks)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None and torch.equal(p.grad, q.grad)
    torch._dynamo.reset()


def test_a_discriminator_called_twice_while_a_generator_waits_names_the_generator_not_a_graph_break() -> None:
    """GAN: the discriminator scores the real and the (detached) fake batch while the
    generator's forward waits for its backward (the generator step backpropagates
    through the fake batch later). Its warning blamed "a graph break", which this step
    has none of; it now names the waiting region. Gradients stay equal to eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(8, 32), nn.LeakyReLU(0.2), nn.Linear(32, 16))
    disc = nn.Sequential(nn.Linear(16, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
    ref_gen, ref_disc = copy.deepcopy(gen), copy.deepcopy(disc)
    g = torch.compile(gen, backend="memopt", options={**EAGER, "memory_budget": 0.5})
    d = torch.compile(disc, backend="memopt", options={**EAGER, "memory_budget": 0.5})

    def step(g: nn.Module, d: nn.Module, gen: nn.Module, disc: nn.Module, z: torch.Tensor, real: torch.Tensor) -> None:
        fake = g(z)
        disc.zero_grad()
        (F.softplus(-d(real)).mean() + F.softplus(d(fake.detach())).mean()).backward()
        gen.zero_grad()
        F.softplus(-d(fake)).mean().backward()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", memopt.MemoptBudgetWarning)
        for _ in range(3):
            z, real = torch.randn(16, 8), torch.randn(16, 16)
            step(g, d, gen, disc, z, real)
            step(ref_gen, ref_disc, ref_gen, ref_disc, z, real)
            for p, q in zip([*gen.parameters(), *disc.parameters()], [*ref_gen.parameters(), *ref_disc.parameters()]):
                assert p.grad is not None and q.grad is not None and torch.equal(p.grad, q.grad)
    repeated = [str(w.message) for w in caught if "ran again before the backward" in str(w.message)]
    assert repeated, [str(w.message) for w in caught]
    for text in repeated:
        assert "(a graph break)" not in text, text
        assert "region(s) 0/0 ran their forward before it and wait for their backward" in text, text


class _Layer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


class _Stem(_Layer):
    pass


class _Head(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).square().mean()


class _LayerLoop(nn.Module):
    """A graph break in the layer loop (as Hugging Face Hubert's LayerDrop branch on a
    random tensor makes): Dynamo runs ``forward`` eagerly and compiles each module's
    frame, so the layers' one region runs six times, on six layers' parameters, before
    the step's backward, between the stem's region and the head's."""

    def __init__(self, width: int = 64, layers: int = 6) -> None:
        super().__init__()
        self.stem, self.head = _Stem(width), _Head(width)
        self.layers = nn.ModuleList(_Layer(width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for layer in self.layers:
            torch._dynamo.graph_break()
            h = layer(h)
        return self.head(h)


def _settled(model: nn.Module, x: torch.Tensor, call: object) -> tuple[memopt.Explanation, int]:
    """The estimate recorded over two steps of ``call(compiled, x).backward()`` and the
    growth measured on a third."""
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return settled_estimate_and_measure(model, lambda compiled: call(compiled, x), EAGER)  # type: ignore[operator]


def test_a_layer_region_called_once_per_layer_counts_its_calls_alone() -> None:
    """Without a budget the step estimate took the layer region's five pending calls as
    five earlier calls of the whole step, stem and head included: +173% (1,655,064
    against 606,472 B of growth). Each call is placed where it ran, on its own
    parameters, its gradients kept."""
    torch.manual_seed(0)
    explanation, measured = _settled(_LayerLoop(), torch.randn(256, 64), lambda m, x: m(x))
    estimated = explanation.estimated_peak_bytes - explanation.baseline_bytes
    assert abs(estimated - measured) <= 0.02 * measured, (estimated, measured)
    regions = explanation.step_regions()
    layer = [r for r in regions if r.repeats]
    assert len(regions) == 3 and len(layer) == 1 and layer[0].repeats == 5, [(r.region, r.repeats) for r in regions]
    assert [c.same_parameters for c in layer[0].earlier_calls] == [False] * 5


def test_a_step_of_several_regions_called_twice_is_estimated_as_both_calls() -> None:
    """The same parameters called twice through two regions (A, B, A, B): each call's
    place observed, the estimate is that of every region called twice
    (`compose_repeated_calls`) and the measured peak."""
    from memopt.analysis.compose import compose_repeated_calls
    from memopt.step_regions import input_sources

    torch.manual_seed(0)
    explanation, measured = _settled(_Split(), torch.randn(1024, 32), lambda m, x: m(x).mean() - m(x * 2).mean())
    regions = explanation.step_regions()
    assert [len(r.earlier_calls) for r in regions] == [1, 1]
    assert all(c.same_parameters for r in regions for c in r.earlier_calls)
    parts = [(r.step, r.timeline_after) for r in regions]
    whole = compose_repeated_calls(parts, 1, [r.kept_outputs for r in regions], input_sources(regions))  # type: ignore[arg-type]
    assert explanation.estimated_peak_bytes == whole.peak_bytes
    estimated = explanation.estimated_peak_bytes - explanation.baseline_bytes
    assert abs(estimated - measured) <= 0.05 * measured, (estimated, measured)
