"""Planning on the meta device with the usual losses: ``F.cross_entropy`` (``aten::nll_loss``,
Hugging Face's ``labels=`` loss) has no autograd kernel on meta tensors under the Python
dispatcher, so AOTAutograd's backward graph lost everything before the loss. memopt's
trace decomposes such operators at their autograd key (`memopt.backends.meta_device`),
and warns when a training region's backward still computes no gradient."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import memopt
import memopt.distributed as md
from memopt.backends.meta_device import composite_autograd_on_meta, lost_on_meta
from memopt.errors import MemoptWarning


def _explain(fn: object, *args: torch.Tensor, blocked: bool = True) -> memopt.Explanation:
    torch._dynamo.reset()
    # per-parameter collectives (no buckets): a lost gradient is a missing reduce-scatter
    options = {"codegen": "eager", "strict": True, "collective_bucket_bytes": 0}
    if not blocked:  # F.cross_entropy as written (aten::nll_loss), not memopt::cross_entropy
        options["disable_passes"] = ["blocked_cross_entropy"]
    return memopt.explain(fn, *args, options=options)


def _cross_entropy_step(device: str, blocked: bool = False) -> memopt.Explanation:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10)).to(device)
    x, y = torch.randn(4, 16, device=device), torch.zeros(4, dtype=torch.long, device=device)
    return _explain(lambda x, y: F.cross_entropy(model(x), y), x, y, blocked=blocked)


@pytest.mark.parametrize("blocked", [False, True], ids=["as_written", "blocked"])
def test_cross_entropy_on_meta_keeps_its_backward(blocked: bool):
    """On meta the backward graph returns the four parameters' gradients, as on the CPU,
    the estimate is the CPU's, and neither torch nor memopt warns: the loss as written
    (``aten::nll_loss``, through memopt's meta kernels) and memopt's blocked loss."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "autograd kernel was not registered", memopt's warning
        meta = _cross_entropy_step("meta", blocked)
    cpu = _cross_entropy_step("cpu", blocked)
    code = meta.graph_code("backward")
    loss_backward = "memopt.cross_entropy_backward.default(" if blocked else "aten.nll_loss_backward.default("
    assert code.count(loss_backward) == 1
    assert code.count("aten.mm.default(") == cpu.graph_code("backward").count("aten.mm.default(") == 3
    assert meta.estimated_peak_bytes == cpu.estimated_peak_bytes > 0


def test_the_kernels_are_installed_only_while_memopt_compiles():
    nll = torch.ops.aten.nll_loss.default
    assert nll in lost_on_meta()
    with composite_autograd_on_meta(), composite_autograd_on_meta():  # re-entrant
        assert nll not in lost_on_meta()
    assert nll in lost_on_meta()


def test_sharded_model_on_meta_reduces_every_gradient(fake_world):
    """A model sharded on the meta device with an ``F.cross_entropy`` loss: one
    reduce-scatter per parameter in backward (the 1B row of docs/sharding.md had 6 of
    201 before)."""
    with torch.device("meta"):
        model = md.shard(nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 16)), stage=3)
    x, y = torch.randn(8, 64, device="meta"), torch.zeros(8, dtype=torch.long, device="meta")
    explanation = _explain(lambda x, y: F.cross_entropy(model(x), y), x, y)
    assert explanation.graph_code("backward").count("_c10d_functional.reduce_scatter_tensor.default(") == 4


_LIB = torch.library.Library("memopt_test", "FRAGMENT")
_LIB.define("lossy_square(Tensor x) -> Tensor")
_LIB.impl("lossy_square", lambda x: x * x, "CompositeExplicitAutograd")  # no autograd kernel: torch's fallback


@torch.library.register_fake("memopt_test::lossy_square", lib=_LIB)
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def test_a_backward_without_gradients_is_named():
    """An operator with no autograd kernel before the loss (here an operator defined
    without one: torch's fallback lets backward through, with no gradient) leaves a training region whose backward computes nothing:
    one MemoptWarning names it and the fixes."""
    model = nn.Linear(8, 8)
    with pytest.warns(MemoptWarning, match=r"backward graph computes no gradient.*An operator with no autograd kernel.*register_autograd"):
        _explain(lambda x: torch.ops.memopt_test.lossy_square(model(x)).sum(), torch.randn(2, 8))


def test_a_loss_that_loses_its_backward_on_meta_is_named(monkeypatch):
    """Without memopt's kernels (as before them), ``F.cross_entropy`` on meta leaves the
    backward empty: the warning names the meta device and both fixes."""
    import memopt.backends.meta_device as meta_device

    monkeypatch.setattr(meta_device, "lost_on_meta", lambda: ())
    with pytest.warns(MemoptWarning, match=r"on the meta device.*log_softmax \+ gather.*FakeTensorMode"):
        explanation = _cross_entropy_step("meta")
    assert "aten.mm.default(" not in explanation.graph_code("backward")
