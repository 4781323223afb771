"""Capture the graphs memopt's passes see, for pass-level tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from memopt.config import MemoptConfig
from memopt.graph.step import StepGraphs
from memopt.passes.pipeline import pass_names

__all__ = ["capture_steps", "capture_step"]


def capture_steps(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[StepGraphs]:
    """The `StepGraphs` of every region ``fn(*args, **kwargs)`` compiles to, as they
    enter memopt's pipeline (every pass disabled). Backward runs if the output
    requires grad, as in `memopt.explain`."""
    from memopt.explain import explain

    config = MemoptConfig(codegen="eager", disable_passes=tuple(pass_names()))
    explanation = explain(fn, *args, options=config, **kwargs)  # type: ignore[arg-type]
    steps = [r.step for r in explanation.regions if r.step is not None]
    if not steps:
        raise RuntimeError("no region was compiled: does the function run any tensor op?")
    return steps


def capture_step(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> StepGraphs:
    """The single region of ``fn``; raises if it compiles to more than one."""
    steps = capture_steps(fn, *args, **kwargs)
    if len(steps) != 1:
        raise RuntimeError(f"expected one compiled region, got {len(steps)} (graph breaks?)")
    return steps[0]
