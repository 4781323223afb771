"""The torch.optim contract where memopt's optimizers broke it: checkpoints loaded onto
parameters of another dtype, AdamW options that a param group sets but the optimizer
would ignore, non-finite hyper-parameters, a rank that leaves no weight low-rank,
channels_last weights under AdamW8bit, parameters moved after the optimizer was built,
load_state_dict hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memopt.optim import AdamW8bit, GaLoreAdamW, MeZO, SubspaceAdamW
from optim_testing import batch, saved, tiny_mlp, train

ADAM_FAMILY = {
    "galore": lambda p: GaLoreAdamW(p, lr=1e-2, rank=4),
    "subspace": lambda p: SubspaceAdamW(p, lr=1e-2, rank=4),
    "adamw8bit": lambda p: AdamW8bit(p, lr=1e-2, block_size=64, min_8bit_size=300),
}


@pytest.mark.parametrize("name", sorted(ADAM_FAMILY))
def test_fp32_checkpoint_loads_onto_bf16_model(name: str) -> None:
    """Resuming an fp32 run in bf16 (a common recipe): the state that AdamW keeps shaped
    like the parameter (plain-AdamW biases and small weights) follows the parameter's
    dtype exactly as torch.optim.AdamW's load casts it; the 8-bit codes and the fp32
    low-rank moments keep theirs; and the next step runs (it raised in lerp_ before)."""
    make = ADAM_FAMILY[name]
    model = tiny_mlp()
    opt = make(model.parameters())
    train(model, opt, range(2))
    checkpoint = saved(opt.state_dict())

    bf16 = tiny_mlp().to(torch.bfloat16)
    resumed = make(bf16.parameters())
    resumed.load_state_dict(checkpoint)
    bias = bf16[0].bias
    # torch's AdamW on the same parameter casts its fp32 moments to bf16 when loading.
    expected = checkpoint["state"][1]["exp_avg"].to(torch.bfloat16)
    assert resumed.state[bias]["exp_avg"].dtype == torch.bfloat16
    assert torch.equal(resumed.state[bias]["exp_avg"], expected)
    weight_state = resumed.state[bf16[0].weight]
    kept = {k: v.dtype for k, v in weight_state.items() if isinstance(v, torch.Tensor)}
    assert kept == {k: v.dtype for k, v in checkpoint["state"][0].items() if isinstance(v, torch.Tensor)}

    x, y = batch(9)
    F.cross_entropy(bf16(x.to(torch.bfloat16)).float(), y).backward()
    resumed.step()
    assert all(torch.isfinite(p).all() for p in bf16.parameters())

@pytest.mark.parametrize("name", sorted(ADAM_FAMILY))
@pytest.mark.parametrize("flag", ["amsgrad", "maximize"])
def test_adamw_flags_they_would_ignore_are_refused(name: str, flag: str) -> None:
    """torch.optim.AdamW's amsgrad/maximize change the update; a param group (ported from
    an AdamW config) that sets them must not be silently trained without them."""
    model = tiny_mlp()
    with pytest.raises(ValueError, match=f"{flag}=True.*not supported"):
        ADAM_FAMILY[name]([{"params": model.parameters(), flag: True}])
    opt = ADAM_FAMILY[name]([{"params": model[0].parameters(), flag: False}])  # the default: fine
    with pytest.raises(ValueError, match=f"{flag}=True"):
        opt.add_param_group({"params": model[2].parameters(), flag: True})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: GaLoreAdamW(p, lr=float("inf"), rank=4), "lr=inf"),
        (lambda p: AdamW8bit(p, eps=float("inf")), "eps=inf"),
        (lambda p: SubspaceAdamW(p, rank=4, scale=float("inf")), "scale=inf"),
        (lambda p: SubspaceAdamW(p, rank=4, weight_decay=float("inf")), "weight_decay=inf"),
        (lambda p: MeZO(p, eps=float("inf")), "eps=inf"),
        (lambda p: MeZO(p, lr=float("inf")), "lr=inf"),
    ],
    ids=["galore_lr", "8bit_eps", "subspace_scale", "subspace_wd", "mezo_eps", "mezo_lr"],
)
def test_non_finite_options_are_refused(make, message: str) -> None:  # type: ignore[no-untyped-def]
    """An infinite lr or eps turns the first step into NaN or a no-op, silently."""
    with pytest.raises(ValueError, match=f"{message}.*expected"):
        make(tiny_mlp().parameters())

@pytest.mark.parametrize("cls", [GaLoreAdamW, SubspaceAdamW], ids=lambda c: c.__name__)
def test_rank_not_below_any_matrix_is_refused(cls: type) -> None:
    """tiny_mlp's weights are 24x16 and 8x24 (min dims 16 and 8): rank 16 leaves both at
    plain AdamW, so the optimizer would silently keep AdamW's full state. Refused at the
    first step (not at construction: ShardedOptimizer builds it on shards and refuses
    those with its own reason first), before any parameter changes: whatever the order
    of the parameters (biases first) and of the groups."""
    model = tiny_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = cls(model.parameters(), rank=16)
    with pytest.raises(ValueError, match=r"rank=16.*min\(m, n\).*16.*lowrank=False"):
        train(model, opt, range(1))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    biases_first = [model[0].bias, model[2].bias, model[0].weight, model[2].weight]
    with pytest.raises(ValueError, match="rank=16"):  # the biases stepped before the refusal
        train(model, cls(biases_first, rank=16), range(1))
    opt = cls([model[0].weight], rank=8)  # 24x16 gets rank 8: fine
    opt.add_param_group({"params": [model[2].weight]})  # 8x24 alone: none low-rank
    with pytest.raises(ValueError, match="rank=8"):  # the first group stepped before the refusal
        train(model, opt, range(1))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for fine in (
        cls([{"params": [model[0].weight, model[2].weight]}], rank=8),  # one of two
        cls([{"params": [model[2].weight], "lowrank": False}], rank=8),  # asked for AdamW
        cls([model[0].bias, model[2].bias], rank=8),  # no matrix at all
    ):
        train(model, fine, range(1))

def test_adamw8bit_steps_channels_last_conv_like_contiguous() -> None:
    """A channels_last conv weight (not contiguous) gets the same update as the same
    weight in the default layout from the same gradient (it raised "must be contiguous"
    before)."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(32, 16, 3, 3))
    last = torch.nn.Parameter(weight.detach().clone().to(memory_format=torch.channels_last))
    assert not last.is_contiguous()
    opt = AdamW8bit([weight], lr=1e-2, block_size=64)
    opt_last = AdamW8bit([last], lr=1e-2, block_size=64)
    for i in range(3):
        grad = torch.randn(weight.shape, generator=torch.Generator().manual_seed(i))
        weight.grad = grad
        last.grad = grad.to(memory_format=torch.channels_last)  # autograd's layout for it
        opt.step()
        opt_last.step()
    assert torch.equal(weight, last)
    assert not last.is_contiguous()  # the layout is kept
    for key in ("exp_avg_code", "exp_avg_scale", "exp_avg_sq_code", "exp_avg_sq_scale"):
        assert torch.equal(opt.state[weight][key], opt_last.state[last][key])


def test_adamw8bit_parameter_moved_after_construction() -> None:
    """Parameters can change device in place after the optimizer is built (module.to()
    swaps tensors when torch.__future__.set_swap_module_params_on_conversion is on; here
    meta -> cpu); the step found no code tables for the new device (KeyError) before."""
    with torch.device("meta"):
        layer = torch.nn.Linear(64, 64)
    opt = AdamW8bit(layer.parameters(), min_8bit_size=1024)
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        layer.to_empty(device="cpu")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    assert opt.param_groups[0]["params"][0] is layer.weight and layer.weight.device.type == "cpu"
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    loss_of_layer = layer(torch.randn(4, 64)).square().sum()
    loss_of_layer.backward()
    opt.step()
    assert opt.state[layer.weight]["exp_avg_code"].dtype == torch.uint8


def test_load_state_dict_hooks_see_the_state() -> None:
    """torch's load hooks: a pre-hook gets the whole dict (and may return a replacement),
    a post-hook runs with the state loaded. Both saw an empty state before (the state was
    loaded after torch's load, hooks included, had returned)."""
    model = tiny_mlp()
    opt = GaLoreAdamW(model.parameters(), lr=1e-2, rank=4)
    train(model, opt, range(2))
    checkpoint = saved(opt.state_dict())
    fresh = GaLoreAdamW(model.parameters(), lr=1e-2, rank=4)
    seen: dict[str, int] = {}

    def pre_hook(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
        seen["pre"] = len(state_dict["state"])
        state = {pid: {**s, "step": 100} for pid, s in state_dict["state"].items()}  # e.g. a migration
        return {**state_dict, "state": state}

    fresh.register_load_state_dict_pre_hook(pre_hook)
    fresh.register_load_state_dict_post_hook(lambda optimizer: seen.update(post=len(optimizer.state)))
    fresh.load_state_dict(checkpoint)
    assert seen == {"pre": 4, "post": 4}
    assert {s["step"] for s in fresh.state.values()} == {100}
