"""Helpers shared by the offload runtime tests."""

from __future__ import annotations

import threading

from functorch.compile import default_partition, make_boxed_func
from torch._dynamo.backends.common import aot_autograd

__all__ = ["recording_backend", "FakeEvent"]


class FakeEvent:
    """A copy's event for fake transfers: complete at once, or when the test sets
    ``done``; ``synchronize`` waits for it (10 s at most)."""

    def __init__(self, done: bool) -> None:
        self.done = threading.Event()
        if done:
            self.done.set()

    def synchronize(self) -> None:
        assert self.done.wait(10), "fake copy never completed"


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
