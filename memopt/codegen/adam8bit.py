"""8-bit AdamW step: blockwise-quantized moments, dequantized and requantized in registers.

State layout for a parameter of ``numel`` elements and block size ``B`` (a power of two):

* ``exp_avg_code``, ``exp_avg_sq_code``: ``uint8`` of shape ``(numel,)``, indices into a
  256-entry code (`CodeTables`);
* ``exp_avg_scale``, ``exp_avg_sq_scale``: ``float32`` of shape ``(ceil(numel / B),)``,
  the absolute maximum of each block.

The codes are Dettmers et al.'s *dynamic tree* code (8-bit Optimizers via Block-wise
Quantization, 2022): one decade per exponent step from 1e-6 to 1, more fraction levels in
higher decades. The first moment uses the signed code (values in [-1, 1]); the second
moment, never negative, the unsigned code (values in [1e-7, 1]: twice the levels per
decade, and no 0). Without 0 (Li et al., Memory Efficient Optimizers with 4-bit States,
2023: the *zero-point problem*), a second moment below about 2e-7 of its block's maximum
is stored as `SECOND_MOMENT_FLOOR` times that maximum, not as 0: with 0, such an element
whose first moment kept a nonzero code stepped by ``step_size * m / eps``, thousands of
times AdamW's step, as soon as its gradient was 0 (an embedding row absent from a batch).
A value ``x`` in a block with absmax ``a`` is stored as the index of the code value nearest
to ``x / a`` (ties go to the lower index), found by an 8-level binary search over the 255
midpoints between code values (``torch.bucketize`` in the reference).

One step per block: dequantize both moments, update them with the gradient, update the
parameter (AdamW, decoupled weight decay) with the *unquantized* new moments, then store
the new absmax and requantize. The Triton kernel does all of it in registers, one program
per block; the reference does the same with PyTorch ops in the same order of rounding, so
under the interpreter (IEEE fp32 like PyTorch on CPU) the codes match exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F

from memopt.codegen._chunks import spans
from memopt.codegen._triton import FP_FUSION, HAS_TRITON, device_guard, launchable, use_triton

__all__ = [
    "CodeTables",
    "SIGNED_ZERO_CODE",
    "SECOND_MOMENT_FLOOR",
    "code_tables",
    "dynamic_code",
    "quantize_blockwise",
    "dequantize_blockwise",
    "adam8bit_step",
    "block_moments",
    "requantize",
    "slice_state",
    "State8bit",
]


State8bit = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""``(exp_avg_code, exp_avg_scale, exp_avg_sq_code, exp_avg_sq_scale)``."""

SIGNED_ZERO_CODE: int = 127
"""Index of 0.0 in the signed code (127 negative values come before it)."""

SECOND_MOMENT_FLOOR: float = 1e-7
"""Entry 0 of the unsigned (second-moment) code, in place of 0.0: the lower edge of the
code's lowest decade, so the smallest second moment a block stores is this fraction of
the block's maximum (an all-zero block still stores zeros: its maximum is 0)."""


class CodeTables(NamedTuple):
    """The two 256-entry codes and the 255 midpoints between consecutive entries."""

    signed: torch.Tensor
    signed_mid: torch.Tensor
    unsigned: torch.Tensor
    unsigned_mid: torch.Tensor


def dynamic_code(signed: bool) -> torch.Tensor:
    """The 256 sorted fp32 values of the dynamic tree code.

    Decade ``d`` (``10**(d-6)`` to ``10**(d-5)``, d = 0..6) holds ``2**d`` values (signed,
    mirrored for negative numbers) or ``2**(d+1)`` values (unsigned): the midpoints of an
    even split of [0.1, 1] scaled by ``10**(d-6)``. Plus 1, and 0 (signed) or
    `SECOND_MOMENT_FLOOR` (unsigned: a second moment is never stored as 0, see the module
    docstring): 256 values.
    """
    values = [0.0 if signed else SECOND_MOMENT_FLOOR, 1.0]
    for decade in range(7):
        count = 2**decade if signed else 2 ** (decade + 1)
        edges = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float64)
        means = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (decade - 6)
        values += means.tolist()
        if signed:
            values += (-means).tolist()
    code = torch.tensor(sorted(values), dtype=torch.float32)
    if code.numel() != 256 or code.unique().numel() != 256:
        raise AssertionError("the dynamic code must have 256 distinct values")
    if signed and code[SIGNED_ZERO_CODE] != 0.0:
        raise AssertionError(f"0.0 must be entry {SIGNED_ZERO_CODE} of the signed code")
    return code


def code_tables(device: torch.device | str = "cpu") -> CodeTables:
    """Both codes and their midpoints on ``device`` (4 KiB in all)."""
    signed = dynamic_code(signed=True).to(device)
    unsigned = dynamic_code(signed=False).to(device)
    return CodeTables(signed, (signed[:-1] + signed[1:]) / 2, unsigned, (unsigned[:-1] + unsigned[1:]) / 2)


def quantize_blockwise(
    blocks: torch.Tensor, midpoints: torch.Tensor, absmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize fp32 ``blocks`` (nblocks, B): ``(uint8 codes (nblocks, B), absmax (nblocks,))``.
    ``absmax``: the blocks' scales, given (at least each block's own absolute maximum);
    default computed from ``blocks``."""
    if absmax is None:
        absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normalized = blocks / safe[:, None]
    return torch.bucketize(normalized, midpoints).to(torch.uint8), absmax


def dequantize_blockwise(
    codes: torch.Tensor, scales: torch.Tensor, code: torch.Tensor, block_size: int, lead: int = 0
) -> torch.Tensor:
    """fp32 blocks (nblocks, B) from flat ``codes`` (numel,) whose first element is element
    ``lead`` of its block; the blocks are 0 before it and past ``numel``."""
    pad = (-(lead + codes.numel())) % block_size
    values = code[codes.long()]
    values = F.pad(values, (lead, pad)).view(-1, block_size)
    return values * scales[:, None]


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _max_combine(a, b):  # type: ignore[no-untyped-def]
        """Combine function of the block absmax (``tl.reduce``)."""
        return tl.maximum(a, b)

    @triton.jit
    def _adam8bit_kernel(
        p_ptr, g_ptr, mc_ptr, ms_ptr, vc_ptr, vs_ptr,
        mcode_ptr, mmid_ptr, vcode_ptr, vmid_ptr,
        numel, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
        step_size, bias_correction2_sqrt, decay,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        """One program: one quantization block."""
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: parameters of 2**31+ elements
        mask = offs < numel
        grad = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m_code = tl.load(mc_ptr + offs, mask=mask, other=0).to(tl.int32)
        v_code = tl.load(vc_ptr + offs, mask=mask, other=0).to(tl.int32)
        m = tl.load(mcode_ptr + m_code) * tl.load(ms_ptr + pid)
        v = tl.load(vcode_ptr + v_code) * tl.load(vs_ptr + pid)
        m = tl.where(mask, m * beta1 + one_minus_beta1 * grad, 0.0)
        v = tl.where(mask, v * beta2 + one_minus_beta2 * grad * grad, 0.0)
        denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
        param = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        param = param * decay - step_size * tl.div_rn(m, denom)
        tl.store(p_ptr + offs, param.to(p_ptr.dtype.element_ty), mask=mask)
        # tl.reduce, not tl.max: tl.max is a jit function of triton's standard library,
        # which a kernel interpreted after import could not call (see _triton.launchable).
        m_absmax = tl.reduce(tl.abs(m), 0, _max_combine)
        v_absmax = tl.reduce(v, 0, _max_combine)
        tl.store(ms_ptr + pid, m_absmax)
        tl.store(vs_ptr + pid, v_absmax)
        m_norm = tl.div_rn(m, tl.where(m_absmax > 0, m_absmax, 1.0))
        v_norm = tl.div_rn(v, tl.where(v_absmax > 0, v_absmax, 1.0))
        # Binary search: the index is the number of midpoints strictly below the value.
        m_idx = tl.full([BLOCK], 0, tl.int32)  # tl.full: builtin; tl.zeros is a jit function
        v_idx = tl.full([BLOCK], 0, tl.int32)
        for level in tl.static_range(8):
            width = 128 >> level
            m_idx = tl.where(m_norm > tl.load(mmid_ptr + m_idx + (width - 1)), m_idx + width, m_idx)
            v_idx = tl.where(v_norm > tl.load(vmid_ptr + v_idx + (width - 1)), v_idx + width, v_idx)
        tl.store(mc_ptr + offs, m_idx.to(tl.uint8), mask=mask)
        tl.store(vc_ptr + offs, v_idx.to(tl.uint8), mask=mask)


def adam8bit_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg_code: torch.Tensor,
    exp_avg_scale: torch.Tensor,
    exp_avg_sq_code: torch.Tensor,
    exp_avg_sq_scale: torch.Tensor,
    *,
    tables: CodeTables,
    block_size: int,
    beta1: float,
    beta2: float,
    eps: float,
    step_size: float | torch.Tensor,
    bias_correction2_sqrt: float | torch.Tensor,
    decay: float | torch.Tensor = 1.0,
    kernel: str = "auto",
) -> None:
    """One 8-bit AdamW step, in place on ``param`` and the four state tensors::

        m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g * g
        p = p * decay - step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)

    with ``m``, ``v`` dequantized before and requantized after (see the module docstring).
    For AdamW at step t: ``step_size = lr / (1 - beta1**t)``, ``bias_correction2_sqrt =
    sqrt(1 - beta2**t)``, ``decay = 1 - lr * weight_decay``. ``param`` must be contiguous;
    ``kernel`` is "auto" (Triton for CUDA tensors), "triton" or "torch".
    """
    _check_operands(param, exp_avg_code, exp_avg_scale, exp_avg_sq_code, exp_avg_sq_scale, block_size)
    state = (exp_avg_code, exp_avg_scale, exp_avg_sq_code, exp_avg_sq_scale)
    coefficients = dict(
        beta1=beta1, beta2=beta2, eps=eps, step_size=step_size,
        bias_correction2_sqrt=bias_correction2_sqrt, decay=decay,
    )  # fmt: skip
    if use_triton(kernel, param):
        _triton_step(param, grad, state, tables, block_size, coefficients)
    else:
        _reference_step(param, grad, state, tables, block_size, coefficients)


def _reference_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: State8bit,
    tables: CodeTables,
    block_size: int,
    c: Mapping[str, float | torch.Tensor],
) -> None:
    """The PyTorch reference (any device; used on CPU), over pieces of whole blocks
    (`memopt.codegen._chunks.spans`; a parameter of more than one piece recurses into
    flat views of its pieces): each piece holds fp32 copies of its parameter elements
    and both moments while it runs, with the int64 gather indices and bucketize codes
    (32 bytes per element of one piece, not of the parameter:
    `memopt.analysis.optimizer_memory.ADAM8BIT_REFERENCE_BYTES_PER_ELEMENT`); the
    Triton kernel holds one block at a time. Blocks are independent, so
    the pieces give the bits one pass over the parameter gives."""
    numel = param.numel()
    pieces = list(spans(numel, block_size))
    if len(pieces) > 1:
        flat, flat_grad = param.detach().view(-1), grad.detach().reshape(-1)
        for start, end in pieces:
            piece_state = slice_state(state, start, end, slice(start // block_size, -(-end // block_size)))
            _reference_step(flat[start:end], flat_grad[start:end], piece_state, tables, block_size, c)
        return
    m, v = block_moments(param, grad, state, tables, block_size, c)
    requantize(m, v, state, tables)


def block_moments(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: State8bit,
    tables: CodeTables,
    block_size: int,
    c: Mapping[str, float | torch.Tensor],
    lead: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first half of the reference step: dequantize both moments, update them with
    ``grad`` and update ``param`` in place; return the new fp32 moments as blocks
    ``(nblocks, block_size)``, to be stored by `requantize`.

    ``param`` (contiguous) holds elements ``lead, lead + 1, ...`` of consecutive blocks:
    ``lead`` (``0 <= lead < block_size``) elements of its first block lie before it, in
    another piece of the whole tensor (`memopt.optim.AdamW8bit` on one rank's rows of a
    sharded parameter). The state holds ``param``'s codes, ``(numel,)``, and one scale
    per block it touches. The moments are zero outside ``param`` (before it and past its
    end), so they leave each block's absmax as the elements of ``param`` make it."""
    numel = param.numel()
    pad = (-(lead + numel)) % block_size
    exp_avg_code, exp_avg_scale, exp_avg_sq_code, exp_avg_sq_scale = state
    g = F.pad(grad.reshape(-1).float(), (lead, pad)).view(-1, block_size)
    m = dequantize_blockwise(exp_avg_code, exp_avg_scale, tables.signed, block_size, lead)
    v = dequantize_blockwise(exp_avg_sq_code, exp_avg_sq_scale, tables.unsigned, block_size, lead)
    # Separate multiplies and adds (no fused alpha): the same roundings as the kernel.
    m = m * c["beta1"] + (1.0 - c["beta1"]) * g
    v = v * c["beta2"] + (1.0 - c["beta2"]) * g * g
    denom = v.sqrt() / c["bias_correction2_sqrt"] + c["eps"]
    p = F.pad(param.reshape(-1).float(), (lead, pad)).view(-1, block_size)
    p = p * c["decay"] - c["step_size"] * (m / denom)
    param.copy_(p.view(-1)[lead : lead + numel].view_as(param))
    return m, v


def requantize(
    m: torch.Tensor,
    v: torch.Tensor,
    state: State8bit,
    tables: CodeTables,
    lead: int = 0,
    absmax: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """The second half of the reference step: store the moment blocks `block_moments`
    returned (same ``lead``) as codes and scales. ``absmax`` (first moment's, second
    moment's; one entry per block) replaces the blocks' own absolute maxima: for a block
    shared with other pieces of the tensor, the maximum over all of them, so that its
    elements get the codes the whole tensor's block gives them (the absmax of a block
    of ``m`` or ``v`` alone, taken over its zeros outside the piece, is at most that)."""
    exp_avg_code, exp_avg_scale, exp_avg_sq_code, exp_avg_sq_scale = state
    numel = exp_avg_code.numel()
    m_codes, m_scale = quantize_blockwise(m, tables.signed_mid, None if absmax is None else absmax[0])
    v_codes, v_scale = quantize_blockwise(v, tables.unsigned_mid, None if absmax is None else absmax[1])
    exp_avg_code.copy_(m_codes.view(-1)[lead : lead + numel])
    exp_avg_sq_code.copy_(v_codes.view(-1)[lead : lead + numel])
    exp_avg_scale.copy_(m_scale)
    exp_avg_sq_scale.copy_(v_scale)


def slice_state(state: State8bit, start: int, end: int, blocks: slice) -> State8bit:
    """Views of the codes of elements ``start .. end`` and the scales of ``blocks``."""
    exp_avg_code, exp_avg_scale, exp_avg_sq_code, exp_avg_sq_scale = state
    return exp_avg_code[start:end], exp_avg_scale[blocks], exp_avg_sq_code[start:end], exp_avg_sq_scale[blocks]


def _triton_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: State8bit,
    tables: CodeTables,
    block_size: int,
    c: Mapping[str, float],
) -> None:
    """Launch the Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``) on
    ``param``'s device."""
    grid = (state[1].numel(),)
    with device_guard(param):
        launchable(_adam8bit_kernel)[grid](
            param, grad.contiguous(), *state,
            tables.signed, tables.signed_mid, tables.unsigned, tables.unsigned_mid,
            param.numel(), c["beta1"], 1.0 - c["beta1"], c["beta2"], 1.0 - c["beta2"], c["eps"],
            c["step_size"], c["bias_correction2_sqrt"], c["decay"],
            BLOCK=block_size, enable_fp_fusion=FP_FUSION["adam8bit"],
        )  # fmt: skip


def _check_operands(
    param: torch.Tensor,
    exp_avg_code: torch.Tensor,
    exp_avg_scale: torch.Tensor,
    exp_avg_sq_code: torch.Tensor,
    exp_avg_sq_scale: torch.Tensor,
    block_size: int,
) -> None:
    """Raise ``ValueError`` naming the operand whose layout does not fit."""
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"adam8bit_step: block_size={block_size} must be a power of two >= 16")
    if not param.is_contiguous():
        raise ValueError("adam8bit_step: the parameter must be contiguous (call .contiguous() once)")
    numel = param.numel()
    blocks = -(-numel // block_size)
    for name, tensor, shape, dtype in (
        ("exp_avg_code", exp_avg_code, (numel,), torch.uint8),
        ("exp_avg_sq_code", exp_avg_sq_code, (numel,), torch.uint8),
        ("exp_avg_scale", exp_avg_scale, (blocks,), torch.float32),
        ("exp_avg_sq_scale", exp_avg_sq_scale, (blocks,), torch.float32),
    ):
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(
                f"adam8bit_step: {name} is {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} "
                f"{shape} for {numel} elements in blocks of {block_size}"
            )
