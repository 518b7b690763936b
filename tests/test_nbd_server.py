"""serve_nbd with in-memory exports: our client, raw hostile clients, limits,
cancellation.  (Clients no one here wrote are in test_serve.py.)"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest
from nbd_peers import DISK, mutate, recorded_session

from tests.harness import FdLeakCheck
from vma_async import (
    NbdClient,
    NbdCommandError,
    NbdError,
    NbdExport,
    NbdOptionError,
    NbdProtocolError,
    serve_nbd,
)
from vma_async import _nbd_proto as proto
from vma_async._nbd_client import list_nbd_exports

pytestmark = pytest.mark.anyio


class MemoryExport(NbdExport):
    """A writable in-memory disk that records how many requests and bytes it
    holds at once; ``gate`` (if set) holds reads at ``gated_offset``."""

    def __init__(self, name: str, data: bytes, *, read_only: bool = False) -> None:
        self.name = name
        self.size = len(data)
        self.data = bytearray(data)
        self.read_only = read_only
        self.active = self.peak_active = self.active_bytes = self.peak_bytes = 0
        self.gate: anyio.Event | None = None
        self.gated_offset = -1
        self.flushes = 0

    async def read(self, offset: int, length: int) -> bytes:
        self.active += 1
        self.active_bytes += length
        self.peak_active = max(self.peak_active, self.active)
        self.peak_bytes = max(self.peak_bytes, self.active_bytes)
        try:
            if self.gate is not None and offset == self.gated_offset:
                await self.gate.wait()
            await anyio.lowlevel.checkpoint()
            return bytes(self.data[offset : offset + length])
        finally:
            self.active -= 1
            self.active_bytes -= length

    def block_status(self, offset: int, length: int) -> Sequence[tuple[int, int]]:
        runs = []
        for start in range(offset, offset + length, 4096):
            size = min(4096, offset + length - start)
            zero = not any(self.data[start : start + size])
            runs.append((size, proto.STATE_HOLE | proto.STATE_ZERO if zero else 0))
        return runs

    async def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data

    async def write_zeroes(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)

    async def flush(self) -> None:
        self.flushes += 1


async def read_failing(client: NbdClient, offset: int, errors: list[BaseException]) -> None:
    """A read that is expected to fail (the server or the client goes away)."""
    try:
        await client.read(offset, 10)
    except NbdError as error:
        errors.append(error)


@asynccontextmanager
async def serving(exports: Sequence[NbdExport], sock: Path, **options: int) -> AsyncIterator[str]:
    async with anyio.create_task_group() as tg:
        address = await tg.start(
            lambda task_status: serve_nbd(
                exports, unix_socket=sock, task_status=task_status, **options
            )
        )
        yield str(address)
        tg.cancel_scope.cancel()


async def test_client_and_server_round_trip_every_command(tmp_path: Path) -> None:
    disk = MemoryExport("disk", os.urandom(300_001))
    expected = bytearray(disk.data)
    async with (
        serving([disk], tmp_path / "s.sock") as address,
        NbdClient.connect(address, "disk") as client,
    ):
        assert client.size == 300_001
        flags = client.flags
        assert flags & proto.TransmissionFlags.SEND_FLUSH
        assert flags & proto.TransmissionFlags.CAN_MULTI_CONN
        assert not flags & proto.TransmissionFlags.READ_ONLY
        await client.write(7, b"written")
        expected[7:14] = b"written"
        await client.write_zeroes(4096, 8192)
        expected[4096:12288] = bytes(8192)
        await client.trim(0, 4096)  # a hint the export ignores
        await client.write(100, b"fua", fua=True)
        expected[100:103] = b"fua"
        await client.flush()
        assert disk.flushes == 2  # FUA and FLUSH
        assert await client.read(0, 300_001) == bytes(expected)
        assert await client.block_status(4096, 8192) == [(8192, 3)]
        assert await client.block_status(0, 10) == [(10, 0)]
        with pytest.raises(NbdCommandError, match="beyond the export") as caught:
            await client.read(300_000, 2)
        assert caught.value.errno == proto.EINVAL
        assert await client.read(300_000, 1) == bytes(expected[300_000:])


class FullDisk(MemoryExport):
    async def write(self, offset: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    async def read(self, offset: int, length: int) -> bytes:
        if offset >= 4096:
            raise OSError(errno.EIO, "Input/output error")
        return await super().read(offset, length)


async def test_export_failures_become_enospc_or_eio_and_the_connection_stays(
    tmp_path: Path,
) -> None:
    disk = FullDisk("disk", bytes(8192))
    async with (
        serving([disk], tmp_path / "s.sock") as address,
        NbdClient.connect(address, "disk") as client,
    ):
        with pytest.raises(NbdCommandError, match="No space left on device") as full:
            await client.write(0, b"data")
        assert full.value.errno == errno.ENOSPC
        with pytest.raises(NbdCommandError, match="Input/output error") as broken:
            await client.read(4096, 10)
        assert broken.value.errno == errno.EIO
        assert await client.read(0, 10) == bytes(10)


async def test_read_only_exports_listing_and_unknown_names(tmp_path: Path) -> None:
    exports = [MemoryExport("a", b"x" * 1000, read_only=True), MemoryExport("b", bytes(512))]
    async with serving(exports, tmp_path / "s.sock") as address:
        assert sorted(await list_nbd_exports(address)) == [("a", ""), ("b", "")]
        async with NbdClient.connect(address, "a") as client:
            assert client.flags & proto.TransmissionFlags.READ_ONLY
            with pytest.raises(NbdCommandError, match="read-only") as caught:
                await client.write(0, b"no")
            assert caught.value.errno == proto.EPERM
        with pytest.raises(NbdOptionError, match="unknown export.*no export named 'zzz'"):
            await NbdClient.connect(address, "zzz")
    async with (
        serving(exports[:1], tmp_path / "t.sock") as address,
        NbdClient.connect(address, "") as client,  # the default export
    ):
        assert await client.read(0, 3) == b"xxx"


async def test_tcp_on_localhost_by_default(tmp_path: Path) -> None:
    disk = MemoryExport("disk", b"tcp!" * 100)
    async with anyio.create_task_group() as tg:
        address = await tg.start(
            lambda task_status: serve_nbd([disk], port=0, task_status=task_status)
        )
        assert isinstance(address, tuple)
        assert address[0] == "127.0.0.1"
        async with NbdClient.connect(address, "disk") as client:
            assert await client.read(0, 8) == b"tcp!tcp!"
        tg.cancel_scope.cancel()


async def test_a_listener_the_caller_made(tmp_path: Path) -> None:
    disk = MemoryExport("disk", b"mine" * 100)
    listener = await anyio.create_unix_listener(tmp_path / "own.sock")
    async with anyio.create_task_group() as tg:
        address = await tg.start(
            lambda task_status: serve_nbd([disk], listener=listener, task_status=task_status)
        )
        assert address == f"unix:{tmp_path / 'own.sock'}"
        async with NbdClient.connect(address, "disk") as client:
            assert await client.read(396, 4) == b"mine"
        tg.cancel_scope.cancel()


async def test_replies_go_out_as_requests_complete_not_in_order(tmp_path: Path) -> None:
    disk = MemoryExport("disk", os.urandom(65536))
    disk.gate = anyio.Event()
    disk.gated_offset = 0
    finished: list[int] = []
    async with (
        serving([disk], tmp_path / "s.sock") as address,
        NbdClient.connect(address, "disk") as client,
    ):

        async def read(offset: int) -> None:
            assert await client.read(offset, 100) == disk.data[offset : offset + 100]
            finished.append(offset)
            if offset == 200:
                disk.gate.set()  # type: ignore[union-attr]

        async with anyio.create_task_group() as tg:
            tg.start_soon(read, 0)  # held until the later request is answered
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(read, 200)
    assert finished == [200, 0]


async def test_requests_in_flight_and_bytes_held_are_bounded(tmp_path: Path) -> None:
    disk = MemoryExport("disk", bytes(64 * 1024 * 1024))
    async with (
        serving(
            [disk], tmp_path / "s.sock", max_requests_in_flight=3, memory_budget=32 * 1024 * 1024
        ) as address,
        NbdClient.connect(address, "disk") as client,
    ):

        async def read(offset: int, length: int) -> None:
            assert await client.read(offset, length) == bytes(length)

        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(read, i * 4096, 64 * 1024)
            for i in range(6):
                tg.start_soon(read, i * (8 << 20), 8 << 20)
    assert disk.peak_active <= 3
    assert disk.peak_bytes <= 32 * 1024 * 1024


async def test_cancelling_serve_nbd_closes_everything(tmp_path: Path) -> None:
    disk = MemoryExport("disk", os.urandom(8192))
    disk.gate = anyio.Event()  # never set: a read that never finishes
    disk.gated_offset = 4096
    sock = tmp_path / "s.sock"
    before = FdLeakCheck.snapshot()
    tasks_before = len(anyio.get_running_tasks())
    caught: list[BaseException] = []
    async with anyio.create_task_group() as outer:
        with anyio.CancelScope() as server_scope:
            async with anyio.create_task_group() as tg:
                address = await tg.start(
                    lambda task_status: serve_nbd([disk], unix_socket=sock, task_status=task_status)
                )
                client = await NbdClient.connect(address, "disk")
                idle = await NbdClient.connect(address, "disk")
                outer.start_soon(read_failing, client, 4096, caught)
                await anyio.wait_all_tasks_blocked()
                assert disk.active == 1
                server_scope.cancel()
        assert not await anyio.Path(sock).exists()
    assert len(anyio.get_running_tasks()) == tasks_before  # no task left behind
    assert len(caught) == 1  # the in-flight read failed: the server went away
    assert "closed the connection" in str(caught[0])
    with pytest.raises(NbdError):
        await idle.read(0, 1)
    await client.aclose()
    await idle.aclose()
    FdLeakCheck().assert_same(before)


async def test_a_graceful_stop_answers_what_is_in_flight_then_closes(tmp_path: Path) -> None:
    disk = MemoryExport("disk", os.urandom(8192))
    disk.gate = anyio.Event()
    disk.gated_offset = 4096
    sock = tmp_path / "s.sock"
    stop = anyio.Event()
    results: list[bytes] = []
    async with anyio.create_task_group() as tg:
        address = await tg.start(
            lambda task_status: serve_nbd(
                [disk], unix_socket=sock, stop=stop, task_status=task_status
            )
        )
        client = await NbdClient.connect(address, "disk")
        haggling = await anyio.connect_unix(sock)  # still in the handshake when stopping

        async def slow_read() -> None:
            results.append(await client.read(4096, 100))

        tg.start_soon(slow_read)
        await anyio.wait_all_tasks_blocked()
        stop.set()
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(NbdError, match="cannot connect"):  # the listener is closed
            await NbdClient.connect(address, "disk")
        disk.gate.set()  # the read in flight completes and is answered
    # serve_nbd returned by itself: no cancellation needed
    assert results == [bytes(disk.data[4096:4196])]
    with pytest.raises(NbdError):
        await client.read(0, 1)  # then the connection was closed
    await client.aclose()
    assert await receive_all(haggling) == proto.ServerConnection().greeting()
    await haggling.aclose()
    assert not await anyio.Path(sock).exists()


async def test_a_graceful_stop_gives_up_after_the_grace(tmp_path: Path) -> None:
    disk = MemoryExport("disk", os.urandom(8192))
    disk.gate = anyio.Event()  # never set
    disk.gated_offset = 0
    stop = anyio.Event()
    errors: list[BaseException] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            address = await tg.start(
                lambda task_status: serve_nbd(
                    [disk],
                    unix_socket=tmp_path / "s.sock",
                    stop=stop,
                    grace=0.2,
                    task_status=task_status,
                )
            )
            client = await NbdClient.connect(address, "disk")
            tg.start_soon(read_failing, client, 0, errors)
            await anyio.wait_all_tasks_blocked()
            stop.set()
    await client.aclose()
    assert len(errors) == 1
    assert "closed the connection" in str(errors[0])


async def test_connections_beyond_the_limit_are_hung_up_on(tmp_path: Path) -> None:
    disk = MemoryExport("disk", b"x" * 512)
    async with serving([disk], tmp_path / "s.sock", max_connections=1) as address:
        async with NbdClient.connect(address, "disk") as first:
            with pytest.raises(NbdProtocolError, match="closed the connection"):
                await NbdClient.connect(address, "disk")
            assert await first.read(0, 1) == b"x"
        await anyio.wait_all_tasks_blocked()  # the server has seen the first one go
        await still_serving(address, disk)  # the slot is free again


async def test_closing_the_client_wakes_a_request_in_flight(tmp_path: Path) -> None:
    disk = MemoryExport("disk", os.urandom(8192))
    disk.gate = anyio.Event()
    disk.gated_offset = 0
    errors: list[BaseException] = []
    async with serving([disk], tmp_path / "s.sock") as address:
        client = await NbdClient.connect(address, "disk")

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_failing, client, 0, errors)
                await anyio.wait_all_tasks_blocked()
                await client.aclose()
        disk.gate.set()
    assert [str(e) for e in errors] == ["the NBD client was closed"]


async def test_an_existing_socket_path_is_never_replaced(tmp_path: Path) -> None:
    sock = tmp_path / "taken.sock"
    sock.write_text("not a socket")
    with pytest.raises(NbdError, match="cannot listen on .*taken.sock"):
        await serve_nbd([MemoryExport("d", b"x")], unix_socket=sock)
    assert sock.read_text() == "not a socket"


# --- hostile clients --------------------------------------------------------------------


async def raw_connect(address: str) -> anyio.abc.SocketStream:
    stream = await anyio.connect_unix(address.removeprefix("unix:"))
    greeting = b""
    while len(greeting) < 18:
        greeting += await stream.receive(18 - len(greeting))
    assert greeting[:16] == b"NBDMAGICIHAVEOPT"
    await stream.send(struct.pack(">I", 3))
    return stream


async def receive_all(stream: anyio.abc.SocketStream) -> bytes:
    """Everything until the server closes (raises on a hang: the test times out)."""
    data = b""
    with anyio.fail_after(10):
        while True:
            try:
                data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return data


def option(option: int, data: bytes = b"", length: int | None = None) -> bytes:
    return (
        struct.pack(">QII", proto.IHAVEOPT, option, len(data) if length is None else length) + data
    )


async def go(stream: anyio.abc.SocketStream, name: bytes = b"disk") -> None:
    await stream.send(
        option(proto.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    )
    received = b""
    while not received.endswith(
        struct.pack(">QII", proto.OPTION_REPLY_MAGIC, proto.OPT_GO, proto.REP_ACK) + bytes(4)
    ):
        received += await stream.receive()


def request(command: int, offset: int, length: int, cookie: int = 1, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", proto.REQUEST_MAGIC, flags, command, cookie, offset, length)


async def still_serving(address: str, disk: MemoryExport) -> None:
    async with NbdClient.connect(address, "disk") as client:
        assert await client.read(0, 16) == bytes(disk.data[:16])


@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param(b"\xff" * 16, id="bad option magic"),
        pytest.param(option(42, length=0xFFFFFFFF), id="4 GiB option"),
        pytest.param(option(proto.OPT_GO, b"\0\0", length=100), id="vanishes mid-option"),
        pytest.param(option(proto.OPT_EXPORT_NAME, b"nope"), id="export name unknown"),
    ],
)
async def test_hostile_handshakes_are_hung_up_on_and_others_served(
    tmp_path: Path, hostile: bytes
) -> None:
    disk = MemoryExport("disk", os.urandom(4096))
    async with serving([disk], tmp_path / "s.sock") as address:
        stream = await raw_connect(address)
        async with stream:
            await stream.send(hostile)
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                await stream.send_eof()
            assert await receive_all(stream) == b""
        await still_serving(address, disk)


async def test_unknown_and_malformed_options_get_error_replies_and_the_session_goes_on(
    tmp_path: Path,
) -> None:
    disk = MemoryExport("disk", os.urandom(4096))
    async with serving([disk], tmp_path / "s.sock") as address:
        stream = await raw_connect(address)
        async with stream:
            await stream.send(option(99, b"whatever"))
            await stream.send(option(proto.OPT_LIST, b"data"))
            await stream.send(option(proto.OPT_GO, struct.pack(">I", 100) + b"short"))
            # meta contexts before structured replies
            await stream.send(option(proto.OPT_SET_META_CONTEXT, bytes(8)))
            long_name = b"x" * 4000  # its error message would pass the 4 KiB string limit
            await stream.send(
                option(proto.OPT_GO, struct.pack(">I", 4000) + long_name + struct.pack(">H", 0))
            )
            await stream.send(option(proto.OPT_ABORT))
            replies = await receive_all(stream)
    got = []
    at = 0
    while at < len(replies):
        magic, opt, reply_type, length = struct.unpack_from(">QIII", replies, at)
        assert magic == proto.OPTION_REPLY_MAGIC
        got.append((opt, reply_type))
        assert length > 0 or reply_type == proto.REP_ACK  # errors carry a message
        assert length <= proto.MAX_STRING_LENGTH
        at += 20 + length
    assert got == [
        (99, proto.REP_ERR_UNSUP),
        (proto.OPT_LIST, proto.REP_ERR_INVALID),
        (proto.OPT_GO, proto.REP_ERR_INVALID),
        (proto.OPT_SET_META_CONTEXT, proto.REP_ERR_INVALID),
        (proto.OPT_GO, proto.REP_ERR_UNKNOWN),
        (proto.OPT_ABORT, proto.REP_ACK),
    ]


@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param(b"\x00" * 28, id="bad request magic"),
        pytest.param(request(proto.CMD_WRITE, 0, 0xFFFFFFFF), id="4 GiB write"),
        pytest.param(request(proto.CMD_WRITE, 0, 4096) + b"half", id="vanishes mid-write"),
        pytest.param(request(proto.CMD_READ, 0, 4096)[:10], id="vanishes mid-header"),
    ],
)
async def test_hostile_requests_are_hung_up_on_and_others_served(
    tmp_path: Path, hostile: bytes
) -> None:
    disk = MemoryExport("disk", os.urandom(4096))
    async with serving([disk], tmp_path / "s.sock") as address:
        stream = await raw_connect(address)
        async with stream:
            await go(stream)
            await stream.send(hostile)
            await stream.send_eof()
            assert await receive_all(stream) == b""
        await still_serving(address, disk)


async def test_bad_requests_get_error_replies_and_the_connection_stays(tmp_path: Path) -> None:
    disk = MemoryExport("disk", os.urandom(4096), read_only=True)
    async with serving([disk], tmp_path / "s.sock") as address:
        stream = await raw_connect(address)
        async with stream:
            await go(stream)
            for cookie, message in enumerate(
                [
                    request(proto.CMD_READ, 4000, 200, 1),  # past the end
                    request(proto.CMD_READ, 1 << 62, 1, 2),  # far past the end
                    request(77, 0, 0, 3),  # unknown command
                    request(proto.CMD_READ, 0, 10, 4, flags=0x80),  # unknown flag
                    request(proto.CMD_TRIM, 0, 10, 5),  # read-only
                    request(proto.CMD_BLOCK_STATUS, 0, 10, 6),  # no meta context
                    request(proto.CMD_READ, 0, 0xFFFFFFFF, 7),  # 4 GiB read
                ],
                start=1,
            ):
                await stream.send(message)
                reply = b""
                while len(reply) < 16:
                    reply += await stream.receive()
                magic, error, got_cookie = struct.unpack(">IIQ", reply)
                assert (magic, got_cookie) == (proto.SIMPLE_REPLY_MAGIC, cookie)
                assert error in (proto.EINVAL, proto.EPERM)
            await stream.send(request(proto.CMD_READ, 16, 0, 8))  # 0 bytes: success, no data
            await stream.send(request(proto.CMD_READ, 0, 16, 9))
            reply = b""
            while len(reply) < 48:
                reply += await stream.receive()
            assert reply == (
                struct.pack(">IIQ", proto.SIMPLE_REPLY_MAGIC, 0, 8)
                + struct.pack(">IIQ", proto.SIMPLE_REPLY_MAGIC, 0, 9)
                + disk.data[:16]
            )
            await stream.send(request(proto.CMD_DISC, 0, 0, 10))
            assert await receive_all(stream) == b""


async def test_a_client_that_floods_reads_and_leaves_costs_nothing_lasting(tmp_path: Path) -> None:
    disk = MemoryExport("disk", os.urandom(4 << 20))
    async with serving([disk], tmp_path / "s.sock", max_requests_in_flight=4) as address:
        stream = await raw_connect(address)
        await go(stream)
        await stream.send(
            b"".join(request(proto.CMD_READ, (i % 4) << 20, 1 << 20, i) for i in range(64))
        )
        await stream.aclose()  # gone without reading a single reply
        await still_serving(address, disk)
        assert disk.peak_active <= 4


async def test_mutated_sessions_never_break_the_real_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A recorded client session, mutated, replayed against serve_nbd: every
    connection ends (an answer, an error reply or a hang-up), nothing is logged
    as a server bug, and the server serves on."""
    to_server, _ = recorded_session()
    disk = MemoryExport("disk", DISK, read_only=True)
    rng = random.Random(5)
    caplog.set_level(logging.INFO, logger="vma_async.nbd")
    async with serving([disk], tmp_path / "s.sock") as address:
        for _ in range(40):
            stream = await anyio.connect_unix(address.removeprefix("unix:"))
            async with stream:
                with contextlib.suppress(anyio.BrokenResourceError, OSError):
                    await stream.send(mutate(to_server, rng))
                    await stream.send_eof()
                await receive_all(stream)
        await still_serving(address, disk)
    bugs = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert bugs == []
    assert any("broke the protocol" in r.getMessage() for r in caplog.records)
