"""state_dict()/load_state_dict() round trips: training k steps, checkpointing, loading into
a fresh model and optimizer and continuing is bit-identical to uninterrupted training."""

from __future__ import annotations

import pytest
import torch

from memopt.optim import AdamW8bit, GaLoreAdamW, MeZO, SubspaceAdamW
from optim_testing import params_equal, saved, tiny_mlp, train, train_mezo

FACTORIES = {
    # update_proj_gap=3 so the 4 steps after the checkpoint cross a projector refresh.
    "galore": lambda p: GaLoreAdamW(p, lr=1e-2, rank=4, update_proj_gap=3),
    "galore_min_state": lambda p: GaLoreAdamW(p, lr=1e-2, rank=4, update_proj_gap=3, proj_type="min_state"),
    "galore_randomized": lambda p: GaLoreAdamW(p, lr=1e-2, rank=4, update_proj_gap=3, svd="randomized"),
    "subspace": lambda p: SubspaceAdamW(p, lr=1e-2, rank=4, update_proj_gap=3, seed=7),
    "subspace_min_state": lambda p: SubspaceAdamW(p, lr=1e-2, rank=4, update_proj_gap=3, seed=7, proj_type="min_state"),
    "adamw8bit": lambda p: AdamW8bit(p, lr=1e-2, block_size=64, min_8bit_size=100),
    "mezo": lambda p: MeZO(p, lr=1e-2, eps=1e-3, seed=3),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_resume_is_bit_identical(name: str) -> None:
    run = train_mezo if name == "mezo" else train
    model = tiny_mlp()
    opt = FACTORIES[name](model.parameters())
    run(model, opt, range(0, 5))
    checkpoint = saved({"model": model.state_dict(), "opt": opt.state_dict()})

    run(model, opt, range(5, 9))  # uninterrupted

    resumed = tiny_mlp(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = FACTORIES[name](resumed.parameters())
    resumed_opt.load_state_dict(checkpoint["opt"])
    run(resumed, resumed_opt, range(5, 9))

    assert params_equal(model, resumed)
    assert resumed_opt.state_bytes() == opt.state_bytes()


def test_load_keeps_8bit_codes_uint8() -> None:
    """torch.optim.Optimizer.load_state_dict would cast the codes to the parameter's float
    dtype (4x the bytes, and no longer valid indices)."""
    model = tiny_mlp()
    opt = AdamW8bit(model.parameters(), block_size=64, min_8bit_size=100)
    train(model, opt, range(2))
    fresh = AdamW8bit(model.parameters(), block_size=64, min_8bit_size=100)
    fresh.load_state_dict(saved(opt.state_dict()))
    weight_state = fresh.state[model[0].weight]
    assert weight_state["exp_avg_code"].dtype == torch.uint8
    assert weight_state["exp_avg_sq_code"].dtype == torch.uint8
    assert fresh.state_bytes() == opt.state_bytes()


def test_load_keeps_fp32_moments_of_bf16_weight() -> None:
    """A bf16 weight's low-rank moments and projector stay fp32 through a checkpoint."""
    model = tiny_mlp().to(torch.bfloat16)
    opt = GaLoreAdamW(model.parameters(), rank=4)
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    model(x).sum().backward()
    opt.step()
    fresh = GaLoreAdamW(model.parameters(), rank=4)
    fresh.load_state_dict(saved(opt.state_dict()))
    state = fresh.state[model[0].weight]
    assert {state[k].dtype for k in ("exp_avg", "exp_avg_sq", "projector")} == {torch.float32}
    assert fresh.state[model[0].bias]["exp_avg"].dtype == torch.bfloat16  # AdamW: param dtype


def test_load_rejects_mismatched_groups() -> None:
    model = tiny_mlp()
    opt = SubspaceAdamW(model.parameters(), rank=4)
    train(model, opt, range(1))
    other = SubspaceAdamW([model[0].weight], rank=4)
    with pytest.raises(ValueError):
        other.load_state_dict(saved(opt.state_dict()))


def test_load_keeps_the_fp32_scales_of_a_one_element_bf16_parameter() -> None:
    """A 1-element parameter quantized in 8 bits (``min_8bit_size=0``) has one fp32 scale
    per moment, shaped (1,) like the parameter: the load casts only plain AdamW's moments
    to the parameter's dtype, so the scales stay fp32 (cast to bf16, the first step after
    the resume raised) and the resumed steps equal the uninterrupted ones."""
    param = torch.nn.Parameter(torch.tensor([0.5], dtype=torch.bfloat16))
    opt = AdamW8bit([param], lr=1e-2, block_size=16, min_8bit_size=0)

    def run(p: torch.Tensor, o: AdamW8bit, steps: range) -> None:
        for i in steps:
            p.grad = torch.full_like(p, 0.3 + 0.01 * i)
            o.step()

    run(param, opt, range(3))
    checkpoint = saved({"param": param.detach().clone(), "opt": opt.state_dict()})
    run(param, opt, range(3, 6))
    resumed = torch.nn.Parameter(checkpoint["param"])
    resumed_opt = AdamW8bit([resumed], lr=1e-2, block_size=16, min_8bit_size=0)
    resumed_opt.load_state_dict(checkpoint["opt"])
    assert resumed_opt.state[resumed]["exp_avg_scale"].dtype == torch.float32
    assert resumed_opt.state[resumed]["exp_avg_sq_scale"].dtype == torch.float32
    run(resumed, resumed_opt, range(3, 6))
    assert torch.equal(resumed, param)


OTHER_OPTIMIZERS = {
    "AdamW->AdamW8bit": (lambda p: torch.optim.AdamW(p, lr=1e-2), lambda p: AdamW8bit(p, block_size=64, min_8bit_size=100)),
    "AdamW->GaLoreAdamW": (lambda p: torch.optim.AdamW(p, lr=1e-2), lambda p: GaLoreAdamW(p, rank=4)),
    "GaLoreAdamW->SubspaceAdamW": (lambda p: GaLoreAdamW(p, rank=4), lambda p: SubspaceAdamW(p, rank=4)),
    "SubspaceAdamW->GaLoreAdamW": (lambda p: SubspaceAdamW(p, rank=4), lambda p: GaLoreAdamW(p, rank=4)),
}


@pytest.mark.parametrize("pair", sorted(OTHER_OPTIMIZERS))
def test_a_checkpoint_of_another_optimizer_is_refused_when_loaded(pair: str) -> None:
    """The state of a weight that this optimizer keeps otherwise (AdamW's moments where
    AdamW8bit keeps codes or GaLore a projector; GaLore's projector under Subspace) is
    refused by the load, naming the parameter, both layouts and the fix, and nothing is
    loaded. Before, the load took it and the first step raised ``KeyError: 'lowrank'``
    (``'min_8bit_size'``, ``'projector'``), or trained with the projector kept unused."""
    make_saver, make_loader = OTHER_OPTIMIZERS[pair]
    model = tiny_mlp()
    saver, opt = make_saver(model.parameters()), make_loader(model.parameters())
    train(model, saver, range(1))
    groups = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=r"load_state_dict: the state of parameter 0 \(shape \(24, 16\).*start \w+ fresh"):
        opt.load_state_dict(saved(saver.state_dict()))
    assert not opt.state and [dict(g) for g in opt.param_groups] == groups


def test_a_torch_adamw_checkpoint_resumes_the_parameters_that_get_plain_adamw() -> None:
    """Where memopt keeps AdamW's state (parameters below ``min_8bit_size``), a
    ``torch.optim.AdamW`` checkpoint loads (its tensor step counts become ints) and
    continues bit for bit as torch's AdamW."""
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    train(model, opt, range(3))
    checkpoint = saved({"model": model.state_dict(), "opt": opt.state_dict()})
    train(model, opt, range(3, 6))
    resumed = tiny_mlp(seed=1)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = AdamW8bit(resumed.parameters(), lr=1e-3, min_8bit_size=10**6)
    resumed_opt.load_state_dict(checkpoint["opt"])
    assert resumed_opt.param_groups[0]["lr"] == 1e-2 and resumed_opt.param_groups[0]["block_size"] == 256
    train(resumed, resumed_opt, range(3, 6))
    assert params_equal(model, resumed)


def test_a_checkpoint_older_than_an_option_loads_with_its_default() -> None:
    """A param group saved before an option existed (here GaLore's ``svd``) takes the
    option's default, as torch's optimizers fill theirs; before, the step raised
    ``KeyError: 'svd'``."""
    model = tiny_mlp()
    opt = GaLoreAdamW(model.parameters(), lr=1e-2, rank=4, update_proj_gap=2)
    train(model, opt, range(2))
    checkpoint = saved({"model": model.state_dict(), "opt": opt.state_dict()})
    for group in checkpoint["opt"]["param_groups"]:
        del group["svd"]
    train(model, opt, range(2, 5))
    resumed = tiny_mlp(seed=1)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = GaLoreAdamW(resumed.parameters(), rank=4)
    resumed_opt.load_state_dict(checkpoint["opt"])
    train(resumed, resumed_opt, range(2, 5))
    assert params_equal(model, resumed)
