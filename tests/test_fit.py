"""`memopt.fit` (memopt/fit.py) and ``memopt fit`` (memopt/cli/fit.py): the largest
batch or sequence length whose planned peak fits a budget, searched on fake tensors."""

from __future__ import annotations

import io
import json
import re
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

import memopt
from memopt.cli.main import main as cli_main
from memopt.fit import FitResult, accumulation, budget_bytes
from memopt.testing.measure import measure_peak

OPTIONS = {"codegen": "eager"}


class MLP(nn.Module):
    """Wide hidden layer: each sample adds activations worth a few KiB."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(32, 512), nn.Linear(512, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x))).pow(2).mean()


class TokenLM(nn.Module):
    """A token model whose activations grow with the sequence length."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.up, self.head = nn.Embedding(64, 32), nn.Linear(32, 256), nn.Linear(256, 64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.head(torch.relu(self.up(self.emb(ids))))
        return nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())


def _mlp_inputs(batch: int) -> torch.Tensor:
    return torch.randn(batch, 32)


def _tokens(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq))


def _planned_peak(model: nn.Module, inputs: torch.Tensor, budget: int) -> int:
    """memopt.explain's planned peak of one step under ``budget``, on real tensors."""
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptWarning)  # an infeasible budget lands at the floor
        return memopt.explain(model, inputs, options={**OPTIONS, "memory_budget": budget}).estimated_peak_bytes


def _budget_for(model: nn.Module, make: Any, size: int) -> int:
    """A budget just above the unbudgeted planned peak at ``size`` (so the answer is small)."""
    torch._dynamo.reset()
    return memopt.explain(model, make(size), options=OPTIONS).estimated_peak_bytes + 1


def test_fit_batch_is_the_largest_whose_planned_peak_fits() -> None:
    """The rule: the returned batch's planned peak (memopt.explain at that batch, real
    tensors) is within the budget and batch+1's is not; the search ran on fake tensors
    and the model's own parameters are untouched."""
    torch.manual_seed(0)
    model = MLP()
    before = [p.detach().clone() for p in model.parameters()]
    budget = _budget_for(model, _mlp_inputs, 5)
    out = io.StringIO()
    result = memopt.fit(model, _mlp_inputs, budget, options=OPTIONS, progress=out)
    assert isinstance(result, FitResult) and result.search == "batch" and not result.capped
    assert result.batch >= 5
    assert _planned_peak(model, _mlp_inputs(result.batch), budget) <= budget
    assert _planned_peak(model, _mlp_inputs(result.batch + 1), budget) > budget
    sizes = {p.size: p for p in result.probes}
    assert sizes[result.batch].fits and not sizes[result.batch + 1].fits
    assert result.estimated_peak_bytes == sizes[result.batch].planned_peak_bytes <= budget
    assert len(out.getvalue().splitlines()) == len(result.probes)  # one progress line per probe
    assert "fits" in out.getvalue() and "over" in out.getvalue()
    assert result.explanation is not None and result.explanation.ran_backward
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert f"batch {result.batch}" in str(result)


def test_fit_sequence_length_mode() -> None:
    """search="seq": the fixed batch and the fitted sequence length (a multiple of
    ``step``) reach make_inputs(batch, seq); seq+step does not fit."""
    torch.manual_seed(0)
    model = TokenLM()
    budget = _budget_for(model, lambda s: _tokens(2, s), 24)
    result = memopt.fit(model, _tokens, budget, search="seq", batch=2, step=8, options=OPTIONS, progress=None)
    assert result.search == "seq" and result.batch == 2 and result.seq == result.size
    assert result.seq is not None and result.seq % 8 == 0 and result.seq >= 24
    assert _planned_peak(model, _tokens(2, result.seq), budget) <= budget
    assert _planned_peak(model, _tokens(2, result.seq + 8), budget) > budget


class PositionLM(nn.Module):
    """Absolute position embeddings for ``config.n_positions`` tokens, as Hugging Face
    GPT-2 has: a longer sequence indexes past the table (IndexError on real tensors)."""

    def __init__(self, n_positions: int) -> None:
        super().__init__()
        self.config = type("Config", (), {"n_positions": n_positions})()
        self.emb, self.pos = nn.Embedding(64, 32), nn.Embedding(n_positions, 32)
        self.up, self.head = nn.Linear(32, 256), nn.Linear(256, 64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        logits = self.head(torch.relu(self.up(x)))
        return nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())


def test_fit_sequence_length_stops_at_the_models_position_table() -> None:
    """search="seq" without max_size stops at ``config.n_positions`` (fake tensors do not
    check the position lookup, so the search ran past the table to a length the model
    cannot run) and says so; the fitted length runs for real."""
    torch.manual_seed(0)
    model = PositionLM(n_positions=32)
    budget = _budget_for(PositionLM(n_positions=256), lambda s: _tokens(2, s), 128)  # fits 4x the table
    progress = io.StringIO()
    result = memopt.fit(model, _tokens, budget, search="seq", batch=2, step=8, options=OPTIONS, progress=progress)
    assert (result.seq, result.capped) == (32, True)
    assert "config.n_positions is 32" in progress.getvalue()
    model(_tokens(2, result.seq)).backward()
    with pytest.raises(IndexError):
        model(_tokens(2, result.seq + 8))


def test_fit_batch_at_a_sequence_past_the_position_table_warns() -> None:
    """A fixed seq above ``config.n_positions`` plans on fake tensors but cannot run:
    fit says so once."""
    torch.manual_seed(0)
    model = PositionLM(n_positions=16)
    with pytest.warns(memopt.MemoptWarning, match=r"seq=24 is above PositionLM's config.n_positions = 16") as caught:
        memopt.fit(model, _tokens, "1GiB", seq=24, max_size=2, options=OPTIONS, progress=None)
    assert len([w for w in caught if issubclass(w.category, memopt.MemoptWarning)]) == 1
    with pytest.raises(IndexError):
        model(_tokens(2, 24))


class KeepsLogits(nn.Module):
    """A graph break before the loss, and the logits returned with it: the caller keeps
    the first region's output through backward (as a Hugging Face output object does)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.up, self.head = nn.Embedding(64, 32), nn.Linear(32, 512), nn.Linear(512, 64)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(torch.relu(self.up(self.emb(ids))))  # the peak is in this region's backward
        torch._dynamo.graph_break()
        return nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()), logits


def test_fit_counts_outputs_the_caller_keeps_across_a_graph_break() -> None:
    """On fake tensors memopt cannot observe which region outputs the caller keeps; fit
    counts them all as kept, which for a break before the loss is exact: the probe's
    planned peak equals memopt.explain's on real tensors (where it is observed)."""
    torch.manual_seed(0)
    model = KeepsLogits()
    result = memopt.fit(model, lambda b: _tokens(b, 16), "1GiB", max_size=2, options=OPTIONS, progress=None)
    probe = {p.size: p for p in result.probes}[2]
    torch._dynamo.reset()
    real = memopt.explain(model, _tokens(2, 16), options={**OPTIONS, "memory_budget": 2**30})
    assert len(real.regions) == 2 and real.regions[0].kept_outputs  # observed on real tensors
    assert probe.planned_peak_bytes == real.estimated_peak_bytes


class SavesKeptLogits(nn.Module):
    """As `KeepsLogits`, with a loss region that saves its input (the logits) for
    backward: the saved input and the kept output are one storage."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(64, 32), nn.Linear(32, 512)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(self.emb(ids))
        torch._dynamo.graph_break()
        return (logits.pow(2) * logits.pow(3)).mean(), logits  # the peak: this region's backward


@pytest.mark.parametrize("training", [True, False])
def test_fit_on_fake_tensors_counts_a_region_input_once(training: bool) -> None:
    """Where a region's input came from is observed on fake tensors too: the logits
    the loss region saves (training), or reads without a gradient (inference), are
    the first region's output, not a second copy (fit planned GPT-2 small 8% high and
    returned one batch too few; under training=False the logits were also a step
    input live from the start)."""
    torch.manual_seed(0)
    model = SavesKeptLogits()
    result = memopt.fit(model, lambda b: _tokens(b, 16), "1GiB", max_size=2, training=training, options=OPTIONS,
                        progress=None)
    probe = {p.size: p for p in result.probes}[2]
    torch._dynamo.reset()
    with torch.set_grad_enabled(training):
        real = memopt.explain(model, _tokens(2, 16), options={**OPTIONS, "memory_budget": 2**30})
    assert len(real.regions) == 2 and real.regions[1].input_sources  # observed on real tensors
    held = sum(p.numel() * p.element_size() for p in model.parameters()) + 2 * 16 * 8
    assert real.timeline().baseline_bytes == held
    assert probe.planned_peak_bytes == real.estimated_peak_bytes


def _graph_break_inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 64), torch.randn(batch, 8)


def test_fit_across_a_graph_break_reaches_the_plan_a_training_loop_settles_on() -> None:
    """A step split by a graph break is planned as a whole by a training loop (from its
    second step, docs/whole_step.md); each probe runs the step until that plan is made,
    so fit's answer is the largest batch that loop plans within the budget, and its
    measured peak there is within it. GraphBreakMLP under 2 MiB: the real 3-step loop
    plans 336 within (2,093,124 B) and 337 over; fit, which planned one step, answered
    217 (and run under max_size=337, 217)."""
    from memopt.testing.zoo import GraphBreakMLP

    budget = 2 * 2**20
    result = memopt.fit(GraphBreakMLP(), _graph_break_inputs, budget, max_size=337, options=OPTIONS, progress=None)
    assert (result.batch, result.capped) == (336, False)
    assert not {p.size: p for p in result.probes}[337].fits
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GraphBreakMLP()
    inputs = _graph_break_inputs(result.batch)
    compiled = torch.compile(model, backend="memopt", options={**OPTIONS, "memory_budget": budget})

    def step() -> None:
        compiled(*inputs).backward()
        model.zero_grad(set_to_none=True)

    with memopt.record() as loop, warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptWarning)
        for _ in range(3):
            step()
    assert result.estimated_peak_bytes == loop.estimated_peak_bytes <= budget
    assert loop.baseline_bytes + measure_peak(step).peak_growth_bytes <= budget


def test_fit_stops_at_max_size_and_says_so() -> None:
    torch.manual_seed(0)
    result = memopt.fit(MLP(), _mlp_inputs, "1GiB", max_size=3, global_batch=10, options=OPTIONS, progress=None)
    assert result.batch == 3 and result.capped
    assert (result.accumulation_steps, result.micro_batches, result.even_batch) == (4, (3, 3, 2, 2), 2)
    assert "uneven micro-batches 3+3+2+2" in result.report() and "5 equal steps of 2" in result.report()


@pytest.mark.parametrize(
    "global_batch, batch, expected",
    [
        (256, 32, (8, (32,) * 8, 32)),  # divides: equal steps
        (100, 32, (4, (25, 25, 25, 25), 25)),  # ceil(100/32) = 4 steps, evened out
        (10, 4, (3, (4, 3, 3), 2)),  # uneven: sizes differ by one; 5 steps of 2 are equal
        (3, 8, (1, (3,), 3)),  # the global batch is below the fitted batch
        (7, 4, (2, (4, 3), 1)),  # a prime: only 1 divides it
    ],
)
def test_accumulation_arithmetic(global_batch: int, batch: int, expected: tuple[int, tuple[int, ...], int]) -> None:
    steps, micro, even = accumulation(global_batch, batch)
    assert (steps, micro, even) == expected
    assert sum(micro) == global_batch and max(micro) <= batch and max(micro) - min(micro) <= 1


def test_accumulation_refuses_zero() -> None:
    with pytest.raises(memopt.MemoptFitError, match="at least 1"):
        accumulation(0, 4)
    with pytest.raises(memopt.MemoptFitError, match="global_batch=0 must be a positive int"):
        memopt.fit(MLP(), _mlp_inputs, "1GiB", global_batch=0, progress=None)  # before any probe


def test_budget_below_the_floor_names_it_and_the_options() -> None:
    model, make = TokenLM(), lambda batch: _tokens(batch, 512)  # floor at batch 1 1.36 MiB, fixed 210 KiB
    with pytest.raises(memopt.MemoptFitError) as info:
        memopt.fit(model, make, 800_000, options=OPTIONS, progress=None)
    message = str(info.value)
    assert "even batch 1 does not fit" in message and "floor" in message
    assert "precision='bf16'" in message and "compress_activations" in message and "offload" in message
    with pytest.raises(memopt.MemoptFitError) as info:
        memopt.fit(model, make, 800_000, options={**OPTIONS, "precision": "bf16"}, progress=None)
    assert "precision='bf16'" not in str(info.value)  # an option already on is not offered


def test_budget_below_the_floor_names_the_other_size_that_fits() -> None:
    """The rule: when batch 1 at the given sequence is over the budget, the error names
    a shorter sequence at batch 1 whose plan fits (checked on real tensors); when the
    first length of a sequence search at batch 4 is over, a smaller batch at that
    length; and when parameters and gradients alone exceed the budget, that no size
    fits (no size is suggested)."""
    torch.manual_seed(0)
    model = TokenLM()  # 104 KiB of parameters (+ as much gradient); batch 1 x seq 512's floor 1.36 MiB
    budget = 800_000
    with pytest.raises(memopt.MemoptFitError) as info:
        memopt.fit(model, _tokens, budget, seq=512, options=OPTIONS, progress=None)
    message = str(info.value)
    assert "even batch 1 does not fit" in message
    found = re.search(r"a shorter sequence: seq (\d+) at batch 1 fits, planned peak", message)
    assert found, message
    seq = int(found.group(1))
    assert 1 <= seq < 512 and _planned_peak(model, _tokens(1, seq), budget) <= budget

    with pytest.raises(memopt.MemoptFitError) as info:
        memopt.fit(model, _tokens, 500_000, search="seq", batch=4, step=64, options=OPTIONS, progress=None)
    found = re.search(r"a smaller batch: batch (\d+) at seq 64 fits", str(info.value))
    assert found, str(info.value)
    assert _planned_peak(model, _tokens(int(found.group(1)), 64), 500_000) <= 500_000

    with pytest.raises(memopt.MemoptFitError) as info:
        memopt.fit(model, _tokens, 200_000, seq=512, options=OPTIONS, progress=None)
    message = str(info.value)
    assert "No batch or sequence fits" in message and "gradients 105.25 KiB" in message, message
    assert "shorter sequence" not in message


def test_make_inputs_that_does_not_take_the_batch() -> None:
    with pytest.raises(memopt.MemoptFitError, match=r"cannot be called as make_inputs\(batch\)"):
        memopt.fit(MLP(), lambda: torch.randn(4, 32), "1GiB", options=OPTIONS, progress=None)
    with pytest.raises(memopt.MemoptFitError, match=r"make_inputs\(batch, seq\)"):
        memopt.fit(TokenLM(), lambda b: _tokens(b, 8), "1GiB", search="seq", options=OPTIONS, progress=None)


def test_make_inputs_that_ignores_the_batch() -> None:
    with pytest.raises(memopt.MemoptFitError, match="ignores the size"):
        memopt.fit(MLP(), lambda b: torch.randn(4, 32), "1GiB", max_size=4, options=OPTIONS, progress=None)


def test_model_without_grads_says_what_is_planned() -> None:
    model = MLP().eval().requires_grad_(False)
    with pytest.raises(memopt.MemoptFitError, match="eval mode.*training step.*training=False"):
        memopt.fit(model, _mlp_inputs, "1GiB", options=OPTIONS, progress=None)
    result = memopt.fit(model, _mlp_inputs, "1GiB", max_size=2, training=False, options=OPTIONS, progress=None)
    assert result.batch == 2 and result.explanation is not None and not result.explanation.ran_backward


def test_reserve_errors_name_the_reserve_and_zero_is_no_reserve() -> None:
    """A malformed reserve was reported as ``budget=...`` (a fraction "of the unoptimized
    peak"), and ``reserve="0MiB"`` was refused as not positive."""
    for bad, match in [("8", r"^reserve='8': .*'8GiB'"), (0.5, r"^reserve=0\.5: .*outside the step"),
                       (-5, r"^reserve=-5 must be a non-negative size")]:
        with pytest.raises(memopt.MemoptFitError, match=match):
            memopt.fit(MLP(), _mlp_inputs, "1GiB", reserve=bad, options=OPTIONS, progress=None)  # type: ignore[arg-type]
    assert budget_bytes("0MiB", name="reserve") == 0
    result = memopt.fit(MLP(), _mlp_inputs, "1GiB", reserve="0MiB", max_size=2, options=OPTIONS, progress=None)
    assert (result.batch, result.reserve_bytes) == (2, 0)


def test_budgets_parse_as_memory_budget_does() -> None:
    assert budget_bytes("24GiB") == 24 * 2**30
    assert budget_bytes("512MB") == 512 * 10**6
    assert budget_bytes(1234) == 1234
    for bad, match in [(0.5, "absolute size"), ("12 parsecs", "not understood"), (True, "absolute size"), (0, "positive"),
                       ("3", r"without a unit.*'3GiB'"), ("50%", "absolute size")]:  # --budget 3 was 3 bytes
        with pytest.raises(memopt.MemoptFitError, match=match):
            budget_bytes(bad)  # type: ignore[arg-type]
    with pytest.raises(memopt.MemoptFitError, match="drop it from options"):
        memopt.fit(MLP(), _mlp_inputs, "1GiB", options={"memory_budget": "1GiB"}, progress=None)
    with pytest.raises(memopt.MemoptFitError, match="leaves nothing"):
        memopt.fit(MLP(), _mlp_inputs, "1MiB", reserve="2MiB", progress=None)



def test_a_budget_int_under_a_kib_names_fit_and_the_unit() -> None:
    """``fit(model, make, 24)`` (24 GiB meant) went on to memory_budget=24, whose refusal
    offered fractions, which fit itself refuses; a reserve's errors said ``budget=``;
    a reserve leaving a few bytes is fit's error, not memory_budget's refusal."""
    with pytest.raises(memopt.MemoptFitError, match=r"^budget=24 is 24 byte\(s\), under 1 KiB.*'24GiB'") as info:
        memopt.fit(MLP(), _mlp_inputs, 24, progress=None)
    assert "fraction" not in str(info.value)
    with pytest.raises(memopt.MemoptFitError, match=r"^reserve='0\.5': .*without a unit"):
        memopt.fit(MLP(), _mlp_inputs, "1MiB", reserve="0.5", progress=None)
    with pytest.raises(memopt.MemoptFitError, match=r"leaves only 24 B \(under 1 KiB\)"):  # not memory_budget's refusal
        memopt.fit(MLP(), _mlp_inputs, 2**20, reserve=2**20 - 24, options=OPTIONS, progress=None)
    with pytest.raises(memopt.MemoptFitError, match=r"^budget='1000B' is 1000 byte\(s\), under 1 KiB"):
        memopt.fit(MLP(), _mlp_inputs, "1000B", progress=None)

FACTORY = """
import torch
import torch.nn as nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(32, 512), nn.Linear(512, 32)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))).pow(2).mean()


def build():
    return MLP(), lambda batch: torch.randn(batch, 32)


def not_a_pair():
    return MLP()


def interrupted():
    def make_inputs(batch):
        raise KeyboardInterrupt  # Ctrl-C while a probe builds its inputs
    return MLP(), make_inputs


def with_adamw():
    model = MLP()
    return model, lambda batch: torch.randn(batch, 32), torch.optim.AdamW(model.parameters())
"""


def test_cli_fit_interrupted_says_so_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C during ``memopt fit`` ends it with one line on stderr and exit status 130
    (128 + SIGINT), not a Python traceback."""
    path = tmp_path / "model.py"
    path.write_text(textwrap.dedent(FACTORY))
    status = cli_main(["fit", f"{path}:interrupted", "--budget", "1GiB", "--quiet"])
    out, err = capsys.readouterr()
    assert status == 130 and out == ""
    assert err == "memopt fit: interrupted (Ctrl-C); stopped before a result\n"


def test_cli_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "model.py"
    path.write_text(textwrap.dedent(FACTORY))
    status = cli_main(["fit", f"{path}:build", "--budget", "1GiB", "--max-batch", "4", "--global-batch", "10"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "memopt fit: batch 4" in out and "3 accumulation steps of uneven micro-batches 4+3+3" in out
    assert "[memopt fit] batch 4:" in err  # progress on stderr, a line per probe
    assert cli_main(["fit", f"{path}:build", "--budget", "1GiB", "--max-batch", "2", "--reserve", "1MiB", "--json", "--quiet"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["batch"], data["reserve_bytes"], data["capped"]) == (2, 2**20, True) and data["probes"][-1]["size"] == 2
    assert cli_main(["fit", f"{path}:build", "--budget", "1KiB", "--quiet"]) == 2
    assert "even batch 1 does not fit" in capsys.readouterr().err
    assert cli_main(["fit", f"{path}:not_a_pair", "--budget", "1GiB"]) == 2
    assert "must return (model, make_inputs)" in capsys.readouterr().err
    assert cli_main(["fit", f"{path}:build", "--budget", "1GiB", "--in-backward"]) == 2
    assert "returns none" in capsys.readouterr().err
    sizes = {}
    for extra in ([], ["--in-backward"]):  # AdamW's state (8 bytes per parameter) is planned
        assert cli_main(["fit", f"{path}:with_adamw", "--budget", "900KiB", "--json", "--quiet", *extra]) == 0
        sizes[bool(extra)] = json.loads(capsys.readouterr().out)["batch"]
    assert cli_main(["fit", f"{path}:build", "--budget", "900KiB", "--json", "--quiet"]) == 0
    assert max(sizes.values()) < json.loads(capsys.readouterr().out)["batch"]
    assert cli_main(["fit", f"{path}:build", "--budget", "12 parsecs"]) == 2
    assert "not understood" in capsys.readouterr().err


class Deep(nn.Module):
    """Four wide blocks: under a budget the planner recomputes some of them."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 32)) for _ in range(4)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).pow(2).mean()


def test_fit_returns_what_a_scan_of_every_size_returns() -> None:
    """The predicted probes choose where to look, never the answer: under a budget the
    planner must work for (between the floor and the unoptimized peak at batch 4), fit's
    batch is the largest size of a brute-force scan of every size whose probe fits (and
    the scan is monotone, fit's precondition)."""
    from memopt.fit import _config
    from memopt.fitting.fake import fake_model
    from memopt.fitting.probe import Runner, Sizes

    torch.manual_seed(0)
    model = Deep()

    def make(batch: int) -> torch.Tensor:
        return torch.randn(batch, 64, 32)  # 64 positions a sample: activations outweigh parameters

    unoptimized = _planned_peak(model, make(4), 2**40)
    floor = _planned_peak(model, make(4), 1024)  # far below reach: the smallest peak
    budget = (unoptimized + floor) // 2
    result = memopt.fit(model, make, budget, options=OPTIONS, progress=None)
    fake, mode, _ = fake_model(model)
    scan = Runner(fake, make, Sizes("batch", 1, None, 1), _config(OPTIONS, budget), mode, True, None, budget)
    verdicts = [scan(size) for size in range(1, result.batch + 3)]
    assert verdicts == sorted(verdicts, reverse=True)  # monotone: fits, ..., fits, over, ...
    assert result.batch == sum(verdicts) and not result.capped
    assert scan.peaks[result.batch] == result.estimated_peak_bytes
    assert not all(p.planned_peak_bytes == p.unoptimized_peak_bytes for p in result.probes)  # the planner worked


def test_fit_plans_the_optimizer_state_and_the_update_in_backward() -> None:
    """options optimizer= / optimizer_in_backward= reach every probe through a copy of
    the optimizer over the fake parameters: the planned peak counts the (predicted)
    state, equal to memopt.explain's on real tensors with the same option; with the
    update in backward too (which fits a smaller batch than a separate step here: this
    MLP's gradients are small next to its activations, and each update's temporaries
    sit at the backward's activation peak); the user's optimizer and model are
    untouched."""
    torch.manual_seed(0)
    model = MLP()
    before = [p.detach().clone() for p in model.parameters()]
    budget = _budget_for(model, _mlp_inputs, 150)
    plain = memopt.fit(model, _mlp_inputs, budget, options=OPTIONS, progress=None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stepped = memopt.fit(model, _mlp_inputs, budget, options={**OPTIONS, "optimizer": opt}, progress=None)
    assert stepped.batch < plain.batch  # AdamW's 8 bytes per parameter take room
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", memopt.MemoptWarning)
        real = memopt.explain(
            model, _mlp_inputs(stepped.batch), options={**OPTIONS, "optimizer": opt, "memory_budget": budget}
        )
    state = 8 * sum(p.numel() for p in model.parameters())  # AdamW, fp32: two moments
    for explanation in (real, stepped.explanation):
        assert explanation is not None
        counted = explanation.step_optimizer()
        assert counted is not None and sum(counted.state_bytes.values()) == state
    assert stepped.estimated_peak_bytes == real.estimated_peak_bytes
    fused_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fused = memopt.fit(model, _mlp_inputs, budget, options={**OPTIONS, "optimizer_in_backward": fused_opt}, progress=None)
    assert fused.batch < plain.batch and fused.explanation is not None
    counted = fused.explanation.step_optimizer()
    assert counted is not None and counted.in_backward and sum(counted.state_bytes.values()) == state
    assert not opt.state and not fused_opt.state and not hasattr(fused_opt, "_memopt_in_backward")
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_fit_refuses_an_optimizer_over_another_model() -> None:
    other = torch.optim.SGD(MLP().parameters(), lr=0.1)
    with pytest.raises(memopt.MemoptFitError, match="not the model's"):
        memopt.fit(MLP(), _mlp_inputs, "1GiB", options={**OPTIONS, "optimizer": other}, progress=None)
