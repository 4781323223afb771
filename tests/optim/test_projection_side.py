"""Which side each proj_type projects on, for tall, wide and square weights, in both low-rank
optimizers.

Rule (GaLore's reference `GaLoreProjector`): "std" projects a weight m x n on the right
when m >= n (moments m x r, projector n x r), on the left otherwise (moments r x n,
projector m x r). "min_state" is the opposite rule (GaLore's "reverse_std"): the side with
the least state. "left" and "right" force a side. The expected shapes below are written out
by hand from that rule, at rank 4.
"""

from __future__ import annotations

import pytest
import torch

from memopt.optim import GaLoreAdamW, SubspaceAdamW

SHAPES = {"tall": (24, 16), "wide": (8, 24), "square": (12, 12)}

SIDES = {
    "std": {"tall": "right", "wide": "left", "square": "right"},
    "min_state": {"tall": "left", "wide": "right", "square": "left"},
    "left": {"tall": "left", "wide": "left", "square": "left"},
    "right": {"tall": "right", "wide": "right", "square": "right"},
}
# proj_type -> weight -> shape of exp_avg / exp_avg_sq (rank 4).
MOMENTS = {
    "std": {"tall": (24, 4), "wide": (4, 24), "square": (12, 4)},
    "min_state": {"tall": (4, 16), "wide": (8, 4), "square": (4, 12)},
    "left": {"tall": (4, 16), "wide": (4, 24), "square": (4, 12)},
    "right": {"tall": (24, 4), "wide": (8, 4), "square": (12, 4)},
}
# proj_type -> weight -> shape of GaLore's stored projector (rank 4).
PROJECTORS = {
    "std": {"tall": (16, 4), "wide": (8, 4), "square": (12, 4)},
    "min_state": {"tall": (24, 4), "wide": (24, 4), "square": (12, 4)},
    "left": {"tall": (24, 4), "wide": (8, 4), "square": (12, 4)},
    "right": {"tall": (16, 4), "wide": (24, 4), "square": (12, 4)},
}


def stepped(cls: type, proj_type: str) -> tuple[torch.optim.Optimizer, dict[str, torch.Tensor], dict]:
    """One step on three weights with fixed random gradients; returns the optimizer, the
    weights and each weight's (gradient, change)."""
    generator = torch.Generator().manual_seed(0)
    weights = {k: torch.nn.Parameter(torch.randn(s, generator=generator)) for k, s in SHAPES.items()}
    opt = cls(weights.values(), lr=1e-2, rank=4, weight_decay=0.0, proj_type=proj_type)
    before = {k: w.detach().clone() for k, w in weights.items()}
    for w in weights.values():
        w.grad = torch.randn(w.shape, generator=generator)
    opt.step()
    return opt, weights, {k: (w.grad, w.detach() - before[k]) for k, w in weights.items()}


@pytest.mark.parametrize("cls", [GaLoreAdamW, SubspaceAdamW], ids=lambda c: c.__name__)
@pytest.mark.parametrize("proj_type", sorted(SIDES))
def test_moment_shapes_follow_the_side_rule(cls: type, proj_type: str) -> None:
    opt, weights, changes = stepped(cls, proj_type)
    for kind, weight in weights.items():
        state = opt.state[weight]
        assert tuple(state["exp_avg"].shape) == MOMENTS[proj_type][kind], kind
        assert tuple(state["exp_avg_sq"].shape) == MOMENTS[proj_type][kind], kind
        if cls is GaLoreAdamW:
            assert tuple(state["projector"].shape) == PROJECTORS[proj_type][kind], kind
        assert torch.linalg.matrix_rank(changes[kind][1], atol=1e-6).item() == 4, kind


@pytest.mark.parametrize("proj_type", sorted(SIDES))
def test_galore_update_lies_in_the_gradient_subspace_of_its_side(proj_type: str) -> None:
    """GaLore, weight decay 0: a left update lies in the span of the gradient's top-4 left
    singular vectors (U_r U_r^T D = D), a right update in that of its right ones
    (D V_r V_r^T = D); on a square weight only the chosen side holds."""
    _, _, changes = stepped(GaLoreAdamW, proj_type)
    for kind, (grad, delta) in changes.items():
        u, _, vh = torch.linalg.svd(grad)
        left = SIDES[proj_type][kind] == "left"
        in_left = torch.allclose(u[:, :4] @ (u[:, :4].T @ delta), delta, atol=1e-6)
        in_right = torch.allclose((delta @ vh[:4].T) @ vh[:4], delta, atol=1e-6)
        assert (in_left, in_right) == (left, not left), kind
