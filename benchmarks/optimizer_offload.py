"""Optimizer state offload (`memopt.optim.OffloadedState`), measured: memory and step time.

Model: ``memopt.testing.hf.build("llama", batch, seq, size="medium")`` (a
``transformers.LlamaForCausalLM``, 4 layers, hidden 256, vocab 2048, random init, train
mode); one fixed batch. Optimizers: ``torch.optim.AdamW`` (defaults but ``lr``) and
`GaLoreAdamW` (rank ``--rank`` on every 2-D weight but the token embedding, which gets
plain AdamW in a ``lowrank=False`` group with the norms), each plain and wrapped in
``OffloadedState(opt, "disk", --offload-dir)``.

Memory: every (optimizer, plain/offloaded) pair trains ``--steps`` steps in a fresh
process started with glibc's malloc thresholds fixed
(`memopt.testing.measure.measure_in_fresh_process`), ``--repeat`` times each, alternating
(medians are reported). The model is built and one forward/backward runs unmeasured
(one-time allocations), its gradients are dropped, then the whole training is one
measured call (the optimizer is made at the first step, so its state is made inside the
measurement). Growth = the peak minus what was live before the first step, in the OS
view (the resident set: what the process holds, whichever thread allocated or freed
it). The profiler-based allocator view of `measure_peak` records the main thread's
allocations and frees only, and the store frees written tensors on its I/O thread, so
that view is not used. Offloading should save the state: ``saved = growth(plain) -
growth(offloaded)`` against the plain optimizer's `optimizer_state_bytes` after training.

Step time: plain and offloaded copies of the model train side by side in this process
(``--threads`` torch threads), alternating which goes first, on the same batch: the
median over steps 2.. of the whole step (forward, backward, ``opt.step``) and of
``opt.step`` alone, their ratio offloaded / plain, and the state bytes moved per step
(read once and written once) over the extra ``opt.step`` time: the rate at which the
offloaded step streams. The two copies' parameters are compared bitwise at the end.

    python benchmarks/optimizer_offload.py
    python benchmarks/optimizer_offload.py --repeat 3 --time-steps 8 --threads 1 --check

``--check`` exits 1 with a ``FAILED`` line when saved/state is off by more than 5% (OS
view) or the parameters differ.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from tabulate import tabulate

from memopt.optim import GaLoreAdamW, OffloadedState, optimizer_state_bytes
from memopt.testing.hf import build
from memopt.testing.measure import Workload, measure_in_fresh_process

OPTIMIZERS = ("AdamW", "GaLoreAdamW")
MiB = 2**20


def make_optimizer(name: str, model: torch.nn.Module, rank: int) -> torch.optim.Optimizer:
    if name == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    matrices = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n]
    others = [p for p in model.parameters() if all(p is not m for m in matrices)]
    return GaLoreAdamW([{"params": matrices}, {"params": others, "lowrank": False}], lr=1e-3, rank=rank)


class Trainer:
    """A model, its batch and an optimizer (offloaded or not) made at the first step."""

    def __init__(self, name: str, offload: bool, batch: int, seq: int, rank: int, offload_dir: str | None) -> None:
        self.model, self.inputs = build("llama", batch=batch, seq=seq, size="medium")
        self.name, self.offload, self.rank, self.offload_dir = name, offload, rank, offload_dir
        self.opt: torch.optim.Optimizer | None = None

    def optimizer(self) -> torch.optim.Optimizer:
        if self.opt is None:
            opt = make_optimizer(self.name, self.model, self.rank)
            self.opt = OffloadedState(opt, "disk", self.offload_dir) if self.offload else opt
        return self.opt

    def backward(self) -> None:
        self.model(**self.inputs).loss.backward()

    def step(self) -> None:
        self.optimizer().step()
        self.optimizer().zero_grad(set_to_none=True)

    def state_bytes(self) -> dict[str, int]:
        opt = self.optimizer()
        if isinstance(opt, OffloadedState):
            stats = opt.stats()
            return {"state": stats.offloaded_bytes + stats.in_memory_bytes, "in_memory": stats.in_memory_bytes,
                    "peak_step": stats.peak_step_bytes, "largest_param": stats.largest_param_bytes}
        return {"state": optimizer_state_bytes(opt), "in_memory": optimizer_state_bytes(opt)}


def workload(optimizer: str, offload: bool, steps: int, batch: int, seq: int, rank: int,
             offload_dir: str | None) -> Workload:
    """The fresh process's side: one measured call trains ``steps`` steps."""
    trainer = Trainer(optimizer, offload, batch, seq, rank, offload_dir)
    trainer.backward()  # one-time allocations (autograd, oneDNN) outside the measurement
    trainer.model.zero_grad(set_to_none=True)

    def train() -> None:
        for _ in range(steps):
            trainer.backward()
            trainer.step()

    return Workload(step=train, info=trainer.state_bytes)


def memory_row(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Growth of ``args.repeat`` fresh processes each, plain and offloaded, alternating;
    the medians."""
    growth: dict[bool, list[int]] = {False: [], True: []}
    info: dict[bool, dict[str, int]] = {}
    for _ in range(args.repeat):
        for offload in (False, True):
            kwargs = dict(optimizer=name, offload=offload, steps=args.steps, batch=args.batch, seq=args.seq,
                          rank=args.rank, offload_dir=args.offload_dir)
            run = measure_in_fresh_process(f"{__file__}:workload", kwargs=kwargs, warmup=0, repeat=1)
            assert run.last.os_reliable, run.last.os_note
            growth[offload].append(run.last.os_peak_growth_bytes)  # type: ignore[arg-type]
            info[offload] = run.info
    plain, off = statistics.median(growth[False]), statistics.median(growth[True])
    state = info[False]["state"]
    return {
        "optimizer": name, "state MiB": state / MiB,
        "growth plain MiB (OS)": plain / MiB, "growth offloaded MiB (OS)": off / MiB,
        "saved MiB (OS)": (plain - off) / MiB, "saved / state (OS)": (plain - off) / state,
        "kept in memory B": info[True]["in_memory"], "peak in step MiB": info[True]["peak_step"] / MiB,
    }  # fmt: skip


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_row(name: str, args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    trainers = [Trainer(name, offload, args.batch, args.seq, args.rank, args.offload_dir) for offload in (False, True)]
    times: dict[bool, dict[str, list[float]]] = {t.offload: {"step": [], "opt": []} for t in trainers}
    for i in range(args.time_steps):
        for trainer in trainers if i % 2 == 0 else trainers[::-1]:
            backward = _timed(trainer.backward)
            opt = _timed(trainer.step)
            if i > 0:  # the first step makes the state (and GaLore's first SVDs)
                times[trainer.offload]["step"].append(backward + opt)
                times[trainer.offload]["opt"].append(opt)
    equal = all(torch.equal(a, b) for a, b in zip(trainers[0].model.parameters(), trainers[1].model.parameters()))
    med = {k: {part: statistics.median(v) for part, v in parts.items()} for k, parts in times.items()}
    moved = 2 * trainers[1].state_bytes()["state"]  # read once and written once per step
    trainers[1].optimizer().close()  # type: ignore[attr-defined]
    return {
        "optimizer": name,
        "step s plain": med[False]["step"], "step s offloaded": med[True]["step"],
        "step ratio": med[True]["step"] / med[False]["step"],
        "opt.step s plain": med[False]["opt"], "opt.step s offloaded": med[True]["opt"],
        "opt.step ratio": med[True]["opt"] / med[False]["opt"],
        "state moved / extra opt.step time (MiB/s)": moved / MiB / max(med[True]["opt"] - med[False]["opt"], 1e-9),
        "bitwise equal": equal,
    }, equal  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=3, help="training steps in each memory measurement")
    parser.add_argument("--time-steps", type=int, default=8,
                        help="steps of the timing run (the first is not timed; 0: no timing run)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=128, help="GaLore's rank (its default)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the timing run")
    parser.add_argument("--repeat", type=int, default=3,
                        help="fresh processes per memory figure (the median is kept; 0: no memory runs)")
    parser.add_argument("--offload-dir", default=None, help="default: the system's temporary directory")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    memory = [memory_row(name, args) for name in args.optimizers] if args.repeat > 0 else []
    timing = [time_row(name, args) for name in args.optimizers] if args.time_steps > 1 else []
    if memory:
        print(tabulate(memory, headers="keys", tablefmt="github", floatfmt=".3f"))
        print()
    if timing:
        print(tabulate([row for row, _ in timing], headers="keys", tablefmt="github", floatfmt=".3f"))
        print()
    print(f"llama medium, batch {args.batch} x {args.seq} tokens, {args.steps} steps per memory run, "
          f"GaLore rank {args.rank}; offload_dir {args.offload_dir or tempfile.gettempdir()}; "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")
    failed = [f"FAILED: {row['optimizer']} saved/state (OS view) {row['saved / state (OS)']:.3f}, not within 5% of 1"
              for row in memory if abs(row["saved / state (OS)"] - 1) > 0.05]
    failed += [f"FAILED: {row['optimizer']} offloaded parameters differ from plain" for row, ok in timing if not ok]
    for line in failed:
        print(line)
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
