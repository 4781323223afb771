"""Estimated against measured peak growth of one training step.

    .venv/bin/python benchmarks/estimate_accuracy.py                # zoo + public models, eager codegen
    .venv/bin/python benchmarks/estimate_accuracy.py --codegen inductor --models gpt hf_llama
    .venv/bin/python benchmarks/estimate_accuracy.py --os-view --models hf_gpt2 hf_vit
    .venv/bin/python benchmarks/estimate_accuracy.py --settle 5 --models hf_vit
    .venv/bin/python benchmarks/estimate_accuracy.py --hf-defaults            # memopt.testing.hf, medium
    .venv/bin/python benchmarks/estimate_accuracy.py --hf-defaults --families llama gpt2 --codegen inductor

For each model: compile with memopt, run two steps to compile, then measure the next
step with `memopt.testing.measure.measure_peak` (profiler allocator events on CPU).
The estimate is ``estimated_peak_bytes - baseline_bytes`` from `memopt.explain`'s
timeline of the same graphs. Prints a Markdown table.

``--hf-defaults`` measures the families of `memopt.testing.hf` at their default
configs, size "medium", with ``use_cache`` True and False, as a user's loop runs them:
``out = compiled(**inputs); out.loss.backward()`` with ``out`` (its logits, its
key/value caches) alive through backward (batch ``--batch``, default 4, by
``--seq`` tokens, default 256).

``--os-view`` runs each model in a fresh process with glibc's malloc thresholds fixed
(`memopt.testing.measure.measure_in_fresh_process`), measures after ``--warmup``
warm-up steps (counted after the compiling steps) and adds the OS view's column
(resident-set peak growth). ``--settle N`` prints, per model, both views of steps
1..N after ``--compile-steps`` compiling steps (default 2), each measured, in one
fresh process.
"""

from __future__ import annotations

import argparse
import sys

import torch

import memopt
from memopt.units import format_bytes
from memopt.testing.measure import Workload, measure_in_fresh_process, measure_peak

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from models import MODELS, build  # noqa: E402

BATCH = {"gpt": 16, "mlp": 256, "cnn_bn": 64, "transformer_block": 64, "graph_break": 256, "inplace_input": 256}


def measure(name: str, codegen: str, batch: int) -> tuple[int, int]:
    torch._dynamo.reset()
    model, inputs = build(name, batch)
    compiled = torch.compile(model, backend="memopt", options={"codegen": codegen})
    with memopt.record() as explanation:
        for _ in range(2):  # compile, and recompile if the first call changed guarded state
            model.zero_grad(set_to_none=True)
            compiled(*inputs).backward()
    model.zero_grad(set_to_none=True)
    measured = measure_peak(lambda: compiled(*inputs).backward())
    timeline = explanation.timeline()
    return timeline.peak_growth_bytes, measured.peak_growth_bytes


def workload(name: str, codegen: str, batch: int, compile_steps: int = 2) -> Workload:
    """Fresh-process factory: the model compiled (``compile_steps`` steps, recorded), its
    training step, and memopt's estimated growth as info."""
    torch._dynamo.reset()
    model, inputs = build(name, batch)
    compiled = torch.compile(model, backend="memopt", options={"codegen": codegen})
    with memopt.record() as explanation:
        for _ in range(compile_steps):
            model.zero_grad(set_to_none=True)
            compiled(*inputs).backward()
    estimated = explanation.timeline().peak_growth_bytes
    return Workload(
        step=lambda: compiled(*inputs).backward(),
        prepare=lambda: model.zero_grad(set_to_none=True),
        info=lambda: {"estimated": estimated},
    )


def measure_os(name: str, codegen: str, batch: int, warmup: int) -> tuple[int, int, int]:
    """(estimated, allocator-view, OS-view) peak growth, measured in a fresh process."""
    result = measure_in_fresh_process(
        f"{__file__}:workload", kwargs={"name": name, "codegen": codegen, "batch": batch}, warmup=warmup
    )
    m = result.last
    if not m.os_reliable:
        raise RuntimeError(f"no reliable OS view for {name}: {m.os_note}")
    return result.info["estimated"], m.peak_growth_bytes, m.os_peak_growth_bytes  # type: ignore[return-value]


def settle(name: str, codegen: str, batch: int, steps: int, compile_steps: int) -> None:
    kwargs = {"name": name, "codegen": codegen, "batch": batch, "compile_steps": compile_steps}
    result = measure_in_fresh_process(f"{__file__}:workload", kwargs=kwargs, warmup=0, repeat=steps)
    allocator = " / ".join(format_bytes(m.peak_growth_bytes) for m in result.measurements)
    os_view = " / ".join(format_bytes(m.os_peak_growth_bytes or 0) for m in result.measurements)
    print(f"| {name} | {batch} | {format_bytes(result.info['estimated'])} | {allocator} | {os_view} |", flush=True)


HF_FAMILIES = ("llama", "gpt2", "mixtral", "t5", "bert")


def measure_hf(family: str, use_cache: bool, codegen: str, batch: int, seq: int) -> tuple[int, int, int]:
    """(estimated, measured growth, regions) of one step of ``family`` at its default
    config, size "medium", the output kept through backward as a user's loop does."""
    from memopt.testing.hf import build as build_hf

    torch._dynamo.reset()
    model, inputs = build_hf(family, batch=batch, seq=seq, size="medium", use_cache=use_cache)
    compiled = torch.compile(model, backend="memopt", options={"codegen": codegen})

    def step() -> None:
        out = compiled(**inputs)
        out.loss.backward()

    with memopt.record() as explanation:
        for _ in range(2):  # compile, and recompile if the first call changed guarded state
            model.zero_grad(set_to_none=True)
            step()
    model.zero_grad(set_to_none=True)
    measured = measure_peak(step)
    return explanation.timeline().peak_growth_bytes, measured.peak_growth_bytes, len(explanation.step_regions())


def hf_defaults(families: list[str], codegen: str, batch: int, seq: int) -> None:
    print(f"memopt.testing.hf families, size medium, batch {batch} x {seq}\n")
    print("| model | use_cache | regions | estimated growth | measured growth | error |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for family in families:
        for use_cache in (True, False):
            estimated, measured, regions = measure_hf(family, use_cache, codegen, batch, seq)
            error = (estimated - measured) / measured * 100
            sizes = f"{format_bytes(estimated)} | {format_bytes(measured)}"
            print(f"| {family} | {use_cache} | {regions} | {sizes} | {error:+.2f}% |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--codegen", default="eager", choices=["eager", "inductor"])
    parser.add_argument("--batch", type=int, default=None, help="override every model's batch size")
    parser.add_argument("--os-view", action="store_true", help="add the OS view, measured in a fresh process per model")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps after compiling, with --os-view")
    parser.add_argument("--settle", type=int, default=0, help="print steps 1..N after compiling, both views")
    parser.add_argument("--compile-steps", type=int, default=2, help="compiling steps before --settle's steps")
    parser.add_argument("--hf-defaults", action="store_true", help="memopt.testing.hf families, medium, use_cache on/off")
    parser.add_argument("--families", nargs="*", default=list(HF_FAMILIES), help="with --hf-defaults")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence, with --hf-defaults")
    args = parser.parse_args()
    print(f"codegen={args.codegen}\n")
    if args.hf_defaults:
        hf_defaults(args.families, args.codegen, args.batch or 4, args.seq)
        return
    if args.settle:
        print("| model | batch | estimated growth | allocator view, steps 1.. | OS view, steps 1.. |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name in args.models:
            settle(name, args.codegen, args.batch or BATCH.get(name, 16), args.settle, args.compile_steps)
        return
    if args.os_view:
        print(f"OS view after {args.warmup} warm-up steps, fresh process per model\n")
        print("| model | batch | estimated growth | allocator view | OS view | error vs allocator | error vs OS |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name in args.models:
            batch = args.batch or BATCH.get(name, 16)
            estimated, measured, os_measured = measure_os(name, args.codegen, batch, args.warmup)
            errors = [(estimated - m) / m * 100 for m in (measured, os_measured)]
            sizes = " | ".join(format_bytes(b) for b in (estimated, measured, os_measured))
            print(f"| {name} | {batch} | {sizes} | {errors[0]:+.2f}% | {errors[1]:+.2f}% |", flush=True)
        return
    print("| model | batch | estimated growth | measured growth | error |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in args.models:
        batch = args.batch or BATCH.get(name, 16)
        estimated, measured = measure(name, args.codegen, batch)
        error = (estimated - measured) / measured * 100
        print(f"| {name} | {batch} | {format_bytes(estimated)} | {format_bytes(measured)} | {error:+.2f}% |", flush=True)


if __name__ == "__main__":
    main()
