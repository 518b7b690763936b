"""Two small NBD peers on the sans-I/O machines, for tests and the fuzz target.

``ToyServer`` answers a ServerConnection's events as a real read-only server
would (one export "disk"); ``ToyClient`` drives a ClientConnection through
structured replies, base:allocation, GO (or EXPORT_NAME) and a few requests.
Neither does I/O: ``converse`` passes their bytes to each other.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from vma_async import _nbd_proto as proto

DISK = bytes(range(256)) * 40  # 10240 bytes
ZERO_FROM = 8192  # the tail reads as zeroes


class ToyServer:
    """Answers every event of a ServerConnection the way a real server would,
    for one read-only export 'disk'."""

    def __init__(self) -> None:
        self.conn = proto.ServerConnection()
        self.out = bytearray(self.conn.greeting())
        self.events: list[object] = []

    def feed(self, data: bytes) -> None:
        self.conn.receive_data(data)
        while True:
            event = self.conn.next_event()
            if event is proto.NEED_DATA or event is proto.PAUSED:
                return
            self.events.append(event)
            self.answer(event)
            if isinstance(event, proto.ConnectionClosed | proto.Disconnect | proto.AbortRequest):
                return

    def answer(self, event: object) -> None:
        conn, out = self.conn, self.out
        if isinstance(event, proto.ListRequest):
            out += conn.reply_server("disk", "a test disk") + conn.reply_ack(proto.OPT_LIST)
        elif isinstance(event, proto.AbortRequest):
            out += conn.reply_ack(proto.OPT_ABORT)
        elif isinstance(event, proto.StructuredReplyRequest):
            out += conn.reply_ack(proto.OPT_STRUCTURED_REPLY)
        elif isinstance(event, proto.MetaContextRequest):
            if (
                proto.BASE_ALLOCATION in event.queries
                or event.option == proto.OPT_LIST_META_CONTEXT
            ):
                out += conn.reply_meta_context(event.option, 7, proto.BASE_ALLOCATION)
            out += conn.reply_ack(event.option)
        elif isinstance(event, proto.GoRequest):
            if event.name != "disk":
                out += conn.reply_error(event.option, proto.REP_ERR_UNKNOWN, "no such export")
                return
            out += conn.reply_info_export(
                event.option, len(DISK), proto.TransmissionFlags.READ_ONLY
            )
            out += conn.reply_info_block_size(event.option, 1, 4096, proto.MAX_PAYLOAD)
            out += (
                conn.reply_go_ack()
                if event.option == proto.OPT_GO
                else conn.reply_ack(proto.OPT_INFO)
            )
        elif isinstance(event, proto.ExportNameRequest):
            out += conn.reply_export_name(len(DISK), proto.TransmissionFlags.READ_ONLY)
        elif isinstance(event, proto.InvalidOptionRequest):
            out += conn.reply_error(event.option, event.reply_type, event.message)
        elif isinstance(event, proto.Request):
            end = event.offset + event.length
            if end > len(DISK) or event.command not in (proto.CMD_READ, proto.CMD_BLOCK_STATUS):
                out += conn.reply_command_error(event.cookie, proto.EINVAL, "no")
            elif event.command == proto.CMD_READ:
                out += conn.reply_read_header(event.cookie, event.offset, event.length)
                out += DISK[event.offset : end]
            else:
                runs = []
                if event.offset < ZERO_FROM:
                    runs.append((min(end, ZERO_FROM) - event.offset, 0))
                if end > ZERO_FROM:
                    runs.append((end - max(event.offset, ZERO_FROM), 3))
                out += conn.reply_block_status(event.cookie, 7, runs)


class ToyClient:
    """Drives a ClientConnection through structured replies, base:allocation,
    GO (or EXPORT_NAME after a refusal), then a few requests."""

    def __init__(self, *, structured: bool = True) -> None:
        self.conn = proto.ClientConnection()
        self.out = bytearray()
        self.events: list[object] = []
        self.structured = structured
        self.requests: dict[int, tuple[int, int, int]] = {}

    def feed(self, data: bytes) -> None:
        self.conn.receive_data(data)
        while True:
            event = self.conn.next_event()
            if event is proto.NEED_DATA:
                return
            self.events.append(event)
            self.react(event)
            if isinstance(event, proto.ConnectionClosed):
                return

    def react(self, event: object) -> None:
        conn, out = self.conn, self.out
        if isinstance(event, proto.ServerGreeting):
            out += conn.send_client_flags()
            out += conn.send_structured_reply() if self.structured else conn.send_list()
        elif isinstance(event, proto.OptionAck):
            if event.option == proto.OPT_STRUCTURED_REPLY:
                out += conn.send_meta_context("disk", [proto.BASE_ALLOCATION])
            elif event.option == proto.OPT_SET_META_CONTEXT:
                out += conn.send_go("disk", info_requests=[proto.INFO_BLOCK_SIZE])
            elif event.option == proto.OPT_LIST:
                out += conn.send_export_name("disk")
        elif isinstance(event, proto.OptionRefused):
            out += conn.send_export_name("disk")
        elif isinstance(event, proto.TransmissionStarted):
            plan = [
                (proto.CMD_READ, 0, 4096),
                (proto.CMD_READ, 5000, 5240),
                (proto.CMD_READ, 10000, 1000),
            ]
            if conn.meta_contexts:
                plan.append((proto.CMD_BLOCK_STATUS, 4096, 6144))
            for command, offset, length in plan:
                cookie, header = conn.send_request(command, offset, length)
                self.requests[cookie] = (command, offset, length)
                out += header


def converse(
    client: ToyClient, server: ToyServer, chunk: Callable[[], int] = lambda: 1 << 20
) -> None:
    """Pass bytes both ways, in chunks of ``chunk()`` bytes, until both are quiet."""
    while client.out or server.out:
        if server.out:
            size = chunk()
            data, server.out[:] = bytes(server.out[:size]), server.out[size:]
            client.feed(data)
        if client.out:
            size = chunk()
            data, client.out[:] = bytes(client.out[:size]), client.out[size:]
            server.feed(data)


def recorded_session() -> tuple[bytes, bytes]:
    """The bytes each side sent in one complete structured session."""
    to_server, handshake_replies, request_replies = recorded_session_parts()
    return to_server, handshake_replies + request_replies


def recorded_session_parts() -> tuple[bytes, bytes, bytes]:
    """What the client sent, and what the server sent split where the
    transmission phase starts: the handshake replies (up to GO's ack), then
    the replies to the requests."""
    client, server = ToyClient(), ToyServer()
    to_server, to_client = bytearray(), bytearray()
    split: int | None = None
    while client.out or server.out:
        if server.out:
            data = bytes(server.out)
            server.out.clear()
            to_client += data
            client.feed(data)
        if client.out:
            data = bytes(client.out)
            client.out.clear()
            to_server += data
            server.feed(data)
            if split is None and server.conn.in_transmission:
                split = len(to_client) + len(server.out)
    assert split is not None
    return bytes(to_server), bytes(to_client[:split]), bytes(to_client[split:])


def mutate(data: bytes, rng: random.Random) -> bytes:
    """``data`` with a few random flips, overwrites, cuts, insertions, huge
    length fields or a truncation."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not buf:
            break
        at = rng.randrange(len(buf))
        kind = rng.randrange(6)
        if kind == 0:
            buf[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            buf[at] = rng.randrange(256)
        elif kind == 2:
            del buf[at : at + rng.randint(1, 16)]
        elif kind == 3:
            buf[at:at] = rng.randbytes(rng.randint(1, 16))
        elif kind == 4:  # a length or offset field gone huge
            buf[at : at + 4] = rng.choice(
                [b"\xff\xff\xff\xff", b"\x80\x00\x00\x00", b"\x00\x00\x00\x00"]
            )
        else:
            del buf[at:]
    return bytes(buf)
