"""Where an archive goes: a new file, a FIFO, an open fd, or an ``exec:`` command.

The writer hands a target whole extents (and the header), one call at a time
and in order, from page-aligned buffers whose lengths are multiples of 512.  A
target's job is to move those bytes without blocking the event loop:

* regular files are written by a worker thread (``anyio.to_thread``), one
  extent (up to 3.7 MiB) per call, so the loop only pays a thread hand-off;
* pipes, FIFOs and sockets are made non-blocking and written with ``os.write``,
  awaiting ``anyio.wait_writable(fd)`` when the reader is behind: this is where
  the writer's backpressure starts.

Every target has the same three-step life: ``open()``, ``write()`` any number
of times, then exactly one of ``close()`` (finish; an ``exec:`` command's exit
status is checked here) or ``abort()`` (never raises: removes a file the
target created, terminates and reaps a child, closes every fd it opened).
"""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import mmap
import os
import signal
import stat
import subprocess
from collections.abc import Callable

import anyio
import anyio.lowlevel

from ._errors import CommandFailedError, TargetError, TargetExistsError
from ._fdio import create_exclusive, remove_created, write_all, write_all_nonblocking

EXEC_PREFIX = "exec:"
_FIFO_RETRY_MAX_DELAY = 0.05
ALIGNMENT = 4096
"""``O_DIRECT`` writes are kept to whole, page-aligned blocks of this size
(see :meth:`Target.write_aligned` and :class:`NewFileTarget`)."""
_PIPE_CAPACITY = 1 << 20
"""Asked of the kernel (F_SETPIPE_SZ) for pipes we create: fewer wake-ups per extent."""


def _write_error(exc: OSError) -> TargetError:
    return TargetError(f"vma_queue_write: write error - {exc.strerror or exc}")


def _close_error(exc: OSError) -> TargetError:
    return TargetError(f"vma_writer_close: close failed - {exc.strerror}")


class Target(abc.ABC):
    """An archive's destination; the writer drives it, one call at a time."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Acquire the destination (create the file, start the command, ...)."""

    @abc.abstractmethod
    async def write(self, data: memoryview) -> None:
        """Write all of ``data`` (a 512-multiple from a page-aligned buffer)."""

    async def write_aligned(self, buffer: mmap.mmap, start: int, end: int) -> None:
        """Write ``buffer[start:end]``, which starts at ``start`` modulo
        :data:`ALIGNMENT` in the output; the bytes of ``buffer`` from the
        previous multiple of :data:`ALIGNMENT` up to ``start`` are scratch.

        The writer lays out its page-aligned buffers this way so that an
        ``O_DIRECT`` file can prepend its carried tail in place and write whole
        aligned blocks, without copying an extent.  Others just write.
        """
        await self.write(memoryview(buffer)[start:end])

    def blocking_writer(self) -> Callable[[mmap.mmap, int, int], None] | None:
        """A blocking twin of :meth:`write_aligned` for a target whose writes
        are blocking system calls (a regular file), or None.  The writer then
        calls it from a thread of its own, extent after extent, instead of
        one ``to_thread`` hop per extent (see ``_output_thread``); only after
        :meth:`open`, and never at the same time as the async methods."""
        return None

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish successfully: release the destination, report what failed."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Undo: remove what was created, end any child, close fds.  Never raises."""


# --- writing an fd ---------------------------------------------------------------


def _is_pollable(mode: int) -> bool:
    """epoll can wait on pipes, FIFOs and sockets, not on regular files."""
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


class _FdTarget(Target):
    """Shared by every target that ends in one fd: chooses thread or poll writes."""

    def __init__(self) -> None:
        self._fd = -1
        self._pollable = False

    async def write(self, data: memoryview) -> None:
        try:
            if self._pollable:
                await write_all_nonblocking(self._fd, data)
            else:
                await anyio.to_thread.run_sync(self._write_file, data)
        except OSError as exc:
            raise _write_error(exc) from exc

    def _write_file(self, data: memoryview) -> None:
        write_all(self._fd, data)

    def blocking_writer(self) -> Callable[[mmap.mmap, int, int], None] | None:
        return None if self._pollable else self._write_blocking

    def _write_blocking(self, buffer: mmap.mmap, start: int, end: int) -> None:
        try:
            self._write_file(memoryview(buffer)[start:end])
        except OSError as exc:
            raise _write_error(exc) from exc

    def _close_fd(self) -> None:
        """Close our fd; waiters (none, if the writer is right) are told first."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        if self._pollable:
            anyio.notify_closing(fd)
        os.close(fd)

    def _release(self) -> None:
        """Give the fd up; a target that does not own its fd overrides this."""
        self._close_fd()

    async def close(self) -> None:
        try:
            self._release()
        except OSError as exc:
            raise _close_error(exc) from exc

    async def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._release()


class NewFileTarget(_FdTarget):
    """A file created by the writer: never an existing one (``O_EXCL``).

    ``O_DIRECT`` is used where the file system takes it, so a multi-GiB backup
    does not flush everyone else's page cache.  It is switched on with
    ``fcntl`` after the file is created (a file system that refuses it answers
    ``EINVAL`` there, and no half-created file needs cleaning up), and switched
    off again if a write answers ``EINVAL``: the same bytes then go through
    the page cache.

    Extents are 512-byte multiples, so after the header every write would
    start and end inside a file-system block, which ext4 and others serve
    with a slow, serialised sub-block path (a third of the speed, measured).
    Under ``O_DIRECT`` we therefore write whole 4 KiB blocks only and carry
    the tail (< 4 KiB) over to the next write; :meth:`close` writes the last
    tail.  Through :meth:`write_aligned` the tail is prepended in the writer's
    buffer, so the big write comes from a page-aligned address (a writev with
    a small first segment, or a source that is not page-aligned, halves the
    throughput, measured); through :meth:`write` it goes as a two-segment
    writev.
    """

    def __init__(self, path: str | os.PathLike[str], *, direct: bool = True) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.direct = direct
        self._created = False
        self._carry = mmap.mmap(-1, ALIGNMENT)
        self._carry_len = 0

    async def open(self) -> None:
        await anyio.to_thread.run_sync(self._open_blocking)

    def _open_blocking(self) -> None:
        try:
            self._fd = create_exclusive(None, self.path)
        except FileExistsError as exc:
            raise TargetExistsError(f"can't open file {self.path} - File exists") from exc
        except OSError as exc:
            raise TargetError(f"can't open file {self.path} - {exc.strerror}") from exc
        self._created = True
        if self.direct:
            try:
                flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
                fcntl.fcntl(self._fd, fcntl.F_SETFL, flags | os.O_DIRECT)
            except OSError:
                self.direct = False

    def _write_file(self, data: memoryview) -> None:
        if self.direct:
            carried = self._carry_len
            total = carried + len(data)
            whole = total - total % ALIGNMENT
            if whole:
                take = whole - carried
                self._write_all([memoryview(self._carry)[:carried], data[:take]])
                self._carry_len = 0
                data = data[take:]
            if self.direct:
                self._carry[self._carry_len : self._carry_len + len(data)] = data
                self._carry_len += len(data)
                return
        self._write_all([data])

    async def write_aligned(self, buffer: mmap.mmap, start: int, end: int) -> None:
        await anyio.to_thread.run_sync(self._write_blocking, buffer, start, end)

    def _write_blocking(self, buffer: mmap.mmap, start: int, end: int) -> None:
        head = start - self._carry_len
        if not self.direct or head < 0 or head % ALIGNMENT:
            super()._write_blocking(buffer, start, end)
            return
        try:
            self._write_direct(buffer, head, end)
        except OSError as exc:
            raise _write_error(exc) from exc

    def _write_direct(self, buffer: mmap.mmap, head: int, end: int) -> None:
        """Prepend the carried tail in the writer's scratch room, write the
        whole blocks straight from its page-aligned buffer, carry the rest."""
        start = head + self._carry_len
        buffer[head:start] = self._carry[: self._carry_len]
        whole = head + (end - head) // ALIGNMENT * ALIGNMENT
        self._carry_len = 0
        self._write_all([memoryview(buffer)[head:whole]])
        if self.direct:
            self._carry[: end - whole] = buffer[whole:end]
            self._carry_len = end - whole
        else:
            self._write_all([memoryview(buffer)[whole:end]])

    def _write_all(self, buffers: list[memoryview]) -> None:
        """``writev`` everything; on ``EINVAL`` under ``O_DIRECT`` (nothing is
        written then) switch to the page cache and go on."""
        pending = [b for b in buffers if len(b)]
        while pending:
            try:
                written = os.writev(self._fd, pending)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
                fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
                self.direct = False
                continue
            while pending and written >= len(pending[0]):
                written -= len(pending.pop(0))
            if written:
                pending[0] = pending[0][written:]

    def _flush_carry(self) -> None:
        if self._carry_len:
            self._write_all([memoryview(self._carry)[: self._carry_len]])
            self._carry_len = 0

    async def close(self) -> None:
        try:
            await anyio.to_thread.run_sync(self._flush_carry)
        except OSError as exc:
            raise _close_error(exc) from exc
        await super().close()

    async def abort(self) -> None:
        await super().abort()
        if self._created:
            self._created = False
            with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
                await anyio.to_thread.run_sync(remove_created, None, self.path)


class FifoTarget(_FdTarget):
    """An existing FIFO, opened non-blocking for writing.

    Opening a FIFO non-blocking for writing fails with ``ENXIO`` until a
    reader has it open; instead of failing (as the reference does) or blocking
    a thread in ``open()``, we retry with a short back-off that any
    cancellation ends.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self._pollable = True

    async def open(self) -> None:
        delay = 0.001
        while True:
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise TargetError(f"can't open file {self.path} - {exc.strerror}") from exc
                await anyio.sleep(delay)
                delay = min(delay * 2, _FIFO_RETRY_MAX_DELAY)
                continue
            return


class FdTarget(_FdTarget):
    """An fd the caller opened.

    Like Python's ``open(fd)``: the target closes ``fd`` when it closes or
    aborts if ``closefd`` is true (the default); with ``closefd=False`` the
    fd stays open for the caller.  A pipe or socket is switched to
    ``O_NONBLOCK`` for the writer's lifetime (the flag belongs to the open
    file description, which the caller may share), and its original flags
    are put back before the fd is closed or handed back.
    """

    def __init__(self, fd: int, *, closefd: bool = True) -> None:
        super().__init__()
        self.fd = fd
        self.closefd = closefd
        self._saved_flags: int | None = None

    async def open(self) -> None:
        try:
            mode = os.fstat(self.fd).st_mode  # an fstat never waits for a disk
            if _is_pollable(mode):
                self._saved_flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
                fcntl.fcntl(self.fd, fcntl.F_SETFL, self._saved_flags | os.O_NONBLOCK)
                self._pollable = True
        except OSError as exc:
            raise TargetError(f"can't use fd {self.fd} - {exc.strerror}") from exc
        self._fd = self.fd

    def _release(self) -> None:
        if self._fd < 0:
            return
        if self._saved_flags is not None:
            flags, self._saved_flags = self._saved_flags, None
            with contextlib.suppress(OSError):
                fcntl.fcntl(self._fd, fcntl.F_SETFL, flags)
        if self.closefd:
            self._close_fd()
        else:
            self._fd = -1


class CommandTarget(_FdTarget):
    """``exec:COMMAND``: the command runs through ``/bin/sh -c`` with the
    archive on its stdin (a pipe we write non-blocking).

    The child inherits no fd of ours but its stdin, stdout and stderr.  It
    leads a process group of its own, so that an abort reaches a whole
    pipeline (``exec:zstd | ssh host ...``), not just the shell.  Its exit is
    awaited through a pidfd, so waiting for it is an ordinary, cancellable
    readiness wait under every backend.  On abort the group gets SIGTERM,
    then SIGKILL after ``kill_after`` seconds, and the child is always reaped.
    """

    def __init__(self, command: str, *, kill_after: float = 5.0) -> None:
        super().__init__()
        self.command = command
        self.kill_after = kill_after
        self._pollable = True
        self._process: subprocess.Popen[bytes] | None = None
        self._pidfd = -1

    async def open(self) -> None:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            self._process = subprocess.Popen(  # noqa: ASYNC220 - fork+exec, no waiting
                ["/bin/sh", "-c", self.command],
                stdin=read_end,
                close_fds=True,
                start_new_session=True,
            )
        except OSError as exc:
            os.close(write_end)
            raise TargetError(f"can't popen command '{self.command}' - {exc.strerror}") from exc
        finally:
            os.close(read_end)
        self._fd = write_end
        os.set_blocking(write_end, False)
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, _PIPE_CAPACITY)
        try:
            self._pidfd = os.pidfd_open(self._process.pid)
        except OSError as exc:
            await self.abort()
            raise TargetError(f"can't watch command '{self.command}' - {exc.strerror}") from exc

    async def write(self, data: memoryview) -> None:
        try:
            await write_all_nonblocking(self._fd, data)
        except BrokenPipeError as exc:
            # The command stopped reading; its exit status says more than EPIPE.
            with anyio.move_on_after(self.kill_after):
                await self._wait_exit()
            self._raise_if_failed_status()
            raise TargetError(
                f"vma_queue_write: write error - command '{self.command}' closed its input"
            ) from exc
        except OSError as exc:
            raise _write_error(exc) from exc

    async def _wait_exit(self) -> int:
        """Wait for the child to exit and reap it; return its returncode."""
        process = self._process
        assert process is not None
        if process.returncode is None:
            await anyio.wait_readable(self._pidfd)
            process.wait()
        return process.returncode

    def _raise_if_failed_status(self) -> None:
        process = self._process
        if process is None or process.returncode is None or process.returncode == 0:
            return
        status = process.returncode
        if status < 0:
            how = f"was killed by signal {-status} ({signal.Signals(-status).name})"
        else:
            how = f"exited with status {status}"
        raise CommandFailedError(f"command '{self.command}' {how}")

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit status once reaped (negative: killed by that signal)."""
        return self._process.returncode if self._process is not None else None

    def _signal_group(self, signum: signal.Signals) -> None:
        assert self._process is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, signum)

    def _close_pidfd(self) -> None:
        if self._pidfd >= 0:
            pidfd, self._pidfd = self._pidfd, -1
            anyio.notify_closing(pidfd)
            os.close(pidfd)

    async def close(self) -> None:
        """Close its stdin, wait for it to exit, and check the status."""
        self._close_fd()
        await self._wait_exit()
        self._close_pidfd()
        self._raise_if_failed_status()

    async def abort(self) -> None:
        process = self._process
        if process is not None and process.returncode is None:
            # Signal before closing its input: on EOF it might exit 0, as if
            # the archive were complete.
            self._signal_group(signal.SIGTERM)
        with contextlib.suppress(OSError):
            self._close_fd()
        if process is not None and process.returncode is None:
            with anyio.move_on_after(self.kill_after):
                await self._wait_exit()
            if process.returncode is None:
                self._signal_group(signal.SIGKILL)
                await self._wait_exit()
        if process is not None:
            # The shell may be gone while the rest of its pipeline lingers.
            self._signal_group(signal.SIGKILL)
        with contextlib.suppress(OSError):
            self._close_pidfd()


TargetLike = str | os.PathLike[str] | int | Target


async def resolve_target(target: TargetLike) -> Target:
    """Pick the target for what the caller gave: a :class:`Target` as is, an
    int fd (closed with the target, see :class:`FdTarget`), ``exec:COMMAND``,
    ``s3://BUCKET/KEY`` (:class:`S3Target`), an existing FIFO, or else a path
    to create.

    Async because telling a FIFO from a path to create takes an ``os.stat``,
    which can wait on a slow or hung file system: it runs in a worker thread.
    """
    if isinstance(target, Target):
        return target
    if isinstance(target, int):
        return FdTarget(target)
    path = os.fspath(target)
    if path.startswith(EXEC_PREFIX):
        return CommandTarget(path[len(EXEC_PREFIX) :])
    if path.startswith("s3://"):
        from ._s3 import S3Target  # needs the optional obstore package

        return S3Target(path)
    is_fifo = await anyio.to_thread.run_sync(_is_fifo, path)
    return FifoTarget(path) if is_fifo else NewFileTarget(path)


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False
