"""Fused low-rank Adam step (GaLore-style): moments in rank-r space, update in full rank.

Given a weight ``W`` (m x n), a projector ``P`` (m x r) and the projected gradient
``R = P^T G`` (r x n, one matmul done by the caller), one step does::

    M = beta1 * M + (1 - beta1) * R                   # r x n, in place
    V = beta2 * V + (1 - beta2) * R * R               # r x n, in place
    N = M / (sqrt(V) / sqrt(1 - beta2**t) + eps)      # r x n, never stored
    W = W * (1 - lr * wd) - lr * scale / (1 - beta1**t) * (P @ N)

The Triton kernel gives each program a strip of ``BLOCK_N`` columns: it updates the
strip's moments once, keeps ``N`` in registers, and walks down the rows in ``BLOCK_M``
tiles computing ``P_tile @ N`` with ``tl.dot`` over the rank, so the full-rank update
``P @ N`` is never written to memory. The PyTorch reference uses ``addmm_`` into ``W``
(no m x n temporary when ``W`` is fp32; a fp32 copy of ``W`` for other dtypes).

A right projection (``G Q`` with ``Q`` n x r) is the same step on transposed views:
``W^T``, ``Q``, ``R^T``, ``M^T``, ``V^T``; both paths honour strides, so no copy is made.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from memopt.codegen._triton import HAS_TRITON, device_guard, launchable, use_triton

__all__ = ["lowrank_adam_step"]

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _lowrank_adam_kernel(
        w_ptr, r_ptr, p_ptr, m_ptr, v_ptr,
        rows, cols, rank,
        stride_wm, stride_wn, stride_rr, stride_rn, stride_pm, stride_pr,
        stride_mr, stride_mn, stride_vr, stride_vn,
        beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
        bias_correction2_sqrt, decay,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        """One program: columns [pid * BLOCK_N, +BLOCK_N) of M, V and W."""
        # int64 offsets: a weight of 2**31+ elements (rows * stride) would wrap in int32.
        offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
        rn_mask = (offs_r[:, None] < rank) & (offs_n[None, :] < cols)
        r_ptrs = r_ptr + offs_r[:, None] * stride_rr + offs_n[None, :] * stride_rn
        m_ptrs = m_ptr + offs_r[:, None] * stride_mr + offs_n[None, :] * stride_mn
        v_ptrs = v_ptr + offs_r[:, None] * stride_vr + offs_n[None, :] * stride_vn
        grad = tl.load(r_ptrs, mask=rn_mask, other=0.0).to(tl.float32)
        exp_avg = tl.load(m_ptrs, mask=rn_mask, other=0.0)
        exp_avg_sq = tl.load(v_ptrs, mask=rn_mask, other=0.0)
        exp_avg = exp_avg * beta1 + one_minus_beta1 * grad
        exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
        tl.store(m_ptrs, exp_avg, mask=rn_mask)
        tl.store(v_ptrs, exp_avg_sq, mask=rn_mask)
        # Padded rank rows and columns hold zeros, so they add nothing to the dot below.
        denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bias_correction2_sqrt) + eps
        normalized = tl.div_rn(exp_avg, denom)
        for row_start in range(0, rows, BLOCK_M):
            offs_m = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
            p_mask = (offs_m[:, None] < rows) & (offs_r[None, :] < rank)
            p_ptrs = p_ptr + offs_m[:, None] * stride_pm + offs_r[None, :] * stride_pr
            proj = tl.load(p_ptrs, mask=p_mask, other=0.0).to(tl.float32)
            update = tl.dot(proj, normalized, input_precision="ieee")
            w_mask = (offs_m[:, None] < rows) & (offs_n[None, :] < cols)
            w_ptrs = w_ptr + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn
            weight = tl.load(w_ptrs, mask=w_mask, other=0.0).to(tl.float32)
            weight = weight * decay - step_size * update
            tl.store(w_ptrs, weight.to(w_ptr.dtype.element_ty), mask=w_mask)


def lowrank_adam_step(
    weight: torch.Tensor,
    lowrank_grad: torch.Tensor,
    projector: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step_size: float,
    bias_correction2_sqrt: float,
    decay: float = 1.0,
    kernel: str = "auto",
    tile: tuple[int, int] = (64, 64),
) -> None:
    """One fused low-rank Adam step, in place on ``weight``, ``exp_avg`` and ``exp_avg_sq``::

        M = beta1 * M + (1 - beta1) * R;   V = beta2 * V + (1 - beta2) * R * R
        W = W * decay - step_size * P @ (M / (sqrt(V) / bias_correction2_sqrt + eps))

    Shapes: ``weight`` (m, n), ``projector`` (m, r), ``lowrank_grad``, ``exp_avg`` and
    ``exp_avg_sq`` (r, n); the moments and the projector are fp32. For AdamW at step t
    with back-projection scale s: ``step_size = lr * s / (1 - beta1**t)``,
    ``bias_correction2_sqrt = sqrt(1 - beta2**t)``, ``decay = 1 - lr * weight_decay``.
    ``kernel``: "auto" (Triton for CUDA tensors), "triton" or "torch" (see
    `memopt.codegen._triton`). ``tile``: the Triton path's (BLOCK_M, BLOCK_N), powers of
    two >= 16.
    """
    _check_operands(weight, lowrank_grad, projector, exp_avg, exp_avg_sq)
    coefficients = dict(
        beta1=beta1, beta2=beta2, eps=eps, step_size=step_size,
        bias_correction2_sqrt=bias_correction2_sqrt, decay=decay,
    )  # fmt: skip
    if use_triton(kernel, weight):
        _triton_step(weight, lowrank_grad, projector, exp_avg, exp_avg_sq, coefficients, tile)
    else:
        _reference_step(weight, lowrank_grad, projector, exp_avg, exp_avg_sq, coefficients)


def _reference_step(
    weight: torch.Tensor,
    lowrank_grad: torch.Tensor,
    projector: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    c: Mapping[str, float],
) -> None:
    """The PyTorch reference (any device; used on CPU)."""
    grad = lowrank_grad.float()
    exp_avg.mul_(c["beta1"]).add_(grad, alpha=1.0 - c["beta1"])
    exp_avg_sq.mul_(c["beta2"]).addcmul_(grad, grad, value=1.0 - c["beta2"])
    normalized = exp_avg / (exp_avg_sq.sqrt() / c["bias_correction2_sqrt"] + c["eps"])
    if weight.dtype == torch.float32:
        weight.addmm_(projector, normalized, beta=c["decay"], alpha=-c["step_size"])
    else:
        updated = torch.addmm(weight.float(), projector, normalized, beta=c["decay"], alpha=-c["step_size"])
        weight.copy_(updated)


def _triton_step(
    weight: torch.Tensor,
    lowrank_grad: torch.Tensor,
    projector: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    c: Mapping[str, float],
    tile: tuple[int, int],
) -> None:
    """Launch the Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``) on
    ``weight``'s device; the rank is padded to a power of two of at least 16 for
    ``tl.dot``."""
    rows, cols = weight.shape
    rank = projector.shape[1]
    block_m, block_n = tile
    grid = (triton.cdiv(cols, block_n),)
    with device_guard(weight):
        launchable(_lowrank_adam_kernel)[grid](
            weight, lowrank_grad, projector, exp_avg, exp_avg_sq,
            rows, cols, rank,
            weight.stride(0), weight.stride(1), lowrank_grad.stride(0), lowrank_grad.stride(1),
            projector.stride(0), projector.stride(1), exp_avg.stride(0), exp_avg.stride(1),
            exp_avg_sq.stride(0), exp_avg_sq.stride(1),
            c["beta1"], 1.0 - c["beta1"], c["beta2"], 1.0 - c["beta2"], c["eps"],
            c["step_size"], c["bias_correction2_sqrt"], c["decay"],
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(rank)),
        )  # fmt: skip


def _check_operands(
    weight: torch.Tensor,
    lowrank_grad: torch.Tensor,
    projector: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
) -> None:
    """Raise ``ValueError`` naming the operand whose shape or dtype does not fit."""
    if weight.dim() != 2 or projector.dim() != 2:
        raise ValueError(
            f"lowrank_adam_step needs a 2-D weight and projector, got weight "
            f"{tuple(weight.shape)} and projector {tuple(projector.shape)}"
        )
    rows, cols = weight.shape
    rank = projector.shape[1]
    expected = {"projector": (rows, rank), "lowrank_grad": (rank, cols),
                "exp_avg": (rank, cols), "exp_avg_sq": (rank, cols)}  # fmt: skip
    given = {"projector": projector, "lowrank_grad": lowrank_grad,
             "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}  # fmt: skip
    for name, tensor in given.items():
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"lowrank_adam_step: {name} has shape {tuple(tensor.shape)}, expected "
                f"{expected[name]} for a {rows}x{cols} weight at rank {rank}"
            )
        if name != "lowrank_grad" and tensor.dtype != torch.float32:
            raise ValueError(f"lowrank_adam_step: {name} must be float32, got {tensor.dtype}")
