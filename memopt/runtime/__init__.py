"""memopt.runtime: what runs inside the compiled step, beside the generated code.

Offload stores (`offload_store`, `disk_store`, `host_store`, each with its I/O thread
from `io_worker`) keep saved activations on disk or in pinned host memory between
forward and backward; the custom ops of `memopt.codegen.offload` call them through
`offload_ops`. The offload pass registers a store at compile time (`register_store`,
in `store_registry`) and bakes its id into the graph; `preflight`, `bandwidth` and
`measure_copy_rate` (`store_bandwidth`) feed the planner; `stats` feeds the report;
`synchronous_io` makes the copies on the step's thread, for measuring with the
allocator's view.
"""

from memopt.errors import MemoptOffloadError
from memopt.runtime.offload_store import OffloadStore, StoreStats
from memopt.runtime.store_bandwidth import bandwidth, measure_bandwidth, measure_copy_rate
from memopt.runtime.store_registry import (
    TARGETS,
    close_all,
    get_store,
    register_store,
    synchronous_io,
)

__all__ = [
    "TARGETS",
    "MemoptOffloadError",
    "OffloadStore",
    "StoreStats",
    "bandwidth",
    "close_all",
    "get_store",
    "measure_bandwidth",
    "measure_copy_rate",
    "register_store",
    "synchronous_io",
]
