"""memopt._compat: each gate's choice on the installed torch, and its behaviour.

The suite runs on one torch at a time (torch 2.13 in CI, torch 2.11 in the scratch venv
README.md names), so a gate's fallback and the newer API it stands in for never run in
the same process: each behaviour test asserts values computed by hand, which both
paths must produce.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from memopt import _compat
from memopt.analysis.aliasing import concrete_int


def test_torch_version_is_in_the_supported_range():
    """pyproject.toml declares torch>=2.11,<2.14; TORCH_VERSION is (major, minor)."""
    assert (2, 11) <= _compat.TORCH_VERSION < (2, 14)
    assert torch.__version__.startswith("%d.%d." % _compat.TORCH_VERSION)


def test_optimization_hint_gate_choice():
    """symbolic_shapes.optimization_hint is in torch 2.12 and 2.13, not in 2.11."""
    assert _compat.HAS_OPTIMIZATION_HINT is (_compat.TORCH_VERSION >= (2, 12))


def _symbolic_sizes() -> dict[str, torch.SymInt]:
    """Sizes of a graph traced symbolically at x: (3, 5) (backed symbols, named s<k>)
    and of ``x.nonzero()`` (an unbacked one, u0), keyed by their expression."""

    def f(x: torch.Tensor):
        n = x.nonzero()  # n.shape[0] is an unbacked symbol
        return x.reshape(-1) * 2, n.reshape(-1), n.shape[0] * x.shape[0]

    gm = make_fx(f, tracing_mode="symbolic")(torch.randn(3, 5))
    sizes: dict[str, torch.SymInt] = {}
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        for size in value.shape if isinstance(value, torch.Tensor) else [value]:
            if isinstance(size, torch.SymInt):
                sizes.setdefault(str(size), size)
    return sizes


def test_optimization_hint_backed_and_unbacked():
    """Backed symbols take the example input's value (s0=3, s1=5); each unbacked symbol
    takes Inductor's ``unbacked_symint_fallback`` (8192), on every supported torch."""
    from torch._inductor.config import unbacked_symint_fallback

    assert unbacked_symint_fallback == 8192
    hints = {expr: _compat.optimization_hint(size) for expr, size in _symbolic_sizes().items()}
    backed = {e: h for e, h in hints.items() if "u" not in e}
    unbacked = {e: h for e, h in hints.items() if "u" in e}
    assert sorted(backed.values()) == [3, 5, 15]  # s0, s1, s0*s1
    assert sorted(unbacked.values()) == [8192, 16384, 24576]  # u0, 2*u0, s0*u0
    assert _compat.optimization_hint(7) == 7


def test_concrete_int_goes_through_the_gate():
    sizes = _symbolic_sizes()
    assert [concrete_int(s) for s in sizes.values()] == [_compat.optimization_hint(s) for s in sizes.values()]


def test_triton_version_is_read_without_importing_triton():
    triton = pytest.importorskip("triton")
    assert _compat.triton_version() == tuple(int(p) for p in triton.__version__.split(".")[:2])


def test_interpreter_loop_gate_choice():
    """False exactly for triton < 3.7 with numpy >= 2.4 (torch 2.11's triton 3.6 with a
    current numpy); True with triton 3.7 (torch 2.12's) and 3.9 (torch 2.13's)."""
    pytest.importorskip("triton")
    new_numpy = tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 4)
    expected = _compat.triton_version() >= (3, 7) or not new_numpy
    assert _compat.triton_interpreter_loops_to_runtime_bounds() is expected


def test_interpreter_loop_gate_matches_the_interpreter(monkeypatch: pytest.MonkeyPatch):
    """The gate says True exactly when the interpreter runs a loop to a runtime bound."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    from memopt.codegen._triton import launchable

    @triton.jit
    def count_kernel(out_ptr, n, STEP: tl.constexpr):
        total = 0
        for _ in range(0, n, STEP):
            total += 1
        tl.store(out_ptr, total)

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = torch.zeros(1, dtype=torch.int32)
    try:
        launchable(count_kernel)[(1,)](out, 10, STEP=4)
        ran = True
    except Exception as exc:  # noqa: BLE001 - triton.runtime.errors.InterpreterError
        assert "0-dimensional" in str(exc)
        ran = False
    assert ran is _compat.triton_interpreter_loops_to_runtime_bounds()
    if ran:
        assert out.item() == 3


def test_functional_collective_gates_choice():
    """torch 2.13 names the functional all-gather and reduce-scatter ``*_single`` (the
    ``*_tensor`` names are deprecated wrappers there); torch 2.11 and 2.12 have only ``*_tensor``.
    Same for ``torch.distributed``'s in-place all-gather (``all_gather_single`` against
    ``all_gather_into_tensor``)."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    new = _compat.TORCH_VERSION >= (2, 13)
    assert _compat.all_gather_single is (funcol.all_gather_single if new else funcol.all_gather_tensor)
    assert _compat.reduce_scatter_single is (funcol.reduce_scatter_single if new else funcol.reduce_scatter_tensor)
    assert hasattr(dist, "all_gather_single") is new


def test_functional_collective_gates_on_one_rank():
    """On a one-rank gloo group both gates trace to the same ops and compute what a
    one-rank collective does: the gather returns its input, the reduce-scatter its sum."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _get_default_group

    from memopt.distributed.testing import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        group = _get_default_group().group_name
        x = torch.arange(6.0).reshape(3, 2)
        gathered = _compat.all_gather_single(x, 0, group)
        reduced = _compat.reduce_scatter_single(x, "sum", 0, group)
        out = torch.empty(3, 2)
        _compat.dist_all_gather_single(out, x, _get_default_group())
        assert torch.equal(torch.as_tensor(gathered), x) and torch.equal(torch.as_tensor(reduced), x)
        assert torch.equal(out, x)

        def traced(t: torch.Tensor) -> torch.Tensor:
            return _compat.reduce_scatter_single(_compat.all_gather_single(t, 0, group), "sum", 0, group)

        code = make_fx(traced)(x).code
        assert "_c10d_functional.all_gather_into_tensor" in code and "_c10d_functional.reduce_scatter_tensor" in code
    finally:
        dist.destroy_process_group()


def test_backward_frees_incoming_gradients_gate_choice():
    """torch 2.13's compiled backward frees an incoming gradient at its last use; torch
    2.11's and 2.12's hold it to the end (the behaviour: tests/test_kept_outputs.py's estimates
    against the allocator, on each torch)."""
    assert _compat.BACKWARD_FREES_INCOMING_GRADIENTS is (_compat.TORCH_VERSION >= (2, 13))


def test_compile_isolates_recompiles_gate_choice():
    """torch 2.13's torch.compile takes isolate_recompiles; 2.11's and 2.12's do not
    (checked on 2.11.0 and 2.12.1), and memopt.explain compiles without it there."""
    import inspect

    has = "isolate_recompiles" in inspect.signature(torch.compile).parameters
    assert _compat.COMPILE_ISOLATES_RECOMPILES is has
    assert has is (_compat.TORCH_VERSION >= (2, 13))
