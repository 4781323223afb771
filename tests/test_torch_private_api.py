"""Pins the private torch APIs memopt calls, as it calls them (names, the parameters
it passes, the attributes it reads), on the installed torch.

Private APIs move between releases. Most are exercised by behaviour tests too, but a
rename there surfaces as a fallback warning or a wrong estimate several layers away;
here it fails with the name of the API and of memopt's module that uses it. If a test
fails after a torch upgrade, mend the module named in its docstring (and gate the
difference in `memopt/_compat.py` while both releases are supported). The bucketing
helpers are pinned in `tests/distributed/test_collective_passes.py`, the gates in
`tests/test_compat.py`.
"""

from __future__ import annotations

import inspect

import torch


def _parameters(fn: object) -> list[str]:
    return list(inspect.signature(fn).parameters)  # type: ignore[arg-type]


def test_partitioner_split_helpers():
    """`memopt/graph/partition.py` splits the joint graph with torch's helper, passing
    the module, the saved tensors and symbols by position and ``num_fwd_outputs`` by
    name, then raises getitems; it reads the donated-buffer switch
    (`memopt/analysis/liveness.py`)."""
    from torch._functorch import partitioners

    params = _parameters(partitioners._extract_fwd_bwd_modules)
    assert params[:3] == ["joint_module", "saved_values", "saved_sym_nodes"]
    assert "num_fwd_outputs" in params
    assert _parameters(partitioners.raise_getitems) == ["gm"]
    assert isinstance(torch._functorch.config.donated_buffer, bool)


def test_lazy_graph_modules():
    """`memopt/graph/partition.py` and `memopt/graph/dropout.py` build graph modules
    without generating their code until needed."""
    from torch.fx import _lazy_graph_module

    module = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    with _lazy_graph_module._use_lazy_graph_module(True):
        built = _lazy_graph_module._make_graph_module(module, module.graph)
    assert isinstance(built, torch.fx.GraphModule)


def test_boxed_codegen():
    """The eager codegen (`memopt/codegen/eager.py`) runs graphs with boxed inputs."""
    from torch.fx.graph import _BoxedCodeGen

    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    gm.graph.set_codegen(_BoxedCodeGen())
    gm.recompile()
    args = [torch.ones(2)]
    assert torch.equal(gm(args), torch.full((2,), 2.0)) and args == []  # the list is cleared


def test_inductor_hooks():
    """`memopt/codegen/inductor.py`: the custom partitioner (abstract ``__call__`` and
    ``uuid``), the choices handler around the inner compile with horizontal and
    vertical fusion vetoes, and the options of a ``mode``."""
    import torch._inductor as inductor
    from torch._inductor.choices import InductorChoices
    from torch._inductor.custom_graph_pass import CustomPartitionerFn
    from torch._inductor.virtualized import V

    assert CustomPartitionerFn.__abstractmethods__ == {"__call__", "uuid"}
    fuse = ["scheduler", "node1", "node2", "shared_data_score"]
    assert _parameters(InductorChoices.can_fuse_horizontal) == fuse
    assert _parameters(InductorChoices.can_fuse_vertical) == fuse
    assert callable(V.set_choices_handler)
    assert _parameters(inductor.list_mode_options)[0] == "mode"
    assert isinstance(inductor.list_mode_options("reduce-overhead"), dict)


def test_inductor_lowering_tables():
    """`memopt/analysis/fusion.py` reads which ops Inductor lowers to its own loops and
    which fall back to ATen; `memopt/codegen/offload.py` registers fallback lowerings
    and finds their `FallbackKernel`."""
    from torch._inductor import ir, lowering

    assert torch.ops.aten.add.Tensor in lowering.lowerings
    assert torch.ops.aten.rand.default in lowering.fallbacks  # a set of op overloads
    assert _parameters(lowering.fallback_handler)[:2] == ["kernel", "add_to_fallback_set"]
    assert _parameters(lowering.register_lowering)[0] == "aten_fn"
    assert isinstance(ir.FallbackKernel, type)


def test_inductor_wrapper_free():
    """`memopt/codegen/offload.py` replaces the Python wrapper's ``codegen_free`` to
    free an offloaded buffer without offering it for reuse: it writes a `FreeLine`,
    marks ``self.freed`` and reads the graph's ``never_reuse_buffers`` and
    ``operations``."""
    from torch._inductor.codegen.wrapper import FreeLine, PythonWrapperCodegen
    from torch._inductor.graph import GraphLowering

    assert _parameters(PythonWrapperCodegen.codegen_free) == ["self", "buffer"]
    assert _parameters(FreeLine)[:2] == ["wrapper", "node"]
    wrapper_init = inspect.getsource(PythonWrapperCodegen.__init__)
    assert "self.freed" in wrapper_init
    graph_init = inspect.getsource(GraphLowering.__init__)
    assert "self.never_reuse_buffers" in graph_init and "self.operations" in graph_init


def test_autocast_markers_and_compile_context():
    """`memopt/passes/precision.py` and `blocked_cross_entropy.py` find autocast regions
    in Dynamo graphs by these functions; `memopt/backends/dynamo.py` names regions by
    the compile id, and `memopt/backends/watched.py` reads the tracing context."""
    from torch.amp import autocast_mode

    assert _parameters(autocast_mode._enter_autocast) == ["vals"]
    assert _parameters(autocast_mode._exit_autocast) == ["mode"]
    assert torch._guards.CompileContext.current_compile_id() is None  # outside a compile
    assert torch._guards.TracingContext.try_get() is None


def test_default_store(tmp_path):
    """`memopt/backends/agreement.py` agrees through the default process group's store:
    `_get_default_store` returns it (the same object while the group lives), with the
    group's timeout, and the store reads, writes, checks and deletes keys."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _get_default_store

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=timedelta(seconds=42))  # fmt: skip
    try:
        store = _get_default_store()
        assert store is _get_default_store() and store.timeout == timedelta(seconds=42)
        store.set("memopt/agree/probe", "1")
        assert store.check(["memopt/agree/probe"]) and store.get("memopt/agree/probe") == b"1"
        assert store.delete_key("memopt/agree/probe") and not store.check(["memopt/agree/probe"])
        assert issubclass(dist.DistStoreError, dist.DistError)
    finally:
        dist.destroy_process_group()
