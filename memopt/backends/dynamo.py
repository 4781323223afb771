"""The Dynamo entry point: ``torch.compile(model, backend="memopt", options={...})``.

Registered through the ``torch_dynamo_backends`` entry-point group (pyproject.toml), so
the string ``"memopt"`` works without importing memopt first.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo.backends.common import aot_autograd

from memopt._logging import configure_from_env
from memopt.backends.record import active_recorders
from memopt.backends.region import RegionCompiler, describe_inputs
from memopt.backends.wholestep import CompiledRegion
from memopt.codegen.inductor import compile_with_inductor
from memopt.config import MemoptConfig
from memopt.errors import MemoptWarning
from memopt.graph.step import output_values

__all__ = ["memopt_backend"]

log = logging.getLogger("memopt")


def _region_name() -> str:
    compile_id = torch._guards.CompileContext.current_compile_id()
    return str(compile_id) if compile_id is not None else "0"


def memopt_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Mapping[str, Any] | MemoptConfig | None = None,
    mode: str | None = None,
    **kwargs: Any,
) -> Callable[..., Any]:
    """Compile one Dynamo graph with memopt (see `memopt.MemoptConfig` for options)."""
    configure_from_env()
    config = MemoptConfig.from_options(options)
    if kwargs:
        warnings.warn(
            f"memopt ignores backend arguments {sorted(kwargs)}; pass memopt settings "
            f"as options={{...}} (valid keys: see memopt.MemoptConfig).",
            MemoptWarning,
            stacklevel=2,
        )
    region = RegionCompiler(
        config,
        _region_name(),
        inputs=describe_inputs(gm, example_inputs),
        num_user_outputs=len(output_values(gm)),
    )
    region.example_inputs = tuple(example_inputs)
    gm = region.optimize_pre_autograd(gm)  # precision lowering, before AOTAutograd
    log.info("region %s: compiling %d-node graph (codegen=%s)", region.region, len(gm.graph.nodes), config.codegen)
    if config.codegen != "inductor" and mode not in (None, "default"):
        warnings.warn(
            f"memopt ignores mode={mode!r} with codegen='eager' (modes tune Inductor).",
            MemoptWarning,
            stacklevel=2,
        )
    compile = functools.partial(_compile_region, mode=mode)
    if config.memory_budget is None or not config.plan_across_graph_breaks:
        return compile(region, gm, example_inputs)
    compiled = CompiledRegion(region, compile, gm, example_inputs)  # plans across graph breaks
    return torch._dynamo.disable(compiled, reason="memopt's compiled region")


def _compile_region(
    region: RegionCompiler, gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None
) -> Callable[..., Any]:
    """AOTAutograd (inside Inductor, or with eager codegen) over ``gm``, ``region``'s
    pipeline inside."""
    config = region.config
    if config.codegen == "inductor":
        return compile_with_inductor(
            gm,
            example_inputs,
            partition=region.partition,
            optimize_inference=lambda g: region.optimize(region.inference_step(g)).forward,
            on_compiled=region.record.compiled_graphs.append,
            config=config,
            mode=mode,
            use_caches=not (active_recorders() or config.dump_dir),
            partition_always=config.memory_budget is not None and config.plan_across_graph_breaks,
        )
    return aot_autograd(
        fw_compiler=region.compile_forward,
        bw_compiler=region.compile_backward,
        inference_compiler=region.compile_inference,
        partition_fn=region.partition,
        keep_inference_input_mutations=True,
    )(gm, example_inputs)
