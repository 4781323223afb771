"""memopt.runtime: what runs inside the compiled step, beside the generated code.

Offload stores (`offload_store`, `disk_store`, `host_store`) keep saved activations
on disk or in pinned host memory between forward and backward; the custom ops of
`memopt.codegen.offload` call them. The offload pass registers a store at compile time
(`register_store`) and bakes its id into the graph; `preflight`, `bandwidth` and
`measure_copy_rate` feed the planner; `stats` feeds the report; `synchronous_io` makes
the copies on the step's thread, for measuring with the allocator's view.
"""

from memopt.errors import MemoptOffloadError
from memopt.runtime.offload_store import (
    TARGETS,
    OffloadStore,
    StoreStats,
    bandwidth,
    close_all,
    get_store,
    measure_bandwidth,
    measure_copy_rate,
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
