"""The NBD protocol as two sans-I/O state machines: bytes in, events out.

Goal: one place that knows the network block device protocol (the fixed
newstyle handshake and the transmission phase with simple and structured
replies), usable by an anyio client and an anyio server alike and testable
without an event loop, the way h11 is for HTTP.

Plan: :class:`ClientConnection` and :class:`ServerConnection` each own a
receive buffer.  The I/O layer feeds every received chunk to
``receive_data`` (``b""`` for end of stream) and calls ``next_event`` until
it answers :data:`NEED_DATA` (give me more bytes) or :data:`PAUSED` (the
server must answer the option it was handed before later bytes can be
understood).  Everything the caller wants to say goes through methods that
return the bytes to send; the machines never perform I/O and never await.

Worst case (hostile peer): every length a peer sends is checked against a
cap *before* anything is allocated or waited for.  Option data is at most
:data:`MAX_OPTION_LENGTH` bytes, strings at most :data:`MAX_STRING_LENGTH`,
write payloads and read replies at most :data:`MAX_PAYLOAD` (and never
more than the request asked for), block-status chunks at most
:data:`MAX_BLOCK_STATUS_CHUNK`; a longer one is an :class:`NbdProtocolError`
(the caller hangs up), so a 4 GiB length field costs nothing.  A receive
buffer holds at most the message being parsed plus what one network read
brought; it keeps the chunks as they came, so taking a message costs
O(its size) (a 1 MiB read reply is copied once), never O(buffer).
Malformed but bounded option data gets an ``NBD_REP_ERR_INVALID`` answer
instead (the client may carry on), as the protocol asks.

Errors: :class:`NbdProtocolError` means the peer broke the protocol and the
connection must be closed; :class:`RuntimeError` means the caller misused a
machine (a bug in the I/O layer, never the peer's doing).
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ._errors import NbdProtocolError

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "ClientConnection",
    "ServerConnection",
    "TransmissionFlags",
]

# --- constants (names as in the protocol document) ----------------------------

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0  # client flags
FLAG_C_NO_ZEROES = 1 << 1


class TransmissionFlags(enum.IntFlag):
    """What an export supports, as the server announces it."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

STATE_HOLE = 1 << 0  # base:allocation flags
STATE_ZERO = 1 << 1
BASE_ALLOCATION = "base:allocation"

EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

COMMAND_NAMES = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}

# --- caps on what a peer may make us hold -------------------------------------

MAX_STRING_LENGTH = 4096
"""Export names, descriptions, queries and messages (the protocol's own limit)."""
MAX_OPTION_LENGTH = 65536
"""Option data and option replies: a GO with a 4 KiB name and every info type
fits many times over; a longer one is refused by hanging up."""
MAX_PAYLOAD = 32 * 1024 * 1024
"""Largest write payload a server accepts and read a client asks for in one
request (the protocol's default maximum payload)."""
MAX_BLOCK_STATUS_DESCRIPTORS = 1 << 20
MAX_BLOCK_STATUS_CHUNK = 4 + 8 * MAX_BLOCK_STATUS_DESCRIPTORS
MAX_ERROR_CHUNK = 6 + MAX_STRING_LENGTH + 8

_GREETING = struct.Struct(">QQH")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY_HEADER = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK_HEADER = struct.Struct(">IHHQI")
_EXPORT_NAME_REPLY = struct.Struct(">QH")


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")
"""``next_event`` needs more bytes before it can say anything."""
PAUSED = _Sentinel("PAUSED")
"""The server machine waits for the caller to answer an option (GO or
EXPORT_NAME decide whether the next bytes are options or requests)."""


# --- events -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the stream at a point where that is allowed."""


# client side: what the server said


@dataclass(frozen=True, slots=True)
class ServerGreeting:
    handshake_flags: int


@dataclass(frozen=True, slots=True)
class OptionAck:
    option: int


@dataclass(frozen=True, slots=True)
class OptionRefused:
    option: int
    reply_type: int
    message: str


@dataclass(frozen=True, slots=True)
class ExportListed:
    name: str
    description: str


@dataclass(frozen=True, slots=True)
class ExportInfo:
    size: int
    flags: TransmissionFlags


@dataclass(frozen=True, slots=True)
class BlockSizeInfo:
    minimum: int
    preferred: int
    maximum: int


@dataclass(frozen=True, slots=True)
class ExportNameInfo:
    name: str


@dataclass(frozen=True, slots=True)
class ExportDescriptionInfo:
    description: str


@dataclass(frozen=True, slots=True)
class MetaContextReply:
    context_id: int
    name: str


@dataclass(frozen=True, slots=True)
class TransmissionStarted:
    """GO was acknowledged (or EXPORT_NAME answered): requests may flow."""

    size: int
    flags: TransmissionFlags


@dataclass(frozen=True, slots=True)
class ReadChunk:
    """Bytes of the export at ``offset``, part of the reply to ``cookie``."""

    cookie: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class HoleChunk:
    """``length`` bytes at ``offset`` read as zeroes."""

    cookie: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class BlockStatusChunk:
    cookie: int
    context_id: int
    extents: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class ReplyDone:
    """The last message of the reply to ``cookie``; ``error`` 0 is success,
    else the first NBD error value the server sent (with its ``message``)."""

    cookie: int
    error: int
    message: str


# server side: what the client asked


@dataclass(frozen=True, slots=True)
class ExportNameRequest:
    name: str


@dataclass(frozen=True, slots=True)
class GoRequest:
    """NBD_OPT_GO or NBD_OPT_INFO (``option`` says which)."""

    option: int
    name: str
    info_requests: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ListRequest:
    pass


@dataclass(frozen=True, slots=True)
class AbortRequest:
    pass


@dataclass(frozen=True, slots=True)
class StructuredReplyRequest:
    pass


@dataclass(frozen=True, slots=True)
class MetaContextRequest:
    """NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT."""

    option: int
    name: str
    queries: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class InvalidOptionRequest:
    """A known option with malformed data, or an unknown option: answer it
    with ``reply_type`` (an ``NBD_REP_ERR_*``); the session goes on."""

    option: int
    reply_type: int
    message: str


@dataclass(frozen=True, slots=True)
class Request:
    """A transmission-phase command (``data`` only for WRITE)."""

    cookie: int
    command: int
    flags: int
    offset: int
    length: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """NBD_CMD_DISC: answer what is in flight, then close."""


ClientEvent = (
    ConnectionClosed
    | ServerGreeting
    | OptionAck
    | OptionRefused
    | ExportListed
    | ExportInfo
    | BlockSizeInfo
    | ExportNameInfo
    | ExportDescriptionInfo
    | MetaContextReply
    | TransmissionStarted
    | ReadChunk
    | HoleChunk
    | BlockStatusChunk
    | ReplyDone
)
ServerEvent = (
    ConnectionClosed
    | ExportNameRequest
    | GoRequest
    | ListRequest
    | AbortRequest
    | StructuredReplyRequest
    | MetaContextRequest
    | InvalidOptionRequest
    | Request
    | Disconnect
)


# --- shared pieces ----------------------------------------------------------------


def append_run(runs: list[tuple[int, int]], length: int, flags: int) -> None:
    """Add ``(length, flags)`` to block-status ``runs``, merged into the last
    run when the flags are the same (fewer descriptors on the wire)."""
    if runs and runs[-1][1] == flags:
        runs[-1] = (runs[-1][0] + length, flags)
    else:
        runs.append((length, flags))


class _ReceiveBuffer:
    """Bytes received and not yet parsed; ``eof`` once the peer closed.

    Kept as the chunks that arrived: a 1 MiB read reply that came in
    256 KiB pieces is joined once when taken (one copy), and a chunk that is
    exactly one message is handed out as is (none).  Taking costs
    O(bytes taken), never O(bytes buffered).
    """

    __slots__ = ("_chunks", "_length", "_offset", "eof")

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._length = 0
        self._offset = 0  # consumed bytes of the first chunk
        self.eof = False

    def feed(self, data: bytes) -> None:
        if self.eof:
            raise RuntimeError("receive_data after end of stream")
        if data:
            self._chunks.append(bytes(data))
            self._length += len(data)
        else:
            self.eof = True

    def __len__(self) -> int:
        return self._length

    def peek(self, size: int) -> bytes | None:
        if self._length < size:
            return None
        if not size:
            return b""
        first = self._chunks[0]
        if len(first) - self._offset >= size:
            return first[self._offset : self._offset + size]
        return b"".join(self._pieces(size, consume=False))

    def take(self, size: int) -> bytes | None:
        """The next ``size`` bytes, or None (nothing consumed) if fewer arrived."""
        if self._length < size:
            return None
        if not size:
            return b""
        self._length -= size
        first = self._chunks[0]
        if self._offset == 0 and len(first) == size:
            self._chunks.popleft()
            return first
        if len(first) - self._offset > size:
            self._offset += size
            return first[self._offset - size : self._offset]
        return b"".join(self._pieces(size, consume=True))

    def _pieces(self, size: int, *, consume: bool) -> list[memoryview]:
        pieces = []
        offset, index = self._offset, 0
        while size:
            chunk = self._chunks[index]
            piece = memoryview(chunk)[offset : offset + size]
            pieces.append(piece)
            size -= len(piece)
            offset += len(piece)
            if offset == len(chunk):
                offset = 0
                index += 1
        if consume:
            for _ in range(index):
                self._chunks.popleft()
            self._offset = offset
        return pieces


def _decode_string(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise NbdProtocolError(f"{what} is not valid UTF-8") from None


def _encode_string(text: str, what: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > MAX_STRING_LENGTH:
        raise ValueError(f"{what} is longer than {MAX_STRING_LENGTH} bytes")
    return data


def _message_bytes(message: str) -> bytes:
    """An error message for the peer, cut to the protocol's string limit."""
    data = message.encode("utf-8", "replace")
    if len(data) <= MAX_STRING_LENGTH:
        return data
    return data[: MAX_STRING_LENGTH - 3].decode("utf-8", "ignore").encode() + b"..."


def _option_bytes(option: int, data: bytes = b"") -> bytes:
    return _OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def _name_and_strings(name: str, queries: Sequence[str]) -> bytes:
    encoded = _encode_string(name, "export name")
    parts = [struct.pack(">I", len(encoded)), encoded, struct.pack(">I", len(queries))]
    for query in queries:
        q = _encode_string(query, "meta context query")
        parts += [struct.pack(">I", len(q)), q]
    return b"".join(parts)


# --- client -----------------------------------------------------------------------


class _ClientState(enum.Enum):
    GREETING = "waiting for the server's greeting"
    SEND_FLAGS = "the client must send its flags"
    OPTIONS = "option haggling"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


@dataclass(slots=True)
class _PendingRequest:
    command: int
    offset: int
    length: int
    structured_seen: bool = False
    covered: int = 0
    error: int = 0
    message: str = ""
    status_contexts: int = 0


class ClientConnection:
    """The client's half of an NBD connection.

    Call order: feed the greeting, get :class:`ServerGreeting`, send
    :meth:`send_client_flags`; then options one at a time (each ``send_*``
    option method; read events until its final reply: an ack, a refusal or
    :class:`TransmissionStarted`); then :meth:`send_request` freely, each reply
    ending in a :class:`ReplyDone` for its cookie.
    """

    def __init__(self) -> None:
        self._buffer = _ReceiveBuffer()
        self._state = _ClientState.GREETING
        self._option: int | None = None  # awaiting replies to this option
        self._no_zeroes = False
        self._export_info: ExportInfo | None = None
        self._pending: dict[int, _PendingRequest] = {}
        self._next_cookie = 1
        self._header: tuple[int, int, int, int] | None = None  # a parsed chunk header
        self._pending_done: int | None = None
        self.structured_replies = False
        self.meta_contexts: dict[int, str] = {}
        self._candidate_contexts: dict[int, str] = {}
        self.size = 0
        self.flags = TransmissionFlags(0)

    @property
    def in_transmission(self) -> bool:
        return self._state is _ClientState.TRANSMISSION

    @property
    def pending_requests(self) -> int:
        return len(self._pending)

    # -- bytes in

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the server; ``b""`` means it closed the stream."""
        self._buffer.feed(data)

    def next_event(self) -> ClientEvent | _Sentinel:
        event = self._parse()
        if event is NEED_DATA and self._buffer.eof:
            return self._closed()
        return event

    def _closed(self) -> ConnectionClosed:
        if len(self._buffer) or self._header is not None:
            raise NbdProtocolError(
                "the NBD server closed the connection in the middle of a message"
            )
        if self._state is _ClientState.TRANSMISSION and self._pending:
            raise NbdProtocolError(
                f"the NBD server closed the connection with {len(self._pending)} request(s)"
                " unanswered"
            )
        if self._option is not None:
            raise NbdProtocolError("the NBD server closed the connection during the handshake")
        self._state = _ClientState.CLOSED
        return ConnectionClosed()

    def _parse(self) -> ClientEvent | _Sentinel:
        done = self._take_pending_done()  # a data chunk marked DONE: its ReplyDone next
        if done is not None:
            return done
        state = self._state
        if state is _ClientState.GREETING:
            return self._parse_greeting()
        if state is _ClientState.OPTIONS and self._option is not None:
            return self._parse_option_reply()
        if state is _ClientState.TRANSMISSION:
            return self._parse_reply()
        if len(self._buffer):
            raise NbdProtocolError(f"the NBD server sent data unasked ({state.value})")
        return NEED_DATA

    def _parse_greeting(self) -> ClientEvent | _Sentinel:
        head = self._buffer.peek(8)
        if head is not None and head != NBDMAGIC.to_bytes(8, "big"):
            raise NbdProtocolError("not an NBD server: the greeting does not start with NBDMAGIC")
        head = self._buffer.peek(16)
        if head is not None and head[8:] != IHAVEOPT.to_bytes(8, "big"):
            raise NbdProtocolError(
                "the NBD server speaks the oldstyle handshake, which is not supported"
            )
        data = self._buffer.take(_GREETING.size)
        if data is None:
            return NEED_DATA
        _, _, handshake_flags = _GREETING.unpack(data)
        if not handshake_flags & FLAG_FIXED_NEWSTYLE:
            raise NbdProtocolError("the NBD server does not support the fixed newstyle handshake")
        self._no_zeroes = bool(handshake_flags & FLAG_NO_ZEROES)
        self._state = _ClientState.SEND_FLAGS
        return ServerGreeting(handshake_flags)

    def _parse_option_reply(self) -> ClientEvent | _Sentinel:
        option = self._option
        assert option is not None
        if option == OPT_EXPORT_NAME:
            size = _EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else 124)
            data = self._buffer.take(size)
            if data is None:
                return NEED_DATA
            export_size, flags = _EXPORT_NAME_REPLY.unpack_from(data)
            return self._start_transmission(ExportInfo(export_size, TransmissionFlags(flags)))
        header = self._buffer.peek(_OPTION_REPLY_HEADER.size)
        if header is None:
            return NEED_DATA
        magic, replied_option, reply_type, length = _OPTION_REPLY_HEADER.unpack(header)
        if magic != OPTION_REPLY_MAGIC:
            raise NbdProtocolError(f"bad NBD option reply magic {magic:#x}")
        if replied_option != option:
            raise NbdProtocolError(
                f"the NBD server answered option {replied_option} while option {option} was asked"
            )
        if length > MAX_OPTION_LENGTH:
            raise NbdProtocolError(
                f"NBD option reply of {length} bytes is longer than {MAX_OPTION_LENGTH}"
            )
        if len(self._buffer) < _OPTION_REPLY_HEADER.size + length:
            return NEED_DATA
        self._buffer.take(_OPTION_REPLY_HEADER.size)
        data = self._buffer.take(length)
        assert data is not None
        return self._option_reply(option, reply_type, data)

    def _option_reply(self, option: int, reply_type: int, data: bytes) -> ClientEvent | _Sentinel:
        if reply_type & REP_FLAG_ERROR:
            self._option = None
            message = data[:MAX_STRING_LENGTH].decode("utf-8", "replace")  # only shown
            return OptionRefused(option, reply_type, message)
        if reply_type == REP_ACK:
            if data:
                raise NbdProtocolError("NBD_REP_ACK carries data")
            self._option = None
            if option == OPT_GO:
                if self._export_info is None:
                    raise NbdProtocolError("the NBD server acknowledged GO without NBD_INFO_EXPORT")
                return self._start_transmission(self._export_info)
            if option == OPT_STRUCTURED_REPLY:
                self.structured_replies = True
            if option == OPT_SET_META_CONTEXT:
                self.meta_contexts = dict(self._candidate_contexts)
            if option == OPT_ABORT:
                self._state = _ClientState.CLOSED
            return OptionAck(option)
        if reply_type == REP_SERVER and option == OPT_LIST:
            if len(data) < 4:
                raise NbdProtocolError("NBD_REP_SERVER shorter than its name length")
            (name_length,) = struct.unpack_from(">I", data)
            if name_length > len(data) - 4:
                raise NbdProtocolError("NBD_REP_SERVER name longer than the reply")
            name = _decode_string(data[4 : 4 + name_length], "export name")
            description = _decode_string(data[4 + name_length :], "export description")
            return ExportListed(name, description)
        if reply_type == REP_INFO and option in (OPT_GO, OPT_INFO):
            return self._info_reply(data)
        if reply_type == REP_META_CONTEXT and option in (
            OPT_LIST_META_CONTEXT,
            OPT_SET_META_CONTEXT,
        ):
            if len(data) < 4:
                raise NbdProtocolError("NBD_REP_META_CONTEXT shorter than its id")
            (context_id,) = struct.unpack_from(">I", data)
            name = _decode_string(data[4:], "meta context name")
            if option == OPT_SET_META_CONTEXT:
                self._candidate_contexts[context_id] = name
            return MetaContextReply(context_id, name)
        raise NbdProtocolError(f"unexpected NBD option reply type {reply_type} to option {option}")

    def _info_reply(self, data: bytes) -> ClientEvent | _Sentinel:
        if len(data) < 2:
            raise NbdProtocolError("NBD_REP_INFO shorter than its type")
        (info_type,) = struct.unpack_from(">H", data)
        if info_type == INFO_EXPORT:
            if len(data) != 12:
                raise NbdProtocolError(f"NBD_INFO_EXPORT of {len(data)} bytes, not 12")
            size, flags = struct.unpack_from(">QH", data, 2)
            self._export_info = ExportInfo(size, TransmissionFlags(flags))
            return self._export_info
        if info_type == INFO_BLOCK_SIZE:
            if len(data) != 14:
                raise NbdProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes, not 14")
            return BlockSizeInfo(*struct.unpack_from(">III", data, 2))
        if info_type == INFO_NAME:
            return ExportNameInfo(_decode_string(data[2:], "export name"))
        if info_type == INFO_DESCRIPTION:
            return ExportDescriptionInfo(_decode_string(data[2:], "export description"))
        return self._parse()  # unknown information: ignored, as the protocol asks

    def _start_transmission(self, info: ExportInfo) -> TransmissionStarted:
        self._option = None
        self._state = _ClientState.TRANSMISSION
        self.size, self.flags = info.size, info.flags
        return TransmissionStarted(info.size, info.flags)

    def _parse_reply(self) -> ClientEvent | _Sentinel:
        if self._header is None:
            magic_bytes = self._buffer.peek(4)
            if magic_bytes is None:
                return NEED_DATA
            magic = int.from_bytes(magic_bytes, "big")
            if magic == SIMPLE_REPLY_MAGIC:
                return self._parse_simple_reply()
            if magic != STRUCTURED_REPLY_MAGIC:
                raise NbdProtocolError(f"bad NBD reply magic {magic:#x}")
            if not self.structured_replies:
                raise NbdProtocolError("structured NBD reply though none were negotiated")
            data = self._buffer.take(_CHUNK_HEADER.size)
            if data is None:
                return NEED_DATA
            _, flags, chunk_type, cookie, length = _CHUNK_HEADER.unpack(data)
            pending = self._pending.get(cookie)
            if pending is None:
                raise NbdProtocolError(f"NBD reply for unknown cookie {cookie}")
            if length > self._chunk_cap(pending, chunk_type):
                raise NbdProtocolError(
                    f"NBD reply chunk of type {chunk_type} with {length} bytes is too long"
                )
            self._header = (flags, chunk_type, cookie, length)
        flags, chunk_type, cookie, length = self._header
        if len(self._buffer) < length:
            return NEED_DATA
        self._header = None
        if chunk_type == REPLY_TYPE_OFFSET_DATA and length > 8:
            # the offset apart from the data, so the data is never sliced (copied) again
            offset_field = self._buffer.take(8)
            data = self._buffer.take(length - 8)
            assert offset_field is not None
            assert data is not None
            return self._chunk(flags, chunk_type, cookie, offset_field, data)
        payload = self._buffer.take(length)
        assert payload is not None
        return self._chunk(flags, chunk_type, cookie, payload)

    def _parse_simple_reply(self) -> ClientEvent | _Sentinel:
        header = self._buffer.peek(_SIMPLE_REPLY.size)
        if header is None:
            return NEED_DATA
        _, error, cookie = _SIMPLE_REPLY.unpack(header)
        pending = self._pending.get(cookie)
        if pending is None:
            raise NbdProtocolError(f"NBD reply for unknown cookie {cookie}")
        if pending.structured_seen:
            raise NbdProtocolError("simple NBD reply after structured chunks for the same request")
        if pending.command == CMD_READ and not error:
            if self.structured_replies:
                raise NbdProtocolError(
                    "simple NBD reply with data though structured replies were negotiated"
                )
            if len(self._buffer) < _SIMPLE_REPLY.size + pending.length:
                return NEED_DATA
            self._buffer.take(_SIMPLE_REPLY.size)
            data = self._buffer.take(pending.length)
            assert data is not None
            pending.covered = pending.length
            self._pending_done = cookie  # the data now, the completion next
            return ReadChunk(cookie, pending.offset, data)
        self._buffer.take(_SIMPLE_REPLY.size)
        return self._finish(cookie, error, "")

    def _chunk_cap(self, pending: _PendingRequest, chunk_type: int) -> int:
        if chunk_type == REPLY_TYPE_OFFSET_DATA:
            return 8 + pending.length
        if chunk_type == REPLY_TYPE_BLOCK_STATUS:
            return MAX_BLOCK_STATUS_CHUNK
        if chunk_type & (1 << 15):
            return MAX_ERROR_CHUNK
        return 16

    def _chunk(
        self, flags: int, chunk_type: int, cookie: int, payload: bytes, data: bytes | None = None
    ) -> ClientEvent | _Sentinel:
        """One structured chunk; for OFFSET_DATA ``payload`` is the offset
        field and ``data`` the bytes (None if the chunk is too short)."""
        pending = self._pending[cookie]
        pending.structured_seen = True
        done = bool(flags & REPLY_FLAG_DONE)
        event: ClientEvent | None = None
        if chunk_type == REPLY_TYPE_NONE:
            if payload or not done:
                raise NbdProtocolError("NBD_REPLY_TYPE_NONE with data or without the DONE flag")
        elif chunk_type in (REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE):
            event = self._content_chunk(pending, chunk_type, cookie, payload, data)
        elif chunk_type == REPLY_TYPE_BLOCK_STATUS:
            event = self._status_chunk(pending, cookie, payload)
        elif chunk_type & (1 << 15):
            self._error_chunk(pending, chunk_type, payload)
        else:
            raise NbdProtocolError(f"unknown NBD structured reply type {chunk_type}")
        if done:
            if event is not None:
                self._pending_done = cookie
                return event
            return self._finish(cookie, pending.error, pending.message)
        return event if event is not None else self._parse()

    def _content_chunk(
        self,
        pending: _PendingRequest,
        chunk_type: int,
        cookie: int,
        payload: bytes,
        data: bytes | None,
    ) -> ClientEvent:
        if pending.command != CMD_READ:
            raise NbdProtocolError("NBD read data in the reply to a request other than READ")
        if chunk_type == REPLY_TYPE_OFFSET_DATA:
            if data is None:
                raise NbdProtocolError("NBD_REPLY_TYPE_OFFSET_DATA shorter than 9 bytes")
            (offset,) = struct.unpack_from(">Q", payload)
            length = len(data)
        else:
            if len(payload) != 12:
                raise NbdProtocolError("NBD_REPLY_TYPE_OFFSET_HOLE not 12 bytes long")
            offset, length = struct.unpack(">QI", payload)
            if not length:
                raise NbdProtocolError("NBD_REPLY_TYPE_OFFSET_HOLE of length 0")
        if offset < pending.offset or offset + length > pending.offset + pending.length:
            raise NbdProtocolError("NBD read reply chunk outside the requested range")
        pending.covered += length
        if pending.covered > pending.length:
            raise NbdProtocolError("NBD read reply chunks overlap")
        if chunk_type == REPLY_TYPE_OFFSET_DATA:
            assert data is not None
            return ReadChunk(cookie, offset, data)
        return HoleChunk(cookie, offset, length)

    def _status_chunk(self, pending: _PendingRequest, cookie: int, payload: bytes) -> ClientEvent:
        if pending.command != CMD_BLOCK_STATUS:
            raise NbdProtocolError(
                "NBD block status in the reply to a request other than BLOCK_STATUS"
            )
        if len(payload) < 12 or (len(payload) - 4) % 8:
            raise NbdProtocolError("NBD_REPLY_TYPE_BLOCK_STATUS not 4 + a multiple of 8 bytes")
        (context_id,) = struct.unpack_from(">I", payload)
        if context_id not in self.meta_contexts:
            raise NbdProtocolError(f"NBD block status for unnegotiated context {context_id}")
        values = struct.unpack_from(f">{(len(payload) - 4) // 4}I", payload, 4)
        extents = tuple(zip(values[0::2], values[1::2], strict=True))
        if any(length == 0 for length, _ in extents):
            raise NbdProtocolError("NBD block status extent of length 0")
        pending.status_contexts += 1
        return BlockStatusChunk(cookie, context_id, extents)

    def _error_chunk(self, pending: _PendingRequest, chunk_type: int, payload: bytes) -> None:
        if len(payload) < 6:
            raise NbdProtocolError("NBD error chunk shorter than 6 bytes")
        error, message_length = struct.unpack_from(">IH", payload)
        if 6 + message_length > len(payload):
            raise NbdProtocolError("NBD error chunk message longer than the chunk")
        if chunk_type == REPLY_TYPE_ERROR_OFFSET and len(payload) != 14 + message_length:
            raise NbdProtocolError("NBD_REPLY_TYPE_ERROR_OFFSET of the wrong length")
        if not pending.error:
            pending.error = error or EINVAL
            pending.message = payload[6 : 6 + message_length].decode("utf-8", "replace")

    def _finish(self, cookie: int, error: int, message: str) -> ReplyDone:
        pending = self._pending.pop(cookie)
        if not error and pending.structured_seen:
            if pending.command == CMD_READ and pending.covered != pending.length:
                raise NbdProtocolError("NBD read reply did not cover the requested range")
            if pending.command == CMD_BLOCK_STATUS and not pending.status_contexts:
                raise NbdProtocolError("NBD block status reply without a status chunk")
        return ReplyDone(cookie, error, message)

    def _take_pending_done(self) -> ReplyDone | None:
        cookie = self._pending_done
        if cookie is None:
            return None
        self._pending_done = None
        pending = self._pending[cookie]
        return self._finish(cookie, pending.error, pending.message)

    # -- bytes out

    def send_client_flags(self, *, no_zeroes: bool = True) -> bytes:
        if self._state is not _ClientState.SEND_FLAGS:
            raise RuntimeError("client flags are sent once, right after the greeting")
        self._no_zeroes = self._no_zeroes and no_zeroes
        self._state = _ClientState.OPTIONS
        return struct.pack(
            ">I", FLAG_C_FIXED_NEWSTYLE | (FLAG_C_NO_ZEROES if self._no_zeroes else 0)
        )

    def _send_option(self, option: int, data: bytes = b"") -> bytes:
        if self._state is not _ClientState.OPTIONS or self._option is not None:
            raise RuntimeError(
                "an option can be sent only during haggling, after the last one's final reply"
            )
        self._option = option
        return _option_bytes(option, data)

    def send_go(self, name: str, *, info_requests: Sequence[int] = (), go: bool = True) -> bytes:
        """NBD_OPT_GO (or NBD_OPT_INFO with ``go=False``) for export ``name``."""
        encoded = _encode_string(name, "export name")
        self._export_info = None
        data = (
            struct.pack(">I", len(encoded))
            + encoded
            + struct.pack(f">H{len(info_requests)}H", len(info_requests), *info_requests)
        )
        return self._send_option(OPT_GO if go else OPT_INFO, data)

    def send_export_name(self, name: str) -> bytes:
        return self._send_option(OPT_EXPORT_NAME, _encode_string(name, "export name"))

    def send_list(self) -> bytes:
        return self._send_option(OPT_LIST)

    def send_abort(self) -> bytes:
        return self._send_option(OPT_ABORT)

    def send_structured_reply(self) -> bytes:
        return self._send_option(OPT_STRUCTURED_REPLY)

    def send_meta_context(self, name: str, queries: Sequence[str], *, select: bool = True) -> bytes:
        """NBD_OPT_SET_META_CONTEXT (``select``) or NBD_OPT_LIST_META_CONTEXT."""
        if select:
            self.meta_contexts = {}
            self._candidate_contexts = {}
        option = OPT_SET_META_CONTEXT if select else OPT_LIST_META_CONTEXT
        return self._send_option(option, _name_and_strings(name, queries))

    def send_request(
        self, command: int, offset: int = 0, length: int = 0, *, flags: int = 0
    ) -> tuple[int, bytes]:
        """A request header and its cookie; for WRITE the caller sends
        ``length`` bytes of data right after the header."""
        if self._state is not _ClientState.TRANSMISSION:
            raise RuntimeError(f"requests need the transmission phase, not {self._state.value}")
        if not (0 <= offset < 1 << 64 and 0 <= length < 1 << 32):
            raise ValueError("offset or length out of range for NBD")
        if command in (CMD_READ, CMD_WRITE) and length > MAX_PAYLOAD:
            raise ValueError(f"NBD read/write of {length} bytes is longer than {MAX_PAYLOAD}")
        if command == CMD_BLOCK_STATUS and not self.meta_contexts:
            raise RuntimeError("BLOCK_STATUS needs a meta context selected during the handshake")
        cookie = self._next_cookie
        self._next_cookie = (cookie + 1) & 0xFFFF_FFFF_FFFF_FFFF or 1
        if command == CMD_DISC:
            self._state = _ClientState.CLOSED
        else:
            self._pending[cookie] = _PendingRequest(command, offset, length)
        return cookie, _REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)


# --- server -----------------------------------------------------------------------


class _ServerState(enum.Enum):
    CLIENT_FLAGS = "waiting for the client's flags"
    OPTIONS = "option haggling"
    DECIDING = "waiting for the server to answer GO or EXPORT_NAME"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class ServerConnection:
    """The server's half of an NBD connection.

    Send :meth:`greeting` first.  Option events come one at a time; answer
    each with the reply methods (``reply_*``).  After a :class:`GoRequest`
    with ``option == OPT_GO`` or an :class:`ExportNameRequest`, ``next_event``
    answers :data:`PAUSED` until :meth:`reply_go_ack`, :meth:`reply_export_name`
    or an error reply decides what the next bytes are.  In transmission each
    :class:`Request` is answered with ``reply_*`` for its cookie, in any order.
    """

    def __init__(self, *, max_payload: int = MAX_PAYLOAD) -> None:
        self._buffer = _ReceiveBuffer()
        self._state = _ServerState.CLIENT_FLAGS
        self._no_zeroes = False
        self._option_header: tuple[int, int] | None = None
        self._request_header: tuple[int, int, int, int, int] | None = None
        self._deciding: GoRequest | ExportNameRequest | None = None
        self.max_payload = max_payload
        self.structured_replies = False
        self.meta_contexts: dict[int, str] = {}
        self._meta_export: str | None = None

    def greeting(self) -> bytes:
        return _GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

    @property
    def in_transmission(self) -> bool:
        return self._state is _ServerState.TRANSMISSION

    # -- bytes in

    def receive_data(self, data: bytes) -> None:
        self._buffer.feed(data)

    def next_event(self) -> ServerEvent | _Sentinel:
        if self._state is _ServerState.DECIDING:
            return PAUSED
        event = self._parse()
        if event is NEED_DATA and self._buffer.eof:
            if len(self._buffer) or self._option_header or self._request_header:
                raise NbdProtocolError(
                    "the NBD client closed the connection in the middle of a message"
                )
            self._state = _ServerState.CLOSED
            return ConnectionClosed()
        return event

    def _parse(self) -> ServerEvent | _Sentinel:
        if self._state is _ServerState.CLIENT_FLAGS:
            data = self._buffer.take(4)
            if data is None:
                return NEED_DATA
            (flags,) = struct.unpack(">I", data)
            if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
                raise NbdProtocolError(f"NBD client sent unknown client flags {flags:#x}")
            self._no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
            self._state = _ServerState.OPTIONS
        if self._state is _ServerState.OPTIONS:
            return self._parse_option()
        if self._state is _ServerState.TRANSMISSION:
            return self._parse_request()
        if len(self._buffer):
            raise NbdProtocolError("the NBD client sent data after it disconnected")
        return NEED_DATA

    def _parse_option(self) -> ServerEvent | _Sentinel:
        if self._option_header is None:
            data = self._buffer.take(_OPTION_HEADER.size)
            if data is None:
                return NEED_DATA
            magic, option, length = _OPTION_HEADER.unpack(data)
            if magic != IHAVEOPT:
                raise NbdProtocolError(f"bad NBD option magic {magic:#x}")
            if length > MAX_OPTION_LENGTH:
                raise NbdProtocolError(
                    f"NBD option {option} with {length} bytes of data is longer than"
                    f" {MAX_OPTION_LENGTH}"
                )
            self._option_header = (option, length)
        option, length = self._option_header
        data = self._buffer.take(length)
        if data is None:
            return NEED_DATA
        self._option_header = None
        try:
            return self._option_event(option, data)
        except _InvalidOption as error:
            return InvalidOptionRequest(option, error.reply_type, str(error))

    def _option_event(self, option: int, data: bytes) -> ServerEvent:
        if option == OPT_EXPORT_NAME:
            if len(data) > MAX_STRING_LENGTH:
                raise NbdProtocolError("NBD export name longer than 4096 bytes")
            name = _decode_string(data, "export name")
            self._deciding = ExportNameRequest(name)
            self._state = _ServerState.DECIDING
            return self._deciding
        if option == OPT_ABORT:
            return AbortRequest()
        if option in (OPT_LIST, OPT_STRUCTURED_REPLY):
            if data:
                raise _InvalidOption("this option takes no data")
            if option == OPT_LIST:
                return ListRequest()
            if self.structured_replies:
                raise _InvalidOption("structured replies were negotiated already")
            return StructuredReplyRequest()
        if option in (OPT_GO, OPT_INFO):
            reader = _OptionReader(data)
            name = reader.string("export name")
            count = reader.unsigned(2)
            info_requests = tuple(reader.unsigned(2) for _ in range(count))
            reader.end()
            request = GoRequest(option, name, info_requests)
            if option == OPT_GO:
                self._deciding = request
                self._state = _ServerState.DECIDING
            return request
        if option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            if not self.structured_replies:
                raise _InvalidOption("meta contexts need structured replies first")
            reader = _OptionReader(data)
            name = reader.string("export name")
            count = reader.unsigned(4)
            queries = tuple(reader.string("query") for _ in range(min(count, len(data))))
            reader.end()
            if option == OPT_SET_META_CONTEXT:
                self.meta_contexts = {}
                self._meta_export = name
            return MetaContextRequest(option, name, queries)
        raise _InvalidOption(f"unsupported option {option}", REP_ERR_UNSUP)

    def _parse_request(self) -> ServerEvent | _Sentinel:
        if self._request_header is None:
            data = self._buffer.take(_REQUEST.size)
            if data is None:
                return NEED_DATA
            magic, flags, command, cookie, offset, length = _REQUEST.unpack(data)
            if magic != REQUEST_MAGIC:
                raise NbdProtocolError(f"bad NBD request magic {magic:#x}")
            if command == CMD_DISC:
                self._state = _ServerState.CLOSED
                return Disconnect()
            if command != CMD_WRITE:
                return Request(cookie, command, flags, offset, length)
            if length > self.max_payload:
                raise NbdProtocolError(
                    f"NBD write of {length} bytes is longer than the maximum payload"
                    f" {self.max_payload}"
                )
            self._request_header = (flags, command, cookie, offset, length)
        flags, command, cookie, offset, length = self._request_header
        payload = self._buffer.take(length)
        if payload is None:
            return NEED_DATA
        self._request_header = None
        return Request(cookie, command, flags, offset, length, payload)

    # -- bytes out: option replies

    def _reply(self, option: int, reply_type: int, data: bytes = b"") -> bytes:
        return _OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data

    def reply_ack(self, option: int) -> bytes:
        """NBD_REP_ACK: ends LIST, INFO, STRUCTURED_REPLY, META_CONTEXT, ABORT (use
        :meth:`reply_go_ack` for GO)."""
        if option == OPT_GO:
            raise RuntimeError("GO is acknowledged with reply_go_ack")
        if option == OPT_STRUCTURED_REPLY:
            self.structured_replies = True
        if option == OPT_ABORT:
            self._state = _ServerState.CLOSED
        return self._reply(option, REP_ACK)

    def reply_error(self, option: int, reply_type: int, message: str = "") -> bytes:
        if not reply_type & REP_FLAG_ERROR:
            raise ValueError("an option error reply type has bit 31 set")
        if self._state is _ServerState.DECIDING:
            if isinstance(self._deciding, ExportNameRequest):
                raise RuntimeError("EXPORT_NAME cannot be refused; close the connection")
            self._deciding = None
            self._state = _ServerState.OPTIONS
        return self._reply(option, reply_type, _message_bytes(message))

    def reply_server(self, name: str, description: str = "") -> bytes:
        encoded = _encode_string(name, "export name")
        text = _encode_string(description, "description")
        return self._reply(OPT_LIST, REP_SERVER, struct.pack(">I", len(encoded)) + encoded + text)

    def reply_info_export(self, option: int, size: int, flags: int) -> bytes:
        return self._reply(
            option,
            REP_INFO,
            struct.pack(">HQH", INFO_EXPORT, size, flags | TransmissionFlags.HAS_FLAGS),
        )

    def reply_info_block_size(
        self, option: int, minimum: int, preferred: int, maximum: int
    ) -> bytes:
        return self._reply(
            option, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)
        )

    def reply_info_name(self, option: int, name: str) -> bytes:
        return self._reply(
            option, REP_INFO, struct.pack(">H", INFO_NAME) + _encode_string(name, "name")
        )

    def reply_info_description(self, option: int, description: str) -> bytes:
        return self._reply(
            option,
            REP_INFO,
            struct.pack(">H", INFO_DESCRIPTION) + _encode_string(description, "description"),
        )

    def reply_meta_context(self, option: int, context_id: int, name: str) -> bytes:
        if option == OPT_SET_META_CONTEXT:
            self.meta_contexts[context_id] = name
        return self._reply(
            option,
            REP_META_CONTEXT,
            struct.pack(">I", context_id) + _encode_string(name, "context"),
        )

    def reply_go_ack(self) -> bytes:
        """Acknowledge the pending GO: the transmission phase starts."""
        if not isinstance(self._deciding, GoRequest):
            raise RuntimeError("no GO is waiting for an answer")  # noqa: TRY004
        self._enter_transmission(self._deciding.name)
        return self._reply(OPT_GO, REP_ACK)

    def reply_export_name(self, size: int, flags: int) -> bytes:
        """Answer the pending EXPORT_NAME: the transmission phase starts."""
        if not isinstance(self._deciding, ExportNameRequest):
            raise RuntimeError("no EXPORT_NAME is waiting for an answer")  # noqa: TRY004
        self._enter_transmission(self._deciding.name)
        return _EXPORT_NAME_REPLY.pack(size, flags | TransmissionFlags.HAS_FLAGS) + (
            b"" if self._no_zeroes else bytes(124)
        )

    def _enter_transmission(self, name: str) -> None:
        if self._meta_export != name:
            self.meta_contexts = {}  # selected for another export: not in force
        self._deciding = None
        self._state = _ServerState.TRANSMISSION

    # -- bytes out: replies to requests

    def reply_simple(self, cookie: int, error: int = 0) -> bytes:
        """A reply without data: success or an error, for any command but a
        structured READ (use :meth:`reply_read_error`)."""
        return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)

    def reply_done(self, cookie: int) -> bytes:
        """Success without data: a simple reply, or the structured NONE chunk
        (the only success a structured READ of 0 bytes can have)."""
        if not self.structured_replies:
            return self.reply_simple(cookie)
        return _CHUNK_HEADER.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0
        )

    def reply_read_header(self, cookie: int, offset: int, length: int) -> bytes:
        """Header for a successful READ; the caller sends ``length`` data
        bytes right after it.  One chunk, final."""
        if self.structured_replies:
            return _CHUNK_HEADER.pack(
                STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, 8 + length
            ) + struct.pack(">Q", offset)
        return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)

    def reply_command_error(self, cookie: int, error: int, message: str = "") -> bytes:
        """A failed command: an error chunk with a message when structured
        replies are on, else a simple reply."""
        if not error:
            raise ValueError("an error reply needs a non-zero error")
        if not self.structured_replies:
            return self.reply_simple(cookie, error)
        text = _message_bytes(message)
        return (
            _CHUNK_HEADER.pack(
                STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6 + len(text)
            )
            + struct.pack(">IH", error, len(text))
            + text
        )

    def reply_block_status(
        self, cookie: int, context_id: int, extents: Sequence[tuple[int, int]]
    ) -> bytes:
        """One block status chunk (final) for ``context_id``."""
        if not extents:
            raise ValueError("block status needs at least one extent")
        values = [v for extent in extents for v in extent]
        payload = struct.pack(f">I{len(values)}I", context_id, *values)
        return (
            _CHUNK_HEADER.pack(
                STRUCTURED_REPLY_MAGIC,
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                cookie,
                len(payload),
            )
            + payload
        )


class _InvalidOption(Exception):
    def __init__(self, message: str, reply_type: int = REP_ERR_INVALID) -> None:
        super().__init__(message)
        self.reply_type = reply_type


class _OptionReader:
    """Reads the fields of one option's data; a field past its end is an
    NBD_REP_ERR_INVALID, not a crash."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def unsigned(self, size: int) -> int:
        end = self._pos + size
        if end > len(self._data):
            raise _InvalidOption("option data too short")
        value = int.from_bytes(self._data[self._pos : end], "big")
        self._pos = end
        return value

    def string(self, what: str) -> str:
        length = self.unsigned(4)
        if length > MAX_STRING_LENGTH:
            raise _InvalidOption(f"{what} longer than {MAX_STRING_LENGTH} bytes", REP_ERR_TOO_BIG)
        end = self._pos + length
        if end > len(self._data):
            raise _InvalidOption(f"{what} longer than the option data")
        raw = self._data[self._pos : end]
        self._pos = end
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _InvalidOption(f"{what} is not valid UTF-8") from None

    def end(self) -> None:
        if self._pos != len(self._data):
            raise _InvalidOption("option data longer than its fields")
