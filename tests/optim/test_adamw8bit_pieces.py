"""AdamW8bit on pieces of a tensor (`AdamW8bit.set_piece`, what a sharded parameter's
ranks do) quantizes in the whole tensor's blocks: the pieces step bit for bit as the
whole, whatever the cuts. Each piece is stepped by its own optimizer in its own thread;
``reduce_max`` is an in-process all-reduce MAX over the threads (a barrier)."""

from __future__ import annotations

import threading

import pytest
import torch

from memopt.codegen._triton import HAS_TRITON
from memopt.optim import AdamW8bit
from memopt.optim._flat_piece import FlatPiece, piece_blocks

BLOCK = 16


class ThreadMax:
    """An all-reduce MAX among ``n`` threads: each calls it with its tensor, which then
    holds the elementwise maximum of all of them."""

    def __init__(self, n: int) -> None:
        self.barrier = threading.Barrier(n, timeout=30)  # a thread that failed breaks it
        self.values: list[torch.Tensor] = []
        self.lock = threading.Lock()
        self.calls = 0

    def __call__(self, values: torch.Tensor) -> None:
        with self.lock:
            self.values.append(values.clone())
            self.calls += 1
        self.barrier.wait()
        result = torch.stack(self.values).amax(dim=0)
        self.barrier.wait()
        with self.lock:
            self.values.clear()
        self.barrier.wait()
        values.copy_(result)


def run_in_threads(functions: list) -> None:
    errors: list[BaseException] = []

    def guarded(fn):
        try:
            fn()
        except BaseException as error:  # surfaced below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(fn,)) for fn in functions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]


# Cuts of a 100-element tensor (blocks of 16: 0-15, ..., 96-99): on a block boundary (32),
# two cuts inside one block (40, 44: the piece 40-44 touches one block shared by three
# pieces), an empty piece (44-44), a cut inside the last, partial block (98).
CUTS = [0, 32, 40, 44, 44, 70, 98, 100]


def gradients(steps: int = 3) -> list[torch.Tensor]:
    """Gradients over 4 decades, so that blocks hold small and large moments."""
    return [torch.randn(100) * torch.logspace(-4, 0, 100)[torch.randperm(100)] for _ in range(steps)]


def train_pieces(cuts: list[int], declared: bool = True, **options: object):
    """3 steps of AdamW8bit on a 100-element tensor and, from the same start and
    gradients, on its pieces between ``cuts``, each with its own optimizer stepped in its
    own thread (declared pieces of the whole, or not). Returns the whole's optimizer
    and tensor, the pieces' spans, optimizers and tensors, and the all-reduce."""
    torch.manual_seed(0)
    whole = torch.randn(100)
    options = dict(lr=1e-2, weight_decay=0.1, block_size=BLOCK, min_8bit_size=0, **options)
    ref = whole.clone().requires_grad_()
    ref_opt = AdamW8bit([ref], **options)
    spans = list(zip(cuts[:-1], cuts[1:]))
    pieces = [whole[a:b].clone().requires_grad_() for a, b in spans]
    optimizers = [AdamW8bit([p], **options) for p in pieces]
    reduce = ThreadMax(len(pieces))
    for (a, _), p, opt in zip(spans, pieces, optimizers):
        if declared:
            opt.set_piece(p, FlatPiece(offset=a, total=100, cuts=tuple(cuts[1:-1]), reduce_max=reduce))
    for g in gradients():
        ref.grad = g.clone()
        ref_opt.step()
        for (a, b), p in zip(spans, pieces):
            p.grad = g[a:b].clone()
        run_in_threads([opt.step for opt in optimizers])
    return ref_opt, ref, spans, optimizers, pieces, reduce


@pytest.mark.parametrize("cuts", [CUTS, [0, 50, 100], [0, 48, 96, 100]])
def test_pieces_step_bit_for_bit_as_the_whole(cuts):
    """3 steps of the pieces equal 3 steps of the whole tensor: parameters, and each
    piece's codes and scales are the whole's for its elements and blocks; every piece
    joins one all-reduce per step where a cut crosses a block, none otherwise."""
    ref_opt, ref, spans, optimizers, pieces, reduce = train_pieces(cuts)
    assert torch.equal(torch.cat([p.detach() for p in pieces]), ref.detach())
    whole_state = ref_opt.state[ref]
    for (a, b), p, opt in zip(spans, pieces, optimizers):
        state = opt.state[p]
        first, count = a // BLOCK, piece_blocks(a, b - a, BLOCK)
        for key in ("exp_avg_code", "exp_avg_sq_code"):
            assert torch.equal(state[key], whole_state[key][a:b]), (a, b, key)
        for key in ("exp_avg_scale", "exp_avg_sq_scale"):
            assert torch.equal(state[key], whole_state[key][first : first + count]), (a, b, key)
    crossed = any(c % BLOCK for c in cuts[1:-1])
    assert reduce.calls == (3 * len(pieces) if crossed else 0)


def test_pieces_in_their_own_blocks_differ_from_the_whole():
    """The same pieces not declared (each quantized from its own first element) do not
    step as the whole: what the declaration fixes."""
    _, ref, _, _, pieces, _ = train_pieces(CUTS, declared=False)
    assert not torch.equal(torch.cat([p.detach() for p in pieces]), ref.detach())


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_pieces_with_the_triton_kernel(monkeypatch):
    """With ``kernel="triton"`` (Triton's interpreter on CPU) a piece's own blocks run the
    kernel and its shared blocks the PyTorch reference: the whole (all kernel) and the
    pieces agree on every code, and on the parameters to within the kernel's own
    difference from the reference (docs/optimizers.md: an ulp or so). Threads launch the
    kernel one at a time (the interpreter is not thread-safe)."""
    import memopt.optim._flat_piece as flat_piece
    import memopt.optim.adamw8bit as adamw8bit

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    launch = threading.Lock()

    def one_at_a_time(*args, **kwargs):
        with launch:
            adamw8bit.adam8bit_step(*args, **kwargs)

    monkeypatch.setattr(flat_piece, "adam8bit_step", one_at_a_time)
    ref_opt, ref, spans, optimizers, pieces, _ = train_pieces(CUTS, kernel="triton")
    torch.testing.assert_close(torch.cat([p.detach() for p in pieces]), ref.detach(), rtol=0, atol=1e-6)
    for (a, b), p, opt in zip(spans, pieces, optimizers):
        for key in ("exp_avg_code", "exp_avg_sq_code"):
            assert torch.equal(opt.state[p][key], ref_opt.state[ref][key][a:b]), (a, b, key)


def test_set_piece_after_the_first_step_is_refused():
    param = torch.randn(64, requires_grad=True)
    opt = AdamW8bit([param], block_size=BLOCK, min_8bit_size=0)
    param.grad = torch.randn(64)
    opt.step()
    with pytest.raises(ValueError, match=r"already has state .* before its first step"):
        opt.set_piece(param, FlatPiece(8, 128, (8,), lambda values: None))


def test_predicted_state_bytes_count_the_blocks_a_piece_touches():
    """64 elements at offset 8 touch 5 blocks of 16 (4 if counted from the piece's first
    element): the prediction before the first step is what the step then makes."""
    from memopt.optim.state_size import predicted_state_bytes, state_bytes_of

    param = torch.randn(64, requires_grad=True)
    opt = AdamW8bit([param], block_size=BLOCK, min_8bit_size=0)
    opt.set_piece(param, FlatPiece(8, 128, (8, 72), lambda values: None))
    group = opt.param_groups[0]
    predicted = predicted_state_bytes(opt, param, group)
    assert predicted == 2 * 64 + 8 * 5
    param.grad = torch.randn(64)
    opt.step()
    assert state_bytes_of(opt, param, group) == predicted


def test_state_of_another_layout_is_refused():
    """A piece at offset 8 of blocks of 16 touches 5 blocks with 64 elements; state made
    for 4 (its own blocks: a checkpoint of another world size) is named, not misread."""
    param = torch.randn(64, requires_grad=True)
    opt = AdamW8bit([param], block_size=BLOCK, min_8bit_size=0)
    opt.set_piece(param, FlatPiece(8, 128, (8, 72), lambda values: None))
    assert opt.scale_blocks(param, BLOCK) == 5
    opt.state[param].update(
        step=0, exp_avg_code=torch.full((64,), 127, dtype=torch.uint8), exp_avg_scale=torch.zeros(4),
        exp_avg_sq_code=torch.zeros(64, dtype=torch.uint8), exp_avg_sq_scale=torch.zeros(4),
    )  # fmt: skip
    param.grad = torch.randn(64)
    with pytest.raises(ValueError, match=r"64 codes and 4 scales; blocks of 16 of the whole tensor need 64 and 5"):
        opt.step()
