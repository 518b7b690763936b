"""An anyio NBD client: the sans-I/O :class:`ClientConnection` on a byte stream.

Goal: read and write any NBD export (``qemu-nbd``, ``vma serve``, nbdkit)
from asyncio, uvloop or trio, with requests pipelined from several tasks.

Plan: :meth:`NbdClient.connect` opens the stream, runs the fixed newstyle
handshake (structured replies and ``base:allocation`` when the server has
them, then GO, falling back to EXPORT_NAME for servers without GO) and
returns the client.  Each request takes the send lock only to write its
header (and data), then waits for its reply.  There is no background task
(so no task group has to outlive ``connect``): whichever waiting task finds
no one reading becomes the reader, reads and dispatches replies to every
waiter by cookie until its own reply is complete, then hands reading over
to another waiter.  A reader cancelled inside ``receive`` loses no bytes
(anyio streams either return data or raise), so cancelling one request never
disturbs the others; the reply to a cancelled request is read and dropped.
A request is cancellable until its first byte goes out; from then on its
send is shielded (half a request would wreck the stream for every task), so
a server that stops reading holds that one send until the client is closed.

Worst case: a request's memory is its own data (reads and writes are split
into pieces of at most the server's maximum payload, 32 MiB by default); a
server that breaks the protocol or closes the stream fails every waiting
request with :class:`NbdProtocolError` and the client is closed.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass, field
from typing import cast

import anyio
import anyio.abc
import anyio.lowlevel

from . import _nbd_proto as proto
from ._errors import NbdCommandError, NbdError, NbdOptionError, NbdProtocolError
from ._opening import AsyncResource, Opening

__all__ = ["NbdAddress", "NbdClient", "list_nbd_exports"]

NbdAddress = str | tuple[str, int] | anyio.abc.ByteStream
"""``"unix:/path/to.sock"``, ``(host, port)``, or an already open byte stream
(which the client then owns and closes)."""

_RECEIVE_SIZE = 256 * 1024
_SPLIT_LENGTH = 1 << 30  # WRITE_ZEROES / TRIM / BLOCK_STATUS pieces (the field is 32 bits)
_ZERO_CHUNK = bytes(1024 * 1024)


class StreamReceiver:
    """Receives from one byte stream: the next bytes, ``b""`` at its end.

    On asyncio, anyio's UNIX socket stream resolves its read future from a
    raw reader callback, which fails with ``InvalidStateError`` (printed by the
    event loop) when the receive is cancelled just as data arrives: see
    agronholm/anyio#1267.  A server cancelled while a client disconnects hits
    that, so for those streams we read the raw socket after
    :func:`anyio.wait_readable`, whose callback tolerates cancellation.
    """

    __slots__ = ("_socket", "_stream")

    def __init__(self, stream: anyio.abc.ByteReceiveStream) -> None:
        self._stream = stream
        self._socket = _asyncio_unix_socket(stream)

    def notify_closing(self) -> None:
        """Call before closing the stream under a task that may be receiving:
        it then raises ClosedResourceError instead of waiting forever."""
        if self._socket is not None and self._socket.fileno() >= 0:
            anyio.notify_closing(self._socket)

    async def receive(self) -> bytes:
        sock = self._socket
        if sock is None:
            try:
                return await self._stream.receive(_RECEIVE_SIZE)
            except anyio.EndOfStream:
                return b""
        await anyio.lowlevel.checkpoint()
        while True:
            if sock.fileno() < 0:
                raise anyio.ClosedResourceError
            try:
                return sock.recv(_RECEIVE_SIZE)
            except BlockingIOError:
                await anyio.wait_readable(sock)
            except OSError as error:
                raise anyio.BrokenResourceError from error


def _asyncio_unix_socket(stream: anyio.abc.ByteReceiveStream) -> socket.socket | None:
    if not isinstance(stream, anyio.abc.UNIXSocketStream):
        return None
    if not type(stream).__module__.startswith("anyio._backends._asyncio"):
        return None
    return stream.extra(anyio.abc.SocketAttribute.raw_socket)


@dataclass(eq=False, slots=True)
class _Reply:
    """What one waiting request collects until its ReplyDone."""

    command: int
    offset: int
    length: int
    wake: anyio.Event = field(default_factory=anyio.Event)
    done: proto.ReplyDone | None = None
    data: bytearray | bytes | None = None
    extents: list[tuple[int, int]] = field(default_factory=list)
    abandoned: bool = False


async def _open_stream(address: NbdAddress) -> anyio.abc.ByteStream:
    if isinstance(address, anyio.abc.ByteStream):
        return address
    try:
        if isinstance(address, str):
            if not address.startswith("unix:"):
                raise ValueError(f"NBD address {address!r} is neither 'unix:PATH' nor (host, port)")
            return await anyio.connect_unix(address[len("unix:") :])
        host, port = address
        return await anyio.connect_tcp(host, port)
    except OSError as error:
        raise NbdError(f"cannot connect to the NBD server at {address!r}: {error}") from error


def _describe_refusal(event: proto.OptionRefused, what: str) -> str:
    reason = {
        proto.REP_ERR_UNKNOWN: "unknown export",
        proto.REP_ERR_UNSUP: "not supported",
        proto.REP_ERR_POLICY: "refused by policy",
        proto.REP_ERR_INVALID: "invalid request",
        proto.REP_ERR_TLS_REQD: "TLS required",
        proto.REP_ERR_SHUTDOWN: "server shutting down",
        proto.REP_ERR_TOO_BIG: "request too big",
    }.get(event.reply_type, f"error {event.reply_type & 0x7FFFFFFF}")
    message = f": {event.message}" if event.message else ""
    return f"the NBD server refused {what} ({reason}){message}"


class NbdClient(AsyncResource):
    """One connection to one export of an NBD server.

    Built by :meth:`connect`; ``await client.aclose()`` (or ``async with``)
    sends NBD_CMD_DISC and closes the stream.  All request methods may be
    called concurrently from several tasks.
    """

    def __init__(
        self, stream: anyio.abc.ByteStream, connection: proto.ClientConnection, export_name: str
    ) -> None:
        self._stream = stream
        self._receiver = StreamReceiver(stream)
        self._conn = connection
        self.export_name = export_name
        self.size: int = connection.size
        self.flags: proto.TransmissionFlags = connection.flags
        self.max_payload = proto.MAX_PAYLOAD
        self._send_lock = anyio.Lock()
        self._replies: dict[int, _Reply] = {}
        self._reading = False
        self._failure: NbdError | None = None
        self._closed = False

    # -- opening

    @classmethod
    def connect(cls, address: NbdAddress, export_name: str = "") -> Opening[NbdClient]:
        """Connect to ``export_name`` at ``address``; await the result or use
        ``async with``."""

        async def opener() -> NbdClient:
            stream = await _open_stream(address)
            try:
                return await cls._handshake(stream, export_name)
            except BaseException:
                await anyio.aclose_forcefully(stream)
                raise

        return Opening(opener)

    @classmethod
    async def _handshake(cls, stream: anyio.abc.ByteStream, export_name: str) -> NbdClient:
        handshake = _Handshake(stream)
        await handshake.start()
        conn = handshake.conn
        if isinstance(await handshake.option(conn.send_structured_reply()), proto.OptionAck):
            await handshake.option(conn.send_meta_context(export_name, [proto.BASE_ALLOCATION]))
        max_payload = proto.MAX_PAYLOAD
        # No NBD_INFO_BLOCK_SIZE request: asking would bind us to the server's
        # minimum block size, and requests here are not aligned to one (the
        # server then does any read-modify-write).  A maximum sent anyway is kept.
        outcome = await handshake.option(conn.send_go(export_name))
        for event in handshake.events:
            if isinstance(event, proto.BlockSizeInfo) and event.maximum:
                max_payload = min(max_payload, event.maximum)
        if isinstance(outcome, proto.OptionRefused):
            if outcome.reply_type != proto.REP_ERR_UNSUP:
                raise NbdOptionError(
                    _describe_refusal(outcome, f"export {export_name!r}"), outcome.reply_type
                )
            outcome = await handshake.option(conn.send_export_name(export_name))
        assert isinstance(outcome, proto.TransmissionStarted)
        client = cls(stream, conn, export_name)
        client.max_payload = max_payload
        return client

    # -- resource protocol

    async def aclose(self) -> None:
        """Send NBD_CMD_DISC (if the connection is healthy) and close; a
        cancelled aclose still closes."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._failure is None:
                with anyio.move_on_after(5, shield=True):
                    async with self._send_lock:
                        _, header = self._conn.send_request(proto.CMD_DISC)
                        await self._stream.send(header)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            self._fail(NbdError("the NBD client was closed"))
            self._receiver.notify_closing()  # a task waiting for replies wakes up
            await anyio.aclose_forcefully(self._stream)

    # -- requests

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (pieces of at most the maximum
        payload are requested one after another)."""
        if not length:
            return b""
        if length <= self.max_payload:
            reply = await self._request(proto.CMD_READ, offset, length)
            return bytes(reply.data) if reply.data is not None else bytes(length)
        parts = []
        for start in range(offset, offset + length, self.max_payload):
            parts.append(await self.read(start, min(self.max_payload, offset + length - start)))
        return b"".join(parts)

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        """Write ``data`` at ``offset``; with ``fua`` the data is on stable
        storage when this returns (a flush follows if the server lacks FUA)."""
        view = memoryview(data).cast("B")
        native_fua = fua and bool(self.flags & proto.TransmissionFlags.SEND_FUA)
        for start in range(0, len(view), self.max_payload):
            piece = view[start : start + self.max_payload]
            flags = proto.CMD_FLAG_FUA if native_fua else 0
            await self._request(
                proto.CMD_WRITE, offset + start, len(piece), flags=flags, data=piece
            )
        if fua and not native_fua:
            await self.flush()

    async def write_zeroes(self, offset: int, length: int, *, no_hole: bool = False) -> None:
        """Zero ``length`` bytes at ``offset`` (NBD_CMD_WRITE_ZEROES, or plain
        writes of zeroes if the server lacks it); ``no_hole`` asks the server
        to allocate rather than punch a hole."""
        if not self.flags & proto.TransmissionFlags.SEND_WRITE_ZEROES:
            for start in range(offset, offset + length, len(_ZERO_CHUNK)):
                await self.write(
                    start, _ZERO_CHUNK[: min(len(_ZERO_CHUNK), offset + length - start)]
                )
            return
        flags = proto.CMD_FLAG_NO_HOLE if no_hole else 0
        for start in range(offset, offset + length, _SPLIT_LENGTH):
            piece = min(_SPLIT_LENGTH, offset + length - start)
            await self._request(proto.CMD_WRITE_ZEROES, start, piece, flags=flags)

    async def trim(self, offset: int, length: int) -> None:
        """Tell the server the range is no longer needed (a no-op if it
        cannot trim: a trim is only a hint)."""
        if not self.flags & proto.TransmissionFlags.SEND_TRIM:
            return
        for start in range(offset, offset + length, _SPLIT_LENGTH):
            await self._request(proto.CMD_TRIM, start, min(_SPLIT_LENGTH, offset + length - start))

    async def flush(self) -> None:
        """Make completed writes durable (a no-op if the server has no cache
        to flush, i.e. does not offer NBD_CMD_FLUSH)."""
        if self.flags & proto.TransmissionFlags.SEND_FLUSH:
            await self._request(proto.CMD_FLUSH, 0, 0)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``base:allocation`` runs ``(length, flags)`` covering exactly
        ``offset .. offset + length`` (clipped at the export's end); flags are
        ``STATE_HOLE`` (1) and ``STATE_ZERO`` (2).  Without the context every
        byte is reported as data (0)."""
        end = min(offset + length, self.size)
        if offset >= end:
            return []
        if not self._conn.meta_contexts:
            return [(end - offset, 0)]
        runs: list[tuple[int, int]] = []
        position = offset
        while position < end:
            reply = await self._request(
                proto.CMD_BLOCK_STATUS, position, min(_SPLIT_LENGTH, end - position)
            )
            for run_length, flags in reply.extents:
                run_length = min(run_length, end - position)
                if run_length <= 0:
                    break
                proto.append_run(runs, run_length, flags)
                position += run_length
        return runs

    # -- machinery

    async def _request(
        self,
        command: int,
        offset: int,
        length: int,
        *,
        flags: int = 0,
        data: memoryview | None = None,
    ) -> _Reply:
        self._check_usable()
        async with self._send_lock:
            self._check_usable()
            await anyio.lowlevel.checkpoint()  # a cancel arriving now sends nothing
            cookie, header = self._conn.send_request(command, offset, length, flags=flags)
            reply = _Reply(command, offset, length)
            self._replies[cookie] = reply
            try:
                # Once the first byte may be out, the request is sent whole:
                # half a request would leave the stream unusable for everyone.
                with anyio.CancelScope(shield=True):
                    if data is not None and len(data) <= 65536:
                        await self._stream.send(header + data)
                    else:
                        await self._stream.send(header)
                        if data is not None:
                            # the streams take any buffer; sending the view avoids a copy
                            await self._stream.send(cast(bytes, data))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as error:
                raise self._fail(
                    NbdError(f"the connection to the NBD server broke: {error}")
                ) from error
        try:
            await self._wait(reply)
        except BaseException:
            reply.abandoned = True
            raise
        done = reply.done
        assert done is not None
        if done.error:
            name = proto.COMMAND_NAMES.get(command, str(command))
            text = f": {done.message}" if done.message else ""
            raise NbdCommandError(
                f"NBD {name} of {length} bytes at offset {offset} failed"
                f" with error {done.error}{text}",
                done.error,
            )
        return reply

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise NbdError("the NBD client is closed")

    async def _wait(self, reply: _Reply) -> None:
        while reply.done is None:
            if self._failure is not None:
                raise self._failure
            if self._reading:
                await reply.wake.wait()
                reply.wake = anyio.Event()
                continue
            self._reading = True
            try:
                while reply.done is None:
                    await self._receive_some()
            finally:
                self._reading = False
                for other in self._replies.values():  # hand reading over
                    if other is not reply and not other.abandoned:
                        other.wake.set()
                        break

    async def _receive_some(self) -> None:
        try:
            data = await self._receiver.receive()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as error:
            raise self._fail(
                NbdError(f"the connection to the NBD server broke: {error}")
            ) from error
        self._conn.receive_data(data)
        try:
            while True:
                event = self._conn.next_event()
                if event is proto.NEED_DATA:
                    return
                self._dispatch(event)
        except NbdProtocolError as error:
            self._fail(error)
            await anyio.aclose_forcefully(self._stream)
            raise

    def _dispatch(self, event: object) -> None:
        if isinstance(event, proto.ReadChunk):
            reply = self._replies[event.cookie]
            if event.offset == reply.offset and len(event.data) == reply.length:
                reply.data = event.data
            else:
                if not isinstance(reply.data, bytearray):
                    reply.data = bytearray(reply.length)
                at = event.offset - reply.offset
                reply.data[at : at + len(event.data)] = event.data
        elif isinstance(event, proto.HoleChunk):
            reply = self._replies[event.cookie]
            if not isinstance(reply.data, bytearray):
                reply.data = bytearray(reply.length)  # already zero
        elif isinstance(event, proto.BlockStatusChunk):
            reply = self._replies[event.cookie]
            if self._conn.meta_contexts.get(event.context_id) == proto.BASE_ALLOCATION:
                reply.extents.extend(event.extents)
        elif isinstance(event, proto.ReplyDone):
            reply = self._replies.pop(event.cookie)
            reply.done = event
            reply.wake.set()
        elif isinstance(event, proto.ConnectionClosed):
            raise NbdProtocolError("the NBD server closed the connection")
        else:
            raise NbdProtocolError(f"unexpected NBD message in transmission: {event!r}")

    def _fail(self, error: NbdError) -> NbdError:
        """Mark the connection unusable; every waiter wakes and raises."""
        if self._failure is None:
            self._failure = error
        for reply in self._replies.values():
            reply.wake.set()
        return self._failure


class _Handshake:
    """The option phase: one option at a time, its replies collected."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.receiver = StreamReceiver(stream)
        self.conn = proto.ClientConnection()
        self.events: list[object] = []

    async def next_event(self) -> object:
        while True:
            event = self.conn.next_event()
            if event is not proto.NEED_DATA:
                return event
            try:
                data = await self.receiver.receive()
            except (anyio.BrokenResourceError, OSError) as error:
                raise NbdError(f"the connection to the NBD server broke: {error}") from error
            self.conn.receive_data(data)

    async def start(self) -> None:
        event = await self.next_event()
        if not isinstance(event, proto.ServerGreeting):
            raise NbdProtocolError("the NBD server closed the connection before its greeting")
        await self.stream.send(self.conn.send_client_flags())

    async def option(self, request: bytes) -> object:
        """Send one option; return its final reply (ack, refusal, or
        TransmissionStarted), the replies before it in ``events``."""
        self.events = []
        await self.stream.send(request)
        while True:
            event = await self.next_event()
            if isinstance(event, proto.OptionAck | proto.OptionRefused | proto.TransmissionStarted):
                return event
            if isinstance(event, proto.ConnectionClosed):
                raise NbdProtocolError("the NBD server closed the connection during the handshake")
            self.events.append(event)


async def list_nbd_exports(address: NbdAddress) -> list[tuple[str, str]]:
    """``(name, description)`` of every export the server lists (NBD_OPT_LIST),
    then a polite NBD_OPT_ABORT."""
    stream = await _open_stream(address)
    async with stream:
        handshake = _Handshake(stream)
        await handshake.start()
        outcome = await handshake.option(handshake.conn.send_list())
        if isinstance(outcome, proto.OptionRefused):
            raise NbdOptionError(
                _describe_refusal(outcome, "to list its exports"), outcome.reply_type
            )
        exports = [
            (e.name, e.description) for e in handshake.events if isinstance(e, proto.ExportListed)
        ]
        # a server may hang up on ABORT without answering
        with contextlib.suppress(NbdError, anyio.BrokenResourceError, OSError):
            await handshake.option(handshake.conn.send_abort())
        return exports
