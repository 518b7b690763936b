"""NbdClient against a server no one here wrote (qemu-nbd), and against
hostile fake servers that break the protocol."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from nbd_peers import mutate, recorded_session_parts

from tests.harness import FdLeakCheck
from vma_async import NbdCommandError, NbdError, NbdOptionError, NbdProtocolError
from vma_async import _nbd_proto as proto
from vma_async._nbd_client import NbdClient, StreamReceiver, list_nbd_exports

pytestmark = pytest.mark.anyio

QEMU_NBD = shutil.which("qemu-nbd")
requires_qemu_nbd = pytest.mark.skipif(
    QEMU_NBD is None, reason="qemu-nbd missing (apt-get install qemu-utils)"
)

IMAGE_SIZE = 3 * 1024 * 1024 + 7 * 512  # odd: not a multiple of 64 KiB or 4 KiB


def start_qemu_nbd(image: Path, sock: Path, *args: str) -> subprocess.Popen[bytes]:
    """qemu-nbd on a listening socket we created (systemd socket activation),
    so the socket accepts connections before the child even runs: no wait."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    listener.listen(16)
    fd = listener.fileno()
    command = " ".join(
        [QEMU_NBD or "qemu-nbd", "-f", "raw", "-x", "disk", "--persistent", *args, str(image)]
    )
    child = subprocess.Popen(
        ["sh", "-c", f"LISTEN_PID=$$ LISTEN_FDS=1 exec {command}"],
        pass_fds=(3,),
        preexec_fn=lambda: os.dup2(fd, 3),  # the listening socket as fd 3
        stderr=subprocess.PIPE,
    )
    listener.close()
    return child


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    """A sparse image: random data in the first MiB, a hole, data near the end."""
    path = tmp_path / "disk.raw"
    data = bytearray(IMAGE_SIZE)
    data[: 1 << 20] = os.urandom(1 << 20)
    data[-5000:] = os.urandom(5000)
    with open(path, "wb") as f:
        f.write(data[: 1 << 20])
        f.seek(IMAGE_SIZE - 5000)
        f.write(data[-5000:])
    return path, bytes(data)


@pytest.fixture
def qemu_server(tmp_path: Path) -> Iterator[Callable[..., str]]:
    children: list[subprocess.Popen[bytes]] = []

    def start(image: Path, *args: str) -> str:
        sock = tmp_path / f"qemu{len(children)}.sock"
        children.append(start_qemu_nbd(image, sock, *args))
        return f"unix:{sock}"

    yield start
    for child in children:
        child.terminate()
        child.wait(timeout=10)
        assert child.stderr is not None
        child.stderr.close()


@requires_qemu_nbd
async def test_reads_match_the_image_with_requests_pipelined_from_many_tasks(
    image: tuple[Path, bytes], qemu_server: Callable[..., str]
) -> None:
    path, data = image
    address = qemu_server(path, "-r")
    async with NbdClient.connect(address, "disk") as client:
        assert client.size == IMAGE_SIZE
        assert client.export_name == "disk"
        assert client.flags & proto.TransmissionFlags.READ_ONLY
        assert await client.read(0, IMAGE_SIZE) == data
        results: dict[int, bytes] = {}

        async def read_at(offset: int) -> None:
            results[offset] = await client.read(offset, 70001)

        offsets = list(range(0, IMAGE_SIZE - 70001, 123457))
        async with anyio.create_task_group() as tg:
            for offset in offsets:
                tg.start_soon(read_at, offset)
        for offset in offsets:
            assert results[offset] == data[offset : offset + 70001]
        # the last odd bytes of the export
        assert await client.read(IMAGE_SIZE - 3, 3) == data[-3:]


@requires_qemu_nbd
async def test_write_write_zeroes_trim_flush_reach_the_file(
    image: tuple[Path, bytes], qemu_server: Callable[..., str]
) -> None:
    path, data = image
    expected = bytearray(data)
    address = qemu_server(path, "--cache=none", "--discard=unmap")
    async with NbdClient.connect(address, "disk") as client:
        assert not client.flags & proto.TransmissionFlags.READ_ONLY
        payload = os.urandom(100_000)
        await client.write(12345, payload)
        expected[12345 : 12345 + len(payload)] = payload
        await client.write(2 << 20, b"fua!", fua=True)
        expected[2 << 20 : (2 << 20) + 4] = b"fua!"
        await client.write_zeroes(65536, 131072)
        expected[65536 : 65536 + 131072] = bytes(131072)
        await client.write_zeroes(200_000, 5000, no_hole=True)
        expected[200_000:205_000] = bytes(5000)
        await client.trim(IMAGE_SIZE - 5000 - 4096, 4096)  # was a hole already: reads back zero
        await client.flush()
        assert await client.read(0, IMAGE_SIZE) == bytes(expected)
        status = await client.block_status(65536, 131072)
        assert sum(length for length, _ in status) == 131072
        assert all(flags & proto.STATE_ZERO for _, flags in status)
    assert path.read_bytes() == bytes(expected)


@requires_qemu_nbd
async def test_block_status_reports_data_and_holes_of_a_sparse_file(
    image: tuple[Path, bytes], qemu_server: Callable[..., str]
) -> None:
    path, _ = image
    address = qemu_server(path, "-r")
    async with NbdClient.connect(address, "disk") as client:
        runs = await client.block_status(0, IMAGE_SIZE)
        assert sum(length for length, _ in runs) == IMAGE_SIZE
        assert runs[0] == (1 << 20, 0)
        assert runs[1][1] == proto.STATE_HOLE | proto.STATE_ZERO
        assert runs[-1][1] == 0
        # a range inside the hole, and one clipped at the end
        assert await client.block_status(2 << 20, 4096) == [(4096, 3)]
        tail = await client.block_status(IMAGE_SIZE - 100, 10_000)
        assert sum(length for length, _ in tail) == 100


@requires_qemu_nbd
async def test_errors_from_the_server_leave_the_client_usable(
    image: tuple[Path, bytes], qemu_server: Callable[..., str]
) -> None:
    path, data = image
    address = qemu_server(path, "-r")
    async with NbdClient.connect(address, "disk") as client:
        with pytest.raises(NbdCommandError, match="READ of 10 bytes at offset") as caught:
            await client.read(IMAGE_SIZE - 1, 10)
        assert caught.value.errno == errno.EINVAL
        with pytest.raises(NbdCommandError, match="WRITE of 1 bytes.*read-only") as caught:
            await client.write(0, b"x")
        assert caught.value.errno in (errno.EPERM, errno.EINVAL)  # qemu-nbd says EINVAL
        assert await client.read(0, 4096) == data[:4096]


@requires_qemu_nbd
async def test_unknown_export_and_listing(
    image: tuple[Path, bytes], qemu_server: Callable[..., str]
) -> None:
    path, _ = image
    address = qemu_server(path, "-r")
    with pytest.raises(NbdOptionError, match="refused export 'nope' \\(unknown export\\)"):
        await NbdClient.connect(address, "nope")
    assert await list_nbd_exports(address) == [("disk", "")]


@requires_qemu_nbd
async def test_cancelling_one_request_keeps_the_others_and_leaks_nothing(
    image: tuple[Path, bytes], qemu_server: Callable[..., str]
) -> None:
    path, data = image
    address = qemu_server(path, "-r")
    before = FdLeakCheck.snapshot()
    client = await NbdClient.connect(address, "disk")
    results: dict[int, bytes] = {}

    async def reader(offset: int) -> None:
        results[offset] = await client.read(offset, 1 << 20)

    with anyio.CancelScope() as scope:
        scope.cancel()  # cancelled at its first checkpoint: maybe after the send
        await client.read(0, 1 << 20)

    async def cancelled_reader(*, task_status: anyio.abc.TaskStatus[anyio.CancelScope]) -> None:
        with anyio.CancelScope() as scope:
            task_status.started(scope)
            await reader(1 << 20)

    async with anyio.create_task_group() as tg:
        for offset in (0, 4096, 8192):
            tg.start_soon(reader, offset)
        scope = await tg.start(cancelled_reader)
        await anyio.lowlevel.checkpoint()  # it may be sent, or waiting: either is fine
        scope.cancel()
    assert 1 << 20 not in results  # cancelled before it was sent
    assert results == {o: data[o : o + (1 << 20)] for o in (0, 4096, 8192)}
    assert await client.read(100, 100) == data[100:200]
    await client.aclose()
    with pytest.raises(NbdError, match="closed"):
        await client.read(0, 1)
    FdLeakCheck().assert_same(before)


async def test_connecting_to_nothing_is_an_nbd_error(tmp_path: Path) -> None:
    with pytest.raises(NbdError, match="cannot connect to the NBD server"):
        await NbdClient.connect(f"unix:{tmp_path}/absent.sock", "x")


# --- hostile servers ----------------------------------------------------------


GREETING = proto.ServerConnection().greeting()


async def run_against(
    tmp_path: Path, behave: Callable[[anyio.abc.SocketStream], object]
) -> BaseException:
    """A one-connection server that plays ``behave``; returns what the client raised."""
    sock = tmp_path / "fake.sock"
    listener = await anyio.create_unix_listener(sock)
    caught: BaseException | None = None
    async with listener, anyio.create_task_group() as tg:

        async def serve_one() -> None:
            stream = await listener.accept()
            async with stream:
                await behave(stream)  # type: ignore[misc]

        tg.start_soon(serve_one)
        try:
            async with NbdClient.connect(f"unix:{sock}", "disk") as client:
                await client.read(0, 4096)
        except NbdError as error:
            caught = error
    assert caught is not None, "the client accepted a broken server"
    return caught


async def handshake_then(
    stream: anyio.abc.SocketStream, *, structured: bool = False, go: bool = True
) -> proto.ServerConnection:
    """Play a well-behaved handshake up to GO, answering export 'disk' (an old
    server without ``go`` refuses GO and takes EXPORT_NAME)."""
    server = proto.ServerConnection()
    await stream.send(server.greeting())
    while True:
        event = server.next_event()
        if event is proto.NEED_DATA:
            server.receive_data(await stream.receive())
            continue
        if isinstance(event, proto.StructuredReplyRequest):
            if structured:
                await stream.send(server.reply_ack(proto.OPT_STRUCTURED_REPLY))
            else:
                await stream.send(
                    server.reply_error(proto.OPT_STRUCTURED_REPLY, proto.REP_ERR_UNSUP)
                )
        elif isinstance(event, proto.MetaContextRequest):
            await stream.send(server.reply_meta_context(event.option, 1, proto.BASE_ALLOCATION))
            await stream.send(server.reply_ack(event.option))
        elif isinstance(event, proto.GoRequest) and not go:
            await stream.send(server.reply_error(event.option, proto.REP_ERR_UNSUP))
        elif isinstance(event, proto.GoRequest):
            await stream.send(server.reply_info_export(event.option, 1 << 20, 0))
            await stream.send(server.reply_go_ack())
            return server
        elif isinstance(event, proto.ExportNameRequest):
            assert event.name == "disk"
            await stream.send(server.reply_export_name(1 << 20, proto.TransmissionFlags.READ_ONLY))
            return server
        else:
            raise AssertionError(event)


async def next_request(
    stream: anyio.abc.SocketStream, server: proto.ServerConnection
) -> proto.Request:
    while True:
        event = server.next_event()
        if isinstance(event, proto.Request):
            return event
        server.receive_data(await stream.receive())


async def test_a_server_with_bad_magic_is_a_protocol_error(tmp_path: Path) -> None:
    async def behave(stream: anyio.abc.SocketStream) -> None:
        await stream.send(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    error = await run_against(tmp_path, behave)
    assert isinstance(error, NbdProtocolError)
    assert "not an NBD server" in str(error)


async def test_a_reply_for_an_unknown_cookie_is_a_protocol_error(tmp_path: Path) -> None:
    async def behave(stream: anyio.abc.SocketStream) -> None:
        server = await handshake_then(stream)
        request = await next_request(stream, server)
        await stream.send(server.reply_simple(request.cookie + 99))
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()  # the client hangs up

    error = await run_against(tmp_path, behave)
    assert isinstance(error, NbdProtocolError)
    assert "unknown cookie" in str(error)


async def test_a_server_vanishing_mid_reply_fails_the_request(tmp_path: Path) -> None:
    async def behave(stream: anyio.abc.SocketStream) -> None:
        server = await handshake_then(stream, structured=True)
        request = await next_request(stream, server)
        await stream.send(server.reply_read_header(request.cookie, 0, 4096) + b"half")

    error = await run_against(tmp_path, behave)
    assert isinstance(error, NbdProtocolError)
    assert "closed the connection in the middle of a message" in str(error)


async def test_a_huge_reply_length_is_refused_before_allocation(tmp_path: Path) -> None:
    async def behave(stream: anyio.abc.SocketStream) -> None:
        server = await handshake_then(stream, structured=True)
        request = await next_request(stream, server)
        header = proto._CHUNK_HEADER.pack(
            proto.STRUCTURED_REPLY_MAGIC,
            1,
            proto.REPLY_TYPE_OFFSET_DATA,
            request.cookie,
            0xFFFFFFFF,
        )
        await stream.send(header)
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()

    error = await run_against(tmp_path, behave)
    assert isinstance(error, NbdProtocolError)
    assert "too long" in str(error)


async def test_an_old_server_without_go_or_structured_replies(tmp_path: Path) -> None:
    sock = tmp_path / "old.sock"
    listener = await anyio.create_unix_listener(sock)
    async with listener, anyio.create_task_group() as tg:

        async def old_server() -> None:
            stream = await listener.accept()
            async with stream:
                server = await handshake_then(stream, go=False)
                request = await next_request(stream, server)
                await stream.send(server.reply_read_header(request.cookie, 0, 5) + b"hello")
                with pytest.raises(anyio.EndOfStream):
                    await next_request(stream, server)  # the client's DISC, then the end

        tg.start_soon(old_server)
        async with NbdClient.connect(f"unix:{sock}", "disk") as client:
            assert client.size == 1 << 20
            assert client.flags & proto.TransmissionFlags.READ_ONLY
            assert await client.block_status(0, 100) == [(100, 0)]  # no context: all data
            assert await client.read(0, 5) == b"hello"


async def test_mutated_server_streams_only_ever_raise_nbd_errors(tmp_path: Path) -> None:
    """A recorded server session, mutated, played to the real NbdClient making
    the same four requests at once: it either works or raises NbdError."""
    _, handshake, replies = recorded_session_parts()
    rng = random.Random(11)
    sock = tmp_path / "mutant.sock"
    outcomes = {"ok": 0, "NbdError": 0}

    async def play(listener: anyio.abc.SocketListener, first: bytes, then: bytes | None) -> None:
        """Send ``first``; then, if any, ``then`` once the client's four
        requests are in; then nothing more."""
        conn = proto.ServerConnection()  # only to count the client's requests
        requests = 0
        stream = await listener.accept()
        receiver = StreamReceiver(stream)
        gone = (anyio.BrokenResourceError, OSError, NbdProtocolError)
        async with stream:
            with contextlib.suppress(*gone):
                await stream.send(first)
                while then is not None and requests < 4:
                    event = conn.next_event()
                    if event is proto.PAUSED:
                        conn.reply_go_ack()
                    elif event is proto.NEED_DATA:
                        conn.receive_data(await receiver.receive())
                    requests += isinstance(event, proto.Request)
                await stream.send(then or b"")
                await stream.send_eof()  # all it will ever say
                while await receiver.receive():  # until the client hangs up
                    pass

    async def use(client: NbdClient) -> None:
        failures: list[NbdError] = []

        async def request(offset: int, length: int, status: bool = False) -> None:
            try:
                if status:
                    await client.block_status(offset, length)
                else:
                    await client.read(offset, length)
            except NbdCommandError:
                pass  # the server's answer: fine
            except NbdError as error:
                failures.append(error)

        # Cookies 1 to 4 in this order, as recorded (trio shuffles task starts,
        # so each request gets its cookie before the next one starts).
        async with anyio.create_task_group() as tg:
            plan = [(0, 4096, False), (5000, 5240, False), (10000, 1000, False), (4096, 6144, True)]
            for count, (offset, length, status) in enumerate(plan, start=1):
                tg.start_soon(request, offset, length, status)
                while client._conn._next_cookie <= count and not failures:  # cookies from 1
                    await anyio.lowlevel.checkpoint()
        if failures:
            raise failures[0]

    listener = await anyio.create_unix_listener(sock)
    async with listener:
        for attempt in range(40):
            first, then = handshake, replies  # the first attempt intact
            if attempt % 3 == 1:  # a broken handshake, and nothing after it
                first, then = mutate(handshake, rng), None
            elif attempt:
                then = mutate(replies, rng)
            async with anyio.create_task_group() as tg:
                tg.start_soon(play, listener, first, then)
                try:
                    with anyio.fail_after(10):
                        async with NbdClient.connect(f"unix:{sock}", "disk") as client:
                            await use(client)
                    outcomes["ok"] += 1
                except NbdError:
                    outcomes["NbdError"] += 1
    assert outcomes["ok"] > 1
    assert outcomes["NbdError"]
