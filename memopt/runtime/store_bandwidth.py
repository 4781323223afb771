"""Transfer rates of the offload stores, for the planner: measured once per process.

`measure_bandwidth` gives a store's ``(write, read)`` bytes per second, `measure_copy_rate`
the bytes per second of CPU time a host core spends on one offload's copies, and
`bandwidth` the figures the planner uses (given ones, else the measurement). Each
measurement runs on the store that `memopt.runtime.store_registry.register_store`
gives for the target and directory, and is cached for the process.
"""

from __future__ import annotations

import logging
import os

import torch

from memopt.runtime.store_registry import get_store, register_store, resolve_offload_dir
from memopt.units import format_bytes

__all__ = ["measure_bandwidth", "measure_copy_rate", "bandwidth"]

log = logging.getLogger("memopt.offload")

DEFAULT_PROBE_BYTES = 32 * 2**20
"""Bytes moved each way by `measure_bandwidth`."""

_BANDWIDTHS: dict[tuple[str, str, str | None], tuple[float, float]] = {}


def measure_bandwidth(target: str, device: torch.device | str,
                      nbytes: int = DEFAULT_PROBE_BYTES, *,
                      offload_dir: str | os.PathLike[str] | None = None) -> tuple[float, float]:
    """``(write, read)`` bytes per second of ``target`` for tensors on ``device``,
    measured once per process (by moving ``nbytes`` each way: well under a second at
    the default 32 MiB) and cached. Disk: written with ``fsync`` and read back after
    dropping the file from the page cache, so both figures are the disk's own.
    Host: pinned copies device->host and host->device."""
    where = torch.device(device)
    root = resolve_offload_dir(offload_dir)
    key = (target, str(where), root)
    if key not in _BANDWIDTHS:
        store = get_store(register_store(target, root, device=where))
        write, read = store.measure(nbytes, where)
        log.info("offload bandwidth to %s (%s): write %s/s, read %s/s", store.location, where,
                 format_bytes(write), format_bytes(read))
        _BANDWIDTHS[key] = (write, read)
    return _BANDWIDTHS[key]


_COPY_RATES: dict[tuple[str, str | None], float | None] = {}


def measure_copy_rate(target: str, device: torch.device | str,
                      nbytes: int = DEFAULT_PROBE_BYTES, *,
                      offload_dir: str | os.PathLike[str] | None = None) -> float | None:
    """`OffloadStore.measure_copies` of ``target``'s store for ``device``, measured
    once per process (``nbytes`` out and back, four times: about 150 ms here at the
    default 32 MiB) and cached; None where a copy engine does the copying."""
    where = torch.device(device)
    root = resolve_offload_dir(offload_dir)
    key = (target, root)
    if key not in _COPY_RATES:
        store = get_store(register_store(target, root, device=where))
        rate = store.measure_copies(nbytes)
        if rate is not None:
            log.info("offload copies to %s: %s/s of CPU time, out and back", store.location, format_bytes(rate))
        _COPY_RATES[key] = rate
    return _COPY_RATES[key]


def bandwidth(target: str, device: torch.device | str,
              given: float | tuple[float, float] | None = None, *,
              offload_dir: str | os.PathLike[str] | None = None) -> tuple[float, float]:
    """``(write, read)`` bytes per second for the planner: ``given`` when set (one
    figure for both directions, or a pair), else `measure_bandwidth`'s."""
    if given is None:
        return measure_bandwidth(target, device, offload_dir=offload_dir)
    pair = (given, given) if isinstance(given, (int, float)) else tuple(given)
    if len(pair) != 2 or not all(isinstance(b, (int, float)) and b > 0 for b in pair):
        raise ValueError(f"offload bandwidth must be a positive number of bytes/s or a "
                         f"(write, read) pair of them, got {given!r}")
    return float(pair[0]), float(pair[1])
