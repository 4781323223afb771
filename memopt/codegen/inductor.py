"""``codegen="inductor"``: hand memopt's rewritten graphs to Inductor.

memopt does not re-implement Inductor's driver. It calls ``compile_fx`` (decompositions,
joint-graph passes, cudagraphs, caching all as in ``backend="inductor"``) with two
hooks:

* a `CustomPartitionerFn` that is memopt's partition (min-cut + memopt's pipeline);
* an ``inner_compile`` wrapper that runs memopt's pipeline on inference graphs (which
  never reach a partitioner) before Inductor's inner compile.

Caching: Inductor's FX-graph and AOTAutograd caches key on a pickle of Inductor's
config, the partitioner included, and on its ``uuid``. memopt's key is a hash of its
own source files plus the config, and the partitioner pickles as that key (the region
it holds does not pickle), so a cached artifact is only reused for the same memopt
code and options. Recording (`memopt.explain`) and dumps switch the caches off,
because a cache hit skips the pipeline that records; under a budget planned for the
whole step, with ``optimizer_in_backward``, and with ``optimizer`` under a budget,
AOTAutograd's cache is off (its hit would skip the planner, whose plan its key does
not see, or the attaching of the optimizer), and each deliberate bypass is logged
once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomPartitionerFn

from memopt.config import MemoptConfig

__all__ = ["MemoptPartitioner", "PartitionerKey", "compile_with_inductor"]

log = logging.getLogger("memopt")
_said: set[str] = set()


def _say_once(level: int, message: str) -> None:
    """Log ``message`` the first time only (a deliberate cache bypass, said once per
    process rather than once per region)."""
    if message not in _said:
        _said.add(message)
        log.log(level, message)


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

    def __reduce__(self) -> tuple[type[PartitionerKey], tuple[str]]:
        # Inductor's FX graph cache key and AOTAutograd's pickle the whole Inductor
        # config, this hook included (torch leaves ``custom_partitioner_fn`` out of
        # its ignore lists). The hook holds the region (graphs, fake tensors, cyclic
        # dicts): pickled as is, the key fails and Inductor bypasses its cache with a
        # warning. What identifies the hook is its key, so that is what pickles.
        return PartitionerKey, (self._key,)


class PartitionerKey(CustomPartitionerFn):
    """What a pickled `MemoptPartitioner` becomes: its key (memopt's source hash and
    the config), for cache keys. It cannot partition (the region is not pickled)."""

    def __init__(self, key: str) -> None:
        self._key = key

    def __call__(
        self, gm: fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any
    ) -> tuple[fx.GraphModule, fx.GraphModule]:
        raise RuntimeError("a pickled MemoptPartitioner keeps only its cache key; it cannot partition")

    def uuid(self) -> Any:
        return self._key

    def __reduce__(self) -> tuple[type[PartitionerKey], tuple[str]]:
        return PartitionerKey, (self._key,)


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
    partition_always: bool = False,
) -> Callable[..., Any]:
    """Compile a Dynamo graph with Inductor, memopt's pipeline inside.

    ``use_caches=False`` turns off Inductor's FX graph cache and AOTAutograd's cache
    (every pass runs and is recorded); ``partition_always`` turns off only the
    AOTAutograd cache, whose hit skips the partition, hence memopt's planner (its key
    does not know the step a region runs in)."""
    import torch._functorch.config as functorch_config
    import torch._inductor as inductor
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    from memopt.codegen.offload import register_inductor_lowering

    if config.offload is not None:
        register_inductor_lowering()  # an offloaded buffer must not be reused while written

    def inner_compile(graph: fx.GraphModule, inputs: Sequence[Any], **kwargs: Any) -> Any:
        if kwargs.get("is_inference"):
            graph = optimize_inference(graph)
            on_compiled("inference")
        else:
            on_compiled("backward" if kwargs.get("is_backward") else "forward")
        if config.memory_budget is None:
            return compile_fx_inner(graph, inputs, **kwargs)
        from torch._inductor.virtualized import V

        with V.set_choices_handler(_nearby_fusion_only()):
            return compile_fx_inner(graph, inputs, **kwargs)

    patches: dict[str, Any] = {"custom_partitioner_fn": MemoptPartitioner(partition, config)}
    if mode:
        patches.update(inductor.list_mode_options(mode))
    if frees_at_last_use(config):
        patches.update(BUDGET_PATCHES)
    if not use_caches:
        patches.update({"fx_graph_cache": False, "fx_graph_remote_cache": False})
        _say_once(logging.DEBUG, "recording or dumping: Inductor's caches are off (a hit skips the recording)")
    elif partition_always:
        _say_once(
            logging.INFO,
            "under a memory budget, AOTAutograd's cache is off: a hit would skip memopt's planner, whose plan "
            "depends on the step's other regions and on the gradients held (accumulation), which its key does not see. "
            "Inductor's FX graph cache still applies (its key is the planned graph).",
        )
    elif config.optimizer_in_backward is not None:
        _say_once(
            logging.INFO,
            "with optimizer_in_backward, AOTAutograd's cache is off: a hit would skip the partition, where the "
            "optimizer is attached to the region's parameters (its key knows only the optimizer's type).",
        )
    elif config.optimizer is not None and config.memory_budget is not None:
        _say_once(
            logging.INFO,
            "with optimizer= and a memory budget, AOTAutograd's cache is off: a hit would skip memopt's planner, "
            "whose plan counts the optimizer's state bytes, which its key does not see (only the optimizer's type).",
        )
    stale = config.optimizer is not None and config.memory_budget is not None
    if not use_caches or partition_always or config.optimizer_in_backward is not None or stale:
        with functorch_config.patch(enable_autograd_cache=False):
            return compile_fx(gm, example_inputs, inner_compile=inner_compile, config_patches=patches)
    return compile_fx(gm, example_inputs, inner_compile=inner_compile, config_patches=patches)


BUDGET_PATCHES: dict[str, Any] = {"allow_buffer_reuse": False}
"""Inductor config wherever memopt plans where saved values live (`frees_at_last_use`).
``allow_buffer_reuse`` keeps a dead buffer allocated until a later buffer of the same
size takes it over (``buf61 = reinterpret_tensor(buf16, ...); del buf16  # reuse``); in
a backward that recomputes every block, a block's recomputed buffers are held into the
next block's backward, above the plan, which frees a buffer at its last use. Off, every
buffer is freed at its last use. In-place kernels (``inplace_buffers``, modelled by
`memopt.analysis.fusion.inplace_reuses`) are a separate setting and stay on."""


def frees_at_last_use(config: MemoptConfig) -> bool:
    """Whether Inductor compiles with `BUDGET_PATCHES` (every buffer freed at its last
    use, as memopt's estimate assumes): under a ``memory_budget``, and wherever saved
    values are moved out of memory until backward (``offload``, ``compress_activations``)
    even without one. Those options move the step's peak from the end of forward into
    backward, among the reloaded or restored values, where a dead buffer held for reuse
    counts: the zoo GPT (2 layers, width 32, batch 8 x 32) with ``offload="disk"`` and
    no budget measured 600,760 B with reuse on, 9.6% above its estimate of 548,012 B (a
    gelu-backward buffer of one block held through the next block's attention backward),
    and 526,720 B with it off. Without any of them Inductor's config is left as it is."""
    return (
        config.memory_budget is not None
        or config.offload is not None
        or config.compress_activations is not None
    )


FUSION_WINDOW = 4
"""Under a memory budget, Inductor may fuse two kernels that share an input ("horizontal"
fusion) only if together they span at most this many of its scheduler nodes (in graph
order, as ``Scheduler.are_long_distant_nodes`` counts them), and a kernel with the
kernel that writes a buffer it reads ("vertical" fusion) only if the writer is at most
this many scheduler nodes before it."""


def _nearby_fusion_only() -> Any:
    """Inductor's fusion choices, except that fusions of far-apart kernels are refused.

    Horizontal fusion runs two kernels that read the same buffer as one, at the earlier
    one's place: with rematerialization, the recomputation of an early block is fused
    with a kernel of a late one and its results are made long before backward needs
    them (measured: the zoo GPT at ``memory_budget=0.5`` grew from the planned 5.3 MiB
    to 7.5 MiB). Inductor's own guard (``Scheduler.are_long_distant_nodes``) allows 64
    scheduler nodes, most of a small model's backward; here it is 4. Nearby fusions
    (a layer norm's reductions, a bias gradient beside its matmul) are kept.

    Vertical fusion gets there through a producer two kernels read. Inductor's
    lowering of ``inductor_random`` realizes the random values as a kernel of their
    own, and a recomputed dropout and the dropout's gradient both read them: the random
    kernel is fused into the first, then the pair into the second, far later, and
    the scheduler runs the three as one kernel once everything the second needs exists
    (``Scheduler.topological_sort_schedule``). The recomputed dropout is then made after
    the attention gradient's matmul instead of before it, live together with that
    kernel's inputs and outputs: one attention-sized buffer more than memopt's plan
    (Hugging Face BERT at ``memory_budget=0.5``: 6% over the budget; the zoo GPT with
    dropout 0.1: 17% over the estimate). Refused, the random values are a buffer from
    their first reader to the second, as the plan counts them."""
    from torch._inductor.choices import InductorChoices

    class NearbyFusionOnly(InductorChoices):
        @staticmethod
        def can_fuse_horizontal(scheduler: Any, node1: Any, node2: Any, shared_data_score: int) -> bool:
            if not InductorChoices.can_fuse_horizontal(scheduler, node1, node2, shared_data_score):
                return False
            extent = max(abs(node1.min_order - node2.max_order), abs(node2.min_order - node1.max_order))
            return extent <= FUSION_WINDOW

        @staticmethod
        def can_fuse_vertical(scheduler: Any, node1: Any, node2: Any, shared_data_score: int) -> bool:
            if not InductorChoices.can_fuse_vertical(scheduler, node1, node2, shared_data_score):
                return False
            read = {dep.name for dep in node2.read_writes.reads}
            writers = [n.max_order for n in node1.get_nodes() if n.get_buffer_names() & read]
            return not writers or node2.min_order - max(writers) <= FUSION_WINDOW

    return NearbyFusionOnly()
