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

import logging
from collections.abc import Mapping

import torch

from memopt.codegen._triton import FP_FUSION, HAS_TRITON, device_guard, launchable, use_triton

__all__ = ["lowrank_adam_step", "launched_config"]

log = logging.getLogger("memopt.optim")

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
    step_size: float | torch.Tensor,
    bias_correction2_sqrt: float | torch.Tensor,
    decay: float | torch.Tensor = 1.0,
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
    two >= 16; smaller tiles are tried when it does not fit the GPU (`_triton_step`),
    and with ``kernel="auto"`` the reference runs where none fits (said once per
    shape on the ``memopt.optim`` logger), with ``kernel="triton"`` that is a
    ``RuntimeError``.
    """
    _check_operands(weight, lowrank_grad, projector, exp_avg, exp_avg_sq)
    coefficients = dict(
        beta1=beta1, beta2=beta2, eps=eps, step_size=step_size,
        bias_correction2_sqrt=bias_correction2_sqrt, decay=decay,
    )  # fmt: skip
    if use_triton(kernel, weight):
        if _triton_step(weight, lowrank_grad, projector, exp_avg, exp_avg_sq, coefficients, tile):
            return
        if kernel == "triton":
            raise RuntimeError(
                f"lowrank_adam_step: the Triton kernel does not fit this GPU's shared memory at rank "
                f"{projector.shape[1]}, even with a {_MIN_TILE}x{_MIN_TILE} tile and one stage; use "
                "kernel='auto' (the PyTorch reference where it does not fit) or kernel='torch'"
            )
    _reference_step(weight, lowrank_grad, projector, exp_avg, exp_avg_sq, coefficients)


def _reference_step(
    weight: torch.Tensor,
    lowrank_grad: torch.Tensor,
    projector: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    c: Mapping[str, float | torch.Tensor],
) -> None:
    """The PyTorch reference (any device; used on CPU). ``c``'s ``step_size`` and ``decay``
    may be 0-dim tensors (a compiled step: `memopt.optim._adamw.adam_coefficients`)."""
    grad = lowrank_grad.float()
    exp_avg.mul_(c["beta1"]).add_(grad, alpha=1.0 - c["beta1"])
    exp_avg_sq.mul_(c["beta2"]).addcmul_(grad, grad, value=1.0 - c["beta2"])
    normalized = exp_avg / (exp_avg_sq.sqrt() / c["bias_correction2_sqrt"] + c["eps"])
    if isinstance(c["step_size"], torch.Tensor):  # addmm's alpha and beta must be numbers
        weight.copy_(weight.float() * c["decay"] - (projector @ normalized) * c["step_size"])
    elif weight.dtype == torch.float32:
        weight.addmm_(projector, normalized, beta=c["decay"], alpha=-c["step_size"])
    else:
        updated = torch.addmm(weight.float(), projector, normalized, beta=c["decay"], alpha=-c["step_size"])
        weight.copy_(updated)


_LAUNCHES: dict[tuple[object, ...], tuple[int, int, int | None] | None] = {}
"""``(BLOCK_M, BLOCK_N, num_stages)`` that launched, per device, padded rank, weight
dtype and requested tile (``num_stages`` None: Triton's default); None where none
fits."""

_MIN_TILE = 16


def launched_config(device: torch.device, rank: int, dtype: torch.dtype,
                    tile: tuple[int, int] = (64, 64)) -> tuple[int, int, int | None] | None:
    """``(BLOCK_M, BLOCK_N, num_stages)`` the Triton kernel launched with for weights of
    ``dtype`` on ``device`` at ``rank`` when ``tile`` was asked for (`_triton_step`);
    None when it has not launched there (or nothing fits)."""
    if HAS_TRITON:
        return _LAUNCHES.get((torch.device(device), max(16, triton.next_power_of_2(rank)), dtype, tuple(tile)))
    return None


def _attempts(tile: tuple[int, int]) -> list[tuple[int, int, int | None]]:
    """The launch configurations to try, in order: ``tile``, halved down to 16 x 16,
    then 16 x 16 without software pipelining (one stage: no tile staged ahead)."""
    block_m, block_n = tile
    tried = [(block_m, block_n, None)]
    while block_m > _MIN_TILE or block_n > _MIN_TILE:
        block_m, block_n = max(_MIN_TILE, block_m // 2), max(_MIN_TILE, block_n // 2)
        tried.append((block_m, block_n, None))
    return [*tried, (block_m, block_n, 1)]


def _triton_step(
    weight: torch.Tensor,
    lowrank_grad: torch.Tensor,
    projector: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    c: Mapping[str, float],
    tile: tuple[int, int],
) -> bool:
    """Launch the Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``) on
    ``weight``'s device; the rank is padded to a power of two of at least 16 for
    ``tl.dot``. Returns False, having written nothing, when no configuration fits.

    Each program stages ``BLOCK_M x BLOCK_R`` projector tiles (one per pipeline stage)
    and the ``BLOCK_R x BLOCK_N`` normalized moments in shared memory, so a large rank
    can need more than the GPU has (GaLore's ranks reach 512-1024). Triton refuses such
    a kernel when it loads it, before anything is written (``OutOfResources``); the
    next configuration of `_attempts` is then tried, and the one that launched is kept
    for later steps. Every element's update is the same dot over the rank whatever
    the tile."""
    from triton.runtime.errors import OutOfResources

    operands = (weight, lowrank_grad, projector, exp_avg, exp_avg_sq)
    block_r = max(16, triton.next_power_of_2(projector.shape[1]))
    key = (weight.device, block_r, weight.dtype, tuple(tile))
    if key in _LAUNCHES:
        known = _LAUNCHES[key]
        if known is None:
            return False
        _launch(operands, c, (*known[:2], block_r), known[2])
        return True
    for block_m, block_n, stages in _attempts(tile):
        try:
            _launch(operands, c, (block_m, block_n, block_r), stages)
        except OutOfResources:
            continue
        _LAUNCHES[key] = (block_m, block_n, stages)
        return True
    _LAUNCHES[key] = None
    log.warning("lowrank_adam_step: the Triton kernel does not fit this GPU's shared memory at rank %d, even "
                "with a %dx%d tile and one stage; the PyTorch reference runs instead", projector.shape[1],
                _MIN_TILE, _MIN_TILE)
    return False


_WIDE_TILE = 4096
"""Elements of a ``BLOCK_R x BLOCK_N`` tile above which a launch uses 8 warps and asks
for up to 255 registers per thread (`launch_options`)."""


def launch_options(block_r: int, block_n: int) -> dict[str, int]:
    """``num_warps`` and ``maxnreg`` for a launch whose rank-by-columns tile is
    ``block_r x block_n``.

    Each thread holds its share of four fp32 tiles of that size while it updates the
    moments (gradient, both moments, the normalized update kept for the row loop). Up to
    `_WIDE_TILE` elements (32 per thread per tile at 4 warps: ranks up to 64 with the
    default 64-column strip) Triton's defaults stand: 4 warps, and ptxas chooses the
    registers (110-172 at ranks 16-64 for sm_90, no spills). Above it, left to itself,
    ptxas 13.4 (Triton 3.9) gives the kernel 32 registers, the most that lets 64 warps
    share an SM, and spills 7-24 KiB per thread to local memory; ptxas 12.9 (Triton 3.6)
    does the same for some launches. Those tiles are large enough in shared memory
    (104-208 KiB for ranks 128-512) that an sm_90 SM runs at most 8 of their warps at
    once anyway, so the kernel takes 8 warps and ``maxnreg=255`` (one block of 8 warps
    is an SM's whole register file): the same 8 warps per SM or more, and at most
    3.7 KiB of spills (tests/codegen/test_kernels_compile_for_gpu.py compiles them and
    checks; docs/optimizers.md has the figures per rank)."""
    if block_r * block_n <= _WIDE_TILE:
        return {}
    return {"num_warps": 8, "maxnreg": 255}


def _launch(operands: tuple[torch.Tensor, ...], c: Mapping[str, float], blocks: tuple[int, int, int],
            stages: int | None) -> None:
    """One launch of `_lowrank_adam_kernel` on ``operands`` (weight, low-rank gradient,
    projector, moments) with ``blocks`` = (BLOCK_M, BLOCK_N, BLOCK_R)."""
    weight, lowrank_grad, projector, exp_avg, exp_avg_sq = operands
    rows, cols = weight.shape
    block_m, block_n, block_r = blocks
    grid = (triton.cdiv(cols, block_n),)
    options = launch_options(block_r, block_n) | ({} if stages is None else {"num_stages": stages})
    with device_guard(weight):
        launchable(_lowrank_adam_kernel)[grid](
            weight, lowrank_grad, projector, exp_avg, exp_avg_sq,
            rows, cols, projector.shape[1],
            weight.stride(0), weight.stride(1), lowrank_grad.stride(0), lowrank_grad.stride(1),
            projector.stride(0), projector.stride(1), exp_avg.stride(0), exp_avg.stride(1),
            exp_avg_sq.stride(0), exp_avg_sq.stride(1),
            c["beta1"], 1.0 - c["beta1"], c["beta2"], 1.0 - c["beta2"], c["eps"],
            c["step_size"], c["bias_correction2_sqrt"], c["decay"],
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, enable_fp_fusion=FP_FUSION["lowrank_adam"], **options,
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
