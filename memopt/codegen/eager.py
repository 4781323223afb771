"""``codegen="eager"``: run the rewritten FX graphs op by op.

The graph is regenerated with FX's boxed calling convention: the compiled function
takes one list of inputs and clears it, and FX's generated code drops every value after
its last use, so a backward graph frees each saved activation as soon as it has
consumed it (as AOTAutograd's ``boxed_nop`` does for ``aot_eager``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.fx as fx
from torch.fx.graph import _BoxedCodeGen

__all__ = ["compile_eager"]


def compile_eager(gm: fx.GraphModule, example_inputs: Any = None) -> Callable[[list[Any]], Any]:
    """A boxed callable running ``gm``. ``gm``'s codegen is switched to boxed."""
    gm.graph.set_codegen(_BoxedCodeGen())
    gm.recompile()
    forward = gm.forward

    def run(args: list[Any]) -> Any:
        return forward(args)

    run._boxed_call = True  # type: ignore[attr-defined]
    run.graph_module = gm  # type: ignore[attr-defined]  # for inspection in tests
    return run
