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
    enter memopt's pipeline (every pass disabled), in compile order. Backward runs if
    the output requires grad, as in `memopt.explain`."""
    return _capture(fn, *args, **kwargs)[0]


def capture_step(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> StepGraphs:
    """The single region of ``fn``; raises if it compiles to more than one (naming
    Dynamo's reasons for the graph breaks, and `capture_steps`)."""
    steps, explanation = _capture(fn, *args, **kwargs)
    if len(steps) != 1:
        regions = ", ".join(r.region for r in explanation.regions if r.step is not None)
        why = "; ".join(b.rstrip(". ") for b in explanation.graph_breaks) or "none reported (a recompile?)"
        raise RuntimeError(
            f"capture_step expects one compiled region, but fn compiled to {len(steps)} ({regions}); "
            f"Dynamo's reasons: {why}. Use capture_steps(fn, *args), which returns every region's "
            "StepGraphs in compile order, or remove the graph break."
        )
    return steps[0]


def _capture(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[list[StepGraphs], Any]:
    from memopt.explain import explain

    config = MemoptConfig(codegen="eager", disable_passes=tuple(pass_names()))
    explanation = explain(fn, *args, options=config, **kwargs)  # type: ignore[arg-type]
    steps = [r.step for r in explanation.regions if r.step is not None]
    if not steps:
        raise RuntimeError("no region was compiled: does the function run any tensor op?")
    return steps, explanation
