"""memopt's Inductor compiles use Inductor's caches as ``backend="inductor"`` does, and
stay quiet (issue 18).

Inductor's FX graph cache and AOTAutograd's cache key on a pickle of Inductor's config,
memopt's partitioner included; it pickles as its key (memopt's source hash and the
options), so a second process with the same code, options and graph hits, and a change
of options or of memopt's code misses.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from memopt.codegen.inductor import MemoptPartitioner, PartitionerKey
from memopt.config import MemoptConfig
from memopt.errors import MemoptWarning
from memopt.testing.hf import build

WORKER = Path(__file__).with_name("inductor_cache_worker.py")
REPO = Path(__file__).resolve().parents[2]


def test_partitioner_pickles_as_its_key() -> None:
    """The hook pickles as a `PartitionerKey` with the same ``uuid`` (the region it
    holds is not pickled); options change the key."""
    import pickle

    hook = MemoptPartitioner(lambda *a, **k: None, MemoptConfig.from_options(None))
    restored = pickle.loads(pickle.dumps(hook))
    assert isinstance(restored, PartitionerKey)
    assert restored.uuid() == hook.uuid()
    other = MemoptPartitioner(lambda *a, **k: None, MemoptConfig.from_options({"memory_budget": 0.5}))
    assert other.uuid() != hook.uuid()


@pytest.fixture
def warnings_logged(caplog: pytest.LogCaptureFixture) -> Iterator[list[logging.LogRecord]]:
    """Records at WARNING or above from ``torch._inductor`` and ``memopt`` (torch's
    loggers do not propagate to the root logger, so the handler goes on them)."""
    handler = caplog.handler
    loggers = [logging.getLogger(name) for name in ("torch._inductor", "memopt")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


@pytest.mark.inductor
@pytest.mark.parametrize("options", [None, {"memory_budget": 0.5}], ids=["default", "budget"])
def test_inductor_compile_logs_no_warning(options: dict[str, object] | None, warnings_logged: list) -> None:
    """A default-config HF Llama compiled with codegen="inductor" (fresh caches, so the
    cache key is computed and the artifacts saved) logs nothing at WARNING. (A budget
    below what remat can reach is memopt's one user-facing `MemoptWarning`, not a log
    line: the small Llama's floor is above half its peak.)"""
    from torch._inductor.utils import fresh_cache

    model, inputs = build("llama")
    with fresh_cache(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is infeasible for", category=MemoptWarning)
        torch.compile(model, backend="memopt", options=options)(**inputs).loss.backward()
    loud = [r for r in warnings_logged if r.levelno >= logging.WARNING]
    assert not loud, "\n".join(f"{r.name}: {r.getMessage()}" for r in loud)


def _run_worker(cache_dir: Path, variants: list[dict[str, object]]) -> list[dict[str, Any]]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(WORKER), json.dumps(variants)],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Failed to pickle" not in done.stderr, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.inductor
def test_second_process_hits_the_cache_and_changes_miss(tmp_path: Path) -> None:
    """Process 1 compiles the zoo MLP with no options and under a budget (misses, saves).
    Process 2, same cache directory: the same compiles hit Inductor's FX graph cache
    (and AOTAutograd's without a budget; under a budget it is off, the planner runs
    again); other options, or other memopt code, miss."""
    budget = {"memory_budget": 2 << 20}  # feasible for the MLP: no MemoptWarning
    cold = _run_worker(tmp_path, [{"options": {}}, {"options": budget}])
    for counts in cold:
        assert counts["inductor"].get("fxgraph_cache_miss", 0) > 0
        assert counts["inductor"].get("fxgraph_cache_hit", 0) == 0
        assert counts["inductor"].get("fxgraph_cache_bypass", 0) == 0
    plain, budgeted, other_options, other_code = _run_worker(
        tmp_path,
        [
            {"options": {}},
            {"options": budget},
            {"options": {"planner_time_limit": 4.0}},  # changes no graph, only the key
            {"options": {}, "source": "other memopt code"},
        ],
    )
    for warm, first in ((plain, cold[0]), (budgeted, cold[1])):  # what a hit runs is what was compiled
        assert warm["loss"] == first["loss"]
        assert warm["grads"] == first["grads"]
    assert plain["inductor"].get("fxgraph_cache_hit", 0) > 0
    assert plain["aot_autograd"].get("autograd_cache_hit", 0) == 1
    assert budgeted["inductor"].get("fxgraph_cache_hit", 0) > 0
    assert budgeted["inductor"].get("fxgraph_cache_miss", 0) == 0
    for counts in (other_options, other_code):
        assert counts["inductor"].get("fxgraph_cache_hit", 0) == 0
        assert counts["inductor"].get("fxgraph_cache_miss", 0) > 0
        assert counts["aot_autograd"].get("autograd_cache_hit", 0) == 0


def test_deliberate_bypass_is_said_once_at_info(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Under a budget planned for the whole step AOTAutograd's cache is off on purpose:
    one INFO line per process, however many regions compile, and nothing louder."""
    import torch._inductor.compile_fx as compile_fx_module

    import memopt.codegen.inductor as memopt_inductor

    monkeypatch.setattr(compile_fx_module, "compile_fx", lambda gm, *a, **k: gm)
    monkeypatch.setattr(memopt_inductor, "_said", set())
    config = MemoptConfig.from_options({"memory_budget": 0.5})
    with caplog.at_level(logging.DEBUG, logger="memopt"):
        for _ in range(3):
            memopt_inductor.compile_with_inductor(
                torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph()), [], partition=lambda *a, **k: None,
                optimize_inference=lambda g: g, on_compiled=lambda kind: None, config=config, partition_always=True,
            )  # fmt: skip
    said = [r for r in caplog.records if r.name == "memopt"]
    assert [r.levelno for r in said] == [logging.INFO]
    assert "AOTAutograd's cache is off" in said[0].getMessage()


def test_optimizer_under_a_budget_turns_the_autograd_cache_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """``optimizer=opt`` with a budget: the plan counts the optimizer's state bytes,
    which the cache key does not see, so AOTAutograd's cache (whose hit skips the
    planner) is off; without a budget the graphs do not depend on it and it stays on."""
    import torch._functorch.config as functorch_config
    import torch._inductor.compile_fx as compile_fx_module

    import memopt.codegen.inductor as memopt_inductor

    seen: list[bool] = []
    def compile_fx(gm: torch.fx.GraphModule, *args: object, **kwargs: object) -> torch.fx.GraphModule:
        seen.append(functorch_config.enable_autograd_cache)
        return gm

    monkeypatch.setattr(compile_fx_module, "compile_fx", compile_fx)
    monkeypatch.setattr(memopt_inductor, "_said", set())
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    for options in ({"optimizer": opt, "memory_budget": "1GiB"}, {"optimizer": opt}):
        memopt_inductor.compile_with_inductor(
            torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph()), [], partition=lambda *a, **k: None,
            optimize_inference=lambda g: g, on_compiled=lambda kind: None, config=MemoptConfig.from_options(options),
        )  # fmt: skip
    assert seen[0] is False
    assert seen[1] == functorch_config.enable_autograd_cache
