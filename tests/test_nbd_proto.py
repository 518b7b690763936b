"""The sans-I/O NBD core, without an event loop: the client and server state
machines talk to each other in memory; hostile bytes get NbdProtocolError
(or an error reply) and never an allocation the size of a length field; a
seeded mutation fuzz of both machines, bounded and fast."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator

import pytest
from nbd_peers import DISK, ToyClient, ToyServer, converse, mutate, recorded_session

from vma_async import NbdProtocolError
from vma_async import _nbd_proto as proto


def reads_of(client: ToyClient) -> dict[int, bytes]:
    data: dict[int, bytearray] = {}
    for event in client.events:
        if isinstance(event, proto.ReadChunk):
            offset = client.requests[event.cookie][1]
            buf = data.setdefault(event.cookie, bytearray(client.requests[event.cookie][2]))
            buf[event.offset - offset : event.offset - offset + len(event.data)] = event.data
    return {cookie: bytes(buf) for cookie, buf in data.items()}


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
@pytest.mark.parametrize("chunk", [1 << 20, 1, 7], ids=["whole", "bytewise", "7-byte"])
def test_a_whole_session_in_memory(structured: bool, chunk: int) -> None:
    client, server = ToyClient(structured=structured), ToyServer()
    converse(client, server, lambda: chunk)
    assert client.conn.in_transmission
    assert server.conn.in_transmission
    assert client.conn.size == len(DISK)
    assert client.conn.structured_replies is structured
    done = [e for e in client.events if isinstance(e, proto.ReplyDone)]
    errors = {d.cookie: d.error for d in done}
    assert sorted(errors) == sorted(client.requests)
    read_cookies = [c for c, (cmd, _, _) in client.requests.items() if cmd == proto.CMD_READ]
    assert errors[read_cookies[2]] == proto.EINVAL  # 10000 + 1000 is past the end
    got = reads_of(client)
    assert got[read_cookies[0]] == DISK[:4096]
    assert got[read_cookies[1]] == DISK[5000:]
    status = [e for e in client.events if isinstance(e, proto.BlockStatusChunk)]
    if structured:
        assert [s.extents for s in status] == [((8192 - 4096, 0), (2048, 3))]
        assert client.conn.meta_contexts == {7: proto.BASE_ALLOCATION}
    else:
        assert status == []
        assert [e for e in client.events if isinstance(e, proto.ExportListed)] == [
            proto.ExportListed("disk", "a test disk")
        ]
    # a clean end: DISC, then the server sees it and then the end of stream
    _, disc = client.conn.send_request(proto.CMD_DISC)
    server.feed(disc)
    assert isinstance(server.events[-1], proto.Disconnect)
    server.feed(b"")
    client.feed(b"")
    assert isinstance(client.events[-1], proto.ConnectionClosed)


def test_the_server_pauses_until_go_is_answered() -> None:
    server = proto.ServerConnection()
    server.receive_data(struct.pack(">I", 1))
    name = b"disk"
    go = (
        struct.pack(">QII", proto.IHAVEOPT, proto.OPT_GO, 4 + len(name) + 2)
        + struct.pack(">I", 4)
        + name
        + bytes(2)
    )
    server.receive_data(
        go + struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_READ, 1, 0, 1)
    )
    assert server.next_event() == proto.GoRequest(proto.OPT_GO, "disk", ())
    assert server.next_event() is proto.PAUSED
    server.reply_go_ack()
    assert server.next_event() == proto.Request(1, proto.CMD_READ, 0, 0, 1)
    assert server.next_event() is proto.NEED_DATA


def server_after_flags() -> proto.ServerConnection:
    server = proto.ServerConnection()
    server.receive_data(struct.pack(">I", 1))
    return server


def test_huge_lengths_fail_before_anything_is_buffered() -> None:
    server = server_after_flags()
    server.receive_data(struct.pack(">QII", proto.IHAVEOPT, 1234, 0xFFFFFFFF))
    with pytest.raises(NbdProtocolError, match="option 1234 with 4294967295 bytes"):
        server.next_event()

    client = proto.ClientConnection()
    client.receive_data(proto.ServerConnection().greeting())
    assert isinstance(client.next_event(), proto.ServerGreeting)
    client.send_client_flags()
    client.send_list()
    client.receive_data(
        struct.pack(">QIII", proto.OPTION_REPLY_MAGIC, proto.OPT_LIST, proto.REP_SERVER, 1 << 31)
    )
    with pytest.raises(NbdProtocolError, match="option reply of 2147483648 bytes"):
        client.next_event()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "bad NBD option magic"),
        (
            struct.pack(">QII", proto.IHAVEOPT, proto.OPT_EXPORT_NAME, 5000) + bytes(5000),
            "longer than 4096",
        ),
        (b"", None),
    ],
)
def test_server_option_errors(data: bytes, message: str | None) -> None:
    server = server_after_flags()
    server.receive_data(data)
    if message is None:  # the end of stream between options is a clean close
        assert server.next_event() == proto.ConnectionClosed()
        return
    with pytest.raises(NbdProtocolError, match=message):
        server.next_event()


def test_unknown_client_flags_and_bad_greetings() -> None:
    server = proto.ServerConnection()
    server.receive_data(struct.pack(">I", 0x80))
    with pytest.raises(NbdProtocolError, match="unknown client flags"):
        server.next_event()
    client = proto.ClientConnection()
    client.receive_data(b"NBDMAGIC" + struct.pack(">Q", 0x00420281861253))
    with pytest.raises(NbdProtocolError, match="oldstyle"):
        client.next_event()
    client = proto.ClientConnection()
    client.receive_data(b"SSH-2.0-")
    with pytest.raises(NbdProtocolError, match="not an NBD server"):
        client.next_event()


def drain(conn: proto.ClientConnection) -> None:
    while conn.next_event() is not proto.NEED_DATA:
        pass


def transmitting_client(structured: bool = True) -> tuple[ToyClient, ToyServer]:
    client, server = ToyClient(structured=structured), ToyServer()
    client.react = lambda event: (
        ToyClient.react(client, event) if not isinstance(event, proto.TransmissionStarted) else None
    )  # type: ignore[method-assign]
    converse(client, server)
    assert client.conn.in_transmission
    return client, server


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (lambda c: struct.pack(">IIQ", proto.SIMPLE_REPLY_MAGIC, 0, c + 1), "unknown cookie"),
        (lambda c: struct.pack(">IIQ", 0xDEADBEEF, 0, c), "bad NBD reply magic"),
        (
            lambda c: struct.pack(">IHHQI", proto.STRUCTURED_REPLY_MAGIC, 1, 1, c, 8 + 4097),
            "too long",
        ),
        (
            lambda c: (
                struct.pack(">IHHQIQ", proto.STRUCTURED_REPLY_MAGIC, 1, 1, c, 12, 9000) + b"abcd"
            ),
            "outside the requested range",
        ),
        (
            lambda c: struct.pack(">IHHQI", proto.STRUCTURED_REPLY_MAGIC, 1, 0, c, 0),
            "did not cover",
        ),
        (
            lambda c: struct.pack(">IHHQI", proto.STRUCTURED_REPLY_MAGIC, 1, 5, c, 12) + bytes(12),
            "block status in the reply to a request other",
        ),
        (
            lambda c: struct.pack(">IHHQI", proto.STRUCTURED_REPLY_MAGIC, 1, 99, c, 0),
            "unknown NBD structured reply type 99",
        ),
        (
            lambda c: struct.pack(">IIQ", proto.SIMPLE_REPLY_MAGIC, 0, c),
            "simple NBD reply with data",
        ),
    ],
)
def test_client_rejects_broken_replies(reply: Callable[[int], bytes], message: str) -> None:
    client, _ = transmitting_client()
    cookie, _ = client.conn.send_request(proto.CMD_READ, 0, 4096)
    client.conn.receive_data(reply(cookie))
    with pytest.raises(NbdProtocolError, match=message):
        drain(client.conn)


def test_error_chunks_finish_with_the_first_error_and_message() -> None:
    client, _ = transmitting_client()
    cookie, _ = client.conn.send_request(proto.CMD_READ, 0, 4096)
    message = b"disk on fire"
    chunk = struct.pack(">IH", proto.EIO, len(message)) + message
    client.conn.receive_data(
        struct.pack(
            ">IHHQI", proto.STRUCTURED_REPLY_MAGIC, 0, proto.REPLY_TYPE_ERROR, cookie, len(chunk)
        )
        + chunk
    )
    client.conn.receive_data(struct.pack(">IHHQI", proto.STRUCTURED_REPLY_MAGIC, 1, 0, cookie, 0))
    assert client.conn.next_event() == proto.ReplyDone(cookie, proto.EIO, "disk on fire")
    client.conn.receive_data(b"")
    assert client.conn.next_event() == proto.ConnectionClosed()


def test_a_structured_read_of_nothing_is_one_done_chunk() -> None:
    client, server = transmitting_client()
    cookie, header = client.conn.send_request(proto.CMD_READ, 100, 0)
    server.conn.receive_data(header)
    request = server.conn.next_event()
    assert request == proto.Request(cookie, proto.CMD_READ, 0, 100, 0)
    client.conn.receive_data(server.conn.reply_done(cookie))
    assert client.conn.next_event() == proto.ReplyDone(cookie, 0, "")


def test_end_of_stream_with_requests_pending_is_an_error() -> None:
    client, _ = transmitting_client()
    client.conn.send_request(proto.CMD_READ, 0, 1)
    client.conn.receive_data(b"")
    with pytest.raises(NbdProtocolError, match="1 request\\(s\\) unanswered"):
        client.conn.next_event()


def test_misuse_is_a_runtime_error_not_a_protocol_error() -> None:
    client = proto.ClientConnection()
    with pytest.raises(RuntimeError):
        client.send_request(proto.CMD_READ, 0, 1)
    with pytest.raises(RuntimeError):
        client.send_list()
    server = proto.ServerConnection()
    with pytest.raises(RuntimeError):
        server.reply_go_ack()


# --- mutation fuzz ------------------------------------------------------------------


def chunks(data: bytes, rng: random.Random) -> Iterator[bytes]:
    at = 0
    while at < len(data):
        size = rng.choice([1, 3, 16, 100, 4096])
        yield data[at : at + size]
        at += size
    yield b""


BUFFER_BOUND = proto.MAX_OPTION_LENGTH + 4096 + 64  # a message being parsed plus one chunk


@pytest.mark.parametrize("side", ["server", "client"])
@pytest.mark.parametrize("seed", range(4))
def test_mutation_fuzz_of_each_machine(side: str, seed: int) -> None:
    """A recorded session's bytes, mutated, fed to a fresh machine in random
    pieces: events or NbdProtocolError, nothing else, and a bounded buffer."""
    to_server, to_client = recorded_session()
    received = to_server if side == "server" else to_client
    rng = random.Random(seed)
    outcomes = {"protocol error": 0, "survived": 0}
    for _ in range(300):
        peer: ToyServer | ToyClient = ToyServer() if side == "server" else ToyClient()
        try:
            for piece in chunks(mutate(received, rng), rng):
                peer.feed(piece)
                assert len(peer.conn._buffer) <= BUFFER_BOUND
                if peer.events and isinstance(
                    peer.events[-1], proto.ConnectionClosed | proto.Disconnect
                ):
                    break
            outcomes["survived"] += 1
        except NbdProtocolError:
            outcomes["protocol error"] += 1
    assert outcomes["protocol error"]
    assert outcomes["survived"]
