"""SubspaceAdamW: rank-r updates in a random subspace that is regenerated, never stored;
resampled every update_proj_gap steps with the moments reset."""

from __future__ import annotations

import torch

from memopt.optim import SubspaceAdamW
from memopt.optim._projection import random_projector
from optim_testing import batch, loss_of, params_equal, tiny_mlp, train


def weight_deltas(opt: SubspaceAdamW, model: torch.nn.Module, steps: range) -> list[torch.Tensor]:
    deltas = []
    for step in steps:
        before = model[0].weight.detach().clone()
        loss_of(model, batch(step)).backward()
        opt.step()
        opt.zero_grad()
        deltas.append(model[0].weight.detach() - before)
    return deltas


def test_state_holds_no_projector() -> None:
    model = tiny_mlp()
    opt = SubspaceAdamW(model.parameters(), rank=4)
    train(model, opt, range(2))
    state = opt.state[model[0].weight]
    assert set(state) == {"step", "seed", "exp_avg", "exp_avg_sq"}
    assert isinstance(state["seed"], int) and isinstance(state["step"], int)
    assert tuple(state["exp_avg"].shape) == (24, 4)  # W1 24x16, "std": right side
    assert opt.state[model[0].weight]["seed"] != opt.state[model[2].weight]["seed"]


def test_updates_share_a_subspace_until_resample() -> None:
    """Weight decay 0: every update of W1 (left side, forced) lies in the span of the current
    projector, so two updates of one period have joint rank r, and an update after the
    resample leaves that span."""
    gap, r = 3, 4
    model = tiny_mlp()
    opt = SubspaceAdamW(model.parameters(), rank=r, update_proj_gap=gap, weight_decay=0.0, proj_type="left")
    deltas = weight_deltas(opt, model, range(1, gap + 2))
    rank = lambda *ds: torch.linalg.matrix_rank(torch.cat(ds, dim=1), atol=1e-6).item()
    assert rank(deltas[0]) == r
    assert rank(*deltas[:gap]) == r
    assert rank(deltas[gap - 1], deltas[gap]) == 2 * r


def test_moments_reset_at_resample() -> None:
    """Right after a reset m = (1 - b1) R and v = (1 - b2) R^2, so v = (1 - b2) / (1 - b1)^2 m^2
    whatever the projector; one step later that no longer holds."""
    gap, (b1, b2) = 3, (0.9, 0.999)
    model = tiny_mlp()
    opt = SubspaceAdamW(model.parameters(), rank=4, update_proj_gap=gap, betas=(b1, b2))
    state = opt.state
    fresh = lambda: torch.allclose(
        state[model[0].weight]["exp_avg_sq"],
        (1 - b2) / (1 - b1) ** 2 * state[model[0].weight]["exp_avg"] ** 2,
        rtol=1e-4, atol=1e-12,
    )  # fmt: skip
    results = []
    for step in range(1, 2 * gap + 2):
        train(model, opt, range(step, step + 1))
        results.append(fresh())
    assert results == [True, False, False, True, False, False, True]


def test_projector_is_orthonormal_and_a_function_of_seed_and_stream() -> None:
    a = random_projector(40, 5, seed=1, stream=2, device="cpu")
    torch.testing.assert_close(a.T @ a, torch.eye(5), atol=1e-5, rtol=0)
    assert torch.equal(a, random_projector(40, 5, seed=1, stream=2, device="cpu"))
    assert not torch.allclose(a, random_projector(40, 5, seed=1, stream=3, device="cpu"))
    assert not torch.allclose(a, random_projector(40, 5, seed=2, stream=2, device="cpu"))


def test_same_seed_same_training_other_seed_differs() -> None:
    runs = []
    for seed in (5, 5, 6):
        model = tiny_mlp()
        train(model, SubspaceAdamW(model.parameters(), rank=4, seed=seed), range(3))
        runs.append(model)
    assert params_equal(runs[0], runs[1])
    assert not params_equal(runs[0], runs[2])
