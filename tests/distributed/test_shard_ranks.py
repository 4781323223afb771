"""Sharded training on 2 gloo ranks (2 processes each, `worker.py`): losses, gradients and
parameters equal to one process on the global batch, gradient accumulation without
sync, per-rank model-state bytes against ZeRO's formula, checkpoints resumed bit for bit
in new processes, mixed precision. Each rank asserts its own numerics; the test checks
what the ranks report."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import memopt.distributed as md
from memopt.distributed.testing import RanksFailed, run_ranks

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("worker.py")


def ranks(*args: str, timeout: float = 240.0) -> list[dict[str, Any]]:
    outputs = run_ranks(WORKER, list(args), world_size=2, timeout=timeout)
    return [json.loads(out.strip().splitlines()[-1]) for out in outputs]


def test_stages_match_one_process_eager():
    """Stages 0-3, 5 AdamW steps: every rank's loss, gradients (gathered) and parameters
    equal one process training on the global batch (rtol 1e-5), with a tied embedding,
    an uneven 13-row weight, an empty piece and a 0-d parameter."""
    results = ranks("numerics", "--stages", "0,1,2,3", "--steps", "5")
    assert results[0] == {**results[1], "rank": 0}
    assert {k: len(v) for k, v in results[0].items() if k != "rank"} == {"0": 5, "1": 5, "2": 5, "3": 5}


@pytest.mark.parametrize("stages", ["0,1", "2,3"])
def test_stages_match_one_process_compiled_by_memopt(stages):
    """The same under ``torch.compile(backend="memopt", options={"codegen": "eager",
    "strict": True})``: the collectives run inside memopt's compiled graphs."""
    results = ranks("numerics", "--stages", stages, "--steps", "5", "--backend", "memopt")
    assert sorted(k for k in results[0] if k != "rank") == stages.split(",")


@pytest.mark.inductor
def test_stage3_compiled_by_memopt_with_inductor():
    ranks("numerics", "--stages", "3", "--steps", "3", "--backend", "memopt-inductor", timeout=600)


def test_adamw8bit_shards_match_unsharded_adamw8bit():
    """AdamW8bit on each rank's rows (blocks aligned to the pieces) steps as the unsharded
    AdamW8bit does, at every stage."""
    ranks("numerics", "--stages", "0,1,2,3", "--steps", "4", "--optimizer", "adamw8bit")


@pytest.mark.parametrize("optimizer", ["adamw8bit-straddling", "adamw8bit-straddling-offloaded", "adamw8bit", "adamw"])
def test_sharded_optimizer_on_one_process_gradients_is_bitwise_one_process(optimizer):
    """Given one process's gradients (each rank its rows of them), 5 steps at stages 0-3
    leave every parameter bit for bit as one process's. AdamW8bit in blocks of 128 that
    the cut between the ranks' rows crosses (the embedding, both weights, the LayerNorm
    and a bias; an empty piece on rank 1): each rank quantizes in the whole parameter's
    blocks and the shared blocks' scales are agreed by an all-reduce (also with its state
    offloaded, `OffloadedState`, which steps one parameter at a time). Quantized in
    blocks of the rank's rows alone, the moments of the shared blocks differed from the
    first step on and the parameters after the second."""
    ranks("numerics", "--stages", "0,1,2,3", "--steps", "5", "--optimizer", optimizer, "--same-grads")


@pytest.mark.parametrize("backend", ["none", "memopt"])
def test_accumulation_reduces_once_per_step(backend):
    """3 micro-steps, sync off for the first 2: gradients equal one process accumulating
    all 3; eager, CommDebugMode counts no reduction in the first two backwards and one per
    parameter read in the last (10: 9 parameters, the tied one read twice); compiled, one
    backward graph has no reduction and the other has all of them: 2 collectives, the 0-d
    parameter's all-reduce and one bucket with the other 8 parameters' reduce-scatters
    (the tied one's two merged into one, `dedupe_collectives`)."""
    stages = "0,1,2,3" if backend == "none" else "3"
    result = ranks("accumulate", "--stages", stages, "--backend", backend)[0]
    for stage in stages.split(","):
        assert result[stage] == ([0, 0, 10, 0, 0, 10] if backend == "none" else [0, 2])


def test_accumulation_under_a_budget_is_planned_again_on_every_rank():
    """The same accumulation under ``memory_budget=0.95`` (`Tiny` is small: lower is
    infeasible, which strict raises), with a graph break before the loss: the step of
    two regions is planned as a whole once seen, and the micro-steps that start with
    gradients held compile the regions again with them counted. Every rank compiles
    again at the same call and keeps or undoes each collective rewrite as rank 0 does;
    gradients still equal one process's. A sharded region was never compiled again (it
    only warned that the gradients held were not counted, and the regions were planned
    each alone); compiled again with each rank deciding its collective rewrites from its
    own estimates, rank 0 bucketed its all-gathers otherwise than rank 1 and gloo
    failed ("Received data size doesn't match expected size")."""
    results = ranks("accumulate", "--stages", "3", "--backend", "memopt", "--budget", "0.95", "--graph-break")
    assert results[0] == {**results[1], "rank": 0}
    held, whole = results[0]["3-held"], results[0]["3-whole"]
    assert held and held[0] > 0, held
    assert any(whole), whole


def test_model_state_bytes_follow_zero():
    """After a step, each rank's parameters, gradients and AdamW state are within 5% of
    ZeRO's formula (fp32 AdamW: 4 + 4 + 8 bytes per element; two Linear(64, 64))."""
    for result in ranks("memory"):
        for stage in "0123":
            measured, formula = result[stage]["measured"], result[stage]["formula"]
            for part in ("params", "grads", "optimizer"):
                assert measured[part] == pytest.approx(formula[part], rel=0.05), (stage, part, measured, formula)
        assert result["3"]["measured"]["params"] * 2 == result["0"]["measured"]["params"]


def test_checkpoint_resumes_bit_for_bit(tmp_path):
    """Train 3 steps, save (sharded and full), train 3 more; new processes with other
    initial weights load and train the same 3 steps: identical losses."""
    saved = ranks("checkpoint", "--dir", str(tmp_path), "--stages", "2,3")
    resumed = ranks("checkpoint", "--dir", str(tmp_path), "--stages", "2,3", "--phase", "resume")
    assert resumed[0] == saved[0] and resumed[1] == saved[1]


def test_checkpoint_saved_before_the_first_step_resumes_bit_for_bit(tmp_path):
    """Saved before the optimizer's first step (a checkpoint of the initial weights; the
    optimizer has no state yet), at stages 1 and 3, sharded and full: loading made the
    state a load fills for every parameter and asked the checkpoint for it ('Missing key
    in checkpoint state_dict: optim.state.embed.weight.exp_avg'). The parameters without
    saved state now start without state, as in the run that saved them: the same 3
    losses in new processes, and in one unsharded process."""
    import torch

    from memopt.distributed import checkpoint

    args = ["checkpoint", "--dir", str(tmp_path), "--stages", "1,3", "--save-at", "0"]
    saved = ranks(*args)
    assert ranks(*args, "--phase", "resume") == saved
    worker = _worker_module()
    torch.manual_seed(1)
    model = worker.Tiny()
    opt = worker.adamw(model.parameters())
    checkpoint.load(tmp_path / "stage3-sharded", model, opt)
    losses = []
    for step in range(3):
        loss = model(*worker.batch(step))
        loss.backward()
        opt.step(), opt.zero_grad()
        losses.append(loss.item())
    assert losses == pytest.approx(saved[0]["3-sharded"], rel=1e-5)


def test_loading_an_optimizer_from_a_checkpoint_without_one_names_the_fix(tmp_path):
    """A checkpoint of the model alone, loaded with an optimizer: DCP's own error named
    the first missing state key; the error says the checkpoint holds no optimizer."""
    import torch
    import torch.distributed.checkpoint as dcp

    from memopt.distributed import checkpoint

    worker = _worker_module()
    model = worker.Tiny()
    dcp.save({"model": model.state_dict()}, checkpoint_id=tmp_path, no_dist=True)
    with pytest.raises(md.ShardingError, match=r"holds no optimizer .*load\(path, model\)"):
        checkpoint.load(tmp_path, model, torch.optim.AdamW(model.parameters()))


def _worker_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("shard_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    return worker


def test_saving_onto_a_checkpoint_is_refused_unless_overwrite(tmp_path):
    """A second save into a directory that holds a checkpoint raises on both ranks,
    naming ``overwrite=True``; with it, the new checkpoint replaces the old one (written
    beside it, then moved in: no staging directory left, the old checkpoint's stale
    shard file gone, the user's own file kept, no DCP warning) and loads. Before, the
    save rewrote the files in place under DCP's warning ('Detected an existing
    checkpoint ... overwriting'), leaving a larger world's shard files behind."""
    results = ranks("overwrite", "--dir", str(tmp_path))
    for result in results:
        assert "already holds a checkpoint" in result["refused"] and "overwrite=True" in result["refused"]
        assert result["warnings"] == []
        assert result["files"] == [".metadata", "notes.txt"]
        assert result["siblings"] == ["ckpt"]


@pytest.mark.parametrize("optimizer", ["adamw8bit", "adamw8bit-straddling"])
def test_checkpoint_with_per_rank_optimizer_state(tmp_path, optimizer):
    """AdamW8bit's codes and scales are per rank: a sharded checkpoint resumes exactly
    (stages 1-3; with blocks shared by two ranks too, whose scales each rank keeps)."""
    args = ["checkpoint", "--dir", str(tmp_path), "--stages", "1,2,3", "--modes", "sharded", "--optimizer", optimizer]
    saved = ranks(*args)
    assert ranks(*args, "--phase", "resume") == saved


@pytest.mark.parametrize("optimizer", ["adamw-offloaded", "adamw8bit-offloaded"])
def test_offloaded_optimizer_state_steps_like_one_process(optimizer):
    """``ShardedOptimizer(lambda ps: OffloadedState(AdamW(ps), "disk"), model)``: each
    rank's rows' state waits on disk between steps; 4 steps at stages 1 and 3 equal one
    process on the global batch (rtol 1e-5; AdamW8bit decides 8-bit by the whole
    parameter through the wrapper). It was refused: memopt did not know whether
    OffloadedState updates each element on its own."""
    ranks("numerics", "--stages", "1,3", "--steps", "4", "--optimizer", optimizer)


@pytest.mark.parametrize("optimizer", ["adamw-offloaded", "adamw8bit-offloaded"])
def test_checkpoint_resumes_offloaded_optimizer_state_bit_for_bit(tmp_path, optimizer):
    """A checkpoint of offloaded optimizer state holds the moments read back from the
    store, and loading puts them back into it: new processes resume with the saved run's
    losses exactly (sharded; full too where the state has a full form). Reading the
    optimizer's in-memory ``state`` only, the checkpoint held its step counts and no
    moments, and the resumed run went on from zero moments."""
    modes = "sharded,full" if optimizer == "adamw-offloaded" else "sharded"
    args = ["checkpoint", "--dir", str(tmp_path), "--stages", "3", "--modes", modes, "--optimizer", optimizer]
    saved = ranks(*args)
    assert ranks(*args, "--phase", "resume") == saved


def test_mixed_precision_policy():
    """bf16 ``param_dtype``, fp32 ``reduce_dtype``: losses within 2% of fp32, parameters,
    gradients and optimizer state in fp32."""
    ranks("mixed", "--stages", "2,3", "--steps", "3")


def test_collective_passes_are_bitwise_exact():
    """3 SGD steps compiled by memopt (the worker asserts each bit for bit):

    * stage 3: bucketing and overlap (defaults, and 1 KiB buckets prefetched 2 ahead)
      leave losses and gradients those of the unbucketed step; merging the tied
      embedding's two reductions changes them within rtol 1e-5;
    * stages 0 and 1: the tied embedding's two all-reduces merged into one of their sum
      (10 per step without `dedupe_collectives`, 9 with it: one per parameter), within
      rtol 1e-5 of the unmerged step; the gradients' all-reduces bucketed (1 under the
      default cap, the tied one's included, 3 at 1 KiB; a bucket reduced in place) and
      waited late, the same bits as unbucketed;
    * stage 3 at ``memory_budget=0.6`` (`Deep`): the budget search's caps (re-gathers
      under a smaller cap) and moves (some collectives left in place) give the bits of
      the same budget with every collective pass off."""
    results = ranks("collectives", timeout=900)
    assert all(len(r["losses"]) == 3 for r in results)
    result = results[0]
    for stage in "01":
        assert result[f"{stage}/traced"]["all_reduces"] == 10 and result[f"{stage}/unbucketed"]["all_reduces"] == 9
        assert result[f"{stage}/default"]["all_reduces"] == 1 and result[f"{stage}/small_buckets"]["all_reduces"] == 3
        assert result[f"{stage}/default"]["in_place"] == 1 and result[f"{stage}/unbucketed"]["in_place"] == 0
    budget = result["3/budget"]
    assert 0 < budget["caps"]["backward_all_gather"] < 4 << 20
    assert "0" in budget["distances"]["backward"]["all_gather"]


def test_updated_rows_are_gathered_in_buckets():
    """Stages 1 and 2 gather the updated rows of the 8 parameters that have a replica
    (the 0-d temperature is replicated) in one collective per step instead of 8, with
    the same parameters bit for bit (each rank asserts it)."""
    result = ranks("gathers", "--stages", "1,2")[0]
    for stage in ("1", "2"):
        assert result[stage] == {"apart": [8, 8, 8], "bucketed": [1, 1, 1]}, (stage, result[stage])


def test_model_built_on_meta_materializes_like_one_built_for_real():
    """md.materialize after md.shard on the meta device: 3 steps on 2 ranks bit for bit
    those of the same model built for real with the same seed (each rank asserts it)."""
    result = ranks("materialize", "--stages", "0,2,3")[0]
    assert sorted(k for k in result if k != "rank") == ["0", "2", "3"] and all(len(result[k]) == 3 for k in "023")


def test_ranks_with_other_batch_shapes_do_not_hang():
    """Without a budget, a rank whose batch changes shape compiles again on its own
    (rank 1 only, at step 2): it must not wait for the other ranks to agree on a plan
    (they never compile that graph: the step hung in the plan's broadcast), and the
    parameters follow one process stepping on the mean of the ranks' losses."""
    result = ranks("uneven", "--stages", "0,3", timeout=120)[0]
    assert all(len(result[k]) == 3 and result[f"{k}/fallbacks"] == [] for k in "03")


def test_ranks_with_other_shapes_under_a_budget_run_unoptimized():
    """Under ``memory_budget`` each rank plans its own shapes (2 and 24 rows from the
    first step), and rank 0's plan, which every rank runs, and their budget searches
    differ: the step hung. Each rank now sees that the graphs differ, warns and runs the
    region unoptimized (the same collectives on every rank); the parameters follow one
    process on both batches."""
    for result in ranks("uneven", "--stages", "3", "--budget", "0.6", timeout=120):
        assert len(result["3"]) == 3
        assert any("compiled another graph than rank 0" in reason for reason in result["3/fallbacks"]), result


def test_ranks_apart_in_a_step_with_a_graph_break_warn_once_and_name_no_memopt_bug():
    """As above, with a graph break after the model: once a step has run, memopt compiles
    the region again for the whole step, and the ranks' graphs are still apart. That
    recompile was reported as a memopt failure ("whole-step recompile failed ... This is
    a memopt bug: please report it"), a second warning and fallback for the cause the
    first compile had already named. The region keeps its plan (unoptimized, the same
    on every rank) with the one warning; the parameters follow one process."""
    for result in ranks("uneven", "--stages", "3", "--budget", "0.6", "--graph-break", timeout=120):
        assert len(result["3"]) == 3
        assert len(result["3/fallbacks"]) == 1 and "compiled another graph than rank 0" in result["3/fallbacks"][0]
        apart = [w for w in result["3/warnings"] if "compiled another graph than rank 0" in w]
        assert len(apart) == 1 and not any("memopt bug" in w for w in result["3/warnings"]), result["3/warnings"]


def test_ranks_with_the_same_batches_under_a_budget_share_one_plan():
    """The ranks' graphs are compared by their inputs' shapes, but not their parameters'
    rows: at stage 3 a 13-row weight is 7 rows on rank 0 and 6 on rank 1 for the same
    program. With the same batches on both ranks nothing falls back (the comparison
    had sent every budgeted region unoptimized)."""
    for result in ranks("uneven", "--stages", "3", "--budget", "0.6", "--rows", "4,4", timeout=120):
        assert len(result["3"]) == 3
        assert result["3/fallbacks"] == [], result


def test_a_short_last_batch_on_every_rank_shares_one_plan():
    """4 rows per rank, then 2 on every rank (a short last batch) under a budget: the
    ranks compile the same dynamic-shape graph and share one plan; no fallback. Rank 1
    comes 2 s late to that step: rank 0 waits for it (within rank_agreement_timeout)."""
    args = ("--rows", "4,4", "--short", "--late", "2", "--agree-timeout", "60")
    for result in ranks("uneven", "--stages", "3", "--budget", "0.6", *args, timeout=120):
        assert len(result["3"]) == 3 and result["3/fallbacks"] == [], result


@pytest.mark.parametrize("alone, bound", [(1, ("--pg-timeout", "16")), (0, ("--agree-timeout", "5"))])
def test_a_rank_that_compiles_again_alone_under_a_budget_names_the_cause(alone, bound):
    """Under a budget the ranks share rank 0's plan; at step 2 one rank's batch alone
    loses a row, so it alone compiles again while the other runs the step. It used to
    agree through an all-gather of the process group, which paired with the other rank's
    all-gathers: gloo aborted the process ('Received data size doesn't match expected
    size. 768 vs 4', exit -6) and the other rank saw its peer reset; with matching sizes
    it would hang until the group's timeout. The rank now waits its bound (half the
    group's timeout of 16 s; rank_agreement_timeout=5 s) and raises the error that names
    the region, the rank that did not come, the shapes and the fixes."""
    args = ("uneven", "--stages", "3", "--budget", "0.6", "--rows", "4,4", "--alone", str(alone), *bound)
    with pytest.raises(RanksFailed) as info:
        ranks(*args, timeout=120)
    other, waited = 1 - alone, 8 if alone else 5
    assert re.search(
        rf"MemoptRanksError: region 0/1: rank {alone} compiled it under a memory_budget and waited {waited}\.\d s "
        rf"for rank {other} to compile it too .* Rank {alone} compiles it again for inputs float32 \(s\d+, 16\) "
        r"where the ranks last agreed on float32 \(4, 16\) \(region 0/0\).* Fix: give every rank inputs of the "
        r"same shapes",
        str(info.value),
    ), str(info.value)


def test_a_short_last_batch_of_slices_names_the_cause():
    """The same with each rank's input a slice of the global batch: rank 1's slice moves
    its storage offset when the batch shrinks and rank 0's does not, so Dynamo compiles
    a dynamic offset on rank 1 only and the graphs differ. Every rank runs the region
    unoptimized (parameters still follow one process), and the warning names the cause
    and the fix instead of asking for inputs of the same shapes, which they were."""
    args = ("uneven", "--stages", "3", "--budget", "0.6", "--rows", "4,4", "--short", "--slice")
    for result in ranks(*args, timeout=120):
        (reason,) = result["3/fallbacks"]
        assert "symbolic inputs" in reason and "a slice of a larger tensor" in reason and ".clone()" in reason, reason


@pytest.mark.parametrize("mode", ["sharded", "full"])
def test_checkpoint_loads_into_one_unsharded_process(tmp_path, mode):
    """A checkpoint saved by 2 ranks at stage 3 loads into a plain model and a plain
    AdamW in this process (no process group, initialised otherwise): training on the
    global batch then gives the 2 ranks' losses after the save (rtol 1e-5)."""
    import importlib.util

    import torch

    from memopt.distributed import checkpoint

    saved = ranks("checkpoint", "--dir", str(tmp_path), "--stages", "3", "--modes", mode)[0][f"3-{mode}"]
    spec = importlib.util.spec_from_file_location("shard_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    torch.manual_seed(1)
    model = worker.Tiny()
    opt = worker.adamw(model.parameters())
    checkpoint.load(tmp_path / f"stage3-{mode}", model, opt, full=mode == "full")
    losses = []
    for step in range(3, 6):
        loss = model(*worker.batch(step))
        loss.backward()
        opt.step(), opt.zero_grad()
        losses.append(loss.item())
    assert losses == pytest.approx(saved, rel=1e-5)


def test_checkpoint_resumes_with_another_world_size(tmp_path):
    """Saved by 2 ranks (stage 3, sharded and full), resumed by 1: DCP reads the rows
    of the saved DTensors the new layout needs, and the same 3 steps give the same
    losses (one rank trains on the whole global batch)."""
    saved = ranks("checkpoint", "--dir", str(tmp_path), "--stages", "3")[0]
    out = run_ranks(WORKER, ["checkpoint", "--dir", str(tmp_path), "--stages", "3", "--phase", "resume"], world_size=1)
    resumed = json.loads(out[0].strip().splitlines()[-1])
    for mode in ("3-sharded", "3-full"):
        assert resumed[mode] == pytest.approx(saved[mode], rel=1e-5), mode
