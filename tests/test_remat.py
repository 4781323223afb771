"""Budget-driven rematerialization: plans meet the budget on the measured peak, are
monotone, change no numbers, and infeasible budgets say what the floor is."""

from __future__ import annotations

import gc
import logging
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch._functorch.partitioners import min_cut_rematerialization_partition

import memopt
from memopt.errors import MemoptBudgetError
from memopt.graph import meta
from memopt.graph.partition import saved_names, split_joint
from memopt.plan.milp import modelled_peak, solve_greedy, solve_milp, solve_min_peak
from memopt.testing.capture import capture_step
from memopt.testing.measure import measure_peak, settled_estimate_and_measure
from memopt.testing.numerics import run_training_step
from memopt.testing.zoo import zoo_case


def _compile(case, budget, **extra):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = case.build()
    options = {"codegen": "eager", "verify": True, "strict": True, **extra}
    if budget is not None:
        options["memory_budget"] = budget
    return model, torch.compile(model, backend="memopt", options=options)


def test_split_with_partitioner_saved_set_reproduces_it():
    """Pins torch's private extraction helper: re-splitting the joint graph with
    min-cut's own saved set gives graphs that save the same values."""
    case = zoo_case("gpt")
    model = case.build()
    step = capture_step(model, *case.inputs(2))
    forward, backward = split_joint(step.joint, saved_names(step))
    got = [n.name for n in forward.graph.find_nodes(op="output")[0].args[0][step.num_fwd_outputs :]]
    assert sorted(got) == sorted(saved_names(step))
    assert min_cut_rematerialization_partition is not None


def _steady_peak_growth(model: torch.nn.Module, step: Any) -> int:
    """The larger of two measured peak growths of ``step`` (gradients dropped and the
    garbage collected first). The profiler's view can only miss allocations, never
    invent them: once in the suite (2026-12-06) the unbudgeted cnn_bn step read 1 MB
    under its estimate and under the budgeted steps (it read its estimate in 80 runs
    alone), which failed the monotone check for a measurement, not a plan."""
    peaks = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        gc.collect()
        peaks.append(measure_peak(step).peak_growth_bytes)
    return max(peaks)


@pytest.mark.parametrize(
    "name, batch, high, low",
    [("gpt", 16, 0.75, 0.5), ("mlp", 1024, 0.9, 0.8), ("cnn_bn", 32, 0.95, 0.85), ("transformer_block", 64, 0.95, 0.88)],
)
def test_budgets_met_on_measured_peak_monotone_and_bitwise_equal(name, batch, high, low):
    case = zoo_case(name)
    inputs = case.inputs(batch)
    results, plans = {}, {}
    for budget in (None, high, low):
        model, compiled = _compile(case, budget)
        with memopt.record() as explanation:
            results[budget] = run_training_step(model, inputs, runner=compiled)
        plan = explanation.regions[0].plan
        measured = _steady_peak_growth(model, lambda: compiled(*inputs).backward()) + plan.baseline_bytes
        results[budget].peak = measured
        # what a failure needs to say: each budget's measured and estimated peak, and its plan
        recomputed = sorted(d.node_name for d in plan.decisions if d.policy == "recompute")
        plans[budget] = (measured, plan.estimated_peak_after, recomputed)
        if budget is not None and plan.feasible:
            assert measured <= 1.05 * plan.budget_bytes, (budget, measured, plan.budget_bytes)
    assert results[low].peak <= results[high].peak <= results[None].peak, plans
    for budget in (high, low):
        assert torch.equal(results[budget].loss, results[None].loss)
        for n, g in results[None].grads.items():
            assert torch.equal(g, results[budget].grads[n]), (budget, n)


def test_budget_the_passes_alone_meet_recomputes_nothing_and_budgets_are_monotone():
    """transformer_block's schedule pass alone takes its peak 11% below the partitioned
    graphs' estimate, which the planner judges: a budget between the two is met by the
    passes with every saved value kept (the planner used to recompute for it and land
    above the unbudgeted peak), and a tighter budget never gives a higher peak."""
    case = zoo_case("transformer_block")
    peaks, recomputed = {}, {}
    for budget in (None, 0.95, 0.9, 0.88, 0.8):
        options = {"codegen": "eager"} | ({} if budget is None else {"memory_budget": budget})
        plan = memopt.explain(case.build(), *case.inputs(64), options=options).regions[0].plan
        peaks[budget] = plan.estimated_peak_after
        recomputed[budget] = sum(d.policy == "recompute" for d in plan.decisions)
        if budget is not None and plan.feasible:
            assert plan.estimated_peak_after <= plan.budget_bytes
    unbudgeted_alone = memopt.explain(case.build(), *case.inputs(64), options={"codegen": "eager", "memory_budget": 0.95})
    plan = unbudgeted_alone.regions[0].plan
    assert plan.budget_bytes < plan.estimated_peak_before  # the planner's view: over the budget
    assert recomputed[0.95] == 0 and peaks[0.95] == peaks[None]
    assert any("the passes alone reach" in n for n in plan.notes)
    assert recomputed[0.8] > 0
    budgets = [None, 0.95, 0.9, 0.88, 0.8]
    assert all(peaks[a] >= peaks[b] for a, b in zip(budgets, budgets[1:])), peaks


def test_plan_decisions_and_report():
    case = zoo_case("gpt")
    model = case.build()
    explanation = memopt.explain(model, *case.inputs(8), options={"codegen": "eager", "memory_budget": 0.5})
    plan = explanation.regions[0].plan
    assert plan.feasible and plan.estimated_peak_after <= plan.budget_bytes
    policies = {d.policy for d in plan.decisions}
    assert policies == {"save", "recompute"}
    recomputed = [d for d in plan.decisions if d.policy == "recompute"]
    assert all("to meet the budget" in d.reason for d in recomputed)
    assert all(d.source and "zoo.py" in d.source for d in recomputed)
    assert plan.solver["method"] in ("milp", "greedy") and plan.solver["recompute_flops"] > 0
    assert len(plan.tradeoff) >= 2
    peaks = [t["predicted_peak_bytes"] for t in plan.tradeoff]
    costs = [t["recompute_seconds"] for t in plan.tradeoff]
    assert peaks == sorted(peaks, reverse=True) and costs == sorted(costs)
    text = explanation.report()
    assert "memory budget" in text and "(within)" in text
    assert "peak/recompute trade-off" in text
    import tempfile, os
    with tempfile.TemporaryDirectory() as d:
        assert os.path.getsize(explanation.plot_tradeoff(os.path.join(d, "t.png"))) > 0


def test_infeasible_budget_warns_with_floor_and_strict_raises():
    case = zoo_case("gpt")
    with pytest.warns(memopt.MemoptWarning, match=r"infeasible.*smallest peak memopt can reach is .*parameters"):
        explanation = memopt.explain(case.build(), *case.inputs(4), options={"codegen": "eager", "memory_budget": "100KiB"})
    plan = explanation.regions[0].plan
    assert not plan.feasible and plan.min_feasible_peak < plan.estimated_peak_before
    assert plan.estimated_peak_after == plan.min_feasible_peak
    with pytest.raises(Exception, match="MemoptBudgetError|infeasible"):
        memopt.explain(case.build(), *case.inputs(4), options={"codegen": "eager", "memory_budget": "100KiB", "strict": True})
    assert issubclass(MemoptBudgetError, ValueError)


def test_infeasible_budget_advice_fits_the_options_and_the_region():
    """The warning names only ways to shrink the peak that the options do not use yet
    (precision never shrinks parameters: they stay fp32), and says why an inference
    region cannot go lower."""
    case = zoo_case("gpt")
    budget = {"codegen": "eager", "memory_budget": "100KiB"}

    def message(options, no_grad=False):
        torch._dynamo.reset()
        with warnings.catch_warnings(record=True) as caught, torch.set_grad_enabled(not no_grad):
            warnings.simplefilter("always", memopt.MemoptBudgetWarning)
            memopt.explain(case.build(), *case.inputs(4), options=options)
        (found,) = {str(w.message) for w in caught if issubclass(w.category, memopt.MemoptBudgetWarning)}
        return found

    plain = message(budget)
    assert "precision='bf16'" in plain and "memopt.distributed.shard" in plain and "inference" not in plain
    assert "precision/sharding" not in plain
    lowered = message({**budget, "precision": "bf16", "compress_activations": "fp8"})
    assert "precision='bf16'" not in lowered and "compress_activations='fp8'" not in lowered
    assert "a smaller batch or sequence" in lowered
    inference = message(budget, no_grad=True)
    assert "(inference regions keep nothing for backward: rematerialization cannot lower their peak)" in inference
    assert "sharding the parameters over devices" in inference  # no gradients in an inference step


def test_a_fractional_budget_does_not_warn_for_an_inference_region():
    """A fraction is of the inference region's own peak, which nothing can lower: it
    warned at every evaluation compile of a training loop (train under 0.5, then eval
    under no_grad). The training region still warns when infeasible; the inference
    region's plan notes why its fraction is not applied; a budget in bytes still warns
    for an inference region (the previous test)."""
    case = zoo_case("gpt")
    torch._dynamo.reset()
    model = case.build()
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "memory_budget": 0.5})
    with warnings.catch_warnings(record=True) as caught, memopt.record() as ex:
        warnings.simplefilter("always")
        compiled(*case.inputs(4)).backward()
        model.eval()
        with torch.no_grad():
            compiled(*case.inputs(4))
    kinds = [r.kind for r in ex.regions]
    assert kinds == ["training", "inference"], kinds
    assert [str(w.message) for w in caught if "inference" in str(w.message)] == []
    inference = ex.regions[1].plan
    assert "a fractional memory_budget is not applied" in " ".join(inference.notes)
    assert inference.budget_bytes is None and inference.feasible


class _SetsItsModeOnFirstCall(torch.nn.Module):
    """Like a Hugging Face classification model, which sets ``config.problem_type`` on
    its first call: Dynamo's guard on the attribute fails at the second call, and the
    same graph compiles again as region ``0/1``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(4)))
        self.mode: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is None:
            self.mode = "regression"
        return self.layers(x).tanh().sum()


def test_an_infeasible_budget_warns_once_for_a_frame_compiled_again_with_the_same_figures():
    """ViT for image classification warned the same infeasible budget twice, for
    regions 0/0 and 0/1. The recompile is still planned (and logged); after
    ``torch._dynamo.reset()`` compile ids restart and the first compile warns again."""

    def run() -> tuple[list[str], list[str]]:
        torch._dynamo.reset()
        compiled = torch.compile(
            _SetsItsModeOnFirstCall(), backend="memopt", options={"codegen": "eager", "memory_budget": "1KiB"}
        )
        with warnings.catch_warnings(record=True) as caught, memopt.record() as ex:
            warnings.simplefilter("always")
            for _ in range(3):
                compiled(torch.randn(8, 64)).backward()
        budget = [str(w.message) for w in caught if issubclass(w.category, memopt.MemoptBudgetWarning)]
        return budget, [r.region for r in ex.regions]

    budget, regions = run()
    assert regions == ["0/0", "0/1"], regions
    assert len(budget) == 1 and "region 0/0" in budget[0], budget
    again, _ = run()
    assert again == budget


def test_budget_above_unoptimized_peak_changes_nothing():
    case = zoo_case("mlp")
    explanation = memopt.explain(case.build(), *case.inputs(8), options={"codegen": "eager", "memory_budget": "1GiB"})
    plan = explanation.regions[0].plan
    assert plan.saved_values is None
    assert not [p for p in explanation.regions[0].passes if p.name == "remat" and p.modified]
    assert "fits the budget" in plan.notes[0]


def test_milp_matches_brute_force_on_small_instances():
    """Rule: the MILP's choice is the cheapest among all choices whose modelled peak
    fits, found here by enumerating every choice."""
    import itertools

    rng = np.random.default_rng(0)
    for _ in range(20):
        K, O = 4, 3
        S = rng.integers(1, 10, (K, O)).astype(float)
        S[:, 0] += 10  # option 0 keeps the most, costs nothing
        F = rng.integers(1, 20, (K, O)).astype(float)
        P = rng.integers(1, 20, (K, O)).astype(float)
        C = rng.random((K, O))
        C[:, 0] = 0
        budget = float(rng.integers(20, 60))
        best = None
        for choice in itertools.product(range(O), repeat=K):
            if modelled_peak(S, F, P, list(choice)) <= budget:
                cost = sum(C[k, o] for k, o in enumerate(choice))
                best = cost if best is None else min(best, cost)
        got, _ = solve_milp(S, F, P, C, budget)
        if best is None:
            assert got is None
        else:
            assert got is not None and modelled_peak(S, F, P, got) <= budget
            assert sum(C[k, o] for k, o in enumerate(got)) == pytest.approx(best, abs=1e-6)
        lowest = min(modelled_peak(S, F, P, list(c)) for c in itertools.product(range(O), repeat=K))
        assert modelled_peak(S, F, P, solve_min_peak(S, F, P, C)) == pytest.approx(lowest)
        greedy = solve_greedy(S, F, P, C, budget)
        if best is not None and modelled_peak(S, F, P, greedy) <= budget:
            assert sum(C[k, o] for k, o in enumerate(greedy)) >= best - 1e-9


def test_memory_budget_bytes_string():
    case = zoo_case("gpt")
    unopt = memopt.explain(case.build(), *case.inputs(8), options={"codegen": "eager"}).estimated_peak_bytes
    torch._dynamo.reset()
    budget = int(unopt * 0.6)
    explanation = memopt.explain(case.build(), *case.inputs(8), options={"codegen": "eager", "memory_budget": f"{budget}B"})
    assert explanation.regions[0].plan.budget_bytes == budget
    assert explanation.estimated_peak_bytes <= budget


@pytest.mark.parametrize("p", [0.0, 0.1, 0.3, 0.5])
def test_dropout_output_rewrite_is_bit_identical_on_cpu_fp32(p):
    """memopt.graph.dropout relies on native_dropout(x)[0] == (x * mask) * (1/(1-p))
    bit for bit on CPU float32; if torch changes its kernel this fails."""
    x = torch.randn(257, 129)
    torch.manual_seed(3)
    out, mask = torch.ops.aten.native_dropout(x, p, True)
    again = torch.ops.aten.mul.Tensor(torch.ops.aten.mul.Tensor(x, mask), 1.0 / (1.0 - p))
    assert torch.equal(out, again)


@pytest.mark.parametrize("shape, transpose", [((257, 129), False), ((64, 16, 64), True), ((3, 1000, 1000), False)])
def test_dropout_mask_replays_from_the_saved_generator_state(shape, transpose):
    """memopt.graph.rng relies on native_dropout drawing its mask from the default
    CPU generator the same way for any input of one size and layout (large inputs
    draw on several threads); the draw must advance the generator exactly as
    native_dropout does, and the replay must leave it where it was."""
    x = torch.randn(*shape)
    if transpose:
        x = x.transpose(0, 1)
    torch.manual_seed(5)
    ref_out, ref_mask = torch.ops.aten.native_dropout(x, 0.3, True)
    ref_next = torch.rand(8)
    torch.manual_seed(5)
    out, mask, state = torch.ops.memopt.dropout_with_rng_state(x, 0.3)
    replayed = torch.ops.memopt.dropout_mask_replay(state, list(mask.shape), list(mask.stride()), 0.3)
    assert torch.equal(torch.rand(8), ref_next)
    assert torch.equal(out, ref_out) and torch.equal(mask, ref_mask)
    assert torch.equal(replayed, mask) and replayed.stride() == mask.stride()


def test_dropout_masks_replayed_in_backward_not_saved():
    """At a low budget the transformer block's backward replays its dropout masks
    from the generator state instead of keeping them; the forward draws each once;
    gradients stay bit-identical to the unbudgeted run."""
    case = zoo_case("transformer_block")
    inputs = case.inputs(64)
    grads = {}
    for budget in (None, 0.5):
        model, compiled = _compile(case, budget, strict=False)  # 0.5 is below the floor: warns
        with memopt.record() as explanation, warnings.catch_warnings():
            warnings.simplefilter("ignore", memopt.MemoptWarning)
            grads[budget] = run_training_step(model, inputs, runner=compiled).grads
        region = explanation.regions[0]
    replay = torch.ops.memopt.dropout_mask_replay.default
    assert [n for n in region.step.backward.graph.nodes if n.target is replay]
    assert not [n for n in region.step.forward.graph.nodes if n.target is replay]
    saved_masks = [p for p in region.step.backward.graph.find_nodes(op="placeholder") if meta.tensor_value(p) is not None
                   and meta.tensor_value(p).dtype == torch.bool]
    assert not saved_masks
    for n, g in grads[None].items():
        assert torch.equal(g, grads[0.5][n]), n


def test_dropout_outputs_recomputed_not_redrawn():
    case = zoo_case("transformer_block")
    explanation = memopt.explain(case.build(), *case.inputs(64), options={"codegen": "eager", "memory_budget": 0.8})
    region = explanation.regions[0]
    assert any(d.policy == "recompute" for d in region.plan.decisions)  # 0.9 is met with nothing recomputed
    backward = region.step.backward
    assert not [n for n in backward.graph.nodes if n.target is torch.ops.aten.native_dropout.default]
    saved = {d.name for d in region.plan.decisions if d.policy == "save"}
    assert not any("native_dropout" in n and "getitem" not in n for n in saved)


@pytest.mark.parametrize("name, batch", [("gpt", 8), ("mlp", 256)])
def test_at_torchs_own_peak_memopt_recomputes_no_more_than_torch(name, batch):
    """torch's min-cut partitions at activation_memory_budget 0.75/0.5/0.3 are in
    memopt's search space, so at the peak of any of them memopt's plan costs at most
    its recompute FLOPs (and its peak fits)."""
    from memopt.plan.remat import plan_remat
    from memopt.plan.remat_problem import build_problem, evaluate_torch_partition

    case = zoo_case(name)
    step = capture_step(case.build(), *case.inputs(batch))
    problem = build_problem(step)
    assert set(problem.torch_graphs) == {0.75, 0.5, 0.3}
    for b, graphs in problem.torch_graphs.items():
        torch_ev = evaluate_torch_partition(step, b)
        assert torch_ev is not None
        solution = plan_remat(step, torch_ev.timeline.peak_bytes)
        assert solution.feasible, b
        assert solution.evaluation.timeline.peak_bytes <= torch_ev.timeline.peak_bytes
        assert solution.evaluation.recompute_flops <= torch_ev.recompute_flops, b


def test_torch_partition_that_redraws_dropout_is_not_a_candidate():
    from memopt.plan.remat_problem import build_problem, evaluate_torch_partition

    case = zoo_case("transformer_block")
    step = capture_step(case.build(), *case.inputs(8))
    problem = build_problem(step)
    redraws = [b for b, g in problem.torch_graphs.items() if evaluate_torch_partition(step, b) is None]
    assert redraws, "torch no longer recomputes dropout at low budgets: this test needs another model"
    fw = {n.name for n in step.joint.module.graph.nodes}
    for b in redraws:  # each rejected partition really recomputes a random op in backward
        backward = problem.torch_graphs[b][1]
        assert any(n.name in fw and memopt.graph.meta.is_random(n) for n in backward.graph.nodes)


class _TwoResidualsPerBlock(torch.nn.Module):
    """Llama's shape: each block adds to the residual stream twice, so the planner's
    segments are half-blocks; the LM head's logits set the peak at the start of
    backward, where every saved boundary is live."""

    def __init__(self, dim: int = 64, blocks: int = 4, vocab: int = 1024) -> None:
        super().__init__()
        nn = torch.nn

        def sub_block(activation: type[nn.Module]) -> nn.Module:
            return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), activation(), nn.Linear(2 * dim, dim))

        self.first = nn.ModuleList(sub_block(nn.GELU) for _ in range(blocks))
        self.second = nn.ModuleList(sub_block(nn.Tanh) for _ in range(blocks))
        self.head = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for f, g in zip(self.first, self.second):
            x = x + f(x)
            x = x + g(x)
        return torch.nn.functional.cross_entropy(self.head(x), y)


def test_recomputing_pairs_of_segments_lowers_the_floor(monkeypatch):
    """When no per-segment plan fits, the planner also tries recomputing every other
    segment boundary (a checkpoint per block, not per half-block); judged exactly, it
    lowers the smallest peak here, and gradients stay bit-identical."""
    import memopt.plan.remat as remat

    torch.manual_seed(0)
    model = _TwoResidualsPerBlock()
    inputs = [torch.randn(512, 64), torch.randint(0, 1024, (512,))]
    reference = run_training_step(model, inputs)

    def floor() -> tuple[int, memopt.Explanation]:
        torch._dynamo.reset()
        with pytest.warns(memopt.MemoptWarning, match="infeasible"):
            explanation = memopt.explain(model, *inputs, options={"codegen": "eager", "memory_budget": "1KiB"})
        return explanation.estimated_peak_bytes, explanation

    merged_peak, explanation = floor()
    decisions = explanation.regions[0].plan.decisions
    assert any("recomputed with the segment from its input" in d.reason for d in decisions)
    monkeypatch.setattr(remat, "_merged_segments", lambda *args: [])
    per_segment_peak, _ = floor()
    assert merged_peak < per_segment_peak

    monkeypatch.undo()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "memory_budget": "1KiB"})
    with pytest.warns(memopt.MemoptWarning, match="infeasible"):
        result = run_training_step(model, inputs, runner=compiled)
    assert torch.equal(result.loss, reference.loss)
    for n, g in reference.grads.items():
        assert torch.equal(g, result.grads[n]), n


@pytest.mark.inductor
def test_budget_met_with_inductor_codegen():
    """With Inductor, the budget holds on the measured peak: far-apart horizontal
    fusions, which would run an early block's recomputation long before its backward,
    are refused under a budget (memopt/codegen/inductor.py)."""
    case = zoo_case("gpt")
    inputs = case.inputs(32)
    peaks = {}
    for budget in (None, 0.5):
        model, compiled = _compile(case, budget, codegen="inductor", verify=False)
        with memopt.record() as explanation:
            run_training_step(model, inputs, runner=compiled)
        model.zero_grad(set_to_none=True)
        plan = explanation.regions[0].plan
        peaks[budget] = measure_peak(lambda: compiled(*inputs).backward()).peak_growth_bytes + plan.baseline_bytes
        if budget is not None:
            assert plan.feasible
            assert peaks[budget] <= 1.05 * plan.budget_bytes, (peaks[budget], plan.budget_bytes)
    assert peaks[0.5] < 0.6 * peaks[None]


@pytest.mark.inductor
def test_budget_met_with_inductor_on_bert_with_dropout():
    """Hugging Face BERT at its default config (dropout 0.1, an attention mask every
    block reads), Inductor codegen, budget 0.7: the measured peak stays within the
    budget + 5%, and the loss of the same seeded step equals the unbudgeted one
    (Inductor's own dropout draws from per-op seeds, recomputed in backward from the
    same seeds)."""
    pytest.importorskip("transformers")
    from memopt.testing.hf import build

    results = {}
    for budget in (None, 0.7):
        torch._dynamo.reset()
        model, kwargs = build("bert", batch=4, seq=64)
        options = {"memory_budget": budget} if budget is not None else {}
        compiled = torch.compile(model, backend="memopt", options=options)

        def step():
            torch.manual_seed(0)
            loss = compiled(**kwargs).loss
            loss.backward()
            return loss.detach()

        with memopt.record() as explanation:
            step()
        model.zero_grad(set_to_none=True)
        plan = explanation.regions[0].plan
        losses = []
        peak = measure_peak(lambda: losses.append(step())).peak_growth_bytes + plan.baseline_bytes
        results[budget] = (peak, losses[0], plan)
    peak, loss, plan = results[0.7]
    assert plan.feasible
    assert peak <= 1.05 * plan.budget_bytes, (peak, plan.budget_bytes)
    assert torch.equal(loss, results[None][1])


@pytest.mark.inductor
def test_inductor_estimate_holds_under_a_budget_with_attention_dropout():
    """With Inductor under a budget, the estimated peak is the measured one (within 3%)
    on a GPT whose attention has dropout (the zoo GPT, dropout 0.1, 8 x 128 tokens,
    ``memory_budget=0.7``): the backward recomputes the dropout. Two things make it
    hold. On CPU, the kernels Inductor generates between two library calls are one
    function whose inputs and outputs are live together (modelled:
    `memopt.analysis.fusion.kernel_runs`). And the recomputed dropout and its gradient,
    which read the same random values, are not fused into one kernel behind the
    gradient's matmul (refused under a budget: `memopt.codegen.inductor`). Before
    both, the measured peak was 13% above the estimate and above the budget."""
    from memopt.testing.zoo import GPT, GPTConfig, _gpt_inputs

    config = GPTConfig(dropout=0.1, context=128)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(config)
    inputs = _gpt_inputs(8, config, seq=128)
    explanation, measured = settled_estimate_and_measure(
        model, lambda compiled: compiled(*inputs), {"codegen": "inductor", "memory_budget": 0.7}
    )
    estimated = explanation.timeline().peak_growth_bytes
    assert explanation.regions[0].plan.feasible
    assert abs(estimated - measured) <= 0.03 * measured, (estimated, measured)


def test_solver_diagnostics_from_native_code_leave_stdout(capfd, caplog):
    """HiGHS prints some diagnostics from C++ to stdout; around solves, memopt captures
    descriptor 1 so they cannot corrupt a program's output (--json): HiGHS's own lines
    go to the debug log, any other native line to stderr."""
    import ctypes

    from memopt.plan.milp import solver_stdout

    libc = ctypes.CDLL(None)
    with caplog.at_level(logging.DEBUG, logger="memopt.plan"), solver_stdout():
        libc.printf(b"HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();\n")
        libc.printf(b"native diagnostic\n")
    print("python output")
    out, err = capfd.readouterr()
    assert "native diagnostic" in err and "native diagnostic" not in out
    assert "Highs" not in out and "Highs" not in err
    assert any("transformNewIntegerFeasibleSolution" in r.getMessage() for r in caplog.records)
    assert "python output" in out


def test_solver_output_is_left_alone_without_a_temporary_file(capfd, monkeypatch):
    """No writable temporary directory: the solve runs with descriptor 1 untouched
    (no descriptor leaked, no error), as where stdout cannot be redirected."""
    import ctypes
    import os
    import tempfile

    from memopt.plan.milp import solver_stdout

    def no_file(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_file)
    opened = len(os.listdir("/proc/self/fd"))
    with solver_stdout():
        ctypes.CDLL(None).printf(b"native line\n")
    ctypes.CDLL(None).fflush(None)
    assert "native line" in capfd.readouterr().out
    assert len(os.listdir("/proc/self/fd")) == opened


def test_a_mask_replay_costs_its_random_draws():
    """The roofline alone calls a replay nearly free (5 KB in, a bool mask out); its
    modelled time counts one draw per element at the device's draw rate."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memopt.analysis.cost import device_model, node_cost

    graph = torch.fx.Graph()
    state = graph.placeholder("state")
    replay = graph.call_function(torch.ops.memopt.dropout_mask_replay.default, (state, [1024, 1024], [1024, 1], 0.1))
    with FakeTensorMode():
        state.meta["val"] = torch.empty(5056, dtype=torch.uint8)
        replay.meta["val"] = torch.empty(1024, 1024, dtype=torch.bool)
    cpu = device_model(torch.device("cpu"))
    cost = node_cost(replay, cpu)
    roofline = cost.bytes_moved / cpu.bytes_per_s + cpu.op_overhead_s
    assert cost.seconds >= roofline + 1024 * 1024 / cpu.draws_per_s


def test_the_garbage_collector_is_paused_only_while_planning(monkeypatch):
    import gc

    import memopt.plan.remat as remat

    seen = []
    build = remat.build_problem

    def recording(*args, **kwargs):
        seen.append(gc.isenabled())
        return build(*args, **kwargs)

    monkeypatch.setattr(remat, "build_problem", recording)
    case = zoo_case("mlp")
    step = capture_step(case.build(), *case.inputs(64))
    assert gc.isenabled()
    remat.plan_remat(step, 1)
    assert seen == [False] and gc.isenabled()


@pytest.mark.parametrize("name", ["gpt", "transformer_block"])
def test_one_pass_backward_copy_equals_copy_then_reorder(name):
    """The planner's draft split copies the backward in just-in-time order in one pass;
    node for node it is the subgraph copy followed by the just-in-time reordering (the
    two passes it replaced), for saving what min-cut saves, only the primals, and every
    other saved value."""
    from memopt.graph.partition import _copy_subgraph, _needed, _recompute_just_in_time

    case = zoo_case(name)
    step = capture_step(case.build(), *case.inputs(2))
    joint = step.joint.recomputable()
    graph = joint.module.graph
    outputs = list(graph.find_nodes(op="output")[0].args[0][joint.num_fwd_outputs :])
    tangents = [p for p in graph.find_nodes(op="placeholder") if meta.is_tangent(p)]
    primals = [p for p in graph.find_nodes(op="placeholder") if not meta.is_tangent(p)]
    mincut = [joint.node(n) for n in saved_names(step)]

    def listing(g: torch.fx.Graph) -> list[tuple[str, str, list[str]]]:
        return [(n.name, str(n.target), [a.name for a in n.all_input_nodes]) for n in g.nodes]

    for saved in (mincut, [], mincut[::2]):
        inputs = list(dict.fromkeys([*primals, *saved, *tangents]))
        one_pass = _recompute_just_in_time(graph, inputs, _needed(outputs, set(inputs)), outputs)
        two_pass = _recompute_just_in_time(_copy_subgraph(graph, inputs, outputs))
        assert listing(one_pass) == listing(two_pass)
        assert len(list(one_pass.nodes)) > len(inputs)


class _DropoutResidual(torch.nn.Module):
    """A post-norm residual branch, as BERT-style layers write it:
    ``norm(dropout(linear(x)) + x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.norm, self.dropout = torch.nn.Linear(16, 16), torch.nn.LayerNorm(16), torch.nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.dropout(self.linear(x)) + x).sum()


def test_the_graphs_run_save_what_the_draft_split_saves():
    """A saved value from which only a dropout draw can be computed: torch's
    extraction copies the draw into backward and keeps it (random ops are impure), so
    the value stayed saved; the just-in-time copy then dropped the draw, and backward
    received the value and never read it. The planner's draft split saves only values
    backward needs, so its estimate freed what the graphs run held through backward
    (Hugging Face ELECTRA under a budget measured 7% over its estimate, and above its
    unbudgeted peak). The graphs run now save what the draft saves, and backward reads
    every value it receives."""
    draw_op = torch.ops.memopt.dropout_with_rng_state.default
    torch.manual_seed(0)
    step = capture_step(_DropoutResidual(), torch.randn(4, 16))
    joint = step.joint.recomputable()
    draws = [n for n in joint.module.graph.nodes if n.target is draw_op]
    assert draws
    mincut = saved_names(step)

    def saved_by(forward: torch.fx.GraphModule) -> list[str]:
        outputs = forward.graph.find_nodes(op="output")[0].args[0][joint.num_fwd_outputs :]
        return sorted(o.name for o in outputs if isinstance(o, torch.fx.Node))

    unneeded = 0
    for draw in draws:
        source = draw.args[0].name
        states = [u.name for u in draw.users if u.args[1] == 2]  # what backward replays the mask from
        saved = [*mincut, *states, source]
        draft_forward, _ = split_joint(joint, saved, draft=True)
        forward, backward = split_joint(joint, saved)
        unneeded += source not in saved_by(draft_forward)
        assert saved_by(forward) == saved_by(draft_forward), source
        unread = [p.name for p in backward.graph.find_nodes(op="placeholder") if not p.users and not meta.is_tangent(p)]
        assert unread == [], source
    assert unneeded, "no dropout input is unneeded in backward: this test needs another model"


def test_a_lower_infeasible_budget_never_gives_a_higher_peak():
    """Under a budget below the floor, the plan is the smallest peak memopt finds, and
    that search must not depend on how far below the floor the budget is: on default
    Hugging Face Llama the budget's own MILP solves found 2.92 MiB at 0.6 while 0.3
    (the MILP infeasible at once) stopped at 2.99 MiB."""
    from memopt.testing.hf import build

    peaks = {}
    for budget in (0.6, 0.3):
        torch._dynamo.reset()
        model, inputs = build("llama", batch=4, seq=64)
        with pytest.warns(memopt.MemoptWarning, match="infeasible"):
            explanation = memopt.explain(model, options={"codegen": "eager", "memory_budget": budget}, **inputs)
        (region,) = explanation.step_regions()
        assert not region.plan.feasible
        assert region.plan.min_feasible_peak == explanation.estimated_peak_bytes
        peaks[budget] = explanation.estimated_peak_bytes
    assert peaks[0.3] <= peaks[0.6]


class _ConvGroupNorm(torch.nn.Module):
    """A convolution read first by a multi-output op (``native_group_norm``), which
    the ``selective`` option saves as a matmul/convolution's consumer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.norm1 = torch.nn.InstanceNorm2d(16, affine=True, track_running_stats=True)
        self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.norm2 = torch.nn.GroupNorm(4, 16)
        self.norm3 = torch.nn.BatchNorm1d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.silu(self.norm1(self.conv1(x)))
        x = self.norm2(self.conv2(x))
        return self.norm3(x.mean((2, 3))).square().mean()


def test_option_sets_save_a_multi_output_op_as_its_outputs():
    """The ``selective`` option saved ``native_group_norm`` itself (a tuple) as the
    consumer of a convolution; a plan choosing it handed the tuple to AOTAutograd, and
    the region's first call raised "expected all tensors_saved_with_vc_check to be
    Tensors" (met in the loss region of a CNN whose BatchNorm(momentum=None) breaks
    the graph, under memory_budget=0.7)."""
    from memopt.plan.remat_problem import build_problem, evaluate

    torch.manual_seed(0)
    model = _ConvGroupNorm()
    x = torch.randn(16, 16, 16, 16)
    step = capture_step(model, x)
    problem = build_problem(step)
    selective = problem.saved_for(["selective"] * len(problem.segments))
    forward = evaluate(step, selective).step.forward
    saved = forward.graph.find_nodes(op="output")[0].args[0][step.num_fwd_outputs :]
    assert [n.name for n in saved if not isinstance(meta.fake_value(n), torch.Tensor)] == []


def _keep_addmm(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """A selective checkpointing policy: keep the matmuls, recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.addmm.default else CheckpointPolicy.MUST_RECOMPUTE


class _GeluStack(torch.nn.Module):
    """Six ``Linear(128, 128)`` + gelu layers; layers 2 and 3 each in a non-reentrant
    ``torch.utils.checkpoint`` (``"plain"``, or ``"selective"`` with `_keep_addmm`), or
    none (``None``)."""

    def __init__(self, checkpointing: str | None) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(128, 128) for _ in range(6))
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import functools

        from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

        for i, layer in enumerate(self.layers):
            def block(v: torch.Tensor, layer: torch.nn.Module = layer) -> torch.Tensor:
                return torch.nn.functional.gelu(layer(v))

            if self.checkpointing is None or i not in (2, 3):
                x = block(x)
            elif self.checkpointing == "plain":
                x = checkpoint(block, x, use_reentrant=False)
            else:
                context = functools.partial(create_selective_checkpoint_contexts, _keep_addmm)
                x = checkpoint(block, x, use_reentrant=False, context_fn=context)
        return x.sum()


def _gelu_stack_plan(checkpointing: str | None, budget: float | None) -> Any:
    torch._dynamo.reset()
    torch.manual_seed(0)
    options = {"codegen": "eager"} | ({} if budget is None else {"memory_budget": budget})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptBudgetWarning)
        return memopt.explain(_GeluStack(checkpointing), torch.randn(512, 128), options=options).regions[0].plan


@pytest.mark.parametrize("checkpointing", ["plain", "selective"])
def test_a_users_checkpoint_is_a_hint_under_a_budget(checkpointing):
    """Rule: under a budget a user's ``torch.utils.checkpoint`` tags (the must-save tag
    on the boundary between two checkpointed blocks, a selective policy's MUST_SAVE and
    MUST_RECOMPUTE) are preferences, not constraints, so checkpointing two layers never
    raises the smallest peak the planner reaches above the same model's without
    checkpointing. The planner held them as hard constraints and segmented by the
    checkpointed partition's saved bytes: 2.25 MiB against 2.19 MiB. Gradients stay
    bit-identical to eager, and without a budget torch's partition that honours the
    checkpoint is kept (nothing inside the checkpointed layers saved)."""
    floor = _gelu_stack_plan(None, 0.5).min_feasible_peak
    plan = _gelu_stack_plan(checkpointing, 0.5)
    assert plan.min_feasible_peak <= floor, (plan.min_feasible_peak, floor)
    torch._dynamo.reset()
    from memopt.testing.numerics import assert_step_matches_eager

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptBudgetWarning)
        assert_step_matches_eager(
            _GeluStack(checkpointing), [torch.randn(512, 128)], options={"codegen": "eager", "memory_budget": 0.5},
            steps=1, exact=True,
        )
    if checkpointing == "plain":
        unbudgeted = _gelu_stack_plan(checkpointing, None)
        saved = {d.node_name for d in unbudgeted.decisions if d.policy == "save"}
        assert unbudgeted.saved_values is None and "gelu_2" in saved, saved  # the boundary the checkpoint keeps
        assert not saved & {"addmm_2", "addmm_3", "gelu_3"}, saved


class _CheckpointedBatchNorm(torch.nn.Module):
    """Four conv + BatchNorm + relu blocks, the middle two in non-reentrant
    ``torch.utils.checkpoint``: train-mode BatchNorm writes its running statistics (graph
    inputs) inside the checkpointed blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(8, 8, 3, padding=1) for _ in range(4))
        self.norms = torch.nn.ModuleList(torch.nn.BatchNorm2d(8) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            def block(v: torch.Tensor, conv: torch.nn.Module = conv, norm: torch.nn.Module = norm) -> torch.Tensor:
                return torch.relu(norm(conv(v)))

            x = checkpoint(block, x, use_reentrant=False) if i in (1, 2) else block(x)
        return x.square().mean()


@pytest.mark.parametrize("budget", [None, 0.2])
def test_batch_norm_inside_a_users_checkpoint_updates_its_statistics_once(budget):
    """A checkpointed block's BatchNorm writes its running statistics once per step under
    memopt, with or without a budget whose plan recomputes inside the block (the write is
    never part of a recomputation): loss, gradients and buffers bit-identical to torch's
    own compiled step (``aot_eager``). Eager PyTorch differs on the buffers only: its
    checkpoint runs the block again in backward and writes the statistics a second time
    (docs/remat.md, "Activation checkpointing in the model")."""
    import copy

    from memopt.testing.numerics import assert_same_step, run_training_step

    torch.manual_seed(0)
    model, x = _CheckpointedBatchNorm(), torch.randn(8, 8, 16, 16)
    runs = {}
    for backend in ("aot_eager", "memopt", None):
        torch._dynamo.reset()
        copied = copy.deepcopy(model)
        options = {"options": {"codegen": "eager"} | ({} if budget is None else {"memory_budget": budget})}
        runner = None if backend is None else torch.compile(copied, backend=backend, **(options if backend == "memopt" else {}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", memopt.MemoptBudgetWarning)
            runs[backend] = [run_training_step(copied, [x], runner=runner, seed=s) for s in range(2)]
    for step in range(2):
        assert_same_step(f"step {step}", runs["aot_eager"][step], runs["memopt"][step], exact=True)
    assert not torch.equal(runs[None][0].buffers["norms.1.running_mean"], runs["memopt"][0].buffers["norms.1.running_mean"])
    torch.testing.assert_close(runs[None][0].loss, runs["memopt"][0].loss)
