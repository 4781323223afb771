"""Every ```python block of README.md and docs/*.md runs against today's code.

The docs describe what the code does today: a block that no longer runs (a renamed
function, a dropped keyword, a changed return type) fails here, named by its file and
its index among that file's ```python blocks (``docs/usage.md:2``, counted from 0).

Each block is ``exec``'d in a fresh namespace holding only the names its `Case` prepares
(the placeholders the docs leave to the reader: ``model``, ``x``, ``y``, ``data``,
``opt``...; small models stand in for the reader's), with a temporary directory as the
working directory. The namespace is the ``__dict__`` of a module ``__docs__`` in
``sys.modules`` while the block runs, as a reader's script runs in ``__main__``: torch
2.11's and 2.12's Dynamo trace a function that has no source file (an ``exec``'d one) from
a wrapper frame and import the function's module by its ``__name__`` to read its globals
(torch 2.13 traces it directly). What differs from a reader's run is all in this file:

* `Case.substitute` replaces a line the reader is meant to adapt (a ``...`` placeholder,
  an absolute path, ``"cuda"`` where the block says ``"cpu"`` on CPU, a model size that
  would take minutes here), keyed by the line's exact text: a substitution whose line is
  gone fails the test;
* no Inductor (`_without_inductor`): memopt's default ``codegen`` is ``"eager"`` (a block
  that names ``codegen`` keeps its own) and a ``torch.compile`` that names no backend
  gets ``backend="eager"``. Inductor's C++ compile takes seconds to minutes per graph on
  a CPU; the blocks call the same API either way, and Dynamo traces the same graphs
  (``fullgraph=True`` still raises at a graph break);
* ``torch.compile`` is lazy: memopt reads its options at the first call. For a block that
  compiles a model without calling it, `Case.after` runs a training step of every model
  the block compiled with ``backend="memopt"``;
* the sharding blocks run on a world of one gloo rank in this process, with the
  environment torchrun would set.

A block that cannot run on a CPU-only machine goes in `SKIPS` with the reason;
`test_every_block_is_run_or_skipped` fails for a block in neither table, so a new block
is never left out silently.
"""

from __future__ import annotations

import re
import sys
import textwrap
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import memopt
import memopt.distributed as md
from memopt.config import MemoptConfig
from memopt.distributed.testing import free_port
from memopt.optim import GaLoreAdamW, MeZO
from memopt.testing.measure import measure_peak
from memopt.testing.zoo import MLP

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# A fence may be indented (a block inside a list item); the body is dedented.
_FENCE = re.compile(r"^[ \t]*```python[ \t]*\n(?P<body>.*?)^[ \t]*```[ \t]*$", re.M | re.S)


def python_blocks(path: Path) -> list[str]:
    """The ```python blocks of a Markdown file, in order."""
    return [textwrap.dedent(m["body"]) for m in _FENCE.finditer(path.read_text())]


BLOCKS: dict[str, str] = {
    f"{path.relative_to(ROOT)}:{index}": source for path in DOCS for index, source in enumerate(python_blocks(path))
}


# ---- what the blocks' placeholders stand for ----------------------------------------------


@dataclass
class Ctx:
    tmp_path: Path
    monkeypatch: pytest.MonkeyPatch
    source: str
    """The block as it will run (after substitutions)."""


def _training(ctx: Ctx) -> dict[str, Any]:
    """``model(x, y)`` is a scalar loss. Activations dominate its peak, so half the
    unoptimized peak is reachable (``memory_budget=0.5`` plans without a warning)."""
    model = MLP(d_in=16, hidden=64, depth=8, d_out=4)
    return {"torch": torch, "memopt": memopt, "model": model, "x": torch.randn(1024, 16), "y": torch.randn(1024, 4)}


def _compiled(ctx: Ctx) -> dict[str, Any]:
    """`_training`'s model compiled, two batches of ``data`` and an ``opt``."""
    ns = _training(ctx)
    ns["compiled"] = torch.compile(ns["model"], backend="memopt", options={"codegen": "eager"})
    ns["data"] = [(ns["x"], ns["y"])] * 2
    ns["opt"] = torch.optim.SGD(ns["model"].parameters(), lr=1e-3)
    return ns


def _offloaded(ctx: Ctx) -> dict[str, Any]:
    """`_training`'s model compiled with every saved activation offloaded to disk."""
    ns = _training(ctx)
    options = {"codegen": "eager", "offload": "disk", "offload_dir": str(ctx.tmp_path / "offload"), "offload_min_bytes": 0}
    ns["compiled"] = torch.compile(ns["model"], backend="memopt", options=options)
    return ns


def _train_every_compiled(ns: dict[str, Any], compiled: list[Callable[..., Any]]) -> None:
    assert compiled, "the block compiled no model with backend='memopt'"
    for fn in compiled:
        fn(ns["x"], ns["y"]).backward()


def _classifier(ctx: Ctx) -> dict[str, Any]:
    """``loss_fn(model(x), y)`` over two batches of ``data``, with an ``optimizer``."""
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    return {
        "torch": torch, "F": F, "model": model, "x": x, "y": y, "data": [(x, y)] * 2,
        "loss_fn": F.cross_entropy, "optimizer": torch.optim.SGD(model.parameters(), lr=0.05),
    }  # fmt: skip


def _fit_factory(ctx: Ctx) -> dict[str, Any]:
    """``memopt.fit(model, make, "24GiB")``: each sample adds 512 MiB to the step's peak
    (fake tensors: nothing is allocated), so the search ends after a few probes."""
    model = nn.Sequential(nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 1))
    return {"torch": torch, "memopt": memopt, "model": model, "make": lambda batch: torch.randn(batch, 1 << 15, 1024)}


class _LowRankModel(nn.Module):
    """Matrices above GaLore's default rank 128 in both dimensions (the low-rank update),
    an embedding (which the block leaves out of the low-rank group) and 1-D parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 256)
        self.norm = nn.LayerNorm(256)
        self.proj = nn.Linear(256, 256)
        self.head = nn.Linear(256, 192)


def _memopt_optimizer(ctx: Ctx) -> dict[str, Any]:
    """``opt`` is one of memopt's optimizers (the section's subject)."""
    ns = _classifier(ctx)
    ns["opt"] = GaLoreAdamW(ns["model"].parameters(), lr=1e-3, rank=4)
    return ns


def _critic(ctx: Ctx) -> dict[str, Any]:
    """A WGAN critic, a batch of ``real`` and ``fake`` samples and the interpolates
    ``x_hat`` its gradient penalty reads."""
    critic = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    real, fake, eps = torch.randn(4, 8), torch.randn(4, 8), torch.rand(4, 1)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    return {"torch": torch, "critic": critic, "real": real, "fake": fake, "x_hat": x_hat}


def _critic_grads_match_eager(ns: dict[str, Any], compiled: list[Callable[..., Any]]) -> None:
    critic = ns["critic"]
    got = [p.grad.clone() for p in critic.parameters()]
    critic.zero_grad(set_to_none=True)
    (grad,) = torch.autograd.grad(critic(ns["x_hat"]).sum(), ns["x_hat"], create_graph=True)
    penalty = ((grad.norm(2, dim=1) - 1) ** 2).mean()
    (critic(ns["fake"]).mean() - critic(ns["real"]).mean() + 10 * penalty).backward()
    for g, p in zip(got, critic.parameters()):
        torch.testing.assert_close(g, p.grad)


def _pass_testing(ctx: Ctx) -> dict[str, Any]:
    """``capture_step(fn, *args)``, and ``MyPass`` as docs/architecture.md's block defines it."""
    architecture: dict[str, Any] = {}
    exec(compile(BLOCKS["docs/architecture.md:0"], "docs/architecture.md:0", "exec"), architecture)
    return {
        "fn": lambda x, w: torch.tanh(x @ w).sum(),
        "args": (torch.randn(4, 16), torch.randn(16, 8, requires_grad=True)),
        "MyPass": architecture["MyPass"],
    }


def _fresh_process_factory(ctx: Ctx) -> dict[str, Any]:
    """The block's ``make`` goes into ``my_bench.py``, the file the block names, for the
    fresh process to import; then the whole block runs here."""
    header = "import torch\nfrom memopt.testing.zoo import MLP\n"
    (ctx.tmp_path / "my_bench.py").write_text(header + ctx.source.split("\nr = measure_in_fresh_process")[0] + "\n")
    return {"torch": torch, "MLP": MLP}


class _Regression(nn.Module):
    """``model(batch)`` is a scalar loss (the sharding docs' call)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).square().mean()


def _one_rank_world(ctx: Ctx, *, init: bool) -> None:
    """torchrun's environment for a world of one rank; with ``init``, its gloo process
    group too (`test_block_runs` destroys it)."""
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                        "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():  # fmt: skip
        ctx.monkeypatch.setenv(name, value)
    if init:
        dist.init_process_group("gloo")


def _sharding(ctx: Ctx) -> dict[str, Any]:
    _one_rank_world(ctx, init=False)  # the block calls dist.init_process_group("gloo")
    return {"model": _Regression(), "batch_of_this_rank": torch.randn(8, 16)}


def _sharding_on_meta(ctx: Ctx) -> dict[str, Any]:
    _one_rank_world(ctx, init=True)
    return {"torch": torch, "md": md, "build_model": lambda config: _Regression(), "config": None}


def _sharded_accumulation(ctx: Ctx) -> dict[str, Any]:
    _one_rank_world(ctx, init=True)
    model = md.shard(_Regression(), stage=3)
    return {
        "model": model,
        "compiled": torch.compile(model, backend="memopt", options={"codegen": "eager"}),
        "optimizer": md.ShardedOptimizer(lambda params: torch.optim.AdamW(params, lr=1e-3), model),
        "micro_batches": [torch.randn(4, 16) for _ in range(3)],
    }


def _sharded_checkpoint_in_one_process(ctx: Ctx) -> dict[str, Any]:
    """``ckpt/step100`` saved by a sharded model and its AdamW after one step (a world
    of one rank, then no process group: the block loads without one)."""
    _one_rank_world(ctx, init=True)
    torch.manual_seed(0)
    model = md.shard(_Regression(), stage=3)
    optimizer = md.ShardedOptimizer(lambda params: torch.optim.AdamW(params, lr=1e-3), model)
    model(torch.randn(8, 16)).backward()
    optimizer.step()
    md.checkpoint.save("ckpt/step100", model, optimizer)
    saved = {name: p.full_tensor().clone() for name, p in model.named_parameters()}
    dist.destroy_process_group()
    return {"torch": torch, "md": md, "build_model": lambda config: _Regression(), "config": None, "saved": saved}


def _loaded_what_was_saved(namespace: dict[str, Any], compiled: list[Callable[..., Any]]) -> None:
    for name, param in namespace["model"].named_parameters():
        torch.testing.assert_close(param.detach(), namespace["saved"][name], rtol=0, atol=0)
    assert all(int(s["step"]) == 1 for s in namespace["optimizer"].state.values())


def _hf_lm(ctx: Ctx) -> dict[str, Any]:
    """A small default-config Llama (``compiled(**batch).loss``) and a ``loader`` of two
    batches."""
    from memopt.testing.hf import build

    model, inputs = build("llama", batch=2, seq=16)
    return {"torch": torch, "model": model, "inputs": inputs, "loader": [inputs] * 2}


def _hf_train_every_compiled(ns: dict[str, Any], compiled: list[Callable[..., Any]]) -> None:
    """A training step of each compiled model in turn (the block's alternatives, one
    after the other: each step ends with ``opt.step()`` and ``opt.zero_grad()``)."""
    assert compiled, "the block compiled no model with backend='memopt'"
    for fn in compiled:
        fn(**ns["inputs"]).loss.backward()
        ns["opt"].step()
        ns["opt"].zero_grad()


def _hf_trainer(ctx: Ctx) -> dict[str, Any]:
    """`_hf_lm`'s model and a dataset ``ds`` of token sequences for ``transformers.Trainer``."""
    import transformers

    ns = _hf_lm(ctx)
    ids = torch.randint(0, ns["model"].config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    ns.update(transformers=transformers, TrainingArguments=transformers.TrainingArguments,
              ds=[{"input_ids": row, "labels": row} for row in ids])  # fmt: skip
    return ns


@dataclass(frozen=True)
class Case:
    namespace: Callable[[Ctx], dict[str, Any]] = lambda ctx: {}
    """The names the block uses without defining them."""
    substitute: Mapping[str, str] = field(default_factory=dict)
    """Exact text of a line of the block (indentation included) -> the line run instead."""
    after: Callable[[dict[str, Any], list[Callable[..., Any]]], None] | None = None
    """Called with the block's namespace and the models it compiled with backend="memopt"."""


CASES: dict[str, Case] = {
    "README.md:0": Case(_training, after=_train_every_compiled),
    "docs/architecture.md:0": Case(),
    "docs/fit.md:0": Case(
        substitute={
            'model, _ = build("llama", size="medium")            # real or fake parameters':
            'model, _ = build("llama", size="small", num_hidden_layers=1)',
            '    "200MiB",                                        # bytes, or a string as memory_budget takes':
            '    "6MiB",',
        },
    ),  # fmt: skip
    "docs/fit.md:1": Case(_fit_factory),
    "docs/kernels.md:0": Case(lambda ctx: {"torch": torch, "x": torch.randn(4, 100)}),
    "docs/memory.md:0": Case(_compiled),
    "docs/memory.md:1": Case(lambda ctx: {**_compiled(ctx), "measure_peak": measure_peak}),
    "docs/memory.md:2": Case(
        _fresh_process_factory,
        substitute={"    model, inputs = ...": "    model, inputs = MLP(), (torch.randn(8, 64), torch.randn(8, 8))"},
    ),
    "docs/offload.md:0": Case(_training, after=_train_every_compiled),
    "docs/offload.md:1": Case(_offloaded),
    "docs/offload.md:2": Case(lambda ctx: {"nbytes": 1 << 20}),
    "docs/offload.md:3": Case(
        _classifier,
        substitute={
            'opt = OffloadedState(torch.optim.AdamW(model.parameters(), lr=1e-3), "disk", offload_dir="/scratch")':
            'opt = OffloadedState(torch.optim.AdamW(model.parameters(), lr=1e-3), "disk", offload_dir="scratch")',
        },
    ),  # fmt: skip
    "docs/optimizers.md:0": Case(lambda ctx: {"model": _LowRankModel()}),
    "docs/optimizers.md:1": Case(lambda ctx: {**_classifier(ctx), "MeZO": MeZO}),
    "docs/optimizers.md:2": Case(_memopt_optimizer),
    "docs/precision.md:0": Case(_training, after=_train_every_compiled),
    "docs/precision.md:1": Case(
        _classifier,
        substitute={
            'scaler = torch.amp.GradScaler("cuda")            # "cpu" on CPU':
            'scaler = torch.amp.GradScaler("cpu")',
        },
    ),  # fmt: skip
    "docs/real_models.md:0": Case(
        lambda ctx: {"torch": torch},
        substitute={
            'model, inputs = build("gpt2", batch=4, seq=256, size="medium")  # 4 layers, hidden 256':
            'model, inputs = build("gpt2", batch=2, seq=16)',
        },
    ),  # fmt: skip
    "docs/remat.md:0": Case(_training, after=_train_every_compiled),
    "docs/sharding.md:0": Case(_sharding),
    "docs/sharding.md:1": Case(
        _sharding_on_meta,
        substitute={
            "optimizer = md.ShardedOptimizer(..., model)  # after materialising":
            "optimizer = md.ShardedOptimizer(lambda params: torch.optim.AdamW(params, lr=1e-3), model)",
        },
    ),  # fmt: skip
    "docs/sharding.md:2": Case(_sharded_accumulation),
    "docs/sharding.md:3": Case(_sharded_checkpoint_in_one_process, after=_loaded_what_was_saved),
    "docs/usage.md:0": Case(_training, substitute={"model = ...": "model = model  # the namespace's"}),
    "docs/usage.md:1": Case(
        _hf_trainer,
        substitute={
            "trainer = Trainer(model=model, args=TrainingArguments(...), train_dataset=ds)":
            'trainer = Trainer(model=model, args=TrainingArguments(output_dir="out", use_cpu=True, report_to=[], '
            'max_steps=2, per_device_train_batch_size=2, save_strategy="no", disable_tqdm=True), train_dataset=ds)',
        },
    ),  # fmt: skip
    "docs/usage.md:2": Case(_training),
    "docs/usage.md:3": Case(_compiled),
    "docs/usage.md:4": Case(_critic, after=_critic_grads_match_eager),
    "docs/usage.md:5": Case(_pass_testing),
    "docs/usage.md:6": Case(),
    "docs/whole_step.md:0": Case(
        _hf_lm,
        substitute={
            "opt = torch.optim.AdamW(model.parameters(), lr=1e-4)":
            "opt = torch.optim.AdamW(model.parameters(), lr=1e-4); scheduler = torch.optim.lr_scheduler.LinearLR(opt)",
        },
    ),  # fmt: skip
    "docs/whole_step.md:1": Case(_hf_lm, after=_hf_train_every_compiled),
    "docs/whole_step.md:2": Case(
        _hf_trainer,
        substitute={
            "args = TrainingArguments(..., max_grad_norm=0, gradient_accumulation_steps=1)":
            'args = TrainingArguments(output_dir="out", use_cpu=True, report_to=[], max_steps=2, per_device_train_batch_size=2, '
            'save_strategy="no", disable_tqdm=True, max_grad_norm=0, gradient_accumulation_steps=1)',
        },
    ),  # fmt: skip
}

SKIPS: dict[str, str] = {}
"""Blocks that cannot run on a CPU-only machine: block -> why. None today."""


# ---- the tests --------------------------------------------------------------------------


def test_every_block_is_run_or_skipped():
    """Each ```python block is in `CASES` or in `SKIPS` with a reason, not both; neither
    table names a block that is gone; the fence pattern found every block."""
    assert len(BLOCKS) == sum(len(re.findall(r"^[ \t]*```python", path.read_text(), re.M)) for path in DOCS)
    assert sorted(set(CASES) & set(SKIPS)) == []
    assert sorted(set(BLOCKS) - set(CASES) - set(SKIPS)) == [], "add these blocks to CASES or SKIPS"
    assert sorted((set(CASES) | set(SKIPS)) - set(BLOCKS)) == [], "these blocks are gone"
    assert all(reason.strip() for reason in SKIPS.values())


def _without_inductor(monkeypatch: pytest.MonkeyPatch, memopt_compiled: list[Callable[..., Any]]) -> None:
    """memopt's default codegen becomes "eager", and a ``torch.compile`` without a backend
    gets "eager"; every ``torch.compile(..., backend="memopt")`` is recorded."""
    from_options = MemoptConfig.from_options.__func__  # type: ignore[attr-defined]

    def eager_unless_given(cls: type[MemoptConfig], options: Any = None) -> MemoptConfig:
        if options is None or (isinstance(options, Mapping) and "codegen" not in options):
            options = {**(options or {}), "codegen": "eager"}
        return from_options(cls, options)

    real_compile = torch.compile

    def compile_without_inductor(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("backend", "eager")
        out = real_compile(*args, **kwargs)
        if kwargs["backend"] == "memopt":
            memopt_compiled.append(out)
        return out

    monkeypatch.setattr(MemoptConfig, "from_options", classmethod(eager_unless_given))
    monkeypatch.setattr(torch, "compile", compile_without_inductor)


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_block_runs(block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if block in SKIPS:
        pytest.skip(SKIPS[block])
    if block not in CASES:
        pytest.fail(f"{block} is neither run nor skipped: add it to CASES or SKIPS")
    case = CASES[block]
    lines = BLOCKS[block].splitlines()
    for old, new in case.substitute.items():
        assert old in lines, f"{block}: no line {old!r} to substitute (the block changed)"
        lines = [new if line == old else line for line in lines]
    source = "\n".join(lines) + "\n"

    monkeypatch.chdir(tmp_path)
    compiled: list[Callable[..., Any]] = []
    _without_inductor(monkeypatch, compiled)
    try:
        module = types.ModuleType("__docs__")
        monkeypatch.setitem(sys.modules, module.__name__, module)
        namespace = module.__dict__
        namespace.update(case.namespace(Ctx(tmp_path, monkeypatch, source)))
        exec(compile(source, block, "exec"), namespace)
        if case.after is not None:
            case.after(namespace, compiled)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
