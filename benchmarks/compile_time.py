"""Compile time of memopt against torch: Inductor cold/warm caches, eager codegen, and
the planner on a 7B model.

    .venv/bin/python benchmarks/compile_time.py inductor --models gpt2 llama bert --runs 3
    .venv/bin/python benchmarks/compile_time.py eager --runs 7
    .venv/bin/python benchmarks/compile_time.py plan7b

``inductor``: compile + first training step (forward, backward) of a default-config
Hugging Face model (`memopt.testing.hf.build(name, batch=2, seq=64)`), each in a fresh
process: ``torch.compile`` default against memopt (no options, ``memory_budget=0.5``,
``precision="bf16"``). A *cold* run starts with a fresh, empty
``TORCHINDUCTOR_CACHE_DIR``; the *warm* run is a second process on the same directory.
Variants alternate run by run so machine noise hits all alike. Each cell is the median
of ``--runs`` processes, as wall seconds and as CPU seconds (the process's and its
compiler subprocesses', with ``TORCHINDUCTOR_COMPILE_THREADS=1`` so that the C++
compiler runs as a child: CPU time is what a loaded, shared machine distorts least),
and the ratio of CPU medians to torch's.

``eager``: memopt with ``codegen="eager"`` against ``backend="aot_eager"`` on the zoo GPT,
in this process (CPU time, one intra-op thread).

``plan7b``: what ``memopt report benchmarks/llama7b.py:build`` runs (32-layer Llama at 7B sizes,
fake tensors, nothing allocated) under ``memory_budget=0.5``, in this process: the
planner's wall and CPU seconds and the whole compile's wall seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS: dict[str, dict[str, object] | None] = {
    "torch.compile": None,
    "memopt": {},
    "memopt budget 0.5": {"memory_budget": 0.5},
    "memopt bf16": {"precision": "bf16"},
}


# -- one compile, in a child process ----------------------------------------------


def child(model_name: str, options: dict[str, object] | None) -> dict[str, object]:
    """Compile + first step of ``model_name``; seconds and cache counters."""
    import torch
    from torch._dynamo.utils import counters

    from memopt.testing.hf import build

    torch.manual_seed(0)
    model, inputs = build(model_name, batch=2, seq=64)
    kwargs: dict[str, object] = {} if options is None else {"backend": "memopt", "options": options}
    wall, cpu = time.perf_counter(), _cpu_seconds()
    compiled: Callable[..., object] = torch.compile(model, **kwargs)  # type: ignore[arg-type]
    compiled(**inputs).loss.backward()  # type: ignore[attr-defined]
    return {
        "wall": time.perf_counter() - wall,
        "cpu": _cpu_seconds() - cpu,
        "fxgraph_cache_hit": counters["inductor"].get("fxgraph_cache_hit", 0),
        "autograd_cache_hit": counters["aot_autograd"].get("autograd_cache_hit", 0),
    }


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _run_child(model_name: str, options: dict[str, object] | None, cache_dir: str) -> dict[str, float]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, TORCHINDUCTOR_COMPILE_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, __file__, "child", model_name, json.dumps(options)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{model_name} {options}: {done.stderr[-3000:]}")
    loud = [line for line in done.stderr.splitlines() if re.match(r"W\d{4} |WARNING", line)]  # torch's, logging's
    if loud:
        print(f"logged by {model_name} {options}:\n" + "\n".join(loud[-20:]), file=sys.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def inductor_table(models: list[str], variants: list[str], runs: int) -> None:
    print("| model | variant | cold wall s | cold CPU s | cold CPU / torch "
          "| warm wall s | warm CPU s | warm CPU / torch | warm FX hits (AOT hits) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for model_name in models:
        results: dict[str, dict[str, list[dict[str, float]]]] = {v: {"cold": [], "warm": []} for v in variants}
        for _ in range(runs):
            for name in variants:
                with tempfile.TemporaryDirectory(prefix="memopt-compile-time-") as cache_dir:
                    results[name]["cold"].append(_run_child(model_name, VARIANTS[name], cache_dir))
                    results[name]["warm"].append(_run_child(model_name, VARIANTS[name], cache_dir))
        base = {k: statistics.median(r["cpu"] for r in results[variants[0]][k]) for k in ("cold", "warm")}
        for name in variants:
            cells = [model_name, name]
            for kind in ("cold", "warm"):
                wall = statistics.median(r["wall"] for r in results[name][kind])
                cpu = statistics.median(r["cpu"] for r in results[name][kind])
                cells += [f"{wall:.1f}", f"{cpu:.1f}", f"{cpu / base[kind]:.2f}x"]
            warm = results[name]["warm"][-1]
            cells.append(f"{warm['fxgraph_cache_hit']:.0f} ({warm['autograd_cache_hit']:.0f})")
            print("| " + " | ".join(cells) + " |", flush=True)


# -- eager codegen, in this process -------------------------------------------------


def eager_table(runs: int, layers: int) -> None:
    import torch
    from tabulate import tabulate

    from memopt.testing.zoo import GPT, GPTConfig

    def first_step_seconds(backend: str, options: dict[str, object] | None) -> float:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = GPT(GPTConfig(layers=layers))
        idx = torch.randint(0, 256, (4, 32))
        kwargs: dict[str, object] = {"backend": backend}
        if options:
            kwargs["options"] = options
        compiled: Callable[..., torch.Tensor] = torch.compile(model, **kwargs)  # type: ignore[arg-type]
        start = time.process_time()
        compiled(idx, idx).backward()
        return time.process_time() - start

    torch.set_num_threads(1)
    variants = {"aot_eager": ("aot_eager", None), "memopt (codegen=eager)": ("memopt", {"codegen": "eager"})}
    first_step_seconds("aot_eager", None)  # warm imports and caches
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, (backend, options) in variants.items():
            times[name].append(first_step_seconds(backend, options))
    base = statistics.median(times["aot_eager"])
    rows = [
        [name, f"{statistics.median(t):.3f}", f"{min(t):.3f}", f"{statistics.median(t) / base:.2f}x"]
        for name, t in times.items()
    ]
    print(f"GPT ({layers} layers), first training step, {runs} runs each, alternating")
    print(tabulate(rows, headers=["backend", "median s", "min s", "ratio (median)"]))


# -- the planner on a 7B model, fake tensors ----------------------------------------


def plan7b() -> None:
    """Trace and plan on fake tensors, in this process (what ``memopt report
    benchmarks/llama7b.py:build --options '{"memory_budget": 0.5}'`` does)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    sys.path.insert(0, str(REPO / "benchmarks"))
    from llama7b import build
    from planner_time import timed_plan

    with FakeTensorMode():
        model, (ids,) = build()
        plan, plan_cpu, total = timed_plan(model, ids)
    solver = plan.solver
    print(f"32-layer 7B Llama, batch 1 x 2048, fake tensors, memory_budget=0.5: {solver['joint_nodes']} joint nodes, "
          f"{solver['segments']} segments, planner {solver['seconds']:.1f} s wall / {plan_cpu:.1f} s CPU "
          f"({solver['method']}); whole compile {total:.1f} s wall")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ind = sub.add_parser("inductor", help="cold/warm Inductor compiles, fresh processes")
    ind.add_argument("--models", nargs="*", default=["gpt2", "llama", "bert"])
    ind.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ind.add_argument("--runs", type=int, default=3)
    eager = sub.add_parser("eager", help="codegen='eager' against aot_eager, in this process")
    eager.add_argument("--runs", type=int, default=7)
    eager.add_argument("--layers", type=int, default=4)
    sub.add_parser("plan7b", help="planner time, 32-layer 7B Llama on fake tensors, budget 0.5")
    ch = sub.add_parser("child")
    ch.add_argument("model")
    ch.add_argument("options")
    args = parser.parse_args()
    if args.command == "child":
        print(json.dumps(child(args.model, json.loads(args.options))))
    elif args.command == "inductor":
        variants = args.variants if "torch.compile" in args.variants[:1] else ["torch.compile", *args.variants]
        inductor_table(args.models, list(dict.fromkeys(variants)), args.runs)
    elif args.command == "eager":
        eager_table(args.runs, args.layers)
    else:
        plan7b()


if __name__ == "__main__":
    main()
