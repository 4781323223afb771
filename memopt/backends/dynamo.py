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
from torch._functorch.partitioners import min_cut_rematerialization_partition

from memopt._logging import configure_from_env
from memopt._once import frame_compile_started, said_since_reset
from memopt.backends.graph_breaks import warn_skipped_frames
from memopt.backends.meta_device import composite_autograd_on_meta
from memopt.backends.record import active_recorders
from memopt.backends.region import RegionCompiler, describe_inputs
from memopt.backends.shapes import watch_shapes
from memopt.backends.watched import CompiledRegion, WatchedRegion
from memopt.backends.wholestep import TRACKER
from memopt.codegen.eager import DECOMPOSITIONS as EAGER_DECOMPOSITIONS
from memopt.codegen.eager import compile_eager
from memopt.codegen.inductor import compile_with_inductor
from memopt.config import MemoptConfig
from memopt.errors import PASSED_THROUGH, MemoptWarning
from memopt.failsoft import fail_soft, is_torch_signal
from memopt.graph.step import clone_graph_module, output_values

__all__ = ["memopt_backend"]

log = logging.getLogger("memopt")

_APPLIED_BY = {
    "precision": "precision",
    "compress_activations": "compress_activations",
    "offload": "offload",
    "optimizer_in_backward": "optimizer_in_backward",
}
"""Options -> the pass that applies them: with that pass disabled the option does nothing."""


def _region_name() -> str:
    compile_id = torch._guards.CompileContext.current_compile_id()
    return str(compile_id) if compile_id is not None else "0"


def _warn_inert_options(config: MemoptConfig, kwargs: Mapping[str, Any]) -> None:
    """Warn of each setting that can do nothing (backend arguments memopt ignores, an
    option another one makes inert), naming it and the fix: once since the last
    ``torch._dynamo.reset()``, not for every region and recompile compiled with the
    same options (`memopt._once.said_since_reset`)."""
    messages = []
    if kwargs:
        messages.append(
            f"memopt ignores backend arguments {sorted(kwargs)}; pass memopt settings "
            f"as options={{...}} (valid keys: see memopt.MemoptConfig)."
        )
    if config.precision_policy and config.precision is None:
        messages.append(
            f"memopt ignores precision_policy={dict(config.precision_policy)}: precision is None, so "
            f"no op is lowered and the overrides have nothing to change. Set precision='bf16' or "
            f"'fp16' for them to apply."
        )
    if config.offload_dir is not None and config.offload is None:
        messages.append(
            f"memopt ignores offload_dir={config.offload_dir!r}: offload is None, so nothing is written there. "
            "Set offload='disk' or 'auto' for it to apply."
        )
    for option, pass_name in _APPLIED_BY.items():
        if getattr(config, option) is not None and pass_name in config.disable_passes:
            messages.append(
                f"memopt ignores {option}={getattr(config, option)!r}: disable_passes names {pass_name!r}, the "
                f"pass that applies it. Drop {pass_name!r} from disable_passes, or the option."
            )
    for message in messages:
        if not said_since_reset(message):
            warnings.warn(message, MemoptWarning, stacklevel=3)


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
    warn_skipped_frames(recording=bool(active_recorders()), stacklevel=2)
    name = _region_name()
    frame_compile_started(name)
    _warn_inert_options(config, kwargs)
    region = RegionCompiler(
        config,
        name,
        inputs=describe_inputs(gm, example_inputs),
        num_user_outputs=len(output_values(gm)),
    )
    region.example_inputs = tuple(example_inputs)
    pristine = clone_graph_module(gm)  # the pre-autograd stage rewrites gm in place
    try:
        return watch_shapes(_compile_with_memopt(region, gm, example_inputs, mode), region, pristine)
    except PASSED_THROUGH:
        raise  # strict=True
    except Exception as exc:  # noqa: BLE001 - fail soft, see memopt.failsoft
        if is_torch_signal(exc):
            region.withdraw_record()  # this compile is abandoned (a restart compiles the frame again)
            raise
        if config.strict:
            fail_soft(region.stage, region.region, exc, strict=True, outcome="")
        compiled = compile_as_torch(pristine, example_inputs, config, mode)  # torch's own error if this fails too
        outcome = f"this region is compiled as torch.compile would without memopt ({config.codegen} codegen)"
        region.record.fallbacks.append(fail_soft(region.stage, region.region, exc, strict=False, outcome=outcome))
        return compiled


def _compile_with_memopt(
    region: RegionCompiler, gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None
) -> Callable[..., Any]:
    config = region.config
    gm = region.optimize_pre_autograd(gm)  # precision lowering, before AOTAutograd
    log.info("region %s: compiling %d-node graph (codegen=%s)", region.region, len(gm.graph.nodes), config.codegen)
    if config.codegen != "inductor" and mode not in (None, "default"):
        message = f"memopt ignores mode={mode!r} with codegen='eager' (modes tune Inductor)."
        if not said_since_reset(message):  # once, not per region (`_warn_inert_options`)
            warnings.warn(message, MemoptWarning, stacklevel=3)
    compile = functools.partial(_compile_region, mode=mode)
    watched: WatchedRegion
    if config.memory_budget is None:
        fn = compile(region, gm, example_inputs)
        watched = WatchedRegion(region, fn, TRACKER)
        if not watched.recording and config.optimizer_in_backward is None:
            return fn  # nothing to observe (with optimizer_in_backward: calls before a backward)
    else:  # planned again across graph breaks, and for gradients held (accumulation)
        alone = not config.plan_across_graph_breaks
        watched = CompiledRegion(region, compile, gm, example_inputs, TRACKER, alone=alone)
    # TRACKER (memopt.backends.wholestep, a memopt.backends.steptracker.StepTracker)
    # observes its calls: which outputs the caller keeps, for the recorded step
    # estimate and, under a budget, for the step's plan.
    return torch._dynamo.disable(watched, reason="memopt's compiled region")


def compile_as_torch(
    gm: fx.GraphModule, example_inputs: Sequence[Any], config: MemoptConfig, mode: str | None = None
) -> Callable[..., Any]:
    """``gm`` compiled as torch would without memopt: Inductor (``mode`` applied) for
    ``codegen="inductor"``, else AOTAutograd with torch's min-cut partition and plain
    FX execution (what memopt's eager codegen runs when no option changes anything)."""
    if config.codegen == "inductor":
        import torch._inductor as inductor
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, list(example_inputs), config_patches=inductor.list_mode_options(mode) if mode else {})
    return aot_autograd(
        fw_compiler=compile_eager,
        bw_compiler=compile_eager,
        partition_fn=min_cut_rematerialization_partition,
        keep_inference_input_mutations=True,
    )(gm, example_inputs)


def _compile_region(
    region: RegionCompiler, gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None
) -> Callable[..., Any]:
    """AOTAutograd (inside Inductor, or with eager codegen) over ``gm``, ``region``'s
    pipeline inside."""
    with composite_autograd_on_meta():  # nll_loss & co. keep their gradients on meta tensors
        return _aot_compile_region(region, gm, example_inputs, mode)


def _aot_compile_region(
    region: RegionCompiler, gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None
) -> Callable[..., Any]:
    config = region.config
    region.stage = "planning"  # AOTAutograd traces the joint graph, then calls the partition
    if config.codegen == "inductor":
        return compile_with_inductor(
            gm,
            example_inputs,
            partition=region.partition,
            optimize_inference=lambda g: region.optimize(region.inference_step(g)).forward,
            on_compiled=region.entering_codegen,
            config=config,
            mode=mode,
            use_caches=not (active_recorders() or config.dump_dir),
            partition_always=config.memory_budget is not None,
        )
    return aot_autograd(
        fw_compiler=region.compile_forward,
        bw_compiler=region.compile_backward,
        inference_compiler=region.compile_inference,
        partition_fn=region.partition,
        decompositions=EAGER_DECOMPOSITIONS,
        keep_inference_input_mutations=True,
    )(gm, example_inputs)
