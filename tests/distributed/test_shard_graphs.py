"""The collectives `memopt.distributed.shard` puts into the graphs memopt compiles, in a
fake 8-rank world (one process): each stage's all-gathers and reductions, the dtypes a
mixed-precision policy gathers and reduces in, and the no-sync backward."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

import memopt.distributed as md


def _mlp() -> nn.Module:
    """Two linears; 13 rows do not split evenly over 8 ranks (chunks of 2, ranks 7 empty)."""
    return nn.Sequential(nn.Linear(16, 13), nn.ReLU(), nn.Linear(13, 8))


UNBUCKETED = {"collective_bucket_bytes": 0}
"""One collective per parameter (bucketing: test_collective_passes.py)."""
AS_TRACED = {**UNBUCKETED, "collective_prefetch": 0}
"""...each waited right after it starts, as traced."""

EXPECTED = {
    # stage: (forward all-gathers, backward reduce-scatters, backward all-reduces), 4 parameters
    0: (0, 0, 4),
    1: (0, 0, 4),
    2: (0, 4, 0),
    3: (4, 4, 0),
}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_each_stage_compiles_its_collectives(fake_world, graphs_of, stage):
    """Stage 3 all-gathers every parameter in forward and reduce-scatters every gradient in
    backward; stage 2 reads its replica (no forward collective) and reduce-scatters;
    stages 0 and 1 all-reduce. Nothing else communicates, and memopt compiles it as one
    region without a fallback (strict)."""
    graphs = graphs_of(md.shard(_mlp(), stage=stage), torch.randn(4, 16), **UNBUCKETED)
    gathers, scatters, reduces = EXPECTED[stage]
    assert graphs["forward"] == {"all_gather_into_tensor": gathers, "reduce_scatter_tensor": 0, "all_reduce": 0}
    assert graphs["backward"] == {"all_gather_into_tensor": 0, "reduce_scatter_tensor": scatters, "all_reduce": reduces}


def test_uneven_rows_are_padded_for_the_collectives(fake_world, graphs_of):
    """13 rows over 8 ranks: rank 0 holds 2 rows; the gathered weight has 16 rows (8 x 2)
    and is cut to 13; its gradient is padded to 16 rows before the reduce-scatter."""
    graphs = graphs_of(md.shard(_mlp(), stage=3), torch.randn(4, 16), **UNBUCKETED)
    assert re.search(r'all_gather_into_tensor\w*: "f32\[16, 16\]"', graphs["forward_code"])
    assert re.search(r'"f32\[13, 16\]" = torch.ops.aten.slice.Tensor\(wait_tensor', graphs["forward_code"])
    assert re.search(r'reduce_scatter_tensor\w*: "f32\[2, 16\]"', graphs["backward_code"])


def test_param_dtype_gathers_and_reduce_dtype_reduces(fake_world, graphs_of):
    """FSDP2's MixedPrecisionPolicy: bf16 parameters are cast before the all-gather (half
    the bytes), gradients reduced in fp32 (``reduce_dtype``); floating inputs are cast to
    bf16 (``cast_forward_inputs``)."""
    policy = md.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = md.shard(_mlp(), stage=3, mp_policy=policy)
    graphs = graphs_of(model, torch.randn(4, 16), **UNBUCKETED)
    gathers = re.findall(r'all_gather_into_tensor\w*: "(\w+)\[', graphs["forward_code"])
    scatters = re.findall(r'reduce_scatter_tensor\w*: "(\w+)\[', graphs["backward_code"])
    assert gathers == ["bf16"] * 4
    assert scatters == ["f32"] * 4
    assert model[0]._parameters["weight"].grad.dtype == torch.float32


def test_no_sync_backward_reduces_nothing(fake_world, graphs_of):
    """With ``set_requires_gradient_sync(False)`` the forward still all-gathers (stage 3)
    but the backward holds no reduction: gradients go to the accumulators."""
    model = md.shard(_mlp(), stage=3)
    model.set_requires_gradient_sync(False)
    graphs = graphs_of(model, torch.randn(4, 16), **UNBUCKETED)
    assert graphs["forward"]["all_gather_into_tensor"] == 4
    assert graphs["backward"] == {"all_gather_into_tensor": 0, "reduce_scatter_tensor": 0, "all_reduce": 0}
    assert model[0]._parameters["weight"].grad is None
    assert all(h.accumulator.grad is not None for h in md.shard_state(model).params.values())


# ---- what memopt's compile path does not handle yet (each is a change outside
# memopt/distributed; docs/sharding.md, "What is left") ------------------------------------


def not_yet(raises: type[BaseException], reason: str) -> pytest.MarkDecorator:
    """A strict xfail: the test passes once memopt handles the case, and then must lose it."""
    return pytest.mark.xfail(strict=True, raises=raises, reason=reason)


COMPILE_FAILED = torch._dynamo.exc.BackendCompilerFailed


def test_precision_bf16_composes_with_sharding(fake_world, graphs_of):
    """memopt's ``precision="bf16"`` on a sharded model: the matmuls in bf16, fp32
    masters gathered (the all-gathers stay fp32, as with any fp32 parameter)."""
    graphs = graphs_of(md.shard(_mlp(), stage=3), torch.randn(4, 16), precision="bf16", **UNBUCKETED)
    assert graphs["forward"]["all_gather_into_tensor"] == 4


def test_budget_planned_across_graph_breaks_accepts_dtensor_inputs(fake_world, graphs_of):
    """A memory budget (planned for the whole step, the default) on a sharded model."""
    graphs = graphs_of(md.shard(_mlp(), stage=3), torch.randn(4, 16), memory_budget=1.0, **UNBUCKETED)
    assert graphs["forward"]["all_gather_into_tensor"] == 4


def test_budget_reshards_after_forward(fake_world, graphs_of):
    """Under a budget the gathered weights (64 KiB, most of the step) are freed after
    forward and all-gathered again in backward, as FSDP's reshard_after_forward."""
    model = md.shard(nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(4)]), stage=3)
    graphs = graphs_of(model, torch.randn(2, 64), memory_budget=0.75, plan_across_graph_breaks=False)
    assert graphs["backward"]["all_gather_into_tensor"] > 0



def test_stage2_replica_and_its_rows_are_one_allocation(fake_world):
    """At stage 2 the module reads the replica and the registered parameter is a view of
    its rows: two graph inputs, one storage. memopt's estimate counts it once, so the
    bytes live at the step's start equal stage 0's (one full copy of each weight)."""
    import memopt

    def explain(stage: int) -> memopt.Explanation:
        torch._dynamo.reset()
        model = md.shard(nn.Sequential(nn.Linear(64, 64, bias=False), nn.ReLU(), nn.Linear(64, 64, bias=False)), stage=stage)
        return memopt.explain(model, torch.randn(4, 64), options={"codegen": "eager", "strict": True, **AS_TRACED})

    replicated, replica = explain(0), explain(2)
    assert replica.baseline_bytes == replicated.baseline_bytes
    assert replica.estimated_peak_bytes <= replicated.estimated_peak_bytes


def _tanh_layers() -> nn.Module:
    """Three Linear(64, 64) + Tanh: each Tanh output is saved for backward (an
    activation that compression may take), each weight is gathered (stage 3) and kept."""
    return nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.Tanh()) for _ in range(3)])


@pytest.mark.parametrize("options", [
    {"compress_activations": "fp8"},
    {"compress_activations": "int8"},
    {"compress_activations": "bf16"},
    {"compress_activations": "fp8", "precision": "bf16"},
])
def test_compression_leaves_gathered_parameters_alone(fake_world, graphs_of, options):
    """``compress_activations`` stores activations compressed, never parameters: at
    stage 3 the all-gathered weights (and their bf16 copies under ``precision``) are
    parameters, freed by gathering again in backward. Compressing them rounded the weights
    backward reads (fp8) and gave the all-gather a second reader, on which
    ``bucket_collectives`` failed ("Expected single user for all_gather_into_tensor")
    and left every collective unbucketed; under ``precision="bf16"`` the weights' bf16
    copies were compressed silently. Only the Tanh outputs are compressed now, and the
    gathers are bucketed (strict: a failing pass raises)."""
    graphs = graphs_of(md.shard(_tanh_layers(), stage=3), torch.randn(64, 64), **options)
    compressed = [d.name for d in graphs["passes"]["compress_activations"].applied]
    assert len(compressed) >= 2
    assert all(re.fullmatch(r"forward:tanh(_\d+)?", name) for name in compressed), compressed
    assert graphs["forward"]["all_gather_into_tensor"] == 1  # one bucket of the six parameters


def _live_bytes(model: nn.Module, *tensors: torch.Tensor) -> int:
    """Bytes of the distinct storages of ``tensors``, this rank's parameter pieces, their
    ``.grad`` and the no-sync accumulators' ``.grad``: what is live as a step starts."""
    from torch.distributed.tensor import DTensor

    live = list(tensors)
    for p in model.parameters():
        live += [t.to_local() if isinstance(t, DTensor) else t for t in (p, p.grad) if t is not None]
    live += [h.accumulator.grad for h in md.shard_state(model).params.values()
             if h.accumulator is not None and h.accumulator.grad is not None]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in live}.values())


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "no-sync"])
def test_accumulated_gradients_are_planned_for(fake_world, sync):
    """Gradient accumulation at stage 3 under a budget: a micro-step after the first
    starts with this rank's gradient shards set (sync on every micro-step) or, with
    ``set_requires_gradient_sync(False)``, with the full-size accumulators' ``.grad``,
    and holds them throughout. The region is compiled again with them counted, as an
    unsharded one is (`docs/memory.md`, "Gradient accumulation"). A sharded region was
    never traced again, so it kept the first micro-step's plan and only warned: six
    Linear(256, 256) + Tanh on 512 rows, a fake world of 4, a budget of 5.3 MB: the
    later micro-steps measured 5.51 MB with sync (4.98 MB now); without sync, whose
    gradients held do not fit, 6.69 MB (6.17 MB now, at the smallest peak memopt can
    reach, which its budget warning states)."""
    import warnings

    import memopt
    from memopt.testing.measure import measure_peak

    torch.manual_seed(0)
    model = md.shard(nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.Tanh()) for _ in range(6)]), stage=3)
    budget = 5_300_000
    x = torch.randn(512, 256)
    with warnings.catch_warnings(record=True) as caught, memopt.record() as explanation:
        warnings.simplefilter("always")
        compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "memory_budget": budget})
        peaks = []
        for step in range(2):
            for micro in range(3):
                model.set_requires_gradient_sync(sync or micro == 2)
                start = _live_bytes(model, x)
                peaks.append(measure_peak(lambda: compiled(x).sum().backward()).peak_growth_bytes + start)
            model.zero_grad(set_to_none=True)
    assert not [str(w.message) for w in caught if ".grad set" in str(w.message)]
    later = [peaks[i] for i in (1, 2, 4, 5)]  # micro-steps that start with gradients held
    first = explanation.region(0)  # the sync micro-step without sync before it is another graph (0/1)
    assert first.step is not None and first.step.grads_held, "planned again with the gradients held counted"
    if sync:
        assert not [w for w in caught if issubclass(w.category, memopt.MemoptBudgetWarning)]
        assert max(later) <= budget, (later, budget)
    else:
        floors = [str(w.message) for w in caught if "infeasible" in str(w.message)]
        assert floors, "the gradients held do not fit 5.3 MB: the budget warning says so"
        assert max(later) <= 1.05 * explanation.estimated_peak_bytes, (later, explanation.estimated_peak_bytes)
