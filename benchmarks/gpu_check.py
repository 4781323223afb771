"""One-command GPU check: memopt's claims measured on one CUDA device, as one table.

    python benchmarks/gpu_check.py --out gpu_check.md            # on the GPU machine (< 8 min)
    python benchmarks/gpu_check.py --sections kernels fusion      # a subset
    python benchmarks/gpu_check.py --cpu-dry-run --out dry.md     # plumbing only, tiny sizes, CPU

Sections (docs/benchmarks.md, "GPU check", says what every column means):

* ``tests``: ``pytest -m gpu`` in a subprocess; with CUDA present a failed or skipped
  test is a failure of this script.
* ``models``: Hugging Face GPT-2, Llama and BERT built from config (random weights,
  default settings but small sizes, train mode, keyword call, ``.loss``); the zoo models
  when ``transformers`` is missing (the table says so). Estimated (`memopt.explain`'s
  timeline) against measured (``torch.cuda.max_memory_allocated``) peak growth; budgets
  0.75, 0.5 and "min" (a budget far below reach: memopt warns and runs its smallest-peak
  plan) against the measured peak; step time and peak against plain ``torch.compile``
  (Inductor) of the same model.
* ``kernels``: memopt's Triton kernels (block-wise quantize/dequantize, low-rank Adam,
  8-bit Adam) against their PyTorch references: max error and time.
* ``offload`` (issue 15 on CUDA): each store's round trip of a value offloaded while
  its kernels still run on a non-default stream (bitwise); pinned copy bandwidth; how
  much of the copies the compute stream hides (compute alone, copies alone, both
  interleaved); a compiled step with ``offload="host"`` at a budget against remat alone
  (measured peak, budget, time).
* ``sharding`` (issue 16 on CUDA): ``examples/train_sharded.py`` (ZeRO-3, memopt's eager
  codegen) under torchrun on NCCL, one rank per GPU, at most 2. On a machine with one
  GPU that is a world of one rank: the collectives are compiled and run through NCCL,
  but nothing crosses ranks (the row says so); multi-rank rows need 2 GPUs.
* ``fusion``: whether Inductor fused the recomputed forward ops into the backward's
  kernels (kernel launches of the backward with and without a budget).

Exit status: 0 when every section ran and nothing failed; 1 when something failed (the
table's status column and stderr name it); 2 when CUDA is absent and ``--cpu-dry-run``
was not given. Progress goes to stderr with elapsed times.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

SECTIONS = ("tests", "kernels", "offload", "sharding", "models", "fusion")
"""In the order they run: the short ones first, ``models`` (the long one) last but
``fusion``, which reuses its compiles."""
TESTS_TIMEOUT = 180.0  # seconds for ``pytest -m gpu`` (it takes about a minute)
SHARDING_TIMEOUT = 150.0  # seconds for torchrun of examples/train_sharded.py
OFFLOAD_BUDGET = 0.5
FUSION_BUDGET = 0.5
NO_CUDA_STATUS = 2
NO_CUDA = "n/a (no CUDA)"
MIB = 2**20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Sizes:
    """Model and kernel sizes of one run (GPU or dry run)."""

    layers: int
    hidden: int
    heads: int
    batch: int
    seq: int
    vocab: int
    steps: int
    quant_numel: int
    lowrank: tuple[int, int, int]
    adam8bit_numel: int


GPU_SIZES = Sizes(layers=4, hidden=512, heads=8, batch=8, seq=512, vocab=8192, steps=10,
                  quant_numel=1 << 26, lowrank=(4096, 4096, 128), adam8bit_numel=1 << 24)  # fmt: skip
DRY_SIZES = Sizes(layers=2, hidden=64, heads=4, batch=2, seq=32, vocab=256, steps=2,
                  quant_numel=4096, lowrank=(64, 32, 8), adam8bit_numel=4096)  # fmt: skip


@dataclass(frozen=True)
class Row:
    section: str
    case: str
    memopt: str
    reference: str
    ratio: str
    status: str


@dataclass
class Check:
    """What a run knows: device, sizes, the rows so far and the failures."""

    device: str
    dry_run: bool
    sizes: Sizes
    time_limit: float = float("inf")
    models: tuple[str, ...] = ()
    start: float = field(default_factory=time.perf_counter)
    rows: list[Row] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    captured: dict[tuple[str, float | None], tuple[int, int]] = field(default_factory=dict)
    """(model, budget) -> (backward kernel launches, recomputed ops) of Inductor compiles
    the models section already ran, so the fusion section need not compile them again."""
    out: str | None = None
    """Where the table goes: rewritten after every row, so a run stopped from outside
    still leaves the rows it measured."""
    sections: tuple[str, ...] = ()
    environment: str = ""
    current: str = ""
    """The case running now (named by the hard limit's failure)."""
    said: str = ""
    """The last progress line (`log`): the step of ``current`` that was running."""
    child: subprocess.Popen[str] | None = None
    """The pytest subprocess while it runs (killed at the hard limit)."""
    lock: threading.RLock = field(default_factory=threading.RLock)
    finished: bool = False

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def add(self, section: str, case: str, memopt: str, reference: str, ratio: str, status: str) -> None:
        with self.lock:
            self.rows.append(Row(section, case, memopt, reference, ratio, status))
            if status.startswith("FAIL"):
                self.failures.append(f"{section}: {case}: {status}")
            self.write()

    def write(self, final: bool = False) -> str:
        """Render the table and write it to ``out`` (whole, then renamed: a reader never
        sees half a file); ``final`` adds the failures of sections that made no row."""
        with self.lock:
            table = render(self, final)
            if self.out:
                tmp = self.out + ".tmp"
                with open(tmp, "w") as f:
                    f.write(table)
                os.replace(tmp, self.out)
            return table

    def log(self, message: str) -> None:
        """Print a progress line; it does not rename the running case (a side remark such
        as "transformers unavailable" is not what a hard limit stopped)."""
        self.said = message
        print(f"[gpu_check {self.elapsed:7.1f}s] {message}", file=sys.stderr, flush=True)

    def running(self) -> str:
        """The case running now, with its last progress line if it said one."""
        if not self.current:
            return "its start-up"
        return f"{self.current} (last said: {self.said})" if self.said else self.current

    def case(self, section: str, case: str, run: Callable[[], None], timed: bool = True) -> None:
        """Run one case; an exception becomes a FAIL row naming it (never a silent skip),
        and the run goes on. ``timed``: past ``time_limit`` the case is not started,
        which is a FAIL row too."""
        self.current, self.said = f"{section}: {case}", ""
        try:
            if timed and self.elapsed > self.time_limit:
                raise TimeoutError(f"not run: the time limit ({self.time_limit:.0f} s) was reached; "
                                   f"rerun this part with --sections")  # fmt: skip
            run()
        except Exception as exc:  # noqa: BLE001 - every failure is reported, then the run goes on
            traceback.print_exc(file=sys.stderr)
            self.add(section, case, "-", "-", "-", f"FAIL: {type(exc).__name__}: {_one_line(exc)}")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:160] + "...") if len(text) > 160 else text


def _mib(n: float) -> str:
    return f"{n / MIB:.2f} MiB"


# ---------------------------------------------------------------- tests


def section_tests(check: Check) -> None:
    """``pytest -m gpu`` in a subprocess; counts from its summary line."""
    check.case("tests", "pytest -m gpu", lambda: _run_gpu_tests(check))


def run_child(check: Check, cmd: list[str], timeout: float, what: str,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in the repository, in a process group of its own (a torchrun agent's
    ranks, a test's subprocesses), killed whole after ``timeout`` seconds (TimeoutError
    naming ``what``) or by the hard limit (`kill_child`)."""
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as child:  # fmt: skip
        check.child = child
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_child(child)
            child.communicate()
            raise TimeoutError(f"{what} ran past {timeout:.0f} s (killed)") from None
        finally:
            check.child = None
    return subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)


def kill_child(child: subprocess.Popen[str]) -> None:
    """Kill ``child`` and every process of its group (started by `run_child`)."""
    try:
        os.killpg(child.pid, 9)
    except (ProcessLookupError, PermissionError):
        child.kill()


def _run_gpu_tests(check: Check) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    timeout = max(30.0, min(TESTS_TIMEOUT, check.time_limit - check.elapsed))
    check.log(f"tests: {' '.join(cmd[1:])} (at most {timeout:.0f} s)")
    proc = run_child(check, cmd, timeout, "pytest -m gpu (a hung or slow gpu test)", env)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", tail)}
    passed, failed = counts.get("passed", 0), counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    skipped = counts.get("skipped", 0)
    summary = f"{passed} passed, {failed} failed, {skipped} skipped"
    if proc.returncode not in (0, 5) or (proc.returncode == 5 and check.cuda):
        print(proc.stdout[-4000:], proc.stderr[-2000:], file=sys.stderr)
    last_error = (proc.stderr.strip().splitlines() or [""])[-1][:160]
    failure = f"FAIL: pytest exit {proc.returncode}" + (f" ({last_error})" if not counts and last_error else "")
    if check.cuda:
        bad = failed or skipped or passed == 0 or proc.returncode != 0
        status = failure if bad else "ok"
    else:
        status = NO_CUDA + ": gpu tests skip on CPU" if failed == 0 and counts else failure
    check.add("tests", "pytest -m gpu", summary, "every gpu test passes", "-", status)


# ---------------------------------------------------------------- models


def _transformers_error() -> str | None:
    try:
        import transformers  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - missing or broken on this torch: fall back either way
        return f"{type(exc).__name__}: {_one_line(exc)}"
    return None


class LossWrapper:
    """Calls a Hugging Face model with keyword inputs and returns ``.loss``."""

    @staticmethod
    def wrap(model: Any, keys: tuple[str, ...]) -> Any:
        import torch.nn as nn

        class Wrapped(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *args: Any) -> Any:
                return self.model(**dict(zip(keys, args))).loss

        return Wrapped()


def _hf_models(s: Sizes) -> dict[str, Callable[[], tuple[Any, tuple[Any, ...]]]]:
    import torch
    import transformers as T

    def ids() -> torch.Tensor:
        return torch.randint(0, s.vocab, (s.batch, s.seq))

    def gpt2() -> tuple[Any, tuple[Any, ...]]:
        cfg = T.GPT2Config(n_layer=s.layers, n_embd=s.hidden, n_head=s.heads, vocab_size=s.vocab,
                           n_positions=s.seq)  # fmt: skip
        x = ids()
        return LossWrapper.wrap(T.GPT2LMHeadModel(cfg), ("input_ids", "labels")), (x, x)

    def llama() -> tuple[Any, tuple[Any, ...]]:
        cfg = T.LlamaConfig(num_hidden_layers=s.layers, hidden_size=s.hidden, num_attention_heads=s.heads,
                            num_key_value_heads=s.heads // 2, intermediate_size=s.hidden * 8 // 3,
                            vocab_size=s.vocab, max_position_embeddings=s.seq)  # fmt: skip
        x = ids()
        return LossWrapper.wrap(T.LlamaForCausalLM(cfg), ("input_ids", "labels")), (x, x)

    def bert() -> tuple[Any, tuple[Any, ...]]:
        cfg = T.BertConfig(num_hidden_layers=s.layers, hidden_size=s.hidden, num_attention_heads=s.heads,
                           intermediate_size=4 * s.hidden, vocab_size=s.vocab, max_position_embeddings=s.seq)  # fmt: skip
        labels = torch.randint(0, 2, (s.batch,))
        return LossWrapper.wrap(T.BertForSequenceClassification(cfg), ("input_ids", "labels")), (ids(), labels)

    # Llama first: the fusion section reuses its compiles, and a run that reaches its
    # time limit during the models section has measured it.
    return {"hf_llama": llama, "hf_gpt2": gpt2, "hf_bert": bert}


def _zoo_models(s: Sizes) -> dict[str, Callable[[], tuple[Any, tuple[Any, ...]]]]:
    import torch

    from memopt.testing.zoo import GPT, MLP, GPTConfig

    def gpt() -> tuple[Any, tuple[Any, ...]]:
        cfg = GPTConfig(vocab=s.vocab, context=s.seq, dim=s.hidden, heads=s.heads, layers=s.layers, dropout=0.1)
        idx = torch.randint(0, s.vocab, (s.batch, s.seq + 1))
        return GPT(cfg), (idx[:, :-1].contiguous(), idx[:, 1:].contiguous())

    def mlp() -> tuple[Any, tuple[Any, ...]]:
        rows = s.batch * s.seq
        return MLP(d_in=s.hidden, hidden=4 * s.hidden, depth=s.layers), (torch.randn(rows, s.hidden), torch.randn(rows, 8))

    return {"zoo_gpt": gpt, "zoo_mlp": mlp}


def model_builders(check: Check) -> tuple[dict[str, Callable[[], tuple[Any, tuple[Any, ...]]]], str]:
    """The models to measure and a note for the table ("" for Hugging Face's)."""
    error = _transformers_error()
    zoo = _zoo_models(check.sizes)
    if check.models:
        if error is None:
            zoo.update(_hf_models(check.sizes))
        unknown = [m for m in check.models if m not in zoo]
        if unknown:
            raise ValueError(f"--models {unknown} not available here; choose from {sorted(zoo)}")
        return {m: zoo[m] for m in check.models}, ""
    if error is None:
        return _hf_models(check.sizes), ""
    check.log(f"transformers unavailable ({error}): falling back to memopt's zoo models")
    return zoo, f" (zoo fallback: transformers unavailable: {error})"


def _build(check: Check, make: Callable[[], tuple[Any, tuple[Any, ...]]]) -> tuple[Any, tuple[Any, ...]]:
    import torch

    torch._dynamo.reset()
    torch.manual_seed(0)
    model, inputs = make()
    return model.to(check.device).train(), tuple(t.to(check.device) for t in inputs)


def _sync(check: Check) -> None:
    import torch

    if check.cuda:
        torch.cuda.synchronize()


@dataclass
class StepResult:
    growth: int  # measured peak growth over the bytes live before the step
    seconds: float  # median step time
    explanation: Any = None
    warned: bool = False
    code: list[str] = field(default_factory=list)  # Inductor's modules of the first step


def run_steps(check: Check, model: Any, compiled: Callable[..., Any], inputs: tuple[Any, ...],
              capture: bool = False) -> StepResult:  # fmt: skip
    """Three warm-up steps (compile; whole-step re-plan across graph breaks), one measured
    step, then the median of ``sizes.steps`` timed steps. ``capture``: keep the code
    Inductor generated in the first step."""
    from torch._inductor.utils import run_and_get_code

    from memopt.testing.measure import measure_peak

    def step() -> None:
        model.zero_grad(set_to_none=True)
        compiled(*inputs).backward()

    code: list[str] = []
    if capture:
        code = list(run_and_get_code(step)[1])
    else:
        step()
    for _ in range(2):
        step()
    model.zero_grad(set_to_none=True)  # the last step's gradients are not part of the next one's growth
    growth = measure_peak(step, device=check.device).peak_growth_bytes
    times = []
    for _ in range(check.sizes.steps):
        _sync(check)
        t0 = time.perf_counter()
        step()
        _sync(check)
        times.append(time.perf_counter() - t0)
    return StepResult(growth, statistics.median(times), code=code)


def run_memopt(check: Check, make: Callable[..., Any], budget: float | str | None, codegen: str,
               extra: dict[str, Any] | None = None) -> StepResult:  # fmt: skip
    import torch

    import memopt

    model, inputs = _build(check, make)
    options: dict[str, Any] = {"codegen": codegen, **(extra or {})}
    if budget is not None:
        options["memory_budget"] = budget
    compiled = torch.compile(model, backend="memopt", options=options)
    with memopt.record() as explanation, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", memopt.MemoptWarning)
        result = run_steps(check, model, compiled, inputs, capture=codegen == "inductor")
    result.explanation = explanation
    result.warned = any(issubclass(w.category, memopt.MemoptWarning) for w in caught)
    return result


def run_reference(check: Check, make: Callable[..., Any]) -> StepResult:
    """Plain ``torch.compile`` (Inductor) on CUDA; ``aot_eager`` in the dry run."""
    import torch

    model, inputs = _build(check, make)
    backend = "inductor" if check.cuda else "aot_eager"
    return run_steps(check, model, torch.compile(model, backend=backend), inputs)


def _infeasible(explanation: Any) -> bool:
    return any(r.plan is not None and not r.plan.feasible for r in explanation.step_regions())


def measure_model(check: Check, name: str, make: Callable[..., Any], note: str) -> None:
    """Estimate, budgets and time rows of one model."""
    codegen = "inductor" if check.cuda else "eager"
    ref_name = "torch.compile" if check.cuda else "aot_eager (dry run)"
    case = name + note
    check.log(f"models: {name}: {ref_name}")
    ref = run_reference(check, make)
    check.log(f"models: {name}: memopt, no budget")
    base = run_memopt(check, make, None, codegen)
    _remember_code(check, name, None, base)
    timeline = base.explanation.timeline()
    estimated, baseline = timeline.peak_growth_bytes, timeline.baseline_bytes
    error = (estimated - base.growth) / base.growth * 100
    status = ("ok" if abs(error) <= 5 else "CHECK: estimate off by more than 5%") if check.cuda else NO_CUDA
    check.add("estimate", case, f"estimated growth {_mib(estimated)}",
              f"measured growth {_mib(base.growth)} ({_measured_by(check)})", f"{error:+.2f}%", status)  # fmt: skip
    _time_row(check, case, "memopt, no budget", base, ref, ref_name)
    unbudgeted_peak = base.explanation.estimated_peak_bytes
    for budget in (0.75, 0.5, "min"):

        def budgeted(budget: float | str = budget) -> None:
            check.log(f"models: {name}: memopt, memory_budget={budget}")
            run = run_memopt(check, make, "1KiB" if budget == "min" else budget, codegen)
            _remember_code(check, name, budget, run)
            _budget_row(check, case, budget, run, baseline, unbudgeted_peak)
            _time_row(check, case, f"memopt @ {budget}", run, ref, ref_name)

        check.case("budget", f"{case} @ {budget}", budgeted)


def _remember_code(check: Check, name: str, budget: float | str | None, run: StepResult) -> None:
    """Keep the backward launch count of Inductor compiles the fusion section reads. A
    failure to count is the fusion section's to report (it compiles again), not a reason
    to lose this model's rows."""
    if run.code and budget in (None, FUSION_BUDGET):
        try:
            check.captured[(name, budget)] = (backward_launches(run.code), recomputed_compute_ops(run.explanation))
        except Exception as exc:  # noqa: BLE001
            check.log(f"fusion counts of {name} @ {budget} not kept: {type(exc).__name__}: {_one_line(exc)}")


def _measured_by(check: Check) -> str:
    return "torch.cuda.max_memory_allocated" if check.cuda else "CPU profiler"


def _budget_row(check: Check, case: str, budget: float | str, run: StepResult, baseline: int, unbudgeted: int) -> None:
    measured = run.growth + baseline
    if budget == "min":
        floor = run.explanation.estimated_peak_bytes
        if not run.warned:
            status = "FAIL: no infeasibility warning at a 1 KiB budget"
        else:
            status = "ok (warned; runs at its floor)" if check.cuda else f"{NO_CUDA}; warned"
        check.add("budget", f"{case} @ min", f"measured peak {_mib(measured)}",
                  f"estimated floor {_mib(floor)}", f"{measured / floor:.3f}", status)  # fmt: skip
        return
    requested = float(budget) * unbudgeted
    ratio = measured / requested
    if _infeasible(run.explanation):
        status = "infeasible (memopt warned; runs at its floor)"
    else:
        status = "met (<= +5%)" if ratio <= 1.05 else f"MISSED (+{(ratio - 1) * 100:.1f}%)"
    if not check.cuda:
        status = f"{NO_CUDA}; {status}"
    check.add("budget", f"{case} @ {budget}", f"measured peak {_mib(measured)}",
              f"budget {_mib(requested)} ({budget} x unbudgeted estimate)", f"{ratio:.3f}", status)  # fmt: skip


def _time_row(check: Check, case: str, what: str, run: StepResult, ref: StepResult, ref_name: str) -> None:
    check.add("time", f"{case}: {what}",
              f"{run.seconds * 1e3:.2f} ms, peak growth {_mib(run.growth)}",
              f"{ref_name}: {ref.seconds * 1e3:.2f} ms, peak growth {_mib(ref.growth)}",
              f"time {run.seconds / ref.seconds:.2f}x, peak {run.growth / ref.growth:.2f}x",
              "info" if check.cuda else NO_CUDA)  # fmt: skip


def section_models(check: Check) -> None:
    builders, note = model_builders(check)
    for name, make in builders.items():
        check.case("models", name + note, functools.partial(measure_model, check, name, make, note))


# ---------------------------------------------------------------- kernels


def _time_fn(check: Check, fn: Callable[[], Any], reps: int = 5) -> float:
    """Median seconds of ``fn`` (after one warm-up call), CUDA-synchronized."""
    fn()
    times = []
    for _ in range(reps):
        _sync(check)
        t0 = time.perf_counter()
        fn()
        _sync(check)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _kernel_row(check: Check, case: str, error: float, tol: float, triton_fn: Callable[[], Any],
                torch_fn: Callable[[], Any], extra: str = "") -> None:  # fmt: skip
    status = "ok" if error <= tol else f"FAIL: max error {error:.3g} > {tol:g}"
    if check.cuda:
        t_tri, t_ref = _time_fn(check, triton_fn), _time_fn(check, torch_fn)
        times = (f"{t_tri * 1e3:.3f} ms", f"{t_ref * 1e3:.3f} ms", f"time {t_tri / t_ref:.2f}x")
    else:
        times = ("interpreted", "-", NO_CUDA)
        status = status if status != "ok" else f"{NO_CUDA}; error ok"
    check.add("kernels", case, f"Triton: max error {error:.3g}{extra}, {times[0]}",
              f"PyTorch reference: {times[1]}", times[2], status)  # fmt: skip


def kernels_quantize(check: Check) -> None:
    import torch

    from memopt.codegen.quantize_reference import dequantize_blockwise_reference, quantize_blockwise_reference
    from memopt.codegen.quantize_triton import dequantize_blockwise_triton, quantize_blockwise_triton

    x_cpu = torch.randn(check.sizes.quant_numel, dtype=torch.bfloat16)
    x = x_cpu.to(check.device)
    for dtype, label in ((torch.int8, "int8"), (torch.float8_e4m3fn, "fp8")):
        block = 128
        codes, scales = quantize_blockwise_triton(x, block, dtype)
        # Errors against the reference on CPU (the format's definition, as the gpu tests do).
        ref_codes, ref_scales = quantize_blockwise_reference(x_cpu, block, dtype)
        differ = (codes.cpu().view(torch.uint8) != ref_codes.view(torch.uint8)).sum().item()
        got = dequantize_blockwise_triton(codes, scales, x.shape, block, torch.float32).cpu()
        want = dequantize_blockwise_reference(ref_codes, ref_scales, x.shape, block, torch.float32)
        error = (got - want).abs().max().item() + (scales.cpu() - ref_scales).abs().max().item()
        _kernel_row(check, f"quantize {label}, block {block}, {x.numel()} bf16", error + differ, 0.0,
                    lambda: quantize_blockwise_triton(x, block, dtype),
                    lambda: quantize_blockwise_reference(x, block, dtype), f", {differ} codes differ")  # fmt: skip
        _kernel_row(check, f"dequantize {label} -> bf16, block {block}", error, 0.0,
                    lambda: dequantize_blockwise_triton(codes, scales, x.shape, block, torch.bfloat16),
                    lambda: dequantize_blockwise_reference(codes, scales, x.shape, block, torch.bfloat16))  # fmt: skip


def _adam_coefficients(step: int, lr: float = 1e-2, weight_decay: float = 0.1, scale: float = 1.0) -> dict[str, float]:
    return dict(beta1=0.9, beta2=0.999, eps=1e-8, step_size=lr * scale / (1 - 0.9**step),
                bias_correction2_sqrt=(1 - 0.999**step) ** 0.5, decay=1 - lr * weight_decay)  # fmt: skip


def kernels_lowrank_adam(check: Check, rank_scale: int = 1) -> None:
    """The low-rank Adam kernel at the sizes' rank times ``rank_scale`` (4: GaLore's
    larger ranks, whose tiles may not fit shared memory at the default tile: the row
    names the tile that launched)."""
    import torch

    from memopt.codegen.lowrank_adam import launched_config, lowrank_adam_step

    m, n, r = check.sizes.lowrank
    r *= rank_scale
    if not check.cuda:
        from memopt._compat import triton_interpreter_loops_to_runtime_bounds

        if not triton_interpreter_loops_to_runtime_bounds():  # compiled (CUDA) kernels are not affected
            check.add("kernels", f"low-rank Adam {m}x{n} rank {r}", "-", "-", NO_CUDA,
                      f"{NO_CUDA}; skipped: this triton's interpreter cannot loop to a runtime bound "
                      "with numpy >= 2.4 (memopt._compat.triton_interpreter_loops_to_runtime_bounds)")  # fmt: skip
            return
    g = torch.Generator().manual_seed(0)
    ops = [torch.randn(m, n, generator=g), torch.randn(r, n, generator=g),
           torch.linalg.qr(torch.randn(m, r, generator=g))[0],
           0.1 * torch.randn(r, n, generator=g), 0.01 * torch.rand(r, n, generator=g)]  # fmt: skip
    ref = [t.to(check.device) for t in ops]
    tri = [t.clone() for t in ref]
    c = _adam_coefficients(2, scale=0.25)
    lowrank_adam_step(*ref, kernel="torch", **c)
    lowrank_adam_step(*tri, kernel="triton", **c)
    error = max((a.double() - b.double()).abs().max().item() for a, b in zip(ref, tri))
    config = launched_config(tri[0].device, r, tri[0].dtype)
    tile = "" if config is None else f", tile {config[0]}x{config[1]}" + (", one stage" if config[2] else "")
    _kernel_row(check, f"low-rank Adam {m}x{n} rank {r}", error, 1e-5,
                lambda: lowrank_adam_step(*tri, kernel="triton", **c),
                lambda: lowrank_adam_step(*ref, kernel="torch", **c), tile)  # fmt: skip


def kernels_adam8bit(check: Check) -> None:
    import torch

    from memopt.codegen.adam8bit import SIGNED_ZERO_CODE, adam8bit_step, code_tables

    numel, block, dev = check.sizes.adam8bit_numel, 256, check.device
    blocks = -(-numel // block)
    state = [torch.randn(numel, device=dev), torch.full((numel,), SIGNED_ZERO_CODE, dtype=torch.uint8, device=dev),
             torch.zeros(blocks, device=dev), torch.zeros(numel, dtype=torch.uint8, device=dev),
             torch.zeros(blocks, device=dev)]  # fmt: skip
    ref, tri = [t.clone() for t in state], [t.clone() for t in state]
    grad, tables, c = torch.randn(numel, device=dev), code_tables(dev), _adam_coefficients(1)
    for s, kernel in ((ref, "torch"), (tri, "triton")):
        adam8bit_step(s[0], grad, *s[1:], tables=tables, block_size=block, kernel=kernel, **c)
    codes_off = max(((ref[i].int() - tri[i].int()).abs().bool().float().mean().item() for i in (1, 3)))
    codes_far = max(((ref[i].int() - tri[i].int()).abs().max().item() for i in (1, 3)))
    error = max((ref[i] - tri[i]).abs().max().item() for i in (0, 2, 4))
    if codes_far > 1 or codes_off > 0.01:  # FMA contraction may move a value one code (tests allow 1%)
        error = float("inf")
    _kernel_row(check, f"8-bit Adam {numel} fp32, block {block}", error, 1e-5,
                lambda: adam8bit_step(tri[0], grad, *tri[1:], tables=tables, block_size=block, kernel="triton", **c),
                lambda: adam8bit_step(ref[0], grad, *ref[1:], tables=tables, block_size=block, kernel="torch", **c),
                f", codes one apart {codes_off * 100:.2f}%")  # fmt: skip


def section_kernels(check: Check) -> None:
    for name, fn in (("quantize", kernels_quantize), ("low-rank Adam", kernels_lowrank_adam),
                     ("low-rank Adam, 4x rank", functools.partial(kernels_lowrank_adam, rank_scale=4)),
                     ("8-bit Adam", kernels_adam8bit)):  # fmt: skip
        check.log(f"kernels: {name}")
        check.case("kernels", name, functools.partial(fn, check))


# ---------------------------------------------------------------- offload


@dataclass(frozen=True)
class OffloadSizes:
    """The overlap rows' work: ``values`` tensors of ``value_mib`` each offloaded in the
    first half of a chain of ``2 * values + 8`` matmuls of ``matmul`` x ``matmul``, and
    reloaded in its second half."""

    matmul: int
    values: int
    value_mib: dict[str, float]


GPU_OFFLOAD = OffloadSizes(matmul=4096, values=8, value_mib={"host": 64.0, "disk": 8.0})


@contextlib.contextmanager
def _offload_store(target: str) -> Iterator[Any]:
    """A fresh store of ``target`` for one case (disk: in a temporary directory),
    closed and its directory removed afterwards."""
    import shutil
    import tempfile

    from memopt.runtime.disk_store import DiskStore
    from memopt.runtime.host_store import HostStore

    if target == "host":
        store, root = HostStore("host (gpu_check)"), None
    else:
        root = tempfile.mkdtemp(prefix="gpu-check-offload-")
        store = DiskStore("disk (gpu_check)", root)
    try:
        yield store
    finally:
        store.close()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


def offload_round_trip(check: Check, target: str) -> None:
    """A value offloaded while the kernels that produce it still run, on a stream other
    than the default one, and reloaded on it: it must come back bitwise (the copy waits
    for the producing stream; the reload's stream waits for the copy)."""
    import torch

    if target == "host" and not check.cuda:
        check.add("offload", "host: round trip, slow producer", "-", "-", "-", f"{NO_CUDA}; host needs CUDA")
        return
    with _offload_store(target) as store:
        n = 2048 if check.cuda else 32
        stream = torch.cuda.Stream() if check.cuda else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            a = torch.randn(n, n, device=check.device) / n**0.5
            x = a
            for _ in range(30):  # tens of milliseconds of kernels the copy must wait for
                x = torch.tanh(x @ a)
            token = store.offload(x, "slow")
            expected = x.clone()
            del x
            started = store.reload_start(int(token.item()))
            back = store.reload_wait(int(started.item()), [n, n], expected.dtype, expected.device)
            same = bool(torch.equal(back, expected))
        _sync(check)
        store.flush()
        stats = store.stats()
    status = "ok" if same else "FAIL: the value came back different (a copy raced its producer or consumer)"
    if not check.cuda:
        status = f"{NO_CUDA}; {status}"
    check.add("offload", f"{target}: round trip, slow producer", f"bitwise {same}; {stats.offloads} offload(s), "
              f"{stats.handles} handle(s) left", "the value as computed", "-", status)  # fmt: skip


def offload_bandwidth_row(check: Check) -> None:
    """Pinned copies device->host and host->device (`memopt.runtime.measure_bandwidth`)."""
    from memopt.runtime import measure_bandwidth

    if not check.cuda:
        check.add("offload", "host: pinned copy bandwidth", "-", "-", "-", f"{NO_CUDA}; host needs CUDA")
        return
    write, read = measure_bandwidth("host", "cuda", nbytes=64 * MIB)
    slow = min(write, read) < 5e9  # pinned copies over PCIe 4/5 or NVLink-C2C run at 20+ GB/s
    check.add("offload", "host: pinned copy bandwidth", f"D2H {write / 1e9:.1f} GB/s, H2D {read / 1e9:.1f} GB/s",
              "pinned PCIe copies: 20+ GB/s", "-",
              "CHECK: below 5 GB/s, as pageable copies run" if slow else "ok")  # fmt: skip


def offload_overlap(check: Check, target: str) -> None:
    """Compute alone, the store's copies alone, and both interleaved as a step
    interleaves them (offloads in the first half of a matmul chain, reloads started in
    the second half, all waited for at its end): the share of the shorter of the two
    that the interleaved run hides. Copies serialized with compute hide nothing."""
    import torch

    case = f"{target}: copies hidden under compute"
    if not check.cuda:
        check.add("offload", case, "-", "-", "-", f"{NO_CUDA}; needs CUDA streams")
        return
    sizes = GPU_OFFLOAD
    with _offload_store(target) as store:
        a = torch.randn(sizes.matmul, sizes.matmul, device="cuda") / sizes.matmul**0.5
        numel = int(sizes.value_mib[target] * MIB) // 4
        values = [torch.randn(numel, device="cuda") for _ in range(sizes.values)]

        def run(compute: bool, copies: bool) -> None:
            tokens, started, x = [], [], a
            for i in range(2 * sizes.values + 8):
                if compute:
                    x = torch.tanh(x @ a)
                if copies and i < sizes.values:
                    tokens.append(store.offload(values[i], f"v{i}"))
                elif copies and i < 2 * sizes.values:
                    started.append(store.reload_start(int(tokens[i - sizes.values].item())))
            for token in started:
                store.reload_wait(int(token.item()), [numel], torch.float32, torch.device("cuda"))
            torch.cuda.synchronize()
            store.flush()

        t_compute, t_copies, t_both = (_time_fn(check, functools.partial(run, c, k), reps=3)
                                       for c, k in ((True, False), (False, True), (True, True)))  # fmt: skip
    hidden = max(0.0, min(1.0, (t_compute + t_copies - t_both) / min(t_compute, t_copies)))
    moved = 2 * sizes.values * sizes.value_mib[target]
    status = "info" if target == "disk" else ("ok" if hidden >= 0.5 else "CHECK: the copies are not hidden under compute")
    check.add("offload", case, f"both {t_both * 1e3:.1f} ms",
              f"compute {t_compute * 1e3:.1f} ms, copies {t_copies * 1e3:.1f} ms ({moved:.0f} MiB moved)",
              f"{hidden * 100:.0f}% of the shorter hidden", status)  # fmt: skip


def offload_step(check: Check) -> None:
    """memopt's zoo GPT at ``memory_budget`` 0.5, remat alone against the planner with
    ``offload="host"`` (``"disk"`` in the dry run): offloads planned, measured peak
    against the budget, step time (eager codegen: no kernel compile to wait for)."""
    make = _zoo_models(check.sizes)["zoo_gpt"]
    target = "host" if check.cuda else "disk"
    check.log("offload: zoo_gpt, memopt, no budget")
    base = run_memopt(check, make, None, "eager")
    unbudgeted = base.explanation.estimated_peak_bytes
    baseline = base.explanation.timeline().baseline_bytes
    check.log(f"offload: zoo_gpt, memopt @ {OFFLOAD_BUDGET}, remat alone")
    remat = run_memopt(check, make, OFFLOAD_BUDGET, "eager")
    check.log(f"offload: zoo_gpt, memopt @ {OFFLOAD_BUDGET}, offload={target!r}")
    offloaded = run_memopt(check, make, OFFLOAD_BUDGET, "eager", {"offload": target})
    requested = OFFLOAD_BUDGET * unbudgeted
    count = sum(d.policy == "offload" for r in offloaded.explanation.step_regions() if r.plan is not None
                for d in r.plan.decisions)  # fmt: skip
    peak, remat_peak = offloaded.growth + baseline, remat.growth + baseline
    if _infeasible(offloaded.explanation):
        status = "infeasible (memopt warned; runs at its floor)"
    else:
        status = "met (<= +5%)" if peak <= 1.05 * requested else f"MISSED (+{(peak / requested - 1) * 100:.1f}%)"
    if not check.cuda:
        status = f"{NO_CUDA}; {status}"
    check.add("offload", f"zoo_gpt @ {OFFLOAD_BUDGET}, offload={target!r}, eager codegen",
              f"{count} offloaded; peak {_mib(peak)}; {offloaded.seconds * 1e3:.2f} ms",
              f"budget {_mib(requested)}; remat alone: peak {_mib(remat_peak)}, {remat.seconds * 1e3:.2f} ms; "
              f"unbudgeted {base.seconds * 1e3:.2f} ms",
              f"peak/budget {peak / requested:.3f}; time {offloaded.seconds / remat.seconds:.2f}x remat's", status)  # fmt: skip


def section_offload(check: Check) -> None:
    for target in ("host", "disk"):
        check.case("offload", f"{target}: round trip", functools.partial(offload_round_trip, check, target))
    check.case("offload", "host: bandwidth", functools.partial(offload_bandwidth_row, check))
    for target in ("host", "disk"):
        check.case("offload", f"{target}: overlap", functools.partial(offload_overlap, check, target))
    check.case("offload", "compiled step", functools.partial(offload_step, check))


# ---------------------------------------------------------------- sharding


def section_sharding(check: Check) -> None:
    check.case("sharding", "train_sharded.py", functools.partial(sharded_training, check))


def sharded_training(check: Check) -> None:
    """``examples/train_sharded.py`` (ZeRO-3, eager codegen) on one rank per GPU, at most
    2 (NCCL); one gloo rank in the dry run. Its ranks run under
    `memopt.distributed.testing.run_ranks` in a child process group, so a hung
    collective is killed with it."""
    import torch

    ranks = max(1, min(2, torch.cuda.device_count())) if check.cuda else 1
    steps = 4 if check.cuda else 2
    timeout = max(30.0, min(SHARDING_TIMEOUT, check.time_limit - check.elapsed))
    driver = ("import sys; from memopt.distributed.testing import run_ranks; "
              "print(run_ranks(sys.argv[1], sys.argv[3:], world_size=int(sys.argv[2]), "
              f"timeout={timeout - 10:.0f})[0])")  # fmt: skip
    cmd = [sys.executable, "-c", driver, os.path.join(REPO, "examples", "train_sharded.py"), str(ranks),
           "--steps", str(steps), "--layers", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    env.pop("TRITON_INTERPRET", None)
    check.log(f"sharding: examples/train_sharded.py on {ranks} rank(s) (at most {timeout:.0f} s)")
    proc = run_child(check, cmd, timeout, "examples/train_sharded.py under run_ranks", env)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], file=sys.stderr)
        last = (proc.stderr.strip().splitlines() or [""])[-1][:160]
        raise RuntimeError(f"train_sharded.py exited {proc.returncode}: {last}")
    losses = [float(m) for m in re.findall(r"step\s+\d+\s+loss\s+([-\d.]+)", proc.stdout)]
    held = re.findall(r"rank (\d+)\s+[\d,]+\s+[\d,]+\s+[\d,]+\s+([\d,]+)\s+([\d,]+)", proc.stdout)
    where = re.search(r"over \d+ ranks \((\w+)\)", proc.stdout)
    if not losses or len(held) != ranks or where is None:
        raise RuntimeError(f"train_sharded.py printed no losses/per-rank bytes: {proc.stdout[-300:]!r}")
    totals = [(int(t.replace(",", "")), int(f.replace(",", ""))) for _, t, f in held]
    backend = "nccl" if where.group(1) == "cuda" else "gloo"
    note = "" if ranks > 1 else f"; 1 rank: {backend} collectives compiled and run, nothing crosses ranks (needs 2 GPUs)"
    status = ("ok" if all(math.isfinite(x) for x in losses) else "FAIL: a loss is not finite") + note
    if not check.cuda:
        status = f"{NO_CUDA}; {status}"
    check.add("sharding", f"ZeRO-3, {ranks} rank(s), {backend}, eager codegen, {steps} steps",
              f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; state per rank {', '.join(_mib(t) for t, _ in totals)}",
              f"ZeRO-3 formula {_mib(totals[0][1])}",
              "state/formula " + ", ".join(f"{t / f:.3f}" for t, f in totals), status)  # fmt: skip


# ---------------------------------------------------------------- fusion


def count_launches(code: str) -> int:
    """Kernel launches in the ``call`` function of an Inductor output module: generated
    kernels (Triton ``.run(``, C++ ``cpp_fused_*(``), extern kernels and fallback ops."""
    defined = set(re.findall(r"^(\w+) = async_compile\.\w+\(", code, flags=re.M))
    body = code[code.find("def call(") :]
    generated = sum(len(re.findall(rf"\b{re.escape(k)}(?:\.run)?\(", body)) for k in defined)
    extern = len(re.findall(r"\bextern_kernels\.\w+\(", body))
    fallback = len(re.findall(r"\btorch\.ops\.\w+\.\w+(?:\.\w+)?\(", body))
    return generated + extern + fallback


def recomputed_compute_ops(explanation: Any) -> int:
    """Forward ops copied into the backward (same joint-graph node name in both), less
    views and constants (no kernel of their own in any codegen)."""
    count = 0
    for r in explanation.step_regions():
        if r.step is None or r.step.backward is None:
            continue
        forward = {n.name for n in r.step.forward.graph.nodes if n.op == "call_function"}
        count += sum(1 for n in r.step.backward.graph.nodes if n.op == "call_function" and n.name in forward
                     and _computes(n))  # fmt: skip
    return count


def _computes(node: Any) -> bool:
    schema = getattr(node.target, "_schema", None)
    if schema is None or not node.all_input_nodes:
        return False
    return not any(ret.alias_info is not None for ret in schema.returns)


def backward_launches(code: list[str]) -> int:
    """Kernel launches of the backward modules among Inductor's generated ``code``."""
    backward = [c for c in code if re.search(r"\btangents_\d+", c)]
    if not backward:
        raise RuntimeError("captured no Inductor backward module (no 'tangents_' in the generated code)")
    return sum(count_launches(c) for c in backward)


def _fusion_counts(check: Check, name: str, make: Callable[..., Any], budget: float | None) -> tuple[int, int]:
    """(backward launches, recomputed ops) of memopt with Inductor at ``budget``: from the
    models section when it compiled the same, else compiled here."""
    if (name, budget) in check.captured:
        check.log(f"fusion: {name} @ {budget}: reusing the models section's compile")
        return check.captured[(name, budget)]
    check.log(f"fusion: {name} @ {budget}: compiling with codegen=inductor")
    run = run_memopt(check, make, budget, "inductor")
    return backward_launches(run.code), recomputed_compute_ops(run.explanation)


def section_fusion(check: Check) -> None:
    """Backward kernel launches with and without a budget on one model."""
    builders, note = model_builders(check)
    name = "hf_llama" if "hf_llama" in builders else next(iter(builders))
    compiled = [m for m in builders if (m, None) in check.captured and (m, FUSION_BUDGET) in check.captured]
    if compiled and name not in compiled:  # two compiles fewer (the models section ran out of time)
        name = compiled[0]
    if not check.cuda:  # C++ kernels; a small MLP keeps the dry run's Inductor compiles short
        name, note = "zoo_mlp", " (dry run, C++ kernels)"
        builders = _zoo_models(check.sizes)
    reused = all((name, b) in check.captured for b in (None, FUSION_BUDGET))
    # reading the models section's counts takes no time: done past the time limit too
    row = functools.partial(_fusion_row, check, name, note, builders[name])
    check.case("fusion", name + note, row, timed=not reused)


def _fusion_row(check: Check, name: str, note: str, make: Callable[..., Any]) -> None:
    k0, r0 = _fusion_counts(check, name, make, None)
    k1, r1 = _fusion_counts(check, name, make, FUSION_BUDGET)
    extra_ops, extra_kernels = r1 - r0, k1 - k0
    own = max(0, min(extra_kernels, extra_ops))
    fused = extra_ops - own
    share = f"{fused / extra_ops * 100:.0f}% fused" if extra_ops > 0 else "no extra recompute"
    check.add("fusion", f"{name}{note} @ {FUSION_BUDGET}",
              f"{r1} recomputed ops ({extra_ops} more than unbudgeted); {k1} backward launches",
              f"unbudgeted: {r0} recomputed ops; {k0} backward launches",
              f"own kernels <= {own}, fused >= {fused} ({share})",
              "info" if check.cuda else f"{NO_CUDA}; C++ kernels")  # fmt: skip


# ---------------------------------------------------------------- driver


RUNNERS: dict[str, Callable[[Check], None]] = {
    "tests": section_tests, "models": section_models, "kernels": section_kernels, "offload": section_offload,
    "sharding": section_sharding, "fusion": section_fusion,
}  # fmt: skip


def render(check: Check, final: bool = True) -> str:
    """The table; ``final``: with the verdict (sections that made no row are failures),
    else a line saying the run is still going."""
    lines = [f"# memopt GPU check ({check.environment})", "",
             "| section | case | memopt / kernel | reference | ratio | status |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in check.rows:
        cells = [c.replace("|", "\\|") for c in dataclasses.astuple(row)]
        lines.append("| " + " | ".join(cells) + " |")
    if not final:
        return "\n".join([*lines, "", f"Result: incomplete: still running at {check.elapsed:.0f} s "
                           f"({check.running()})", ""])  # fmt: skip
    missing = [s for s in check.sections if not any(r.section in _ROW_SECTIONS[s] for r in check.rows)]
    for s in missing:
        if f"{s}: produced no row" not in check.failures:
            check.failures.append(f"{s}: produced no row")
    verdict = "FAILED: " + "; ".join(check.failures) if check.failures else "every section ran; nothing failed"
    return "\n".join([*lines, "", f"Result: {verdict}", ""])


_ROW_SECTIONS = {"tests": {"tests"}, "models": {"models", "estimate", "budget", "time"},
                 "kernels": {"kernels"}, "offload": {"offload"}, "sharding": {"sharding"},
                 "fusion": {"fusion"}}  # fmt: skip


def environment_line(check: Check) -> str:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "missing"
    error = _transformers_error()
    if error is None:
        import transformers

        hf = f"transformers {transformers.__version__}"
    else:
        hf = "transformers unavailable (zoo models used)"
    device = torch.cuda.get_device_name() if check.cuda else "CPU dry run (tiny sizes)"
    return f"{device}; torch {torch.__version__}; triton {triton_version}; {hf}; Python {sys.version.split()[0]}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.md", help="where to write the table (default gpu_check.md)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--models", nargs="+", default=[],
                        help="models to measure (default: hf_llama hf_gpt2 hf_bert, or the zoo's without "
                             "transformers); also zoo_gpt, zoo_mlp")
    parser.add_argument("--time-limit", type=float, default=450.0,
                        help="seconds; cases not started by then are reported as failed (default 450)")
    parser.add_argument("--hard-limit", type=float, default=540.0,
                        help="seconds; then the table so far is written with a failure naming the case "
                             "that was running, and the script exits 1 (default 540; 0: none)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="without CUDA: run every section at tiny sizes on CPU (checks the plumbing)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_dry_run:  # before triton or memopt are imported: memopt's kernels run interpreted
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_dry_run:
        print("gpu_check: no CUDA device is available (torch.cuda.is_available() is False); nothing was "
              "measured. Run it on a GPU machine, or pass --cpu-dry-run to check the script's plumbing "
              "on CPU at tiny sizes.", file=sys.stderr)  # fmt: skip
        return NO_CUDA_STATUS
    if cuda and args.cpu_dry_run:
        print("gpu_check: CUDA is present; --cpu-dry-run is ignored", file=sys.stderr)
    check = Check("cuda" if cuda else "cpu", not cuda, GPU_SIZES if cuda else DRY_SIZES,
                  time_limit=args.time_limit, models=tuple(args.models), out=args.out,
                  sections=tuple(args.sections))  # fmt: skip
    if args.hard_limit > 0:
        start_watchdog(check, args.hard_limit)
    check.environment = environment_line(check)
    check.log(check.environment)
    check.write()
    for name in args.sections:
        check.log(f"section {name}: start")
        section = functools.partial(RUNNERS[name], check)
        check.case(name, f"section {name}", section, timed=False)  # its cases watch the time
        check.log(f"section {name}: done")
    return finish(check)


def finish(check: Check) -> int:
    """Write and print the final table, name the failures on stderr; the exit status.
    Once only (the hard limit's thread and the main thread may both get here)."""
    with check.lock:
        if check.finished:
            return 1
        check.finished = True
        table = check.write(final=True)
        print(table, flush=True)
        check.log(f"wrote {check.out}; {'FAILED' if check.failures else 'ok'}")
        for failure in check.failures:
            print(f"gpu_check: FAILED: {failure}", file=sys.stderr, flush=True)
        return 1 if check.failures else 0


def start_watchdog(check: Check, seconds: float) -> None:
    """After ``seconds``: kill the child process group if one runs, record the case that was
    running as failed, write the table and exit 1 at once (a hung or slow case cannot
    keep the run past its limit, and the rows measured so far are kept)."""

    def expire() -> None:
        child = check.child
        if child is not None and child.poll() is None:
            kill_child(child)
        with check.lock:  # held to the exit: the main thread writes nothing more
            if check.finished:
                return
            check.failures.append(f"hard limit: the run was stopped at {seconds:.0f} s while running "
                                  f"{check.running()}; rerun the rest with --sections")  # fmt: skip
            finish(check)
            sys.stderr.flush()
            os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


if __name__ == "__main__":
    sys.exit(main())
