"""The offload ops as Inductor extern fallbacks (C++ codegen on CPU, slow-ish)."""

from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from memopt.codegen.offload import register_inductor_lowering
from memopt.runtime import get_store

ops = torch.ops.memopt
CPU = torch.device("cpu")


@pytest.mark.inductor
def test_offloaded_buffer_is_freed_but_not_reused_while_written(store_id):
    """Inductor frees a buffer after its last use and hands its memory to the next
    buffer of the same size, here the output of ``mm``, while the disk write of the
    offloaded value may still be reading it. With memopt's lowering the offloaded
    buffer is dropped after its last use with a plain ``del`` (the store holds it until
    written) and never reused, and the value comes back intact; then the reload ops run
    as fallbacks in a second compiled graph."""
    register_inductor_lowering()

    def forward(x, a, b):
        y = x.sin()
        token = ops.offload(y, store_id, "y")
        return token, torch.mm(a, b).cos(), y.sum()

    def backward(token):
        started = ops.reload_start(token)
        return ops.reload_wait(started, [1024], torch.float32, CPU) * 2

    x, a, b = torch.randn(1024), torch.randn(32, 32), torch.randn(32, 32)
    (token, _, _), (code,) = run_and_get_code(torch.compile(forward, backend="inductor"), x, a, b)
    (offloaded,) = re.findall(r"torch\.ops\.memopt\.offload\.default\((buf\d+),", code)
    assert f"del {offloaded}  # reuse" not in code
    assert re.search(rf"^\s*del {offloaded}$", code, re.MULTILINE), "offloaded buffer kept to the end"
    get_store(store_id).flush()
    back = torch.compile(backward, backend="inductor")(token)
    torch.testing.assert_close(back, x.sin() * 2)
    assert get_store(store_id).stats().handles == 0
