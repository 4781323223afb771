"""`memopt.explain` on a model sharded by `memopt.distributed.shard`, on a fake world of
8 ranks: its report carries the per-rank sharding section, and its own memory breakdown
counts parameter shards as parameters and all-gathered parameters as gathered
parameters, not as inputs and saved activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import memopt
import memopt.distributed as md
from memopt._compat import TORCH_VERSION


def _model(layers: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return md.shard(nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(layers)]), stage=3)


def _explain(fn: object, *args: torch.Tensor, **options: object) -> memopt.Explanation:
    torch._dynamo.reset()
    return memopt.explain(fn, *args, options={"codegen": "eager", "strict": True, **options})


def test_report_has_the_sharding_section(fake_world):
    """The model itself (or its compiled form) is recognised: the report ends its memory
    part with `md.report`'s tables; without an optimizer the state row says '-'."""
    model = _model()
    # per-parameter collectives: md.report lists each gather's parameter (a bucket of
    # several parameters is one row, docs/sharding.md)
    explanation = _explain(model, torch.randn(2, 64), collective_bucket_bytes=0)
    assert explanation.sharded_model is model
    text = explanation.report()
    assert "sharding (memopt.distributed.report, this rank):" in text
    assert "ZeRO stage 3, rank 0 of 8" in text
    # the summary at the top is this rank's too, and says so before its first figure
    assert "every figure is rank 0 of 8's" in text.splitlines()[0]
    assert "gathered parameters: 4, 64.00 KiB" in text
    assert "collectives per step" in text and "planned peak on this rank" in text
    state = next(line for line in text.splitlines() if line.startswith("optimizer state "))
    assert state.split()[-3:] == ["-", "-", "-"]
    assert _explain(torch.compile(model), torch.randn(2, 64)).sharded_model is model


def test_report_uses_the_optimizer_of_the_options(fake_world):
    """``options={"optimizer": opt}`` fills the optimizer-state row (AdamW: 8 bytes per
    element of this rank's rows, 4 x 64 x 64 / 8 elements = 16 KiB)."""
    model = _model()
    optimizer = md.ShardedOptimizer(lambda p: torch.optim.AdamW(p, lr=1e-3), model)
    text = _explain(model, torch.randn(2, 64), optimizer=optimizer).report()
    section = text.split("sharding (memopt.distributed.report, this rank):")[1]
    state = next(line for line in section.splitlines() if line.startswith("optimizer state "))
    assert state.split()[-2:] == ["16.00", "KiB"]
    # the step's own breakdown counts the same state at the peak (the plan sees it)
    assert any(line.split()[:4] == ["optimizer", "state", "16.00", "KiB"] for line in text.split(section)[0].splitlines())


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_the_plan_counts_a_sharded_optimizers_state(fake_world, stage):
    """``options={"optimizer": ShardedOptimizer(AdamW)}``: the step's timeline holds
    AdamW's state of the rows this rank steps (8 bytes per element: all of them at
    stage 0, 1/8 at stages 2 and 3), and the estimated peak grows by at least that.
    The state was keyed by the rank's row tensors, which the compiled graphs never take
    (they take the registered DTensors): the plan, and ``memory_budget``, left it out."""
    model = md.shard(nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(4)]), stage=stage)
    optimizer = md.ShardedOptimizer(lambda p: torch.optim.AdamW(p, lr=1e-3), model)
    rows = sum(local.numel() for _, local in optimizer.local_tensors())
    assert rows == 4 * 64 * 64 // (1 if stage == 0 else 8)
    without = _explain(model, torch.randn(2, 64))
    counted = _explain(model, torch.randn(2, 64), optimizer=optimizer)
    state = [iv.nbytes for iv in counted.timeline().intervals if iv.category == "optimizer_state"]
    assert sum(state) == 8 * rows
    assert counted.estimated_peak_bytes >= without.estimated_peak_bytes + 8 * rows


def test_plain_models_and_functions_have_no_sharding_section(fake_world):
    model = nn.Linear(8, 8)
    assert "sharding (" not in _explain(model, torch.randn(2, 8)).report()
    sharded = _model(1)
    explanation = _explain(lambda x: sharded(x).sum(), torch.randn(2, 64))
    assert explanation.sharded_model is None  # a closure: set explanation.sharded_model by hand
    explanation.sharded_model = sharded
    assert "ZeRO stage 3" in explanation.report()


def test_shards_are_parameters_and_gathered_weights_have_their_own_category(fake_world):
    """AOTAutograd flattens each DTensor parameter into its local tensor (and, from torch
    2.12, where a device mesh is an opaque object, its device mesh): the local tensor is a parameter (rank 0 holds 8 of 64 rows:
    2 KiB each), the mesh 'other', the batch an input. Each all-gather of a shard is a gathered
    parameter, not an activation: at the peak (backward's first matmul) the three
    weights backward reads (the first layer's is not needed: the batch needs no
    gradient) are 48 KiB of gathered parameters, and the saved activations are the
    three 2x64 matmul outputs. Gathered weights kept for backward are still values
    saved for backward (the planner may re-gather them)."""
    explanation = _explain(_model(), torch.randn(2, 64), collective_bucket_bytes=0)  # one gather per parameter
    step = explanation.region(0).step
    kinds = [info.kind for info in step.inputs]
    if TORCH_VERSION >= (2, 12):  # each DTensor's device mesh is an input too
        assert kinds == ["parameter", "other", "input"] + ["parameter", "other"] * 3
    else:
        assert kinds == ["parameter", "input"] + ["parameter"] * 3
    timeline = explanation.timeline()
    breakdown = timeline.peak_breakdown
    assert timeline.baseline_bytes == breakdown["parameters"] + breakdown["inputs"] == 4 * 2048 + 512
    assert breakdown["gathered_parameters"] == 3 * 64 * 64 * 4
    assert breakdown["saved_activations"] == 3 * 2 * 64 * 4
    gathered = timeline.by_category("gathered_parameters")
    assert sorted(iv.node.name for iv in gathered) == [f"all_gather_into_tensor{s}" for s in ("", "_1", "_2", "_3")]
    kept = {iv.node.name for iv in timeline.saved_activations() if iv.category == "gathered_parameters"}
    assert kept == {"all_gather_into_tensor_1", "all_gather_into_tensor_2", "all_gather_into_tensor_3"}
    text = explanation.report()
    row = next(line for line in text.splitlines() if line.startswith("gathered parameters "))
    assert row.split()[2:4] == ["48.00", "KiB"], row  # the breakdown's row at the peak


def test_parameters_gathered_again_in_backward_are_gathered_parameters(fake_world):
    """Under a budget the planner frees some gathered weights after forward and gathers
    them again in backward: those backward all-gathers are gathered parameters too."""
    explanation = _explain(_model(), torch.randn(2, 64), memory_budget=0.75, plan_across_graph_breaks=False)
    again = [iv for iv in explanation.timeline().by_category("gathered_parameters") if iv.graph == "backward"]
    assert again and all(iv.nbytes == 64 * 64 * 4 for iv in again)
    assert not any(iv.saved_for_backward for iv in again)


_FACTORY = '''
import torch, torch.nn as nn
import memopt.distributed as md


def build():
    model = md.shard(nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(4)]), stage=3)
    return model, torch.randn(2, 64)
'''


def test_cli_report_of_a_sharded_factory(fake_world, tmp_path, capsys):
    """``memopt report FILE.py:build`` builds the sharded model on fake tensors (the mesh
    is made outside the fake mode) and prints the sharding section; this rank's
    parameter bytes are counted per storage, not per (fake, all-zero) address."""
    from memopt.cli.main import main as cli_main

    path = tmp_path / "sharded_factory.py"
    path.write_text(_FACTORY)
    torch._dynamo.reset()
    assert cli_main(["report", f"{path}:build", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "ZeRO stage 3, rank 0 of 8" in text
    state = text[text.index("ZeRO stage 3") :]
    params = next(line for line in state.splitlines() if line.startswith("parameters  "))
    assert params.split()[-4:] == ["8.00", "KiB", "8.00", "KiB"]  # this rank, ZeRO's formula
    with torch.device("meta"):
        meta = md.shard(nn.Linear(64, 64), stage=3)
    assert md.model_state_bytes(meta).params == (64 * 64 + 64) * 4 // 8


def test_bucketed_gathers_copied_out_are_gathered_parameters(fake_world):
    """With the default buckets (one all-gather of the four shards, each weight copied
    out of the bucket's buffer) the copies are gathered parameters, not activations."""
    explanation = _explain(_model(), torch.randn(2, 64))
    assert explanation.graph_code("forward").count("all_gather_into_tensor.default(") == 1
    timeline = explanation.timeline()
    gathered = {iv.node.name for iv in timeline.by_category("gathered_parameters") if iv.graph == "forward"}
    assert {"clone", "clone_1", "clone_2", "clone_3"} <= gathered
    assert not any(iv.node.name.startswith("clone") for iv in timeline.saved_activations() if iv.category == "saved_activations")


_FIT_FACTORY = '''
import torch, torch.nn as nn
import memopt.distributed as md


class Scaled(nn.Module):  # a buffer, as a rotary model's inv_freq: a plain (fake) tensor beside the DTensors
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(4)])
        self.register_buffer("scale", torch.full((64,), 0.5))

    def forward(self, x):
        return self.layers(x * self.scale)


def build():
    torch.manual_seed(0)
    return md.shard(Scaled(), stage=3), lambda batch: torch.randn(batch, 64)
'''


def test_cli_fit_of_a_sharded_factory(fake_world, tmp_path, capsys):
    """``memopt fit FILE.py:build`` of a factory that shards its model: the parameters are
    DTensors whose local shards are fake (built under the CLI's FakeTensorMode), and fit
    took them for real tensors beside a fake buffer ("mixes 2 fake and 21 real
    parameters/buffers" on a sharded Llama) and refused the model. It fits this rank's step, as `memopt.fit` of
    the model built on real tensors does."""
    import json

    from memopt.cli.main import main as cli_main

    path = tmp_path / "sharded_fit.py"
    path.write_text(_FIT_FACTORY)
    torch._dynamo.reset()
    assert cli_main(["fit", f"{path}:build", "--budget", "64KiB", "--max-batch", "64", "--json", "--quiet"]) == 0
    fitted = json.loads(capsys.readouterr().out)
    namespace: dict[str, object] = {}
    exec(_FIT_FACTORY, namespace)
    model, make_inputs = namespace["build"]()  # type: ignore[operator]
    torch._dynamo.reset()
    real = memopt.fit(model, make_inputs, "64KiB", max_size=64, options={"codegen": "eager"})
    assert (fitted["batch"], fitted["estimated_peak_bytes"]) == (real.batch, real.estimated_peak_bytes)
    assert 1 <= real.batch < 64


def test_the_plan_counts_no_state_of_an_offloaded_sharded_optimizer(fake_world, tmp_path):
    """``ShardedOptimizer(lambda ps: OffloadedState(AdamW(ps), "disk"), model)`` keeps
    this rank's rows' state in a file between steps: the step's timeline counts none of
    it on the device, before the first step (when AdamW's would be predicted) and after,
    as for an `OffloadedState` in one process. Before, the sharded path predicted the
    wrapper's state as two row-sized tensors per parameter (16 KiB here, the estimated
    peak 137 KiB -> 153 KiB) before the first step, and a budget was planned as if the
    state were on the device."""
    from memopt.optim import OffloadedState

    model = md.shard(nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(4)]), stage=3)
    optimizer = md.ShardedOptimizer(
        lambda p: OffloadedState(torch.optim.AdamW(p, lr=1e-3), "disk", offload_dir=tmp_path), model)
    without = _explain(model, torch.randn(2, 64))
    for stepped in (False, True):
        if stepped:
            for p in model.parameters():
                p.grad = torch.ones_like(p)
            optimizer.step()
            optimizer.zero_grad()
            assert optimizer.inner.stats().offloaded_bytes == 8 * 4 * 64 * 64 // 8
        counted = _explain(model, torch.randn(2, 64), optimizer=optimizer)
        timeline = counted.timeline()
        assert all(timeline.breakdown_at(i)["optimizer_state"] == 0 for i in range(len(timeline.points)))
        assert counted.estimated_peak_bytes == without.estimated_peak_bytes
    optimizer.inner.close()


def test_advice_for_a_sharded_step_offers_no_optimizer_in_backward(fake_world):
    """An infeasible budget on a sharded step whose gradients and optimizer state block
    it: the warning and the report's savings table do not offer
    ``optimizer_in_backward=opt``, which refuses a ShardedOptimizer ('does not support
    sharded models'); they name AdamW8bit, which steps on shards. Both offered it (the
    table with a modelled saving of 0 B), and the table offered GaLore, which refuses
    stages 1-3."""
    from memopt.errors import MemoptBudgetWarning

    model = _model()
    optimizer = md.ShardedOptimizer(lambda p: torch.optim.AdamW(p, lr=1e-3), model)
    with pytest.warns(MemoptBudgetWarning) as caught:
        explanation = _explain(model, torch.randn(2, 64), optimizer=optimizer, memory_budget="1KiB", strict=False)
    message = str(next(w.message for w in caught if isinstance(w.message, MemoptBudgetWarning)))
    assert "Gradients are live with the optimizer's state" in message
    assert "optimizer_in_backward=opt frees" not in message and "AdamW8bit, which steps on shards" in message
    fused = next(row for row in explanation.savings() if row.technique == "fused update")
    assert fused.saved_bytes is None and "not for a sharded model" in fused.basis
    # GaLore refuses stages 1-3 (ShardedOptimizer: "stage 3 splits over the ranks"): the
    # table offered it with a modelled 0 B
    lowrank = next(row for row in explanation.savings() if row.technique == "low-rank state")
    assert lowrank.saved_bytes is None and "not at sharding stages 1-3" in lowrank.basis, lowrank


def test_a_region_without_collectives_in_a_sharded_step_does_not_advise_sharding(fake_world):
    """The region after a graph break of a sharded model holds no collectives; planned
    with the step, its infeasible-budget warning advised "sharding the parameters and
    gradients over devices (memopt.distributed.shard)" for a model sharded already. The
    step's other regions now count: it advises more ranks or a higher stage."""
    from memopt.errors import MemoptBudgetWarning

    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(4)])

        def forward(self, x):
            h = self.body(x)
            torch._dynamo.graph_break()
            return (torch.tanh(h) ** 2).mean()

    torch.manual_seed(0)
    model = md.shard(Broken(), stage=3)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "memory_budget": "1KiB"})
    with pytest.warns(MemoptBudgetWarning) as caught:
        for _ in range(3):
            compiled(torch.randn(8, 64)).backward()
    stepwide = [str(w.message) for w in caught if "planned as a whole" in str(w.message)]
    assert stepwide, [str(w.message) for w in caught]
    for message in stepwide:
        assert "more ranks, or a higher stage of memopt.distributed.shard" in message, message
        assert "over devices (memopt.distributed.shard)" not in message, message
