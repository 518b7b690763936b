"""Targets on their own: new file (O_EXCL, O_DIRECT and its fallback), FIFO,
caller's fd, and ``exec:`` commands (exit status, signals, process groups)."""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from tests.harness import FdLeakCheck
from vma_async import (
    CommandFailedError,
    CommandTarget,
    FdTarget,
    FifoTarget,
    NewFileTarget,
    TargetError,
    TargetExistsError,
)
from vma_async._targets import Target, resolve_target

pytestmark = pytest.mark.anyio


def aligned(data: bytes) -> memoryview:
    """``data`` in a page-aligned buffer, as the writer hands it over."""
    buffer = mmap.mmap(-1, max(len(data), 1))
    buffer[: len(data)] = data
    return memoryview(buffer)[: len(data)]


def fds_open_on(path: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                found.append(fd)
        except OSError:
            continue
    return found


async def wait_for_group(pgid: int, members: int, *, at_least: bool = True) -> None:
    """Wait (bounded) until the command's process group has at least (or, when
    ending, at most) ``members`` live processes.  The state of processes that
    are not our children has no event to await, and a SIGKILLed grandchild
    dies a moment after ``kill`` returns."""

    def reached() -> bool:
        count = len(process_group_members(pgid))
        return count >= members if at_least else count <= members

    with anyio.fail_after(10):
        while not reached():  # noqa: ASYNC110
            await anyio.sleep(0.01)


def process_group_members(pgid: int) -> list[int]:
    """Live processes of a group (zombies are dead: init reaps orphans)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry))
    return members


# --- new file ------------------------------------------------------------------------


async def test_new_file_uses_o_direct_and_mode_0644(tmp_path: Path) -> None:
    path = tmp_path / "a.vma"
    target = NewFileTarget(path)
    await target.open()
    assert target.direct  # ext4 takes O_DIRECT
    data = os.urandom(3 * 512 + 4096)
    await target.write(aligned(data))
    await target.close()
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


async def test_new_file_direct_writes_whole_blocks_and_carries_the_tail(tmp_path: Path) -> None:
    path = tmp_path / "blocks.vma"
    target = NewFileTarget(path)
    await target.open()
    pieces = [os.urandom(12800), os.urandom(512 + 4096 * 3), os.urandom(512), os.urandom(1536)]
    for piece in pieces:
        await target.write(aligned(piece))
        assert path.stat().st_size % 4096 == 0  # only whole blocks reach the disk
    assert target.direct
    await target.close()
    assert path.read_bytes() == b"".join(pieces)


async def test_new_file_direct_write_aligned_uses_the_scratch_room(tmp_path: Path) -> None:
    """The writer's layout: each piece at its archive offset modulo 4096."""
    path = tmp_path / "laid-out.vma"
    target = NewFileTarget(path)
    await target.open()
    pieces = [os.urandom(12800), os.urandom(512 + 4096 * 5), os.urandom(512), os.urandom(8192)]
    offset = 0
    for piece in pieces:
        buffer = mmap.mmap(-1, 4096 + len(piece))
        start = offset % 4096
        buffer[start : start + len(piece)] = piece
        await target.write_aligned(buffer, start, start + len(piece))
        assert path.stat().st_size % 4096 == 0
        offset += len(piece)
    misplaced = mmap.mmap(-1, 8192)  # not at its offset modulo 4096: still right
    misplaced[0:1024] = b"m" * 1024
    await target.write_aligned(misplaced, 0, 1024)
    assert target.direct
    await target.close()
    assert path.read_bytes() == b"".join(pieces) + b"m" * 1024


async def test_new_file_falls_back_when_o_direct_refuses_a_write(tmp_path: Path) -> None:
    path = tmp_path / "b.vma"
    target = NewFileTarget(path)
    await target.open()
    assert target.direct
    await target.write(aligned(b"x" * 100))  # carried: no whole block yet
    await target.write(aligned(b"y" * 512))
    assert target.direct
    await target.close()  # the 612-byte tail: EINVAL under O_DIRECT, so page cache
    assert not target.direct
    assert path.read_bytes() == b"x" * 100 + b"y" * 512


async def test_new_file_without_direct(tmp_path: Path) -> None:
    target = NewFileTarget(tmp_path / "c.vma", direct=False)
    await target.open()
    assert not target.direct
    await target.write(memoryview(b"abc"))
    await target.close()
    assert (tmp_path / "c.vma").read_bytes() == b"abc"


async def test_new_file_never_overwrites(tmp_path: Path, fd_leaks: FdLeakCheck) -> None:
    path = tmp_path / "exists"
    path.write_bytes(b"keep")
    fds = fd_leaks.snapshot()
    with pytest.raises(TargetExistsError, match=f"^can't open file {path} - File exists$"):
        await NewFileTarget(path).open()
    assert path.read_bytes() == b"keep"
    fd_leaks.assert_same(fds)


async def test_new_file_in_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such.vma"
    with pytest.raises(TargetError, match=f"^can't open file {path} - No such file or directory$"):
        await NewFileTarget(path).open()


async def test_new_file_abort_removes_it(tmp_path: Path, fd_leaks: FdLeakCheck) -> None:
    path = tmp_path / "d.vma"
    fds = fd_leaks.snapshot()
    target = NewFileTarget(path)
    await target.open()
    await target.write(aligned(bytes(512)))
    await target.abort()
    await target.abort()  # idempotent, never raises
    assert not path.exists()
    fd_leaks.assert_same(fds)


# --- FIFO ----------------------------------------------------------------------------


async def test_fifo_open_waits_for_a_reader(tmp_path: Path) -> None:
    fifo, out = tmp_path / "fifo", tmp_path / "out"
    os.mkfifo(fifo)
    target = FifoTarget(fifo)
    opened = anyio.Event()

    async def open_target() -> None:
        await target.open()
        opened.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(open_target)
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        assert not opened.is_set()  # no reader yet: ENXIO, retried
        with out.open("wb") as sink:
            cat = await anyio.open_process(["cat", str(fifo)], stdout=sink)
    async with cat:
        await target.write(memoryview(b"through the fifo"))
        await target.close()
        with anyio.fail_after(10):
            assert await cat.wait() == 0
    assert out.read_bytes() == b"through the fifo"
    assert fds_open_on(fifo) == []


async def test_fifo_open_is_cancellable(tmp_path: Path, fd_leaks: FdLeakCheck) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fds = fd_leaks.snapshot()
    with anyio.move_on_after(0.05) as scope:
        await FifoTarget(fifo).open()
    assert scope.cancelled_caught
    fd_leaks.assert_same(fds)


# --- the caller's fd -------------------------------------------------------------------


async def test_fd_target_pipe_is_non_blocking_only_while_in_use() -> None:
    read_end, write_end = os.pipe()
    try:
        target = FdTarget(write_end, closefd=False)
        await target.open()
        assert not os.get_blocking(write_end)
        await target.write(memoryview(b"hello"))
        await target.close()
        assert os.get_blocking(write_end)  # flags restored
        os.write(write_end, b"!")  # still open: closefd=False
        assert os.read(read_end, 100) == b"hello!"
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_fd_target_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        target = FdTarget(fd, closefd=False)
        await target.open()
        await target.write(memoryview(b"data"))
        await target.abort()
        assert fcntl.fcntl(fd, fcntl.F_GETFL) == flags
    finally:
        os.close(fd)
    assert path.read_bytes() == b"data"  # abort never removes what the caller made


@pytest.mark.parametrize("finish", ["close", "abort"])
async def test_fd_target_closes_its_fd_by_default(finish: str) -> None:
    """closefd=True (the default, as Python's open(fd)): the target owns the fd."""
    read_end, write_end = os.pipe()
    try:
        target = FdTarget(write_end)
        await target.open()
        await target.write(memoryview(b"hello"))
        await (target.close() if finish == "close" else target.abort())
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(write_end)
        assert os.read(read_end, 100) == b"hello"
        assert os.read(read_end, 100) == b""  # the write end is closed: EOF
    finally:
        os.close(read_end)


async def test_fd_target_bad_fd() -> None:
    with pytest.raises(TargetError, match="^can't use fd 987654 - Bad file descriptor$"):
        await FdTarget(987654).open()


# --- exec: -----------------------------------------------------------------------------


async def test_command_receives_the_bytes_and_only_its_own_fds(tmp_path: Path) -> None:
    leaky = os.open(tmp_path, os.O_RDONLY)
    os.set_inheritable(leaky, True)
    try:
        target = CommandTarget(f"ls /proc/self/fd > {tmp_path}/fds; cat > {tmp_path}/got")
        await target.open()
        await target.write(memoryview(b"archive bytes"))
        await target.close()
    finally:
        os.close(leaky)
    assert (tmp_path / "got").read_bytes() == b"archive bytes"
    # ls's own: stdin (our pipe), stdout, stderr, and the directory it lists.
    assert leaky > 3
    assert (tmp_path / "fds").read_text().split() == ["0", "1", "2", "3"]
    assert target.returncode == 0


async def test_command_killed_by_a_signal() -> None:
    target = CommandTarget("kill -9 $$")
    await target.open()
    with pytest.raises(
        CommandFailedError, match=r"^command 'kill -9 \$\$' was killed by signal 9 \(SIGKILL\)$"
    ):
        await target.close()


async def test_command_abort_ends_the_whole_pipeline(fd_leaks: FdLeakCheck) -> None:
    fds = fd_leaks.snapshot()
    target = CommandTarget("cat | sleep 30")
    await target.open()
    await target.write(memoryview(b"partial"))
    await wait_for_group(target.pid or 0, 3)  # sh, cat, sleep
    await target.abort()
    assert target.returncode == -15
    await wait_for_group(target.pid or 0, 0, at_least=False)
    fd_leaks.assert_same(fds)


async def test_command_ignoring_sigterm_is_killed_after_the_grace_period() -> None:
    target = CommandTarget("trap '' TERM; sleep 30", kill_after=0.2)
    await target.open()
    await wait_for_group(target.pid or 0, 2)  # sh, and sleep: the trap is set
    await target.abort()
    assert target.returncode == -9
    await wait_for_group(target.pid or 0, 0, at_least=False)


# --- picking a target ---------------------------------------------------------------------


async def test_resolve_target(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    mine = NewFileTarget(tmp_path / "x")
    cases: list[tuple[object, type[Target]]] = [
        ("exec:zstd -q", CommandTarget),
        (str(fifo), FifoTarget),
        (fifo, FifoTarget),
        (tmp_path / "new.vma", NewFileTarget),
        (7, FdTarget),
    ]
    for given, expected in cases:
        assert type(await resolve_target(given)) is expected  # type: ignore[arg-type]
    assert await resolve_target(mine) is mine
    command = await resolve_target("exec:zstd -q -o x.zst")
    assert isinstance(command, CommandTarget)
    assert command.command == "zstd -q -o x.zst"
