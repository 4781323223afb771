"""`memopt.distributed.shard` and `ShardedOptimizer` in one process (a fake 8-rank world):
the layout of every parameter, state dicts, the errors users meet, and which optimizers
may step on row pieces."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate, Shard

import memopt
import memopt.distributed as md
from memopt.distributed.layout import ShardLayout
from memopt.distributed.memory import zero_model_state_bytes


# ---- layout ------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("rows", [1, 2, 7, 13, 16])
def test_layout_matches_dtensor_shard0(rows, world):
    """`ShardLayout` cuts rows as DTensor's ``Shard(0)`` does (torch.chunk pieces, trailing
    ranks empty), and the padded collective covers every row."""
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    pieces = [ShardLayout(rows, world, r) for r in range(world)]
    for rank, lay in enumerate(pieces):
        shape, offset = _compute_local_shape_and_global_offset((rows, 3), (world,), [rank], [Shard(0)])
        assert (lay.length, lay.start) == (shape[0], offset[0] if lay.length else lay.start)
        assert lay.padded_rows >= rows and lay.padded_rows == lay.chunk * world
    assert sum(lay.length for lay in pieces) == rows


def test_zero_formula():
    """ZeRO's per-rank bytes for 1000 fp32 elements with AdamW (4 + 4 + 8) over 4 ranks."""
    assert zero_model_state_bytes(1000, 4, 0).total == 16000
    assert zero_model_state_bytes(1000, 4, 1).__dict__ == {"params": 4000, "grads": 4000, "optimizer": 2000}
    assert zero_model_state_bytes(1000, 4, 2).__dict__ == {"params": 4000, "grads": 1000, "optimizer": 2000}
    assert zero_model_state_bytes(1000, 4, 3).total == 4000


# ---- the sharded model -------------------------------------------------------------------


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(24, 16)
        self.proj = nn.Linear(16, 13)
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.head = nn.Linear(16, 24, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("offset", torch.zeros(13))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.head(h).sum() + (self.proj(h) + self.offset).sum() * self.scale


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_parameters_become_dtensors_and_stay_tied(fake_world, stage):
    """Every parameter is a DTensor of its full shape (Shard(0) at stages 2-3, Replicate
    at 0-1; a 0-d one is always replicated); tied parameters stay one parameter; names,
    buffers and the state dict keys do not change; ``module.weight`` is the full tensor."""
    model = Tied()
    names = [n for n, _ in model.named_parameters()]
    keys = list(model.state_dict())
    md.shard(model, stage=stage)
    assert isinstance(model, md.ShardedModule) and isinstance(model, Tied)
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
    assert model.head._parameters["weight"] is model.embed._parameters["weight"]
    weight = model.proj._parameters["weight"]
    assert isinstance(weight, DTensor) and weight.shape == (13, 16)
    assert weight.placements == ((Shard(0),) if stage >= 2 else (Replicate(),))
    assert model._parameters["scale"].placements == (Replicate(),)
    assert type(model.proj.weight) is torch.Tensor and model.proj.weight.shape == (13, 16)
    with model.local_parameters():
        assert model.proj.weight is model.proj._parameters["weight"]
    assert not isinstance(model.offset, DTensor)


def test_stage3_keeps_only_this_ranks_rows(fake_world):
    """Rank 0 of 8 holds rows 0-1 of a 13-row weight (2-row pieces)."""
    torch.manual_seed(0)
    model = nn.Linear(16, 13)
    full = model.weight.detach().clone()
    md.shard(model, stage=3)
    local = model._parameters["weight"].to_local()
    assert local.shape == (2, 16)
    torch.testing.assert_close(local, full[:2])


# ---- errors ------------------------------------------------------------------------------


def test_no_process_group():
    assert not dist.is_initialized()
    with pytest.raises(md.ShardingError, match=r"init_process_group\(\) first"):
        md.shard(nn.Linear(4, 4))


def test_mesh_must_be_the_whole_world_on_one_dimension(fake_world):
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    with pytest.raises(md.ShardingError, match=r"2 dimensions \(2, 4\).*1-D mesh"):
        md.shard(nn.Linear(4, 4), init_device_mesh("cpu", (2, 4)))
    with pytest.raises(md.ShardingError, match="the mesh has 4 ranks but the world has 8"):
        md.shard(nn.Linear(4, 4), DeviceMesh("cpu", [0, 1, 2, 3]))


def test_wrapped_models_are_refused(fake_world):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    with pytest.raises(md.ShardingError, match="already wrapped by DistributedDataParallel"):
        md.shard(DistributedDataParallel(nn.Linear(4, 4)))
    inner = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    fully_shard(inner[1])
    with pytest.raises(md.ShardingError, match=r"submodule '1' is already wrapped by FSDP2"):
        md.shard(inner)
    twice = md.shard(nn.Linear(4, 4))
    with pytest.raises(md.ShardingError, match="already wrapped by memopt.distributed.shard"):
        md.shard(twice)
    part = md.shard(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    with pytest.raises(md.ShardingError, match=r"the model is already wrapped by memopt.distributed.shard \(it is part of a sharded model\)"):
        md.shard(part[0])  # was: "already a DTensor ...; tensor or expert parallel layouts are not supported"


def test_tensor_parallel_dtensors_are_refused(fake_world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    model = nn.Linear(8, 8)
    model.weight = nn.Parameter(distribute_tensor(model.weight.detach(), init_device_mesh("cpu", (8,)), [Shard(1)]))
    with pytest.raises(md.ShardingError, match=r"'weight' is already a DTensor \(placements \(Shard\(dim=1\),\)"):
        md.shard(model)


def test_bad_arguments(fake_world):
    with pytest.raises(ValueError, match="stage=4 is not one of 0"):
        md.shard(nn.Linear(4, 4), stage=4)
    with pytest.raises(TypeError, match="MixedPrecisionPolicy"):
        md.shard(nn.Linear(4, 4), mp_policy={"param_dtype": torch.bfloat16})
    half_meta = nn.Linear(4, 4)
    half_meta.bias = nn.Parameter(torch.zeros(4, device="meta"))
    with pytest.raises(md.ShardingError, match=r"several device types \(\['cpu', 'meta'\]\).*sharded whole"):
        md.shard(half_meta)
    with pytest.raises(TypeError, match="not sharded by memopt.distributed.shard"):
        md.ShardedOptimizer(torch.optim.AdamW, nn.Linear(4, 4))


def test_meta_device_model_is_planned_like_a_real_one(fake_world):
    """A model on the meta device shards (no values: nothing is broadcast or allocated;
    the mesh is on the host) and `memopt.explain` plans it without computing anything:
    the per-rank estimate equals that of the same model with real parameters."""
    import memopt

    def estimate(device: str) -> int:
        torch.manual_seed(0)
        model = md.shard(nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 16)).to(device), stage=3)
        x = torch.randn(8, 64, device=device)
        return memopt.explain(model, x, options={"codegen": "eager", "strict": True}).estimated_peak_bytes

    with torch.device("meta"):
        meta = md.shard(nn.Linear(4, 13), stage=3)
    local = meta._parameters["weight"].to_local()
    assert local.is_meta and tuple(local.shape) == (2, 4)
    torch._dynamo.reset()
    assert estimate("meta") == estimate("cpu") > 0


# ---- optimizers --------------------------------------------------------------------------


def test_optimizer_steps_on_this_ranks_rows(fake_world):
    """AdamW built on model.parameters() (or by a factory) holds state for rank 0's rows
    only; LR schedulers drive the wrapped optimizer."""
    model = md.shard(nn.Linear(16, 16), stage=3)
    opt = md.ShardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1.0), model)
    assert [tuple(t.shape) for _, t in opt.local_tensors()] == [(2, 16), (2,)]
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    scheduler.step()
    assert opt.param_groups[0]["lr"] == 0.5
    assert [tuple(s["exp_avg"].shape) for s in opt.state.values()] == [(2, 16), (2,)]


@pytest.mark.parametrize("name", ["GaLoreAdamW", "SubspaceAdamW"])
def test_lowrank_optimizers_need_whole_matrices(fake_world, name):
    """GaLore/Subspace project whole matrices: refused at stages 1-3 with the
    alternatives named, accepted at stage 0 and for groups with ``lowrank=False``."""
    import memopt.optim

    cls = getattr(memopt.optim, name)
    model = md.shard(nn.Linear(32, 32), stage=2)
    with pytest.raises(md.ShardingError, match=rf"{name} projects whole 32x32 matrices.*use stage=0"):
        md.ShardedOptimizer(lambda p: cls(p, rank=4), model)
    md.ShardedOptimizer(lambda p: cls([{"params": p, "lowrank": False}], rank=4), model)
    replicated = md.shard(nn.Linear(32, 32), stage=0)
    md.ShardedOptimizer(lambda p: cls(p, rank=4), replicated)


def test_other_optimizers(fake_world):
    """MeZO is refused at every stage; an optimizer memopt does not know is refused at
    stages 1-3 unless declared element-wise."""
    from memopt.optim import MeZO

    model = md.shard(nn.Linear(8, 8), stage=1)
    with pytest.raises(md.ShardingError, match="MeZO"):
        md.ShardedOptimizer(lambda p: MeZO(p), model)

    class Custom(torch.optim.SGD):
        pass

    with pytest.raises(md.ShardingError, match="Custom updates each element.*elementwise=True"):
        md.ShardedOptimizer(lambda p: Custom(p, lr=0.1), model)
    md.ShardedOptimizer(lambda p: Custom(p, lr=0.1), model, elementwise=True)
    if hasattr(torch.optim, "Adafactor"):
        with pytest.raises(md.ShardingError, match="Adafactor"):
            md.ShardedOptimizer(lambda p: torch.optim.Adafactor(p), model)


def test_offloaded_state_is_judged_by_the_optimizer_it_wraps(fake_world):
    """`OffloadedState` inside a ShardedOptimizer is judged by its wrapped optimizer
    (AdamW qualifies, GaLore on whole matrices does not); wrapped around one, it is
    refused: it would find no gradient (the ShardedOptimizer sets its rows' gradients in
    its own step) and silently step nothing."""
    from memopt.optim import GaLoreAdamW, OffloadedState

    model = md.shard(nn.Linear(32, 32), stage=3)
    md.ShardedOptimizer(lambda p: OffloadedState(torch.optim.AdamW(p), "disk"), model)
    with pytest.raises(md.ShardingError, match="GaLoreAdamW projects whole 32x32 matrices"):
        md.ShardedOptimizer(lambda p: OffloadedState(GaLoreAdamW(p, rank=4), "disk"), model)
    sharded = md.ShardedOptimizer(lambda p: torch.optim.AdamW(p), model)
    with pytest.raises(TypeError, match=r"step nothing.*ShardedOptimizer\(lambda params: OffloadedState"):
        OffloadedState(sharded, "disk")


def test_adamw8bit_decides_by_the_whole_parameter_and_keeps_its_blocks(fake_world):
    """A 64x64 weight (4096 elements, 8-bit) sharded to 8x64 pieces (512 elements) keeps
    8-bit moments, and each rank's piece is declared to AdamW8bit as the rows it is of
    the whole: with block 1024 the cuts at 512, 1536, ... cross blocks 0-3, so rank 0's
    512 elements keep one scale, the whole's block 0 (no warning: the step agrees the
    shared blocks' scales across ranks); with block 256 every cut is on a block
    boundary and nothing is shared."""
    from memopt.optim import AdamW8bit

    model = md.shard(nn.Linear(64, 64), stage=3)
    opt = md.ShardedOptimizer(lambda p: AdamW8bit(p, min_8bit_size=4096), model)
    weight, bias = (t for _, t in opt.local_tensors())
    assert opt.inner.uses_8bit(weight, opt.param_groups[0]) and not opt.inner.uses_8bit(bias, opt.param_groups[0])
    piece = opt.inner._pieces[weight]
    assert (piece.offset, piece.total, piece.cuts) == (0, 4096, tuple(512 * r for r in range(1, 8)))
    assert piece.shared_blocks(256) == () and piece.shared_blocks(1024) == (0, 1, 2, 3)
    assert bias not in opt.inner._pieces
    wide = md.ShardedOptimizer(lambda p: AdamW8bit(p, min_8bit_size=4096, block_size=1024), model)
    weight = wide.local_tensors()[0][1]
    assert wide.inner.scale_blocks(weight, 1024) == 1 and opt.inner.scale_blocks(weight, 256) == 2


def test_wrapping_an_optimizer_that_already_stepped(fake_world):
    model = md.shard(nn.Linear(8, 8), stage=3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    with pytest.raises(md.ShardingError, match="already has state"):
        md.ShardedOptimizer(opt, model)


def test_step_refuses_unreduced_gradients(fake_world):
    model = md.shard(nn.Linear(8, 8), stage=3)
    opt = md.ShardedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    model.set_requires_gradient_sync(False)
    model(torch.randn(2, 8)).sum().backward()
    with pytest.raises(md.ShardingError, match=r"'weight' has gradients accumulated .* no backward reduced"):
        opt.step()
    opt.zero_grad()
    opt.step()  # dropped by zero_grad: nothing left to reduce


def _layers() -> nn.Module:
    return nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])


def test_materialize_keeps_this_ranks_rows_of_the_seeded_init(fake_world):
    """Built on meta, sharded, materialised with a seed: each stage holds this rank's
    rows (stage 3), the replica (1, 2) or the whole tensor (0) of the model built for
    real with that seed; at stage 3 the step allocates the rank's shards plus one
    layer's full parameters at a time, never the whole model."""
    from memopt.testing.measure import measure_peak

    torch.manual_seed(0)
    reference = _layers()
    for stage in (0, 1, 2, 3):
        with torch.device("meta"):
            model = md.shard(_layers(), stage=stage)
        torch.manual_seed(0)
        md.materialize(model)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            lay = md.shard_state(model).params[name].layout
            want = q if stage in (0, 1) or q.dim() == 0 else q[lay.start : lay.start + lay.length]
            assert torch.equal(p.to_local(), want), (stage, name)
    with torch.device("meta"):
        model = md.shard(_layers(), stage=3)
    growth = measure_peak(lambda: md.materialize(model)).peak_growth_bytes
    total = sum(p.numel() * 4 for p in reference.parameters())
    layer = (256 * 256 + 256) * 4
    assert total // dist.get_world_size() <= growth <= total // dist.get_world_size() + layer + 64 * 1024


def test_materialize_refuses_what_it_cannot_do(fake_world):
    model = md.shard(_layers(), stage=3)
    with pytest.raises(md.ShardingError, match="already have storage"):
        md.materialize(model)
    with torch.device("meta"):
        on_meta = md.shard(_layers(), stage=3)
    with pytest.raises(md.ShardingError, match="not of the mesh's device type"):
        md.materialize(on_meta, device="meta")


def test_optimizer_in_backward_refuses_a_sharded_model(fake_world):
    """``optimizer_in_backward`` cannot update sharded parameters yet. Given the
    `ShardedOptimizer` (whose tensors are the rank's rows, not the model's parameters)
    the pass found nothing to update, and training silently never stepped: refused when
    the options are read. Given a plain optimizer over the sharded (DTensor) parameters:
    refused at compile time, as docs/whole_step.md says."""
    import memopt
    from memopt.errors import MemoptOptimizerError

    model = md.shard(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)), stage=3)
    sharded = md.ShardedOptimizer(lambda params: torch.optim.AdamW(params), model)
    with pytest.raises(MemoptOptimizerError, match="ShardedOptimizer"):
        memopt.MemoptConfig.from_options({"optimizer_in_backward": sharded})
    plain = torch.optim.AdamW(model.parameters())
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "optimizer_in_backward": plain})
    with pytest.raises(Exception, match="sharded or wrapped parameter"):  # Dynamo wraps it
        compiled(torch.randn(2, 16)).sum().backward()


def test_infeasible_budget_of_a_sharded_step_does_not_advise_sharding(fake_world):
    """A budget below what a stage-3 step can reach: the warning's advice is for a model
    sharded already (more ranks, a higher stage), not 'sharding the parameters and
    gradients over devices (memopt.distributed.shard)', which it is."""
    from memopt.errors import MemoptBudgetWarning

    model = md.shard(nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64)), stage=3)
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "memory_budget": 0.1})
    with pytest.warns(MemoptBudgetWarning, match="is infeasible") as caught:
        compiled(torch.randn(4, 64)).sum().backward()
    text = " ".join(str(w.message) for w in caught if isinstance(w.message, MemoptBudgetWarning))
    assert "over devices (memopt.distributed.shard)" not in text
    assert "more ranks, or a higher stage of memopt.distributed.shard" in text


def test_infeasible_budget_of_a_sharded_inference_region_does_not_advise_sharding(fake_world):
    """An inference region of a sharded model (no backward: its peak cannot go lower)
    advised 'sharding the parameters over devices (memopt.distributed.shard)' to a
    model sharded already; it now advises more ranks or a higher stage, as a
    training region does."""
    from memopt.errors import MemoptBudgetWarning

    torch._dynamo.reset()
    model = md.shard(nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64)), stage=3)
    compiled = torch.compile(model, backend="memopt", options={"codegen": "eager", "memory_budget": "2KiB"})
    with pytest.warns(MemoptBudgetWarning, match="inference regions keep nothing for backward") as caught, torch.no_grad():
        compiled(torch.randn(4, 64))
    text = " ".join(str(w.message) for w in caught if isinstance(w.message, MemoptBudgetWarning))
    assert "over devices (memopt.distributed.shard)" not in text
    assert "more ranks, or a higher stage of memopt.distributed.shard for the parameters" in text


def test_infeasible_storage_plan_of_a_sharded_step_does_not_advise_sharding(fake_world):
    """A plan that holds saved values elsewhere (compressed, offloaded) is checked for
    its budget after the passes (`check_final_budget`); over it, its advice for a
    sharded step said 'shard it'. The region's graphs now decide, as for the planner's
    own warning."""
    import dataclasses

    from memopt.config import MemoptConfig
    from memopt.errors import MemoptBudgetWarning
    from memopt.plan.planner import check_final_budget

    torch._dynamo.reset()
    model = md.shard(nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64)), stage=3)
    region = memopt.explain(model, torch.randn(4, 64), options={"codegen": "eager"}).regions[0]
    over = dataclasses.replace(
        region.plan, budget_bytes=1024, estimated_peak_after=8192, solver={"storage": {"values": 1}},
        peak_breakdown_after={"parameters": 4096, "gradients": 2048, "saved_activations": 2048},
    )  # fmt: skip
    with pytest.warns(MemoptBudgetWarning, match="rematerialization and compression cannot remove") as caught:
        check_final_budget(over, MemoptConfig(compress_activations="int8"), region.step)
    text = str(caught[0].message)
    assert "over devices (memopt.distributed.shard)" not in text
    assert "more ranks, or a higher stage of memopt.distributed.shard for the parameters and gradients" in text


def test_creating_optimizer_state_for_a_load_keeps_the_users_gradients():
    """`checkpoint.load` creates the optimizer's state with one zero-gradient step at
    learning rate 0 (as torch's DCP helpers do). Gradients the user already holds (a
    load between backward and step) are put back, not cleared; the parameters do not
    move and the state exists."""
    from memopt.distributed import checkpoint

    model = torch.nn.Linear(4, 3)
    model(torch.randn(2, 4)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    checkpoint._zero_step(opt, list(model.parameters()))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert all("exp_avg" in opt.state[p] for p in model.parameters()) and opt.param_groups[0]["lr"] == 0.1
