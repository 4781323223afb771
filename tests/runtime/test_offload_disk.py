"""DiskStore: raw private files, memory released once written, back-pressure, and no
files left behind whatever happens to the step (exceptions, interrupts, exit, kill)."""

from __future__ import annotations

import errno
import gc
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import weakref
from pathlib import Path

import pytest
import torch

import memopt.runtime.disk_store as disk_store
from memopt.errors import MemoptOffloadError
from memopt.runtime import bandwidth, get_store, measure_bandwidth, measure_copy_rate, register_store
from memopt.runtime.disk_store import DiskStore, sweep_stale
from memopt.runtime.store_registry import _stores
from offload_testing import recording_backend

ops = torch.ops.memopt
CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def gate(monkeypatch):
    """Hold every write of an offloaded value until ``gate.set()``."""
    gate = threading.Event()
    write = disk_store.write_file

    def held_write(path, tensor, **kwargs):
        if path.endswith(".bin"):
            assert gate.wait(10), "test never opened the gate"
        write(path, tensor, **kwargs)

    monkeypatch.setattr(disk_store, "write_file", held_write)
    yield gate
    gate.set()


def test_source_is_held_until_written_then_dropped(store_id, gate):
    """The store references the source only while its write is pending: after the
    write completes, nothing keeps its memory alive."""
    store = get_store(store_id)
    value = torch.randn(256)
    storage = weakref.ref(value.untyped_storage())
    token = ops.offload(value, store_id, "v")
    del value
    gc.collect()
    assert storage() is not None
    assert store.stats().pending_bytes == 1024
    gate.set()
    store.flush()
    assert storage() is None
    stats = store.stats()
    assert (stats.pending_bytes, stats.resident_bytes, stats.files) == (0, 1024, 1)
    del token


def test_offload_blocks_while_the_queue_is_full(offload_dir, gate):
    """With max_pending=1, a second offload waits for the first write."""
    sid = register_store("disk", offload_dir, max_pending=1)
    tokens = [ops.offload(torch.randn(4), sid, "a")]
    second = threading.Thread(target=lambda: tokens.append(ops.offload(torch.randn(4), sid, "b")))
    second.start()
    second.join(0.3)
    assert second.is_alive() and len(tokens) == 1
    gate.set()
    second.join(10)
    assert len(tokens) == 2
    get_store(sid).close()


def test_files_are_private_raw_bytes_deleted_when_read(store_id, leftovers):
    store = get_store(store_id)
    value = torch.randn(4, 4).to(torch.bfloat16)
    token = ops.offload(value, store_id, "v")
    (name,) = leftovers(store)
    path = os.path.join(store.directory, name)
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Path(path).read_bytes() == value.view(torch.uint8).numpy().tobytes()
    ops.reload_start(token)
    assert leftovers(store) == []
    assert store.stats().files == 0


def _offloading_square(store_id: str, fail_in_backward: bool = False):
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(ops.offload(x, store_id, "x"))
            return x * x

        @staticmethod
        def backward(ctx, grad):
            (token,) = ctx.saved_tensors
            started = ops.reload_start(token)
            if fail_in_backward:
                raise RuntimeError("backward failed")
            return 2 * grad * ops.reload_wait(started, list(grad.shape), grad.dtype, grad.device)

    return Square


def test_exception_in_backward_leaves_no_files(store_id, leftovers):
    square = _offloading_square(store_id, fail_in_backward=True)
    x = torch.randn(8, requires_grad=True)
    out = square.apply(x)
    assert len(leftovers(get_store(store_id))) == 1
    with pytest.raises(RuntimeError, match="backward failed"):
        out.sum().backward()
    del out
    assert leftovers(get_store(store_id)) == []
    assert get_store(store_id).stats().handles == 0


def test_interrupt_in_forward_leaves_no_files(store_id, leftovers):
    """A KeyboardInterrupt after some offloads: once the step's objects are gone, so
    are their files."""
    square = _offloading_square(store_id)

    def step(x):
        y = square.apply(square.apply(x))
        raise KeyboardInterrupt
        return y  # noqa: unreachable

    try:
        step(torch.randn(8, requires_grad=True))
    except KeyboardInterrupt:
        pass
    assert leftovers(get_store(store_id)) == []


def test_forward_only_compiled_step_deletes_its_file(store_id, leftovers):
    """A compiled forward whose output is dropped without backward: the saved token
    dies with the autograd graph, and its finalizer deletes the file."""
    square = _offloading_square(store_id)
    backend, codes = recording_backend()
    compiled = torch.compile(lambda x: square.apply(x).sin(), backend=backend, fullgraph=True)
    out = compiled(torch.randn(8, requires_grad=True))
    assert "torch.ops.memopt.offload.default(" in codes["forward"][0]
    assert len(leftovers(get_store(store_id))) == 1
    del out
    assert leftovers(get_store(store_id)) == []


_CHILD = """
import os, signal, sys, torch
import memopt.codegen.offload
from memopt.runtime import get_store, register_store
sid = register_store("disk", sys.argv[1])
token = torch.ops.memopt.offload(torch.randn(1000), sid, "x")
store = get_store(sid)
store.flush()
print(store.directory, flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_exit_and_kill_leave_nothing(tmp_path):
    """A process that exits with a value still offloaded removes its directory; one
    that is killed leaves it, and the next store made under the same offload_dir (in
    another process) removes it. Both children run at once."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    children = {}
    for how in ("exit", "kill"):
        root = tmp_path / how
        root.mkdir(mode=0o700)
        children[how] = (root, subprocess.Popen([sys.executable, "-c", _CHILD, str(root), how],
                                                env=env, stdout=subprocess.PIPE, text=True))
    dirs = {}
    for how, (root, child) in children.items():
        out, _ = child.communicate(timeout=120)
        dirs[how] = Path(out.strip())
        assert dirs[how].parent == root
    assert children["exit"][1].returncode == 0 and not dirs["exit"].exists()
    assert children["kill"][1].returncode == -9
    assert [p.name for p in dirs["kill"].iterdir() if p.name != ".lock"] != []
    sid = register_store("disk", children["kill"][0])
    assert not dirs["kill"].exists()
    get_store(sid).close()


def test_sweep_keeps_directories_of_live_stores(offload_dir):
    first = DiskStore("test-a", str(offload_dir))
    second = DiskStore("test-b", str(offload_dir))
    assert sweep_stale(str(offload_dir)) == []
    assert os.path.isdir(first.directory) and os.path.isdir(second.directory)
    first.close()
    second.close()
    assert os.listdir(offload_dir) == []


def test_preflight_names_free_space_needed_and_fix(store_id, monkeypatch):
    store = get_store(store_id)
    store.preflight(1024)
    usage = shutil.disk_usage(store.directory)._replace(free=12 * 2**20)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    with pytest.raises(MemoptOffloadError) as info:
        store.preflight(96 * 2**20)
    message = str(info.value)
    assert "has 12.00 MiB free" in message and "up to 96.00 MiB per step" in message
    assert "set offload_dir" in message and str(store.root) in message


def test_full_disk_is_a_clear_error_in_the_main_thread(store_id, monkeypatch, leftovers):
    """ENOSPC in the I/O thread, after part of the file is written (by a writer that
    leaves it): the store deletes the partial file, and the next operation raises
    MemoptOffloadError naming the value, the cause and the fix."""
    store = get_store(store_id)

    def full_disk(path, tensor, **kwargs):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"partial")
        os.close(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(disk_store, "write_file", full_disk)
    token = ops.offload(torch.randn(64), store_id, "activation")
    store.flush()
    with pytest.raises(MemoptOffloadError, match="disk is full") as info:
        ops.offload(torch.randn(64), store_id, "next")
    assert "activation" in str(info.value) and "offload_dir" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(MemoptOffloadError, match="disk is full"):
        ops.reload_wait(token, [64], torch.float32, CPU)
    del token
    assert leftovers(store) == []
    assert store.stats().handles == 0


def test_write_file_removes_its_partial_file(tmp_path, monkeypatch):
    """write_file itself deletes what it wrote when a write fails (ENOSPC midway)."""
    path = str(tmp_path / "f.bin")
    real_open = open

    class FullFile:
        def __init__(self, *args, **kwargs):
            self._file = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._file.close()

        def write(self, view):
            self._file.write(view[:3])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk_store, "open", FullFile, raising=False)
    with pytest.raises(OSError):
        disk_store.write_file(path, torch.randn(16))
    assert not os.path.exists(path)


def test_world_writable_offload_dir_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(MemoptOffloadError, match="writable by group or others .*chmod go-w"):
        register_store("disk", shared)


def test_offload_dir_of_another_user_is_refused(offload_dir, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(offload_dir).st_uid + 1)
    with pytest.raises(MemoptOffloadError, match="not by you .*directory you own"):
        register_store("disk", offload_dir)


def test_unusable_offload_dir_is_a_clear_error(tmp_path, monkeypatch):
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(MemoptOffloadError, match="cannot be created"):
        register_store("disk", afile / "offload")
    with pytest.raises(MemoptOffloadError, match="exists and is not a directory"):
        register_store("disk", afile)  # was "cannot be created: File exists"

    def unwritable(path, tensor, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(disk_store, "write_file", unwritable)
    with pytest.raises(MemoptOffloadError, match="not writable"):
        register_store("disk", tmp_path / "readonly")
    assert os.listdir(tmp_path / "readonly") == []


def test_missing_offload_dir_is_created_private(tmp_path):
    sid = register_store("disk", tmp_path / "new")
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o700
    get_store(sid).close()


def test_same_config_gives_the_same_store(offload_dir):
    sid = register_store("disk", offload_dir)
    assert register_store("disk", str(offload_dir)) == sid
    assert register_store("disk", offload_dir, max_pending=2) != sid
    store = get_store(sid)
    store.close()
    assert get_store(sid) is not store  # rebuilt from its id
    get_store(sid).close()
    get_store(register_store("disk", offload_dir, max_pending=2)).close()


def test_default_store_lives_in_the_temporary_directory():
    store = get_store(register_store("disk"))
    assert store.root == tempfile.gettempdir()
    assert os.path.dirname(store.directory) == store.root
    assert os.path.basename(store.directory).startswith(f"memopt-offload-{os.getpid()}-")
    store.close()
    assert not os.path.exists(store.directory)


def test_unknown_target_names_the_valid_ones():
    with pytest.raises(ValueError, match="disk, host"):
        register_store("tape")


def test_stats_follow_the_traffic(store_id):
    store = get_store(store_id)
    tokens = [ops.offload(torch.randn(256), store_id, f"v{i}") for i in range(3)]
    store.flush()
    stats = store.stats()
    assert (stats.offloads, stats.bytes_written, stats.resident_bytes, stats.files, stats.handles) == (
        3, 3072, 3072, 3, 3)
    for token in tokens:
        ops.reload_wait(ops.reload_start(token), [256], torch.float32, CPU)
    stats = store.stats()
    assert (stats.reloads, stats.bytes_read, stats.resident_bytes, stats.files, stats.handles) == (
        3, 3072, 0, 0, 0)
    assert stats.peak_resident_bytes == 3072 and stats.location == store.directory


def test_bandwidth_is_measured_once_or_given(offload_dir, monkeypatch):
    write, read = measure_bandwidth("disk", "cpu", nbytes=2**20, offload_dir=offload_dir)
    assert write > 0 and read > 0
    monkeypatch.setattr(DiskStore, "measure", lambda *a: pytest.fail("measured twice"))
    assert bandwidth("disk", "cpu", offload_dir=offload_dir) == (write, read)
    assert bandwidth("disk", "cpu", given=1e9) == (1e9, 1e9)
    assert bandwidth("disk", "cpu", given=(2e9, 3e9)) == (2e9, 3e9)
    with pytest.raises(ValueError, match="positive"):
        bandwidth("disk", "cpu", given=0)
    get_store(register_store("disk", offload_dir)).close()


def test_home_relative_offload_dir_is_measured_where_the_store_writes(tmp_path, monkeypatch):
    """``offload_dir="~/off"``: the planner's measurements ran in a literal ``./~/off``
    of the current directory (a stray ``~`` left there) while the store wrote to
    ``$HOME/off``."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    measure_bandwidth("disk", "cpu", nbytes=4096, offload_dir="~/off")
    measure_copy_rate("disk", "cpu", nbytes=4096, offload_dir="~/off")
    sid = register_store("disk", "~/off")
    assert get_store(sid).root == str(home / "off")
    assert os.listdir(cwd) == []
    assert [os.path.dirname(s.location) for s in _stores()
            if s.location.startswith(str(tmp_path))] == [str(home / "off")]
    get_store(sid).close()


def _disk_with_free_space(monkeypatch, directory, free: int) -> None:
    """Make the disk under ``directory`` look ``free`` bytes large: a larger write fails
    with ENOSPC, as on a small scratch disk."""
    usage = shutil.disk_usage(directory)._replace(free=free)
    monkeypatch.setattr(disk_store.shutil, "disk_usage", lambda path: usage)
    write = disk_store.write_file

    def small_disk(path, tensor, **kwargs):
        if tensor.numel() * tensor.element_size() > free:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        write(path, tensor, **kwargs)

    monkeypatch.setattr(disk_store, "write_file", small_disk)


def test_measurements_fit_a_disk_smaller_than_the_probe(offload_dir, monkeypatch):
    """On a disk with 8 MiB free the default 32 MiB probe failed with ENOSPC: planning
    failed ("a memopt bug") and the region ran unoptimized, though its plan fitted."""
    store = get_store(register_store("disk", offload_dir))
    _disk_with_free_space(monkeypatch, offload_dir, 8 * 2**20)
    write, read = store.measure(32 * 2**20, CPU)
    assert write > 0 and read > 0
    assert store.measure_copies(32 * 2**20) > 0
    assert os.listdir(store.directory) == [".lock"]
    store.close()


def test_a_measurement_that_cannot_write_names_the_fix(offload_dir, monkeypatch):
    store = get_store(register_store("disk", offload_dir))
    _disk_with_free_space(monkeypatch, offload_dir, 0)
    for measure in (lambda: store.measure(2**20, CPU), lambda: store.measure_copies(2**20)):
        with pytest.raises(MemoptOffloadError, match=r"measuring the disk under offload_dir .* No space left on "
                           r"device; free space there, .* or give offload_bandwidth"):
            measure()
    store.close()


def test_synchronous_io_copies_on_the_calling_thread(store_id, leftovers):
    """Inside `synchronous_io` no I/O thread runs: the write is done when ``offload``
    returns (the source released, the file there), the read when ``reload_start``
    returns, every allocation and free on this thread; the value comes back bit for bit,
    and after the block the store uses its thread again."""
    from memopt.runtime import synchronous_io
    from memopt.testing.measure import measure_peak

    store = get_store(store_id)
    ops.offload(torch.randn(4), store_id, "warm").sum()  # the store's thread is running
    assert store._worker.alive()
    threads_seen = []
    write = disk_store.write_file

    def recording_write(path, tensor, **kwargs):
        threads_seen.append(threading.current_thread())
        write(path, tensor, **kwargs)

    value = torch.randn(64, 1024)  # 256 KiB
    expected = value.clone()
    storage = weakref.ref(value.untyped_storage())
    with synchronous_io(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(disk_store, "write_file", recording_write)
        assert not store._worker.alive()
        token = ops.offload(value, store_id, "v")
        del value
        assert storage() is None and store.stats().pending_bytes == 0 and len(leftovers(store)) == 1
        started = []
        measured = measure_peak(lambda: started.append(ops.reload_start(token)))
        assert measured.end_growth_bytes >= 256 << 10  # the read buffer, made on this thread
        assert leftovers(store) == []
        back = ops.reload_wait(started[0], [64, 1024], torch.float32, CPU)
        assert not store._worker.alive()
    assert threads_seen == [threading.current_thread()]
    assert torch.equal(back, expected)
    ops.offload(torch.randn(4), store_id, "after").sum()
    assert store._worker.alive()


def test_a_sticky_shared_directory_is_accepted_like_the_default(tmp_path):
    """A sticky directory writable by all and owned by you or root (/tmp, /dev/shm, a
    cluster's scratch) holds the store as the default temporary directory does: no
    other user can rename the store's 0700 directory there. It was refused with the
    advice to run ``chmod go-w /tmp``. Without the sticky bit it is still refused."""
    shared = tmp_path / "scratch"
    shared.mkdir()
    shared.chmod(0o1777)
    store = get_store(register_store("disk", shared))
    try:
        assert os.path.dirname(store.directory) == str(shared)
        assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700
    finally:
        store.close()
    assert os.listdir(shared) == []
    shared.chmod(0o777)
    with pytest.raises(MemoptOffloadError, match="without the sticky bit"):
        register_store("disk", shared)


def test_a_compile_after_offload_dir_was_removed_makes_a_new_store(tmp_path):
    """``rm -rf`` of ``offload_dir`` between two compiles in one process: the registry
    gave the next compile the old store, whose directory was gone, and it failed with
    "offload_dir ... is not writable: No such file or directory" though memopt creates
    a missing ``offload_dir``. Registering again now replaces the lost store."""
    root = tmp_path / "off"
    old = get_store(register_store("disk", root))
    shutil.rmtree(root)
    store = get_store(register_store("disk", root))
    try:
        assert store is not old and os.path.isdir(store.directory)
        store.preflight(1)
        token = store.offload(torch.arange(4.0))
        assert torch.equal(store.reload_wait(int(token), [4], torch.float32, torch.device("cpu")), torch.arange(4.0))
    finally:
        store.close()
