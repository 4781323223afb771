"""Cost model: FLOPs and bytes moved per op, turned into time by a device roofline.

FLOPs come from torch's own flop counter formulas (``torch.utils.flop_counter``:
matmuls, convolutions, attention and their backwards); ops it has no formula for
count as zero FLOPs. Bytes moved are the bytes of the op's tensor inputs plus its
fresh outputs. Time is the roofline ``max(flops / peak_flops, bytes / bandwidth)``
plus a fixed per-op launch overhead; views cost nothing. Ops that draw random numbers
(dropout, and memopt's replay of a dropout mask) add one draw per output element at
the device's draw rate: on a CPU a draw costs about 50 times a float32 multiply.

`copies_share_compute_cores` says whether an offload's copies (the disk store's I/O
thread) run on the cores the step computes on; when they do, their CPU time adds to
the step (`DeviceModel.spill_copy_bytes_per_s`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.utils.flop_counter import flop_registry

from memopt.analysis.aliasing import concrete_int
from memopt.graph import meta
from memopt.graph import rng  # noqa: F401  (registers torch.ops.memopt's dropout ops)

__all__ = ["DeviceModel", "OpCost", "node_cost", "device_model", "copies_share_compute_cores", "is_view"]


@dataclass(frozen=True)
class DeviceModel:
    """Peak FLOP rate, memory bandwidth and per-op overhead of a device."""

    name: str
    flops_per_s: float
    bytes_per_s: float
    op_overhead_s: float
    draws_per_s: float
    """Random numbers generated per second (Bernoulli draws of a dropout mask)."""
    network_bytes_per_s: float = 1e9
    """Bytes per second one rank sends or receives in a collective (ring algorithms:
    an all-gather or reduce-scatter of S bytes over N ranks moves S (N-1)/N)."""
    spill_copy_bytes_per_s: float = 1.5 * 2**30
    """Bytes per second the host's cores move a value to a file and back: the write
    into the page cache plus the read into a fresh tensor (its pages faulted in), one
    offload's CPU work on the disk store's I/O thread. Measured on this project's CPU:
    5.5 GiB/s written, 2.1 GiB/s read, 1.5 GiB/s for the round trip. The planner
    uses it where ``offload_bandwidth`` is given; otherwise it measures the rate
    (`memopt.runtime.measure_copy_rate`)."""


_DEVICES = {
    # A modest server CPU core pair; numbers matter only relative to each other.
    # Draws: native_dropout's mask measured at 7.6 ns per element on one core here.
    # Collectives: gloo over loopback TCP, about 1 GB/s.
    "cpu": DeviceModel("cpu", 100e9, 20e9, 2e-6, 150e6, 1e9),
    "meta": DeviceModel("cpu", 100e9, 20e9, 2e-6, 150e6, 1e9),
    # An A100-class GPU (bf16 tensor cores would be ~3x the fp32 rate used here);
    # collectives: NCCL over NVLink, about 100 GB/s per rank.
    "cuda": DeviceModel("cuda", 100e12, 1.5e12, 5e-6, 100e9, 100e9),
}


def device_model(device: torch.device) -> DeviceModel:
    return _DEVICES.get(device.type, _DEVICES["cuda"])


def copies_share_compute_cores(device: torch.device) -> bool:
    """Whether offload copies for a step on ``device`` run on the cores it computes on:
    a CPU step (or a meta one, planned as a CPU's) whose intra-op threads
    (`torch.get_num_threads`) use every core this process may run on. The store's I/O
    thread then takes its CPU time from the step (measured, docs/offload.md: on two
    cores, a Llama step's 62 MiB of offloads added 46-47 ms to a 190-209 ms step with
    both cores computing, 11-13 ms to a 341 ms step with one core left free). An
    accelerator's step computes elsewhere, and a host store's copies are the copy
    engine's."""
    if device_model(device).name != "cpu":
        return False
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return torch.get_num_threads() >= cores


@dataclass(frozen=True)
class OpCost:
    flops: int
    bytes_moved: int
    seconds: float


def _bytes(value: Any) -> int:
    total = 0
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            total += concrete_int(leaf.numel()) * leaf.element_size()
    return total


def _flops(node: fx.Node) -> int:
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    formula = flop_registry.get(packet) if packet is not None else None
    if formula is None:
        return 0
    args, kwargs = pytree.tree_map_only(fx.Node, meta.fake_value, (node.args, node.kwargs))
    try:
        return concrete_int(formula(*args, **kwargs, out_val=meta.fake_value(node)))
    except Exception:  # noqa: BLE001 - a formula that cannot read these args counts as 0
        return 0


def is_view(node: fx.Node) -> bool:
    """The op returns views of its inputs (no storage of its own)."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    returns = target._schema.returns
    return bool(returns) and all(
        r.alias_info is not None and not r.alias_info.is_write for r in returns
    )


def node_cost(node: fx.Node, device: DeviceModel) -> OpCost:
    """The cost of running ``node`` once on ``device``."""
    if node.op != "call_function" or is_view(node):
        return OpCost(0, 0, 0.0)
    if str(node.target) in _COLLECTIVES:
        return _collective_cost(node, device)
    flops = _flops(node)
    moved = sum(_bytes(meta.fake_value(i)) for i in node.all_input_nodes) + _bytes(meta.fake_value(node))
    seconds = max(flops / device.flops_per_s, moved / device.bytes_per_s) + device.op_overhead_s
    if _draws_random_numbers(node):
        seconds += _elements(meta.fake_value(node)) / device.draws_per_s
    return OpCost(flops, moved, seconds)


_COLLECTIVES = {
    "_c10d_functional.all_gather_into_tensor.default": "out",
    "_c10d_functional.reduce_scatter_tensor.default": "in",
    "_c10d_functional.all_reduce.default": "both",
    "_c10d_functional.all_reduce_.default": "both",
}
"""Functional collectives, and which side's size the data moved per rank is
measured on (ring algorithms; an all-reduce moves twice its size)."""


def _collective_cost(node: fx.Node, device: DeviceModel) -> OpCost:
    """Network time of a collective: ``size * (N - 1) / N`` bytes at the device's
    network bandwidth (twice that for an all-reduce), plus the launch overhead."""
    side = _COLLECTIVES[str(node.target)]
    size = _bytes(meta.fake_value(node)) if side != "in" else _bytes(meta.fake_value(node.args[0]))
    ranks = next((a for a in node.args[1:] if isinstance(a, int)), 2)
    moved = size * (ranks - 1) / max(ranks, 1) * (2 if side == "both" else 1)
    return OpCost(0, int(moved), moved / device.network_bytes_per_s + device.op_overhead_s)


_REPLAY = torch.ops.memopt.dropout_mask_replay.default


def _draws_random_numbers(node: fx.Node) -> bool:
    return node.target is _REPLAY or meta.is_random(node)


def _elements(value: Any) -> int:
    """Elements of the first tensor in ``value`` (a draw's output or mask)."""
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            return concrete_int(leaf.numel())
    return 0
