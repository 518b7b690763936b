"""An anyio NBD server: the sans-I/O :class:`ServerConnection` per client.

Goal: export block devices (an archive's disks, in ``vma serve``) to any NBD
client (qemu-img, nbdcopy, nbdinfo, the kernel's nbd-client, our own
:class:`NbdClient`) from asyncio, uvloop or trio, inside the caller's task
group, with several clients at once.

Plan: :func:`serve_nbd` listens (a Unix socket, TCP, or a listener the
caller made) and runs one task per connection.  A connection negotiates
options in order (LIST, INFO, GO, EXPORT_NAME, STRUCTURED_REPLY,
LIST/SET_META_CONTEXT with ``base:allocation``, ABORT), then reads requests
and starts one task per request, so replies go out as they complete (a send
lock keeps each reply whole on the stream).

Worst case: memory is bounded no matter what clients send.  At most
``max_connections`` clients are served at once (more are hung up on at
once), so idle connections cannot exhaust file descriptors.  The protocol
core caps every length before allocating; each connection has at most
``max_requests_in_flight`` requests running and stops reading while at the
limit (TCP backpressure does the rest); all connections together hold at
most ``memory_budget`` bytes of request and reply data (a request waits for
its share before it starts).  A client that breaks the protocol (bad magic,
a 4 GiB option, closing mid-request) has its connection closed and logged;
the others are served on.  An export that fails a read (a missing cluster,
an I/O error) answers that request with EIO and keeps serving.
Cancelling :func:`serve_nbd` closes the listener, every connection and the
Unix socket file it created; nothing outlives it.  Its ``stop`` event stops
gracefully instead: no new clients, requests in flight answered, then the
same (bounded by ``grace`` seconds).
"""

from __future__ import annotations

import abc
import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from . import _nbd_proto as proto
from ._errors import NbdError, NbdProtocolError, VmaError
from ._nbd_client import StreamReceiver

__all__ = ["NbdExport", "serve_nbd"]

log = logging.getLogger("vma_async.nbd")

_MAX_EXTENTS = 1 << 16  # per BLOCK_STATUS reply; the client asks again for the rest
_PREFERRED_BLOCK = 4096


class NbdExport(abc.ABC):
    """One device a server exports.  Subclasses give ``name``, ``size`` and
    :meth:`read`; the defaults make the export read-only and report every byte
    as data.  A writable export sets ``read_only = False`` and overrides the
    write methods."""

    name: str
    size: int
    description: str = ""
    read_only: bool = True
    can_multi_conn: bool = True
    """Every connection sees the same data at once (true for read-only data)."""

    @abc.abstractmethod
    async def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` (the server checked the range)."""

    def block_status(self, offset: int, length: int) -> Sequence[tuple[int, int]]:
        """``base:allocation`` runs ``(length, STATE_HOLE | STATE_ZERO bits)``
        from ``offset``; they may cover less than ``length``, never nothing."""
        return [(length, 0)]

    async def write(self, offset: int, data: bytes) -> None:
        raise NbdError("export is read-only")

    async def write_zeroes(self, offset: int, length: int) -> None:
        raise NbdError("export is read-only")

    async def trim(self, offset: int, length: int) -> None:  # noqa: B027
        """A hint: the default ignores it."""

    async def flush(self) -> None:  # noqa: B027
        """Make completed writes durable: nothing to do for read-only data."""

    def transmission_flags(self) -> int:
        flags = proto.TransmissionFlags.HAS_FLAGS | proto.TransmissionFlags.SEND_FLUSH
        if self.can_multi_conn:
            flags |= proto.TransmissionFlags.CAN_MULTI_CONN
        if self.read_only:
            flags |= proto.TransmissionFlags.READ_ONLY
        else:
            flags |= (
                proto.TransmissionFlags.SEND_WRITE_ZEROES
                | proto.TransmissionFlags.SEND_TRIM
                | proto.TransmissionFlags.SEND_FUA
            )
        return int(flags)


@dataclass(eq=False, slots=True)
class _Shared:
    """What every connection of one server shares."""

    exports: dict[str, NbdExport]
    max_requests_in_flight: int
    budget: _ByteBudget
    max_connections: int
    sessions: set[_Session] = field(default_factory=set)
    stopping: bool = False
    idle: anyio.Event = field(default_factory=anyio.Event)  # stopping, and no session left


class _ByteBudget:
    """A weighted semaphore: how many bytes of request and reply data all
    connections may hold at once."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._free = total
        self._changed = anyio.Condition()

    async def acquire(self, amount: int) -> int:
        amount = min(amount, self.total)
        async with self._changed:
            while self._free < amount:
                await self._changed.wait()
            self._free -= amount
        return amount

    async def release(self, amount: int) -> None:
        with anyio.CancelScope(shield=True):
            async with self._changed:
                self._free += amount
                self._changed.notify_all()


async def serve_nbd(
    exports: Iterable[NbdExport],
    *,
    unix_socket: str | os.PathLike[str] | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None,
    socket_mode: int = 0o600,
    max_requests_in_flight: int = 16,
    memory_budget: int = 256 * 1024 * 1024,
    max_connections: int = 128,
    stop: anyio.Event | None = None,
    grace: float = 10.0,
    task_status: anyio.abc.TaskStatus[str | tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``exports`` until cancelled.

    Listen on exactly one of: ``unix_socket`` (created with ``socket_mode``,
    removed on exit; an existing path is an error, never replaced), ``port``
    on ``host`` (default 127.0.0.1: local only; port 0 picks a free one), or a
    ``listener`` the caller made.  Use ``await tg.start(serve_nbd, ...)``: it
    reports the address to give :meth:`NbdClient.connect` (``"unix:PATH"`` or
    ``(host, port)``) once clients can connect.

    Stopping: cancelling closes everything at once (requests in flight are
    lost; their clients see the connection close).  Setting ``stop`` is the
    graceful way, as the protocol recommends: the listener closes, every
    connection stops reading requests, answers those in flight, then closes;
    after ``grace`` seconds whatever is left is cancelled; then this returns.
    """
    by_name: dict[str, NbdExport] = {}
    for export in exports:
        if export.name in by_name:
            raise ValueError(f"two exports are named {export.name!r}")
        by_name[export.name] = export
    if sum(x is not None for x in (unix_socket, port, listener)) != 1:
        raise ValueError("give exactly one of unix_socket, port or listener")
    if memory_budget < proto.MAX_PAYLOAD:
        raise ValueError(f"memory_budget must be at least {proto.MAX_PAYLOAD} (one request)")
    shared = _Shared(by_name, max_requests_in_flight, _ByteBudget(memory_budget), max_connections)
    created: Path | None = None
    inode: int | None = None
    address: str | tuple[str, int]
    try:
        if unix_socket is not None:
            path = Path(unix_socket)
            try:
                listener = await anyio.create_unix_listener(path, mode=socket_mode)
            except OSError as error:
                raise NbdError(f"cannot listen on {path}: {error.strerror or error}") from error
            created = path
            address = f"unix:{path}"
        elif port is not None:
            try:
                listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
            except OSError as error:
                raise NbdError(
                    f"cannot listen on {host}:{port}: {error.strerror or error}"
                ) from error
            address = _listener_address(listener)
        else:
            assert listener is not None
            address = _listener_address(listener)

        async def handle(stream: anyio.abc.SocketStream) -> None:
            await _serve_connection(stream, shared)

        async with anyio.create_task_group() as connections:
            accepting = anyio.CancelScope()
            if stop is not None:
                connections.start_soon(
                    _stop_gracefully, stop, shared, accepting, connections.cancel_scope, grace
                )
            async with listener:
                with accepting:
                    if created is not None:
                        inode = (await anyio.Path(created).stat()).st_ino
                    task_status.started(address)
                    await listener.serve(handle, task_group=connections)
    finally:
        if created is not None:
            with anyio.CancelScope(shield=True):
                await _remove_socket(created, inode)


async def _stop_gracefully(
    stop: anyio.Event,
    shared: _Shared,
    accepting: anyio.CancelScope,
    everything: anyio.CancelScope,
    grace: float,
) -> None:
    await stop.wait()
    shared.stopping = True
    accepting.cancel()  # the listener closes: new clients are refused
    for session in list(shared.sessions):
        session.stop()
    if shared.sessions:
        with anyio.move_on_after(grace):
            await shared.idle.wait()
        if shared.sessions:
            log.warning(
                "%d NBD connection(s) still busy after %g s: closing them",
                len(shared.sessions),
                grace,
            )
            everything.cancel()


def _listener_address(
    listener: anyio.abc.Listener[anyio.abc.SocketStream],
) -> str | tuple[str, int]:
    """What :meth:`NbdClient.connect` takes to reach ``listener``."""
    local = listener.extra(SocketAttribute.local_address)
    if isinstance(local, str):  # a Unix socket's path
        return f"unix:{local}"
    return (str(local[0]), int(local[1]))


async def _remove_socket(path: Path, inode: int | None) -> None:
    """Unlink the socket we created, unless someone replaced it since (when its
    inode was never learnt, any socket at the path is taken to be ours)."""

    def remove() -> None:
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(path)
            if stat.S_ISSOCK(st.st_mode) and inode in (None, st.st_ino):
                os.unlink(path)

    await anyio.to_thread.run_sync(remove)


async def _serve_connection(stream: anyio.abc.SocketStream, shared: _Shared) -> None:
    peer = stream.extra(SocketAttribute.remote_address, "?") or "unix client"
    if len(shared.sessions) >= shared.max_connections:
        log.warning("NBD client %s refused: %d connections already", peer, len(shared.sessions))
        await anyio.aclose_forcefully(stream)
        return
    session = _Session(stream, shared)
    shared.sessions.add(session)
    try:
        async with stream:
            with session.scope:
                if not shared.stopping:  # accepted just as the server stopped: close
                    await session.run()
    except Exception as error:  # a cancellation is no Exception: it goes through
        _log_end(peer, error)
    finally:
        shared.sessions.discard(session)
        if shared.stopping and not shared.sessions:
            shared.idle.set()


_PEER_GONE = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError)


def _log_end(peer: object, error: BaseException) -> None:
    """Log why a connection ended; only a bug in an export or here is an error."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            _log_end(peer, inner)
    elif isinstance(error, NbdProtocolError):
        log.warning("NBD client %s broke the protocol: %s", peer, error)
    elif isinstance(error, _PEER_GONE):
        log.info("NBD client %s went away: %r", peer, error)
    else:
        log.error("NBD connection from %s failed", peer, exc_info=error)


def _nbd_errno(error: BaseException) -> int:
    """The NBD error value for an export's failure: a full disk is ENOSPC (as
    the protocol asks for EDQUOT and EFBIG too), anything else EIO."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return proto.ENOSPC
    return proto.EIO


class _Session:
    """One client connection: the options, then the requests."""

    def __init__(self, stream: anyio.abc.SocketStream, shared: _Shared) -> None:
        self.stream = stream
        self.receiver = StreamReceiver(stream)
        self.exports = shared.exports
        self.shared = shared
        self.scope = anyio.CancelScope()  # the whole connection
        self.reading = anyio.CancelScope()  # reading requests, in transmission
        self.conn = proto.ServerConnection()
        self.send_lock = anyio.Lock()
        self.export: NbdExport | None = None

    def stop(self) -> None:
        """Stop reading: in transmission, what is in flight is still answered."""
        if self.conn.in_transmission:
            self.reading.cancel()
        else:
            self.scope.cancel()

    async def next_event(self) -> object:
        while True:
            event = self.conn.next_event()
            if event is not proto.NEED_DATA:
                return event
            self.conn.receive_data(await self.receiver.receive())

    async def send(self, *parts: bytes) -> None:
        async with self.send_lock:
            for part in parts:
                await self.stream.send(part)

    async def run(self) -> None:
        await self.stream.send(self.conn.greeting())
        if await self.negotiate():
            await self.transmit()

    def find(self, name: str) -> NbdExport | None:
        if not name and len(self.exports) == 1:
            return next(iter(self.exports.values()))  # the default export
        return self.exports.get(name)

    async def negotiate(self) -> bool:
        """Answer options until GO or EXPORT_NAME succeeds (True) or the
        client aborts or leaves (False)."""
        conn = self.conn
        while True:
            event = await self.next_event()
            if isinstance(event, proto.ConnectionClosed):
                return False
            if isinstance(event, proto.AbortRequest):
                with contextlib.suppress(anyio.BrokenResourceError, OSError):
                    await self.send(conn.reply_ack(proto.OPT_ABORT))
                return False
            if isinstance(event, proto.ListRequest):
                replies = [conn.reply_server(x.name, x.description) for x in self.exports.values()]
                await self.send(*replies, conn.reply_ack(proto.OPT_LIST))
            elif isinstance(event, proto.StructuredReplyRequest):
                await self.send(conn.reply_ack(proto.OPT_STRUCTURED_REPLY))
            elif isinstance(event, proto.MetaContextRequest):
                await self.send(*self.meta_context_replies(event))
            elif isinstance(event, proto.GoRequest):
                export = self.find(event.name)
                if export is None:
                    message = f"no export named {event.name!r}"
                    await self.send(conn.reply_error(event.option, proto.REP_ERR_UNKNOWN, message))
                    continue
                replies = [
                    conn.reply_info_export(event.option, export.size, export.transmission_flags()),
                    conn.reply_info_block_size(event.option, 1, _PREFERRED_BLOCK, conn.max_payload),
                ]
                if proto.INFO_NAME in event.info_requests:
                    replies.append(conn.reply_info_name(event.option, export.name))
                if export.description and proto.INFO_DESCRIPTION in event.info_requests:
                    replies.append(conn.reply_info_description(event.option, export.description))
                if event.option == proto.OPT_GO:
                    self.export = export
                    await self.send(*replies, conn.reply_go_ack())
                    return True
                await self.send(*replies, conn.reply_ack(proto.OPT_INFO))
            elif isinstance(event, proto.ExportNameRequest):
                export = self.find(event.name)
                if export is None:
                    # EXPORT_NAME cannot be refused: the protocol says hang up
                    raise NbdProtocolError(f"NBD client asked for unknown export {event.name!r}")
                self.export = export
                await self.send(conn.reply_export_name(export.size, export.transmission_flags()))
                return True
            elif isinstance(event, proto.InvalidOptionRequest):
                await self.send(conn.reply_error(event.option, event.reply_type, event.message))
            else:
                raise NbdProtocolError(f"unexpected NBD message during the handshake: {event!r}")

    def meta_context_replies(self, event: proto.MetaContextRequest) -> list[bytes]:
        conn = self.conn
        if self.find(event.name) is None:
            message = f"no export named {event.name!r}"
            return [conn.reply_error(event.option, proto.REP_ERR_UNKNOWN, message)]
        if event.option == proto.OPT_LIST_META_CONTEXT:
            wanted = not event.queries or any(
                q in ("base:", proto.BASE_ALLOCATION) for q in event.queries
            )
        else:
            wanted = proto.BASE_ALLOCATION in event.queries
        replies = (
            [conn.reply_meta_context(event.option, 1, proto.BASE_ALLOCATION)] if wanted else []
        )
        return [*replies, conn.reply_ack(event.option)]

    async def transmit(self) -> None:
        in_flight = anyio.Semaphore(self.shared.max_requests_in_flight)
        async with anyio.create_task_group() as tg:
            with self.reading:  # cancelled to stop gracefully
                while True:
                    event = await self.next_event()
                    if isinstance(event, proto.Disconnect | proto.ConnectionClosed):
                        break  # the task group finishes what is in flight
                    if not isinstance(event, proto.Request):
                        raise NbdProtocolError(f"unexpected NBD message in transmission: {event!r}")
                    await in_flight.acquire()
                    # the bytes this request holds: its write data, or the read it will
                    # answer (an oversized read is refused, so it holds nothing)
                    reads = (
                        event.command == proto.CMD_READ and event.length <= self.conn.max_payload
                    )
                    held = await self.shared.budget.acquire(
                        event.length if reads else len(event.data)
                    )
                    tg.start_soon(self.answer, event, in_flight, held)

    async def answer(self, request: proto.Request, in_flight: anyio.Semaphore, held: int) -> None:
        try:
            await self.answer_request(request)
        except _PEER_GONE:
            # The client left with this request unanswered.  The reading task
            # sees the end of the stream by itself; cancelling its receive here
            # would also trip anyio's race on asyncio UNIX streams
            # (agronholm/anyio#1267), so just stop.
            pass
        finally:
            in_flight.release()
            await self.shared.budget.release(held)

    async def answer_request(self, request: proto.Request) -> None:
        export = self.export
        assert export is not None
        conn = self.conn
        cookie, command, offset, length = (
            request.cookie,
            request.command,
            request.offset,
            request.length,
        )
        problem = self.check(request, export)
        if problem is not None:
            error, message = problem
            await self.send(conn.reply_command_error(cookie, error, message))
            return
        try:
            if command == proto.CMD_READ:
                if not length:
                    await self.send(conn.reply_done(cookie))
                    return
                data = await export.read(offset, length)
                if len(data) != length:
                    raise NbdError(f"export returned {len(data)} of {length} bytes")
                await self.send(conn.reply_read_header(cookie, offset, length), data)
                return
            if command == proto.CMD_BLOCK_STATUS:
                extents = self.status(export, offset, length, request.flags)
                await self.send(conn.reply_block_status(cookie, 1, extents))
                return
            if command == proto.CMD_WRITE:
                await export.write(offset, request.data)
            elif command == proto.CMD_WRITE_ZEROES:
                await export.write_zeroes(offset, length)
            elif command == proto.CMD_TRIM:
                await export.trim(offset, length)
            elif command == proto.CMD_CACHE:
                pass
            if command == proto.CMD_FLUSH or request.flags & proto.CMD_FLAG_FUA:
                await export.flush()
        except (VmaError, OSError) as error:
            name = proto.COMMAND_NAMES.get(command, str(command))
            log.info("NBD %s at %d+%d on %s failed: %s", name, offset, length, export.name, error)
            await self.send(conn.reply_command_error(cookie, _nbd_errno(error), str(error)))
            return
        await self.send(conn.reply_simple(cookie))

    def check(self, request: proto.Request, export: NbdExport) -> tuple[int, str] | None:
        """Why the request must be refused (NBD error, message), or None."""
        command = request.command
        if command not in proto.COMMAND_NAMES or command == proto.CMD_DISC:
            return proto.EINVAL, f"unknown command {command}"
        allowed = proto.CMD_FLAG_FUA | {
            proto.CMD_WRITE_ZEROES: proto.CMD_FLAG_NO_HOLE,
            proto.CMD_BLOCK_STATUS: proto.CMD_FLAG_REQ_ONE,
        }.get(command, 0)
        if request.flags & ~allowed:
            return proto.EINVAL, f"command flags {request.flags:#x} not valid here"
        if request.offset + request.length > export.size:
            return (
                proto.EINVAL,
                f"range {request.offset}+{request.length} beyond the export's {export.size} bytes",
            )
        if (
            command in (proto.CMD_WRITE, proto.CMD_WRITE_ZEROES, proto.CMD_TRIM)
            and export.read_only
        ):
            return proto.EPERM, "export is read-only"
        if command == proto.CMD_READ and request.length > self.conn.max_payload:
            return (
                proto.EOVERFLOW,
                f"read of {request.length} bytes exceeds {self.conn.max_payload}",
            )
        if command == proto.CMD_BLOCK_STATUS:
            if not self.conn.meta_contexts:
                return proto.EINVAL, "no meta context was negotiated"
            if not request.length:
                return proto.EINVAL, "block status of 0 bytes"
        return None

    @staticmethod
    def status(export: NbdExport, offset: int, length: int, flags: int) -> list[tuple[int, int]]:
        extents: list[tuple[int, int]] = []
        for run_length, run_flags in export.block_status(offset, length):
            if run_length > 0:
                proto.append_run(extents, run_length, run_flags)
        if not extents:
            extents = [(length, 0)]
        if flags & proto.CMD_FLAG_REQ_ONE:
            return [(min(extents[0][0], length), extents[0][1])]
        return extents[:_MAX_EXTENTS]
