"""Transient workspace some ops allocate inside their kernels, beyond their outputs.

A graph-level liveness model sees each op's inputs and outputs, not the scratch
buffers the kernel allocates and frees before returning. For most ops that scratch is
zero; for a few it is as large as an activation and moves the step's peak. The table
below is per device type and was calibrated on CPU (oneDNN convolutions, ATen's
dropout/batch-norm/loss kernels) by measuring each op alone with
`memopt.testing.measure.measure_peak` (`tests/test_memory_analysis.py` holds some of
them to a measurement). CUDA kernels (cuDNN workspaces) are not modelled: the table is
empty there and estimates on CUDA see outputs only.

Convolutions (NCHW fp32, the eager kernels) are modelled from what oneDNN does rather
than as a multiple of a tensor (`_Conv`): it computes in layouts blocked over
channels (16 fp32 channels per block with AVX-512), padded to whole blocks, so it
holds blocked copies of the input, the weight and the output (and in backward, of the
gradient and the result) beside the dense tensors, and an 8-channel activation's copy
is twice its size. Which tensors it copies follows its kernels: fewer input channels
than a block (with a window larger than 1x1) are read in place, strided backward-data
passes work on unpadded channels-last copies, the weight gradient of 4 to 15 input
channels runs an AVX2 kernel of 8-channel blocks. Where ATen does not call oneDNN
(one small image, `use_mkldnn` in ATen/native/Convolution.cpp) its own kernel holds
the im2col columns. Measured op by op against `measure_peak` (docs/memory.md, item 3):
what is left is oneDNN's own scratchpad (the weight gradient's per-thread reduction
buffers, the strided kernels' per-thread buffers: tens of KiB).

The main table describes ATen's eager kernels. Under ``codegen="inductor"`` (``fused``)
Inductor decomposes dropout, batch norm and the losses into its own kernels, and calls
oneDNN's convolutions on channels-last tensors (``extern_kernels.convolution`` forward,
``aten.convolution_backward`` backward, in the generated code). Their scratch is small
(about the weight plus 12 KiB forward, twice the weight plus 20 KiB for the weight
gradient) except a strided input gradient: oneDNN's strided kernel
(``brgconv_strided``) copies the gradient into a padded buffer per thread
(`_channels_last_strided_data_scratch`, exact against the op measured alone).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from memopt.analysis.aliasing import concrete_int
from memopt.codegen import cross_entropy as _cross_entropy
from memopt.codegen.promoting import PROMOTING, promoted_copy_bytes
from memopt.codegen.quantize_chunked import _chunk
from memopt.graph import meta
from memopt.codegen import quantize as _quantize  # noqa: F401  (registers memopt::(de)quantize_blockwise)
from memopt.graph import rng as _rng  # noqa: F401  (registers memopt::dropout_mask_replay)

__all__ = ["workspace_bytes", "retained_bytes"]

aten = torch.ops.aten


def _bytes(value: Any) -> int:
    if isinstance(value, fx.Node):
        value = meta.fake_value(value)
    if isinstance(value, torch.Tensor):
        return concrete_int(value.numel()) * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_bytes(v) for v in value)
    return 0


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def _strided(node: fx.Node, index: int, name: str = "stride") -> bool:
    stride = _arg(node, index, name, [1])
    return any(s != 1 for s in stride) if isinstance(stride, (list, tuple)) else stride != 1


def _conv_coarse(node: fx.Node) -> int:
    # where the blocked model (_Conv) does not apply (dtypes other than fp32, grouped
    # convolutions other than depthwise): the output (or for strided convolutions the
    # input) in blocks and the weight, as at 16 channels and more
    x, w = _arg(node, 0, "input"), _arg(node, 1, "weight")
    return (_bytes(x) if _strided(node, 3) else _bytes(node)) + _bytes(w)


def _conv_backward_coarse(node: fx.Node) -> int:
    grad_out, x = _arg(node, 0, "grad_output"), _arg(node, 1, "input")
    mask = _arg(node, 10, "output_mask", [True, True, True])
    if not mask[0]:
        return _bytes(grad_out)
    return 2 * (_bytes(x) if _strided(node, 4) else _bytes(grad_out))


@functools.cache
def _channel_block() -> int:
    """fp32 channels per block of oneDNN's blocked layouts: one vector register's worth
    (16 with AVX-512, 8 with AVX2)."""
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


def _up(c: int, block: int) -> int:
    return -(-c // block) * block


class _Conv:
    """One oneDNN convolution problem, as oneDNN sees it: ``ic`` channels in over
    ``sx`` spatial positions, ``oc`` out over ``sy``; ``k`` kernel taps; ``size`` bytes
    per element. A transposed convolution's forward is this problem's backward-data
    pass with ``ic`` and ``oc`` swapped (and its backward, this problem's forward and
    backward-weights)."""

    def __init__(self, n: int, ic: int, oc: int, sx: int, sy: int, k: int, size: int, strided: bool, depthwise: bool):
        self.n, self.ic, self.oc, self.sx, self.sy, self.k, self.size = n, ic, oc, sx, sy, k, size
        self.strided, self.depthwise = strided, depthwise
        self.block = _channel_block()

    def act(self, channels: int, spatial: int) -> int:
        return self.n * channels * spatial * self.size

    def pad(self, c: int, block: int | None = None) -> int:
        return _up(c, block or self.block)

    def weight(self, oc: int, ic: int) -> int:
        return oc * (1 if self.depthwise else ic) * self.k * self.size

    def forward(self, out: int) -> int:
        """Peak bytes while the forward runs: [the input reordered into blocks] + the
        weight reordered + the output computed in blocks, then the blocked output and
        the dense result while it is copied back. Fewer input channels than a block
        (but a real window) run oneDNN's first-layer kernel on the plain input."""
        plain = self.ic < self.block and self.k > 1 and not self.depthwise
        src = 0 if plain else self.act(self.pad(self.ic), self.sx)
        wei = self.weight(self.pad(self.oc), self.ic if plain else self.pad(self.ic))
        dst = self.act(self.pad(self.oc), self.sy)
        return max(src + wei + dst + self.gathered(), dst + out)

    def gathered(self) -> int:
        """A strided 1x1 kernel first gathers the input positions it reads: one
        image's blocked input channels at the output's positions, per thread."""
        if self.k != 1 or not self.strided or self.depthwise:
            return 0
        return torch.get_num_threads() * self.pad(self.ic) * self.sy * self.size

    def backward_data(self, out: int, extra_dst: int = 0, scratchpad: int = 0) -> int:
        """Peak bytes while the input gradient (size ``out``) is computed. Strided (not
        depthwise): oneDNN's strided kernel works on channels-last copies, unpadded:
        the gradient, the weight, the result and its ``scratchpad``
        (`_strided_data_scratchpad`), then two dense copies of the result. Otherwise
        all three are blocked and padded, and the padded result is copied out."""
        if self.strided and not self.depthwise:
            grad = self.act(self.oc, self.sy) if self.oc > 1 else 0
            res = self.act(self.ic, self.sx)
            copies = grad + self.weight(self.oc, self.pad(self.ic)) + res + scratchpad
            return max(copies, res + (2 * out if self.ic > 1 else out))
        grad = self.act(self.pad(self.oc), self.sy)
        res = self.act(self.pad(self.ic), self.sx)
        return max(extra_dst + grad + self.weight(self.pad(self.oc), self.pad(self.ic)) + res, res + out)

    def backward_weights(self) -> int:
        """Peak bytes of the weight-gradient pass: the gradient and the input reordered
        into blocks and the blocked weight gradient, then the blocked weight gradient
        and the dense one while it is copied out (the peak where the weight outweighs
        the activations: a 1x1 convolution on a 1x1 feature map, a late stage of a
        small image). 1-3 input channels (with a real window) read the plain input;
        4-15 run oneDNN's AVX2 kernel, 8-channel blocks."""
        block = self.block
        dense = self.weight(self.oc, self.ic)
        if not self.depthwise and self.k > 1 and self.ic < self.block:
            if self.ic <= 3:
                grad = self.act(self.pad(self.oc), self.sy)
                blocked = self.weight(self.pad(self.oc), self.ic)
                return max(grad + blocked, blocked + dense)
            block = min(block, 8)
        pad = lambda c: self.pad(c, block)  # noqa: E731
        grad, src = self.act(pad(self.oc), self.sy), self.act(pad(self.ic), self.sx)
        blocked = self.weight(pad(self.oc), pad(self.ic))
        return max(grad + src + blocked + self.gathered(), blocked + dense)


def _conv_problem(x: Any, w: Any, y: Any, node: fx.Node, stride_index: int, transposed: bool, groups: int) -> _Conv | int | None:
    """The oneDNN problem of a convolution with input ``x`` and output ``y`` (fake
    tensors); None where the blocked model does not apply (not fp32, or grouped other
    than depthwise); an int where ATen does not call oneDNN: the bytes of the im2col
    columns its own kernel (``slow_conv2d``) builds instead."""
    if not all(isinstance(t, torch.Tensor) for t in (x, w, y)) or x.dim() < 3:
        return None
    depthwise = groups != 1 and groups == concrete_int(x.shape[1]) and concrete_int(w.shape[1]) == 1 and not transposed
    if x.dtype != torch.float32 or (groups != 1 and not depthwise):
        return None
    n = concrete_int(x.shape[0])
    ci, co = concrete_int(x.shape[1]), concrete_int(y.shape[1])
    sx = math.prod(concrete_int(s) for s in x.shape[2:])
    sy = math.prod(concrete_int(s) for s in y.shape[2:])
    window = [concrete_int(s) for s in w.shape[2:]]
    k = math.prod(window)
    strided = _strided(node, stride_index)
    if not transposed and not _onednn(n, ci * sx, window, groups, strided or _strided(node, stride_index + 2, "dilation")):
        unpadded_1x1 = k == 1 and not strided and sx == sy
        return 0 if unpadded_1x1 else n * ci * k * sy * x.element_size()
    if transposed:  # oneDNN's problem runs from the output to the input
        return _Conv(n, co, ci, sy, sx, k, x.element_size(), strided, False)
    return _Conv(n, ci, co, sx, sy, k, x.element_size(), strided, depthwise)


def _onednn(n: int, per_sample: int, window: list[int], groups: int, strided_or_dilated: bool) -> bool:
    """Whether ATen runs an fp32 CPU convolution on oneDNN (``use_mkldnn`` in
    ATen/native/Convolution.cpp): not for one small image (batch 1, at most 20480
    input elements, a window up to 3x3, no groups), nor for an unstrided 1x1 window
    under 16 images on one thread."""
    one = all(s == 1 for s in window[-2:])
    if not (strided_or_dilated or n >= 16 or not one or torch.get_num_threads() > 1):
        return False
    big_window = len(window) >= 2 and window[-1] > 3 and window[-2] > 3
    return groups > 1 or big_window or n > 1 or n * per_sample > 20480


def _conv(node: fx.Node) -> int:
    # oneDNN (NCHW fp32 on CPU) computes in layouts blocked over channels, padded to
    # whole blocks (_Conv): its scratch is those copies beyond the output.
    x, w, bias = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
    transposed, groups = _arg(node, 6, "transposed", False), _arg(node, 8, "groups", 1)
    fx_, fw, fy = (meta.fake_value(v) if isinstance(v, fx.Node) else None for v in (x, w, node))
    problem = _conv_problem(fx_, fw, fy, node, 3, transposed, groups)
    if problem is None:
        return _conv_coarse(node)
    if isinstance(problem, int):
        return problem
    out = _bytes(node)
    if transposed:  # the backward-data pass; with a bias, the stride-1 kernel also holds a padded result
        extra = problem.act(problem.pad(problem.ic), problem.sx) if bias is not None and not problem.strided else 0
        return problem.backward_data(out, extra) - out
    return problem.forward(out) - out


def _channels_last(t: torch.Tensor) -> bool:
    """ATen's ``suggest_memory_format`` of ``t`` is channels-last (2-d or 3-d)."""
    try:
        fmt = torch._prims_common.suggest_memory_format(t)
    except Exception:  # symbolic strides it cannot compare
        return False
    return fmt in (torch.channels_last, torch.channels_last_3d)


def _wide_grouped_weight_grad(x: Any, w: Any, g: Any, groups: int, transposed: bool, channels_last: bool = False) -> int | None:
    """Bytes beyond the op's outputs held by oneDNN's weight-gradient pass for a grouped
    (depthwise included) fp32 convolution on channels-last tensors whose window is
    wider than 3 (ConvNeXt's 7x7 depthwise convolution, whose input is a permuted
    channels-last tensor), AVX-512; None where that kernel does not run. Its kernel
    computes the gradient in a layout blocked per group, both channel counts of each
    group padded to a whole block: ``groups * P(oc/groups) * P(ic/groups) * taps``
    elements, 256 per tap of a depthwise convolution, with the gradient then reordered
    out (one copy of the weight, two where a group has more than one input channel).
    ``channels_last``: the operands are channels-last whatever their strides say (Inductor
    calls convolutions so); else ATen picks the layout from the input's strides.
    Where the input is not channels-last, or the window is at most
    3 wide, oneDNN's depthwise kernel runs instead and holds a few weights' worth
    (`_Conv.backward_weights`). Measured with the profiler's memory events against
    the op alone (`tests/test_memory_analysis.py`): within a few hundred
    bytes on 2-d and 3-d windows from 1x7 to 7x7 and 5x5x5, 2 to 16 groups; the
    blocked model read the depthwise 7x7 gradient 257 weights low (ConvNeXt's step
    measured 5.9 times its estimate)."""
    if groups == 1 or transposed or _channel_block() != 16:
        return None
    if not all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in (x, w, g)) or w.dim() < 3:
        return None
    if concrete_int(w.shape[-1]) <= 3 or not (channels_last or _channels_last(x)):
        return None
    oc, ic_per_group = concrete_int(w.shape[0]), concrete_int(w.shape[1])
    taps = math.prod(concrete_int(s) for s in w.shape[2:])
    blocked = groups * _up(oc // groups, 16) * _up(ic_per_group, 16) * taps * w.element_size()
    return blocked + (1 if ic_per_group == 1 else 2) * _bytes(w)


def _conv_backward(node: fx.Node) -> int:
    grad_out, x, w = _arg(node, 0, "grad_output"), _arg(node, 1, "input"), _arg(node, 2, "weight")
    transposed, groups = _arg(node, 7, "transposed", False), _arg(node, 9, "groups", 1)
    mask = _arg(node, 10, "output_mask", [True, True, True])
    fg, fx_, fw = (meta.fake_value(v) if isinstance(v, fx.Node) else None for v in (grad_out, x, w))
    wide = _wide_grouped_weight_grad(fx_, fw, fg, groups, transposed) if mask[1] else None
    return max(_conv_backward_blocked(node, fx_, fw, fg), wide or 0)


def _conv_backward_blocked(node: fx.Node, fx_: Any, fw: Any, fg: Any) -> int:
    transposed, groups = _arg(node, 7, "transposed", False), _arg(node, 9, "groups", 1)
    mask = _arg(node, 10, "output_mask", [True, True, True])
    x = _arg(node, 1, "input")
    problem = _conv_problem(fx_, fw, fg, node, 4, transposed, groups)
    if problem is None or (isinstance(problem, _Conv) and problem.depthwise and problem.k == 1 and problem.strided):
        # (a strided 1x1 depthwise backward holds no blocked copies: measured, the
        # coarse rule's bound)
        return _conv_backward_coarse(node)
    if isinstance(problem, int):  # one columns buffer for both gradients
        return problem
    outputs = _bytes(node)
    grad_input = _bytes(x) if mask[0] else 0
    peak = 0
    if mask[0] and transposed:  # a transposed convolution's input gradient is its problem's forward
        peak = problem.forward(grad_input)
    elif mask[0]:
        strided_kernel = problem.strided and not problem.depthwise and _channel_block() == 16
        scratchpad = _strided_data_scratchpad(fx_, fw, fg, node) if strided_kernel else 0
        peak = problem.backward_data(grad_input, scratchpad=scratchpad)
    if mask[1] or mask[2]:
        peak = max(peak, grad_input + problem.backward_weights())
    return peak - outputs


def _first_arg(node: fx.Node) -> int:
    return _bytes(node.args[0]) if node.args else 0


def _loss(node: fx.Node) -> int:
    reduction = _arg(node, 2, "reduction", 1)
    return _bytes(node.args[0]) if reduction != 0 else 0


def _replay_noise(node: fx.Node) -> int:
    # memopt::dropout_mask_replay draws its bool mask through a float noise tensor of
    # the default dtype (memopt.graph.rng)
    return _bytes(node) * torch.empty((), dtype=torch.get_default_dtype()).element_size()


_REPLAY = torch.ops.memopt.dropout_mask_replay.default
_DROPOUT_WITH_STATE = torch.ops.memopt.dropout_with_rng_state.default  # native_dropout inside


def _safe_softmax(node: fx.Node) -> int:
    # softmax, then the rows that are all -inf zeroed: a bool ``x == -inf`` of the input's
    # elements and its reduction over the softmax dim (measured: 2.008 MiB at 2M fp32)
    x = meta.fake_value(node.args[0])
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return 0
    numel = concrete_int(x.numel())
    dim = _arg(node, 1, "dim", -1)
    return numel + numel // max(concrete_int(x.shape[dim]), 1)


def _blockwise_elements(numel: int, block_size: int) -> int:
    """Elements one pass of memopt's chunked (de)quantization works on at once: the
    whole tensor padded to whole blocks, or one chunk (`memopt.codegen.quantize_chunked`)."""
    chunk = _chunk(block_size)
    return -(-numel // block_size) * block_size if numel <= chunk else chunk


def _quantize_scratch(node: fx.Node) -> int:
    # the scaled fp32 values per pass (the input itself is read in place when it is fp32
    # and whole blocks; else an fp32 or padded copy too); the chunked path adds the
    # per-block scales twice. Measured on CPU at 8K-1M elements (within 15%, above).
    x = meta.fake_value(_arg(node, 0, "x"))
    block = _arg(node, 1, "block_size")
    if not isinstance(x, torch.Tensor) or not isinstance(block, int):
        return 0
    numel = concrete_int(x.numel())
    at_once = _blockwise_elements(numel, block)
    if at_once < numel:
        return 4 * at_once + 2 * 4 * -(-numel // block)
    copies = 1 if numel % block == 0 and x.element_size() == 4 else 2
    return copies * 4 * at_once


def _dequantize_scratch(node: fx.Node) -> int:
    # whole blocks decode in place into the output (no scratch, for an fp32 output); a
    # padded tail decodes into a padded fp32 copy; the chunked path decodes each chunk
    # into an fp32 chunk it then copies into the output
    out = meta.fake_value(node)
    block = _arg(node, 3, "block_size")
    if not isinstance(out, torch.Tensor) or not isinstance(block, int):
        return 0
    numel = concrete_int(out.numel())
    at_once = _blockwise_elements(numel, block)
    if at_once < numel or numel % block or out.element_size() != 4:
        return 4 * at_once
    return 0


_QUANTIZE = torch.ops.memopt.quantize_blockwise.default
_DEQUANTIZE = torch.ops.memopt.dequantize_blockwise.default


def _cross_entropy_scratch(node: fx.Node, forward: bool) -> int:
    # memopt::cross_entropy and its backward hold one block of log-probabilities;
    # the forward also, for the whole op, the (N, 1) column of picked ones and the (N,)
    # targets it reduces over. With ``upcast`` and half logits the blocks are fp32 and
    # two are held at once (the widened block and its log-probabilities; in backward,
    # the log-probabilities and the gradient block) (memopt.codegen.cross_entropy).
    x = meta.fake_value(node.args[0] if forward else node.args[1])
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        return 0
    upcast = _arg(node, 4 if forward else 6, "upcast", False)
    size = _cross_entropy.compute_dtype(x.dtype, upcast).itemsize
    blocks = 2 if size != x.element_size() else 1
    rows, classes = concrete_int(x.shape[0]), concrete_int(x.shape[1])
    per_op = rows * (size + 2 * 8) if forward else 0
    return blocks * _cross_entropy.block_bytes(rows, classes, size) + per_op


_CROSS_ENTROPY = torch.ops.memopt.cross_entropy.default
_CROSS_ENTROPY_BACKWARD = torch.ops.memopt.cross_entropy_backward.default
# memopt's own ops allocate their scratch through the device's allocator on every
# device, and Inductor calls them as extern kernels: one rule everywhere.
_OWN: dict[Any, Callable[[fx.Node], int]] = {
    _CROSS_ENTROPY: lambda n: _cross_entropy_scratch(n, forward=True),
    _CROSS_ENTROPY_BACKWARD: lambda n: _cross_entropy_scratch(n, forward=False),
}

_CPU: dict[Any, Callable[[fx.Node], int]] = {
    aten.convolution.default: _conv,
    aten.convolution_backward.default: _conv_backward,
    aten.native_batch_norm_backward.default: _first_arg,
    aten.native_dropout.default: _first_arg,
    _DROPOUT_WITH_STATE: _first_arg,
    aten._safe_softmax.default: _safe_softmax,
    aten.native_dropout_backward.default: _first_arg,
    aten.mse_loss.default: _loss,
    _REPLAY: _replay_noise,
    _QUANTIZE: _quantize_scratch,
    _DEQUANTIZE: _dequantize_scratch,
    **dict.fromkeys(PROMOTING, promoted_copy_bytes),  # eager codegen: a piece (memopt.codegen.promoting)
}

_TABLES: dict[str, dict[Any, Callable[[fx.Node], int]]] = {"cpu": _CPU, "meta": _CPU}

_KIB = 1024
_PAGE = 4 * _KIB
# oneDNN's brgemm batch element (an address pair and two offsets), as booked per thread
_BATCH_ELEMENT = 40


def _channels_last_strided_data_scratch(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, node: fx.Node) -> int:
    """Bytes oneDNN holds beside the input gradient while its strided backward-data
    kernel (``brgconv_strided``, AVX-512, fp32, channels-last: what Inductor calls on
    CPU) runs: the weight reordered with its input channels padded to a block, and the
    kernel's scratchpad (`_strided_data_scratchpad`). Measured with the profiler's
    memory events against the op alone: exact on the shapes of
    `tests/test_memory_analysis.py`."""
    ic, oc = concrete_int(x.shape[1]), concrete_int(g.shape[1])
    taps = math.prod(concrete_int(s) for s in w.shape[2:])
    return oc * _up(ic, _channel_block()) * taps * x.element_size() + _strided_data_scratchpad(x, w, g, node)


def _strided_data_scratchpad(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, node: fx.Node) -> int:
    """The scratchpad of oneDNN's strided backward-data kernel (``brgconv_strided``,
    AVX-512, fp32), which runs a strided convolution's input gradient both on the
    channels-last tensors Inductor passes and on the eager codegen's NCHW tensors
    (reordered to channels-last copies first, `_Conv.backward_data`). Per thread it
    books the gradient copied into a buffer padded by the window's overhang
    (``ohp x owp x Cout`` elements rounded up to 4096: the output channels are not
    padded to a block, which read LeViT's 2 -> 4 channel stem 32 KiB high at 2 threads),
    one page of brgemm batch
    entries and one page of masks; each booking adds a page for alignment. An input
    whose size is not a multiple of the stride adds a 16 KiB buffer per thread (and
    its page)."""
    size = x.element_size()
    oc = concrete_int(g.shape[1])
    window = [concrete_int(s) for s in w.shape[2:]]
    spatial_in = [concrete_int(s) for s in x.shape[2:]]
    spatial_out = [concrete_int(s) for s in g.shape[2:]]
    dims = len(window)
    stride, padding, dilation = (
        _per_dim(_arg(node, i, name, default), dims)
        for i, name, default in ((4, "stride", 1), (5, "padding", 0), (6, "dilation", 1))
    )
    padded = 1
    for i, o, k, s, p, d in zip(spatial_in, spatial_out, window, stride, padding, dilation):
        extent = (k - 1) * d + 1
        overhang_end = (o - 1) * s + extent - i - p
        padded *= o + max(0, extent - 1 - p) // s + max(0, extent - 1 - overhang_end) // s
    threads = torch.get_num_threads()
    taps = math.prod(window)
    batch = -(-_up(taps * _BATCH_ELEMENT, _PAGE) // _BATCH_ELEMENT) * _BATCH_ELEMENT
    gradient_copy = _up(padded * oc, _PAGE) * size
    scratchpad = threads * (batch + gradient_copy + _PAGE) + 3 * _PAGE
    if any(i % s for i, s in zip(spatial_in, stride)):
        scratchpad += threads * 16 * _KIB + _PAGE
    return scratchpad


def _per_dim(value: Any, dims: int) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return [int(v) for v in (values * dims if len(values) == 1 else values)]


def _conv_backward_fused(node: fx.Node) -> int:
    """A convolution backward as Inductor calls it on CPU (channels-last operands).
    The weight-gradient pass holds about twice the weight plus tens of KiB (and so does
    an unstrided input-gradient pass: a bound, up to 20 KiB high where oneDNN's
    weight-gradient kernel needs no reduction buffers); a strided input gradient (fp32, not grouped or
    transposed, AVX-512) runs oneDNN's strided kernel, whose scratchpad holds a padded
    copy of the gradient per thread (`_channels_last_strided_data_scratch`): the
    flat rule read 36 KiB low for an 8-to-16-channel 3x3 stride-2 convolution."""
    weight_pass = 2 * _bytes(_arg(node, 2, "weight")) + 20 * _KIB
    mask = _arg(node, 10, "output_mask", [True, True, True])
    x, w, g = (
        meta.fake_value(v) if isinstance(v, fx.Node) else None
        for v in (_arg(node, 1, "input"), _arg(node, 2, "weight"), _arg(node, 0, "grad_output"))
    )
    data_pass = (
        mask[0]
        and all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in (x, w, g))
        and x.dim() >= 3
        and _strided(node, 4)
        and not _arg(node, 7, "transposed", False)
        and _arg(node, 9, "groups", 1) == 1
        and _channel_block() == 16
    )
    if mask[1]:
        transposed = _arg(node, 7, "transposed", False)
        wide = _wide_grouped_weight_grad(x, w, g, _arg(node, 9, "groups", 1), transposed, channels_last=True)
        weight_pass = max(weight_pass, wide or 0)
    if not data_pass:
        return weight_pass
    data = _bytes(x) + _channels_last_strided_data_scratch(x, w, g, node) - _bytes(node)
    return max(weight_pass, data) if mask[1] or mask[2] else data


_CPU_FUSED: dict[Any, Callable[[fx.Node], int]] = {
    aten.convolution.default: lambda n: _bytes(_arg(n, 1, "weight")) + 12 * _KIB,
    aten.convolution_backward.default: _conv_backward_fused,
    _REPLAY: _replay_noise,  # an extern kernel under Inductor: the same workspace
    _DROPOUT_WITH_STATE: _first_arg,  # likewise
    _QUANTIZE: _quantize_scratch,  # likewise
    _DEQUANTIZE: _dequantize_scratch,
}
_FUSED_TABLES: dict[str, dict[Any, Callable[[fx.Node], int]]] = {"cpu": _CPU_FUSED, "meta": _CPU_FUSED}

# Ops whose (small) output keeps a larger buffer alive: on CPU, a reduced mse_loss
# returns a 0-dim tensor whose storage is the full elementwise-loss buffer.
_CPU_RETAINED: dict[Any, Callable[[fx.Node], int]] = {aten.mse_loss.default: _loss}
_RETAINED: dict[str, dict[Any, Callable[[fx.Node], int]]] = {"cpu": _CPU_RETAINED, "meta": _CPU_RETAINED}


def workspace_bytes(node: fx.Node, device: torch.device, fused: bool = False) -> int:
    """Scratch bytes ``node``'s kernel holds while it runs on ``device`` (0 if unknown);
    ``fused``: the kernel Inductor calls for it. Unfused CPU elementwise kernels with
    operands of different dtypes hold their promoted copies
    (`memopt.codegen.promoting`: a piece of them under the eager codegen).

    ``meta`` uses the CPU table so that estimates made on meta tensors equal those on
    CPU tensors.
    """
    rule = _OWN.get(node.target) or (_FUSED_TABLES if fused else _TABLES).get(device.type, {}).get(node.target)
    return 0 if rule is None else max(int(rule(node)), 0)


def retained_bytes(node: fx.Node, device: torch.device) -> int:
    """Extra bytes ``node``'s first output storage holds beyond its own size, for as
    long as the output lives (0 if none)."""
    rule = _RETAINED.get(device.type, {}).get(node.target)
    return 0 if rule is None else max(int(rule(node)), 0)
