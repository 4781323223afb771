"""Every memopt Triton kernel, compiled for sm_90 (H100, H200) ahead of time, no GPU needed.

Triton's interpreter (the other kernel tests) does not compile: it misses compile
errors, type errors that only the GPU lowering sees, and kernels that need more shared
memory or registers than the GPU has. Here each kernel goes through Triton's CUDA
compiler (ptxas included) for ``GPUTarget("cuda", 90, 32)`` with the signature memopt
launches it with. The signatures are not written down: the public entry points
(`quantize_blockwise_triton`, `dequantize_blockwise_triton`, `adam8bit_step`,
`lowrank_adam_step`) run on small CPU tensors with the kernel replaced by a recorder,
and each recorded launch is typed by Triton's own launcher code (the binder of
``JITFunction.run``: pointer dtypes, ints as i32/i64, an int equal to 1 as a constant,
16-divisible ints and 16-byte aligned pointers marked divisible), then compiled.

Checked per compiled kernel: shared memory (``metadata.shared``, what Triton compares
with the device's limit when it loads the kernel) within an H100/H200 block's 227 KiB,
and registers per thread (read from the cubin by ``cuobjdump``, shipped with triton:
``CompiledKernel.n_regs`` is only set when the driver loads the kernel; without
cuobjdump the register check is left out) low enough for the kernel's warps to fit one
SM's register file. Register spills (the stack frame) are recorded, not asserted. The low-rank kernel's tile retry (`lowrank_adam._triton_step`:
smaller tiles on ``OutOfResources`` at load) is run with a recorder that raises exactly
where the compiled kernel would not load, so `launched_config` says which tile an H100
would run at ranks 128 and 512.

Run as a script to print each compiled variant's resources (the table in docs/optimizers.md, Fused kernels):
``PYTHONPATH=. python tests/codegen/test_kernels_compile_for_gpu.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

triton = pytest.importorskip("triton")

try:
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.autotuner import OutOfResources
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from triton.backends.nvidia.compiler import get_ptxas

    TARGET = GPUTarget("cuda", 90, 32)
    BACKEND = make_backend(TARGET)
    PTXAS = get_ptxas(TARGET.arch).path  # the ptxas Triton runs for sm_90
except Exception as error:  # noqa: BLE001 - any missing piece means "cannot compile for CUDA here"
    pytest.skip(f"cannot compile Triton kernels for CUDA here: {type(error).__name__}: {error}", allow_module_level=True)
if not PTXAS or not os.path.exists(PTXAS):
    pytest.skip("triton's ptxas is not installed", allow_module_level=True)

from memopt.codegen import adam8bit, lowrank_adam, quantize_triton  # noqa: E402

KERNELS = {name: getattr(quantize_triton, name) for name in ("_quantize_kernel", "_dequantize_kernel")}
"""The quantize kernels as defined (the tests put recorders in their place)."""

MAX_SHARED_PER_BLOCK = 227 * 1024
"""Dynamic shared memory one block may opt in to on sm_90 (cudaDevAttrMaxSharedMemoryPerBlockOptin:
228 KiB per SM, 1 KiB of it reserved per block), H100 and H200 alike."""
REGISTERS_PER_SM = 65536
"""32-bit registers in one sm_90 SM's register file (a block's threads must fit in it)."""

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
CODES = (torch.int8, torch.float8_e4m3fn)
POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


@dataclass(frozen=True)
class Compiled:
    """One kernel variant compiled for sm_90 and the resources it needs."""

    name: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    shared: int
    num_warps: int
    registers: int | None
    """Per thread, from the cubin (None where cuobjdump is missing, or not assembled: see
    `compile_for_sm90`)."""
    stack: int | None
    """Stack frame per thread, bytes, in local memory: where ptxas spills registers."""

    def fits(self) -> bool:
        """Whether sm_90 can load it: Triton's shared-memory check at load, and the
        warps' registers (allocated 256 per warp) within one SM."""
        if self.shared > MAX_SHARED_PER_BLOCK:
            return False
        if self.registers is None:
            return True
        per_warp = -(-self.registers * 32 // 256) * 256
        return self.num_warps * per_warp <= REGISTERS_PER_SM


@dataclass(frozen=True)
class Launch:
    """A launch the code asked for, typed as Triton's launcher types it for a CUDA device."""

    kernel: Any
    signature: dict[str, str]
    constexprs: dict[tuple[int, ...], Any]
    attrs: dict[tuple[int, ...], Any]
    options: Any
    stages: int | None
    """``num_stages`` as the launch passed it (None: not passed, Triton's default)."""

    @property
    def named_constexprs(self) -> dict[str, Any]:
        names = list(self.signature)
        return {names[path[0]]: value for path, value in self.constexprs.items()}

    def key(self) -> str:
        return repr((self.kernel.fn.__qualname__, self.signature, sorted(self.constexprs.items()),
                     sorted(self.attrs.items()), sorted(self.options.__dict__.items())))  # fmt: skip


def _typed(kernel: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Launch:
    """``kernel[grid](*args, **kwargs)`` as `JITFunction.run` specializes it for sm_90:
    its binder and ``_pack_args``, with the CUDA backend instead of the active one."""
    binder = create_function_from_signature(kernel.signature, kernel.params, BACKEND)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(BACKEND, kwargs, bound, specialization, options)
    return Launch(kernel, signature, constexprs, attrs, options, kwargs.get("num_stages"))


class _Recorder:
    """Stands in for a ``triton.jit`` kernel: ``recorder[grid](...)`` types the launch
    (`_typed`), appends it to ``launches`` and calls ``on_launch`` with it (which may
    raise, as a failed load does)."""

    def __init__(self, kernel: Any, launches: list[Launch], on_launch: Callable[[Launch], None] | None = None):
        if not isinstance(kernel, JITFunction):
            pytest.skip(f"{kernel} is not a compiled-mode kernel: this process imported it with TRITON_INTERPRET=1")
        self.kernel, self.launches, self.on_launch = kernel, launches, on_launch

    def __getitem__(self, grid: object) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            typed = _typed(self.kernel, args, kwargs)
            self.launches.append(typed)
            if self.on_launch is not None:
                self.on_launch(typed)

        return launch


_COMPILED: dict[str, Compiled] = {}
"""Every variant compiled in this process, by `Launch.key` (a variant several tests hit compiles once)."""


@pytest.fixture(scope="module", autouse=True)
def _private_triton_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Triton's cache in a fresh directory: every run compiles (ptxas included), and
    nothing is left in the user's ~/.triton."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton-sm90")))
        yield


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    """``(registers, stack bytes)`` per thread of the one function in ``cubin``."""
    tool = getattr(knobs.nvidia, "cuobjdump", None)
    path = getattr(tool, "path", None)
    if not path or not os.path.exists(path):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([path, "-res-usage", file.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", report)
    assert found, f"cuobjdump -res-usage printed no resource line:\n{report}"
    return int(found[1]), int(found[2])


class _WouldNotLoad(Exception):
    """Raised in place of ptxas for a kernel whose shared memory is over the limit."""

    def __init__(self, shared: int):
        super().__init__(shared)
        self.shared = shared


def compile_for_sm90(launch: Launch) -> Compiled:
    """Compile ``launch`` for sm_90 (once per process). Compile errors propagate.

    A kernel over `MAX_SHARED_PER_BLOCK` is compiled to LLVM IR only, where Triton fixes
    its shared memory: ptxas, minutes on a small CPU for the low-rank kernel's large
    tiles, would make a cubin the GPU refuses to load (``registers`` None)."""
    key = launch.key()
    if key not in _COMPILED:
        backend_type, make_ptx = type(BACKEND), type(BACKEND).make_ptx

        def make_ptx_if_it_loads(self: Any, src: Any, metadata: dict[str, Any], *args: Any) -> Any:
            if metadata["shared"] > MAX_SHARED_PER_BLOCK:
                raise _WouldNotLoad(metadata["shared"])
            return make_ptx(self, src, metadata, *args)

        source = ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(backend_type, "make_ptx", make_ptx_if_it_loads)
            try:
                kernel = triton.compile(source, target=TARGET, options=launch.options.__dict__)
            except _WouldNotLoad as refused:
                shared, registers, stack = refused.shared, None, None
            else:
                shared, (registers, stack) = kernel.metadata.shared, _resources(kernel.asm["cubin"])
        _COMPILED[key] = Compiled(
            launch.kernel.fn.__name__, launch.signature, launch.named_constexprs, shared,
            launch.options.num_warps, registers, stack,
        )  # fmt: skip
    return _COMPILED[key]


def _assert_fits(compiled: Compiled) -> None:
    assert compiled.shared <= MAX_SHARED_PER_BLOCK, (
        f"{compiled.name} {compiled.constexprs}: {compiled.shared} bytes of shared memory, more than an "
        f"sm_90 block's {MAX_SHARED_PER_BLOCK}"
    )
    assert compiled.fits(), (
        f"{compiled.name} {compiled.constexprs}: {compiled.registers} registers per thread x "
        f"{compiled.num_warps} warps do not fit an sm_90 SM's {REGISTERS_PER_SM} registers"
    )


# -- capture: the public entry points with the kernel replaced by a recorder ------------


def _captured_quantize(monkeypatch: pytest.MonkeyPatch, run: Callable[[], object], kernel_name: str) -> list[Launch]:
    launches: list[Launch] = []
    monkeypatch.setattr(quantize_triton, kernel_name, _Recorder(KERNELS[kernel_name], launches))
    monkeypatch.setattr(quantize_triton, "_check_runnable", lambda *_: None)  # CPU tensors, no interpreter
    run()
    return launches


def _quantize_launch(monkeypatch: pytest.MonkeyPatch, x: torch.Tensor, block_size: int, codes: torch.dtype) -> Launch:
    (launch,) = _captured_quantize(
        monkeypatch, lambda: quantize_triton.quantize_blockwise_triton(x, block_size, codes), "_quantize_kernel"
    )
    return launch


def _dequantize_launch(
    monkeypatch: pytest.MonkeyPatch, numel: int, block_size: int, codes: torch.dtype, out: torch.dtype, device: str = "cpu"
) -> Launch:
    stored = torch.zeros(numel, dtype=codes, device=device)
    scales = torch.ones(-(-numel // block_size), device=device)
    (launch,) = _captured_quantize(
        monkeypatch,
        lambda: quantize_triton.dequantize_blockwise_triton(stored, scales, [numel], block_size, out),
        "_dequantize_kernel",
    )
    return launch


def _adam8bit_launch(monkeypatch: pytest.MonkeyPatch, param: torch.Tensor, block_size: int) -> Launch:
    launches: list[Launch] = []
    monkeypatch.setattr(adam8bit, "launchable", lambda kernel: _Recorder(kernel, launches))
    monkeypatch.setattr(adam8bit, "use_triton", lambda kernel, tensor: kernel != "torch")  # CPU tensors
    numel, device = param.numel(), param.device
    blocks = -(-numel // block_size)
    codes = [torch.zeros(numel, dtype=torch.uint8, device=device) for _ in range(2)]
    scales = [torch.zeros(blocks, device=device) for _ in range(2)]
    adam8bit.adam8bit_step(
        param, torch.zeros_like(param), codes[0], scales[0], codes[1], scales[1],
        tables=adam8bit.code_tables(device), block_size=block_size, beta1=0.9, beta2=0.999, eps=1e-8,
        step_size=1e-3, bias_correction2_sqrt=0.03, decay=0.99, kernel="triton",
    )  # fmt: skip
    (launch,) = launches
    return launch


def _lowrank_launches(
    monkeypatch: pytest.MonkeyPatch, rank: int, dtype: torch.dtype, side: str, on_launch: Callable[[Launch], None]
) -> list[Launch]:
    """The launches of one ``lowrank_adam_step(kernel="triton")`` at ``rank`` with the
    default tile, each passed to ``on_launch`` (raise `OutOfResources` there to make the
    step retry). ``side``: "left" (contiguous operands) or "right" (the transposed views
    `memopt.optim` passes for a right projection)."""
    launches: list[Launch] = []
    monkeypatch.setattr(lowrank_adam, "launchable", lambda kernel: _Recorder(kernel, launches, on_launch))
    monkeypatch.setattr(lowrank_adam, "use_triton", lambda kernel, tensor: kernel != "torch")
    monkeypatch.setattr(lowrank_adam, "_LAUNCHES", {})
    rows, cols = 2 * rank, 64
    weight, projector = torch.zeros(rows, cols, dtype=dtype), torch.zeros(rows, rank)
    moments = [torch.zeros(rank, cols) for _ in range(3)]  # low-rank gradient, exp_avg, exp_avg_sq
    if side == "right":
        weight, moments = weight.T.contiguous().T, [m.T.contiguous().T for m in moments]
    coefficients = dict(beta1=0.9, beta2=0.999, eps=1e-8, step_size=1e-3, bias_correction2_sqrt=0.03, decay=0.99)
    try:
        lowrank_adam.lowrank_adam_step(weight, moments[0], projector, *moments[1:], kernel="triton", **coefficients)
    except RuntimeError as error:  # no configuration loaded
        assert "does not fit" in str(error)
    return launches


# -- the tests ---------------------------------------------------------------------------


BIG = 1 << 15
"""Elements of the quantized tensors: enough blocks of 64 for the kernels' widest tile
(4096 elements a program), as large activations get."""


@pytest.mark.parametrize("codes", CODES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("block_size", [64, quantize_triton.MAX_TRITON_BLOCK_SIZE])
def test_quantize_kernel_compiles_and_fits(monkeypatch, dtype, codes, block_size):
    """Every input dtype and code kind, at the compress pass's default block (64) and the
    largest block the kernel takes (one 16384-element row per program)."""
    launch = _quantize_launch(monkeypatch, torch.zeros(BIG, dtype=dtype), block_size, codes)
    assert launch.signature["x_ptr"] == POINTER[dtype]
    assert launch.signature["codes_ptr"] == ("*u8" if codes == torch.float8_e4m3fn else "*i8")
    _assert_fits(compile_for_sm90(launch))


@pytest.mark.parametrize("out", FLOATS, ids=str)
@pytest.mark.parametrize("codes", CODES, ids=str)
@pytest.mark.parametrize("block_size", [64, quantize_triton.MAX_TRITON_BLOCK_SIZE])
def test_dequantize_kernel_compiles_and_fits(monkeypatch, codes, out, block_size):
    launch = _dequantize_launch(monkeypatch, BIG, block_size, codes, out)
    assert launch.signature["out_ptr"] == ("*u16" if out == torch.bfloat16 else POINTER[out])  # bf16 stored as bits
    _assert_fits(compile_for_sm90(launch))


def test_quantize_kernels_compile_for_odd_and_huge_tensors(monkeypatch):
    """The launcher's other specializations: an unaligned input of odd length (no
    divisibility hints), and more than 2**31 elements (int64 ``numel``; meta tensors,
    nothing allocated)."""
    odd = torch.zeros(1001, dtype=torch.bfloat16)[1:]
    launches = [_quantize_launch(monkeypatch, odd, 64, torch.int8)]
    huge = 2**31 + 64
    launches.append(_quantize_launch(monkeypatch, torch.empty(huge, dtype=torch.bfloat16, device="meta"), 64, torch.float8_e4m3fn))
    launches.append(_dequantize_launch(monkeypatch, huge, 64, torch.float8_e4m3fn, torch.bfloat16, device="meta"))
    assert launches[0].attrs[(0,)] == [] and launches[0].signature["numel"] == "i32"  # no tt.divisibility
    assert [launch.signature["numel"] for launch in launches[1:]] == ["i64", "i64"]
    for launch in launches:
        _assert_fits(compile_for_sm90(launch))


@pytest.mark.parametrize(
    "dtype,block_size",
    [(torch.float32, 256), (torch.bfloat16, 256), (torch.float16, 256), (torch.float32, 16), (torch.bfloat16, 4096)],
    ids=str,
)
def test_adam8bit_kernel_compiles_and_fits(monkeypatch, dtype, block_size):
    """Every parameter dtype at `AdamW8bit`'s default block (256), and its smallest and
    largest blocks (16, 4096)."""
    launch = _adam8bit_launch(monkeypatch, torch.zeros(4 * block_size, dtype=dtype), block_size)
    assert launch.named_constexprs == {"BLOCK": block_size}
    _assert_fits(compile_for_sm90(launch))


def test_adam8bit_kernel_compiles_for_a_piece_and_a_huge_parameter(monkeypatch):
    """A piece of a sharded parameter (an unaligned view of odd length, as
    `memopt.optim.AdamW8bit` steps it) and a parameter of more than 2**31 elements."""
    piece = torch.zeros(4097, dtype=torch.bfloat16)[1:]
    huge = torch.empty(2**31 + 256, dtype=torch.bfloat16, device="meta")
    launches = [_adam8bit_launch(monkeypatch, piece, 256), _adam8bit_launch(monkeypatch, huge, 256)]
    assert [launch.signature["numel"] for launch in launches] == ["i32", "i64"]
    for launch in launches:
        _assert_fits(compile_for_sm90(launch))


def _fits_or_fails_to_load(launch: Launch) -> None:
    """What loading the compiled kernel on an H100/H200 does: raise `OutOfResources`
    where it does not fit (as ``CompiledKernel._init_handles`` does)."""
    compiled = compile_for_sm90(launch)
    if compiled.shared > MAX_SHARED_PER_BLOCK:
        raise OutOfResources(compiled.shared, MAX_SHARED_PER_BLOCK, "shared memory")
    if not compiled.fits():
        raise OutOfResources(compiled.num_warps * 32, REGISTERS_PER_SM // compiled.registers, "threads")


def _config(launch: Launch) -> tuple[int, int, int | None]:
    """``(BLOCK_M, BLOCK_N, num_stages)`` of a low-rank launch, as `launched_config` says it."""
    return launch.named_constexprs["BLOCK_M"], launch.named_constexprs["BLOCK_N"], launch.stages


LOWRANK_VARIANTS = [
    (128, torch.float32, "left"), (128, torch.bfloat16, "left"), (128, torch.float16, "left"),
    (128, torch.bfloat16, "right"), (256, torch.bfloat16, "left"), (512, torch.bfloat16, "left"),
]  # fmt: skip
"""Weight dtypes and projection sides per rank. Rank 512 runs one combination to keep
the module under a minute of CPU: each compiles the 64 x 64 tile to LLVM IR (~9 s of
2-core CPU). Measured once by hand on triton 3.6 and 3.9, the other rank-512 combinations
launch the same 32 x 32 tile with at most 4 KiB more shared memory (the right
projection's 200704 bytes with 8 warps) and at most 40 bytes of stack."""


LOWRANK_MAX_STACK = 4096
"""Bytes of stack (spilled registers) per thread the launched low-rank tile may use.
Left to its defaults (4 warps, no ``maxnreg``), ptxas 13.4 (Triton 3.9) gave the kernel
32 registers and 7-23 KiB of stack at ranks 128-512, and ptxas 12.9 (Triton 3.6) did so
for a right projection; with `lowrank_adam.launch_options` the stack is at most 1.4 KiB
at ranks 128 and 512 and 3.7 KiB at rank 256 (its 64 x 64 tile: docs/optimizers.md)."""


@pytest.mark.parametrize("rank,dtype,side", LOWRANK_VARIANTS, ids=str)
def test_lowrank_kernel_launches_a_tile_that_fits(monkeypatch, rank, dtype, side):
    """`lowrank_adam_step` as an H100/H200 runs it: each tile it tries is compiled, one
    that would not load raises `OutOfResources` as the load does, and the step retries.
    Some tile must launch, `launched_config` must name the first that fits, and the
    launched kernel must not spill more than `LOWRANK_MAX_STACK`."""
    launches = _lowrank_launches(monkeypatch, rank, dtype, side, _fits_or_fails_to_load)
    fitting = [launch for launch in launches if compile_for_sm90(launch).fits()]
    assert fitting, f"no tile of the low-rank kernel fits sm_90 at rank {rank}: tried {[_config(x) for x in launches]}"
    assert fitting == launches[-1:], "the step must stop at the first tile that fits"
    assert lowrank_adam.launched_config(torch.device("cpu"), rank, dtype) == _config(launches[-1])
    launched = compile_for_sm90(launches[-1])
    assert launched.stack is None or launched.stack <= LOWRANK_MAX_STACK, (
        f"the low-rank kernel at rank {rank} ({dtype}, {side}) spills {launched.stack} bytes per thread with "
        f"{launched.registers} registers and {launched.num_warps} warps: see lowrank_adam.launch_options"
    )
    if side == "right":
        assert launches[-1].named_constexprs["stride_wm"] == 1  # the transposed weight's unit stride: a constant


@pytest.mark.parametrize("rank,dtype", [(128, torch.float32), (512, torch.bfloat16)], ids=str)
def test_lowrank_kernel_every_retry_tile_compiles(monkeypatch, rank, dtype):
    """Every tile the retry can reach compiles for sm_90, whether or not it is the one
    that launches (a compile error is not an `OutOfResources`: the retry would not
    catch it), and once a tile fits every later one fits too."""

    def refuse(launch: Launch) -> None:
        raise OutOfResources(0, 0, "shared memory")

    launches = _lowrank_launches(monkeypatch, rank, dtype, "left", refuse)
    configs = [_config(launch) for launch in launches]
    assert configs[0] == (64, 64, None) and configs[-1] == (16, 16, 1), configs  # default tile .. 16x16, one stage
    fits = [compile_for_sm90(launch).fits() for launch in launches]
    assert fits == sorted(fits), dict(zip(configs, fits))


def test_every_launch_says_whether_to_fuse_multiply_adds(monkeypatch):
    """Each kernel family passes ``enable_fp_fusion`` explicitly
    (`memopt.codegen._triton.FP_FUSION`): off for the 8-bit step and the quantization
    kernels, whose codes must round as their references do, on for the low-rank step.
    Triton 3.9 warns for a launch without it, and 3.10 changes the default."""
    launches = {
        "adam8bit": _adam8bit_launch(monkeypatch, torch.zeros(512), 256),
        "quantize": _quantize_launch(monkeypatch, torch.zeros(BIG), 64, torch.int8),
        "dequantize": _dequantize_launch(monkeypatch, BIG, 64, torch.int8, torch.float32),
        "lowrank_adam": _lowrank_launches(monkeypatch, 128, torch.float32, "left", lambda launch: None)[0],
    }
    fused = {name: launch.options.enable_fp_fusion for name, launch in launches.items()}
    assert fused == {"adam8bit": False, "quantize": False, "dequantize": False, "lowrank_adam": True}


def _report(compiled_variants: dict[str, Compiled]) -> Iterator[str]:
    """Each compiled variant's resources, one line each (the script mode)."""
    for compiled in sorted(compiled_variants.values(), key=lambda c: (c.name, str(c.signature), str(c.constexprs))):
        shown = {k: v for k, v in compiled.constexprs.items() if k.isupper()}
        pointers = ",".join(t for t in compiled.signature.values() if t.startswith("*"))
        yield (f"{compiled.name:20} {str(shown):55} shared={compiled.shared:6} regs={compiled.registers} "
               f"stack={compiled.stack} warps={compiled.num_warps} fits={compiled.fits()} [{pointers}]")  # fmt: skip


if __name__ == "__main__":
    import sys

    code = pytest.main([__file__, "-q", "-p", "no:cacheprovider", *sys.argv[1:]])
    # pytest imported this file again as a test module: its compiled variants are there.
    compiled = {k: v for name, m in list(sys.modules.items()) if name != "__main__"
                and getattr(m, "__file__", None) == __file__ for k, v in m._COMPILED.items()}  # fmt: skip
    print(f"triton {triton.__version__}, sm_90:", *_report(compiled), sep="\n")
    sys.exit(code)
