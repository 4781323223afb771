"""Projectors for low-rank optimizer updates: which side to project, SVD-based projectors
(GaLore), seeded random orthonormal projectors (subspace methods), and the projections.

For a weight ``W`` of shape (m, n) and rank r:

* ``"left"``: projector ``P`` (m, r) with orthonormal columns; low-rank gradient
  ``P^T G`` (r, n); update ``P @ N``.
* ``"right"``: projector ``Q`` (n, r); low-rank gradient ``G Q`` (m, r); update ``N Q^T``.
* ``"std"``: GaLore's reference rule (``GaLoreProjector``, ``proj_type="std"``): right when
  m >= n, left otherwise. The projection compresses the smaller dimension and the moments
  keep the larger one (m x r for a tall weight, r x n for a wide one).
* ``"min_state"``: the opposite side, the one that keeps the least state: left when
  m >= n (moments r x n plus an m x r projector: ``2 r n + m r`` floats against
  ``2 m r + n r``), right otherwise. GaLore's reference code calls this rule
  ``"reverse_std"``.

For a full SVD both sides approximate ``G`` by the same best rank-r matrix at a refresh;
they differ in which coordinates Adam's per-element normalization sees and in how the
subspace ages between refreshes.

A right projection is a left projection of ``W^T``: `left_form` returns the transposed
views, so one kernel serves both.
"""

from __future__ import annotations

import torch

from memopt.optim._rng import gaussian

__all__ = [
    "PROJ_TYPES",
    "SVD_METHODS",
    "projection_side",
    "svd_projector",
    "random_projector",
    "project",
    "left_form",
]

PROJ_TYPES: tuple[str, ...] = ("std", "min_state", "left", "right")
SVD_METHODS: tuple[str, ...] = ("full", "randomized")


def projection_side(shape: torch.Size | tuple[int, ...], proj_type: str) -> str:
    """``"left"`` or ``"right"`` for a weight of ``shape`` (see the module docstring)."""
    tall = shape[0] >= shape[1]
    if proj_type == "std":
        return "right" if tall else "left"
    if proj_type == "min_state":
        return "left" if tall else "right"
    return proj_type


def svd_projector(
    grad: torch.Tensor, rank: int, side: str, *, method: str, seed: int, stream: int
) -> torch.Tensor:
    """The top-``rank`` singular vectors of ``grad`` on ``side``, fp32 (k, rank).

    ``method="full"``: ``torch.linalg.svd`` (cost O(m n min(m, n))). ``"randomized"``: a
    randomized range finder with two power iterations and ``rank + 8`` probe vectors drawn
    from ``gaussian(seed, stream)`` (cost O(m n rank); deterministic, unlike
    ``torch.svd_lowrank``, which draws from the global generator).
    """
    matrix = grad.float() if side == "left" else grad.float().T
    if method == "full":
        left_vectors = torch.linalg.svd(matrix, full_matrices=False)[0]
        return left_vectors[:, :rank].contiguous()
    probes = min(rank + 8, min(matrix.shape))
    basis = _orthonormal(matrix @ gaussian((matrix.shape[1], probes), seed, stream, matrix.device))
    for _ in range(2):
        basis = _orthonormal(matrix @ _orthonormal(matrix.T @ basis))
    small_left = torch.linalg.svd(basis.T @ matrix, full_matrices=False)[0]
    return (basis @ small_left[:, :rank]).contiguous()


def random_projector(
    dim: int, rank: int, *, seed: int, stream: int, device: torch.device | str
) -> torch.Tensor:
    """A (dim, rank) fp32 matrix with orthonormal columns, a pure function of
    ``(seed, stream)``: Gaussian entries orthonormalized by QR."""
    return _orthonormal(gaussian((dim, rank), seed, stream, device))


def project(grad: torch.Tensor, projector: torch.Tensor, side: str) -> torch.Tensor:
    """The low-rank gradient: ``P^T G`` (r, n) on the left, ``G Q`` (m, r) on the right."""
    if side == "left":
        return projector.T @ grad.float()
    return grad.float() @ projector


def left_form(side: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` (weight, low-rank gradient, moments) as the left-projection kernel sees
    them: unchanged on the left, transposed views on the right."""
    if side == "left":
        return tensors
    return tuple(t.T for t in tensors)


def _orthonormal(matrix: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of ``matrix``'s columns by reduced QR, with signs fixed so that R
    has a positive diagonal (the unique QR): the same basis on every device."""
    q, r = torch.linalg.qr(matrix)
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
    return q * signs
