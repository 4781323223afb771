"""GaLoreAdamW: the update is the documented low-rank step in the gradient's top-r singular
subspace; the projector is refreshed every update_proj_gap steps; everything else is AdamW."""

from __future__ import annotations

import pytest
import torch

from memopt.optim import GaLoreAdamW
from memopt.optim._projection import svd_projector
from optim_testing import batch, clone_model, loss_of, tiny_mlp, train


def one_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int = 0) -> dict[str, torch.Tensor]:
    """Take a step; return each weight's gradient and its change."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_of(model, batch(seed)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    opt.zero_grad()
    return {n: (grads[n], p.detach() - before[n]) for n, p in model.named_parameters()}


def test_plain_groups_match_torch_adamw_bit_for_bit() -> None:
    model, ref_model = tiny_mlp(), tiny_mlp()
    opt = GaLoreAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, lowrank=False)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    train(model, opt, range(4))
    train(ref_model, ref, range(4))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))


# Which side each proj_type projects tiny_mlp's weights on: W1 24x16 (tall), W2 8x24 (wide).
SIDES = {
    "std": {"0.weight": "right", "2.weight": "left"},
    "min_state": {"0.weight": "left", "2.weight": "right"},
    "left": {"0.weight": "left", "2.weight": "left"},
    "right": {"0.weight": "right", "2.weight": "right"},
}


@pytest.mark.parametrize("proj_type", sorted(SIDES))
def test_first_step_is_sign_of_projected_gradient(proj_type: str) -> None:
    """At step 1 Adam's normalized update is R / (|R| + eps), about sign(R), so the weight
    moves by -lr * scale * U_r sign(U_r^T G) (left) or -lr * scale * sign(G V_r) V_r^T
    (right), with U_r / V_r the top-r singular vectors computed here. Sign flips of a
    singular vector cancel in this expression."""
    lr, scale, r = 1e-2, 0.5, 4
    model = tiny_mlp()
    opt = GaLoreAdamW(model.parameters(), lr=lr, scale=scale, rank=r, weight_decay=0.0, proj_type=proj_type)
    changes = one_step(model, opt)
    for name in ("0.weight", "2.weight"):
        grad, delta = changes[name]
        u, _, vh = torch.linalg.svd(grad)
        if SIDES[proj_type][name] == "left":
            expected = -lr * scale * u[:, :r] @ torch.sign(u[:, :r].T @ grad)
        else:
            expected = -lr * scale * torch.sign(grad @ vh[:r].T) @ vh[:r]
        torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-4)


def test_update_has_rank_r_and_decay_is_decoupled() -> None:
    lr, wd, r = 1e-2, 0.5, 4
    model = tiny_mlp()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = GaLoreAdamW(model.parameters(), lr=lr, weight_decay=wd, rank=r)
    changes = one_step(model, opt)
    for name in ("0.weight", "2.weight"):
        lowrank_part = changes[name][1] + lr * wd * weights[name]
        assert torch.linalg.matrix_rank(lowrank_part, atol=1e-6).item() == r
        assert torch.linalg.matrix_rank(changes[name][1], atol=1e-6).item() > r


def test_projector_refreshes_every_gap_steps() -> None:
    gap = 3
    model = tiny_mlp()
    opt = GaLoreAdamW(model.parameters(), rank=4, update_proj_gap=gap, proj_type="left")
    weight = model[0].weight  # 24x16: left projector 24x4
    projectors, grads = [], []
    for step in range(1, 2 * gap + 2):
        loss_of(model, batch(step)).backward()
        grads.append(weight.grad.clone())
        opt.step()
        opt.zero_grad()
        projectors.append(opt.state[weight]["projector"].clone())
    for i, projector in enumerate(projectors):  # step i + 1
        refreshed_at = (i // gap) * gap
        u = torch.linalg.svd(grads[refreshed_at])[0][:, :4]
        overlap = projector.T @ u  # +-1 on the diagonal when the spans agree
        torch.testing.assert_close(overlap.abs(), torch.eye(4), atol=1e-4, rtol=0)
    assert not torch.allclose(projectors[gap - 1], projectors[gap])


def test_randomized_svd_finds_a_clear_top_subspace() -> None:
    torch.manual_seed(0)
    signal = torch.randn(60, 3) @ torch.randn(3, 40) * 10
    grad = signal + 0.01 * torch.randn(60, 40)
    for side, dim in (("left", 60), ("right", 40)):
        full = svd_projector(grad, 3, side, method="full", seed=0, stream=0)
        fast = svd_projector(grad, 3, side, method="randomized", seed=5, stream=1)
        assert fast.shape == (dim, 3)
        cosines = torch.linalg.svdvals(full.T @ fast)  # cosines of the principal angles
        assert cosines.min() > 0.9999


def test_gradient_accumulation_equals_the_full_batch() -> None:
    """The optimizer consumes p.grad: two half batches with loss / 2 each give the
    full-batch step."""
    data = batch(0, size=32)
    halves = [(data[0][:16], data[1][:16]), (data[0][16:], data[1][16:])]
    model = tiny_mlp()
    accumulated = clone_model(model)
    opt = GaLoreAdamW(model.parameters(), rank=4)
    opt_acc = GaLoreAdamW(accumulated.parameters(), rank=4)
    loss_of(model, data).backward()
    opt.step()
    for half in halves:
        (loss_of(accumulated, half) / 2).backward()
    opt_acc.step()
    for a, b in zip(model.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_sparse_gradient_is_refused() -> None:
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    opt = GaLoreAdamW(embedding.parameters(), rank=2)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
