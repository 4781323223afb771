"""Helpers shared by the offload runtime tests."""

from __future__ import annotations

from functorch.compile import default_partition, make_boxed_func
from torch._dynamo.backends.common import aot_autograd

__all__ = ["recording_backend"]


def recording_backend(partition_fn=default_partition):
    """aot_eager with ``partition_fn`` (default: torch's default partitioner, which
    keeps each op on the side, forward or backward, where it was traced: the split the
    offload pass produces), recording the forward and backward graphs' code."""
    codes: dict[str, list[str]] = {"forward": [], "backward": []}

    def compiler(kind):
        def compile_graph(gm, example_inputs):
            codes[kind].append(gm.code)
            return make_boxed_func(gm.forward)

        return compile_graph

    backend = aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"),
                           partition_fn=partition_fn)
    return backend, codes
