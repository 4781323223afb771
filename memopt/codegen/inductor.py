"""``codegen="inductor"``: hand memopt's rewritten graphs to Inductor.

memopt does not re-implement Inductor's driver. It calls ``compile_fx`` (decompositions,
joint-graph passes, cudagraphs, caching all as in ``backend="inductor"``) with two
hooks:

* a `CustomPartitionerFn` that is memopt's partition (min-cut + memopt's pipeline);
* an ``inner_compile`` wrapper that runs memopt's pipeline on inference graphs (which
  never reach a partitioner) before Inductor's inner compile.

Caching: Inductor's FX-graph and AOTAutograd caches key on the partitioner's ``uuid``;
memopt's is a hash of its own source files plus the config, so a cached artifact is
only reused for the same memopt code and options. Recording (`memopt.explain`) and
dumps switch the caches off, because a cache hit skips the pipeline that records.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomPartitionerFn

from memopt.config import MemoptConfig

__all__ = ["MemoptPartitioner", "compile_with_inductor"]


@functools.cache
def _source_hash() -> str:
    root = pathlib.Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class MemoptPartitioner(CustomPartitionerFn):
    """Inductor's partitioner hook, delegating to a region's ``partition``."""

    def __init__(self, partition: Callable[..., Any], config: MemoptConfig) -> None:
        self._partition = partition
        self._key = _source_hash() + json.dumps(config.to_dict(), sort_keys=True)

    def __call__(
        self, gm: fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any
    ) -> tuple[fx.GraphModule, fx.GraphModule]:
        kwargs.pop("compiler", None)
        return self._partition(gm, joint_inputs, **kwargs)  # type: ignore[no-any-return]

    def uuid(self) -> Any:
        return self._key

    def __deepcopy__(self, memo: dict[int, Any]) -> MemoptPartitioner:
        # Inductor deep-copies its config (this hook included) to write repro
        # strings; the hook holds the region's graphs and fake tensors, which must
        # not be copied. It is used by identity, so a copy is the same object.
        return self


def compile_with_inductor(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    partition: Callable[..., Any],
    optimize_inference: Callable[[fx.GraphModule], fx.GraphModule],
    on_compiled: Callable[[str], None],
    config: MemoptConfig,
    mode: str | None = None,
    use_caches: bool = True,
) -> Callable[..., Any]:
    """Compile a Dynamo graph with Inductor, memopt's pipeline inside."""
    import torch._inductor as inductor
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    def inner_compile(graph: fx.GraphModule, inputs: Sequence[Any], **kwargs: Any) -> Any:
        if kwargs.get("is_inference"):
            graph = optimize_inference(graph)
            on_compiled("inference")
        else:
            on_compiled("backward" if kwargs.get("is_backward") else "forward")
        return compile_fx_inner(graph, inputs, **kwargs)

    patches: dict[str, Any] = {"custom_partitioner_fn": MemoptPartitioner(partition, config)}
    if mode:
        patches.update(inductor.list_mode_options(mode))
    if not use_caches:
        patches.update({"fx_graph_cache": False, "fx_graph_remote_cache": False})
        import torch._functorch.config as functorch_config

        with functorch_config.patch(enable_autograd_cache=False):
            return compile_fx(gm, example_inputs, inner_compile=inner_compile, config_patches=patches)
    return compile_fx(gm, example_inputs, inner_compile=inner_compile, config_patches=patches)
