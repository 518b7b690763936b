"""``vma serve`` / serve_archive read by NBD clients no one here wrote
(nbdinfo, nbdcopy, qemu-img) as real subprocesses, with the server running
in-process under asyncio, uvloop and trio."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
import vma_builder as vb

from vma_async import NbdClient, NbdCommandError, SourceError
from vma_async._serve import serve_archive

pytestmark = pytest.mark.anyio

requires_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nbdinfo", "nbdcopy", "qemu-img")),
    reason="needs libnbd-bin and qemu-utils (scripts/setup.sh installs them)",
)

DATA_SIZE = 5 * 65536 + 3 * 4096 + 700  # odd: ends inside a 4 KiB block
ZERO_SIZE = 2 * 1024 * 1024 + 512 + 3  # all zero, odd


def data_disk() -> bytes:
    """Random clusters, a zero cluster, zero 4 KiB blocks inside a cluster,
    and a short random tail."""
    rng = __import__("random").Random(9)
    image = bytearray(rng.randbytes(DATA_SIZE))
    image[65536 : 2 * 65536] = bytes(65536)  # a zero cluster
    image[3 * 65536 + 4096 : 3 * 65536 + 3 * 4096] = bytes(2 * 4096)  # zero blocks
    return bytes(image)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    disks = {"drive-scsi0": data_disk(), "drive-virtio1": bytes(ZERO_SIZE)}
    path = tmp_path_factory.mktemp("serve") / "backup.vma"
    path.write_bytes(vb.archive([vb.Device(name, data) for name, data in disks.items()]))
    return path, disks


@asynccontextmanager
async def serving(archive: Path, sock: Path) -> AsyncIterator[str]:
    """serve_archive in a task group; afterwards: no socket file, no fd and no
    task left behind."""
    fds_before = set(os.listdir("/proc/self/fd"))
    tasks_before = len(anyio.get_running_tasks())
    async with anyio.create_task_group() as tg:
        address = await tg.start(
            lambda task_status: serve_archive(archive, unix_socket=sock, task_status=task_status)
        )
        assert address == f"unix:{sock}"
        yield str(sock)
        tg.cancel_scope.cancel()
    assert not await anyio.Path(sock).exists()
    left = set(os.listdir("/proc/self/fd")) - fds_before
    # uvloop keeps a /dev/null open once it has spawned a child: not ours
    assert [os.readlink(f"/proc/self/fd/{fd}") for fd in left] in ([], ["/dev/null"])
    assert len(anyio.get_running_tasks()) == tasks_before


def uri(sock: str, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


async def run(*command: str) -> bytes:
    result = await anyio.run_process(list(command), check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


@requires_tools
async def test_nbdinfo_lists_every_disk_read_only(
    archive: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    path, disks = archive
    async with serving(path, tmp_path / "s.sock") as sock:
        listing = json.loads(await run("nbdinfo", "--list", "--json", uri(sock, "")))
    exports = {e["export-name"]: e for e in listing["exports"]}
    assert set(exports) == set(disks)
    for name, data in disks.items():
        assert exports[name]["export-size"] == len(data)
        assert exports[name]["is_read_only"] is True
        assert exports[name]["can_multi_conn"] is True
        assert "base:allocation" in exports[name]["contexts"]


@requires_tools
async def test_nbdinfo_map_shows_zero_clusters_and_blocks_as_holes(
    archive: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    path, _ = archive
    async with serving(path, tmp_path / "s.sock") as sock:
        zero_map = json.loads(await run("nbdinfo", "--map", "--json", uri(sock, "drive-virtio1")))
        data_map = json.loads(await run("nbdinfo", "--map", "--json", uri(sock, "drive-scsi0")))
    assert [(e["offset"], e["length"], e["type"]) for e in zero_map] == [(0, ZERO_SIZE, 3)]
    hole = 3  # hole|zero
    assert [(e["offset"], e["length"], e["type"]) for e in data_map] == [
        (0, 65536, 0),
        (65536, 65536, hole),  # the zero cluster
        (2 * 65536, 65536 + 4096, 0),
        (3 * 65536 + 4096, 2 * 4096, hole),  # the zero blocks
        (3 * 65536 + 3 * 4096, DATA_SIZE - 3 * 65536 - 3 * 4096, 0),
    ]


@requires_tools
async def test_nbdcopy_to_a_file_and_to_stdout_is_byte_exact(
    archive: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    path, disks = archive
    async with serving(path, tmp_path / "s.sock") as sock:
        for name, data in disks.items():
            out = tmp_path / f"{name}.raw"
            await run("nbdcopy", uri(sock, name), str(out))
            assert out.read_bytes() == data
            assert await run("nbdcopy", uri(sock, name), "-") == data


@requires_tools
async def test_qemu_img_compare_and_convert_to_qcow2(
    archive: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    path, disks = archive
    data = disks["drive-scsi0"]
    raw = tmp_path / "expected.raw"
    raw.write_bytes(data)
    async with serving(path, tmp_path / "s.sock") as sock:
        await run("qemu-img", "compare", "-f", "raw", str(raw), uri(sock, "drive-scsi0"))
        qcow2 = tmp_path / "disk.qcow2"
        await run("qemu-img", "convert", "-O", "qcow2", uri(sock, "drive-scsi0"), str(qcow2))
    back = tmp_path / "back.raw"
    await run("qemu-img", "convert", "-O", "raw", str(qcow2), str(back))
    assert back.read_bytes()[:DATA_SIZE] == data
    assert not back.read_bytes()[DATA_SIZE:].strip(b"\0")  # qemu may round up to 512


@requires_tools
async def test_two_clients_at_once(archive: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    path, disks = archive
    outputs: dict[str, bytes] = {}

    async with serving(path, tmp_path / "s.sock") as sock:

        async def copy(name: str, key: str) -> None:
            outputs[key] = await run("nbdcopy", uri(sock, name), "-")

        async def ours() -> None:
            async with NbdClient.connect(f"unix:{sock}", "drive-scsi0") as client:
                outputs["ours"] = await client.read(0, DATA_SIZE)

        async with anyio.create_task_group() as tg:
            tg.start_soon(copy, "drive-scsi0", "a")
            tg.start_soon(copy, "drive-virtio1", "b")
            tg.start_soon(ours)
    assert outputs == {
        "a": disks["drive-scsi0"],
        "b": disks["drive-virtio1"],
        "ours": disks["drive-scsi0"],
    }


async def test_a_missing_cluster_answers_eio_and_the_server_stays_up(tmp_path: Path) -> None:
    image = data_disk()
    entries = vb.entries_for({1: vb.Device("drive-scsi0", image)})
    kept = [e for e in entries if e.cluster != 2]  # cluster 2 never stored: an incomplete archive
    path = tmp_path / "incomplete.vma"
    path.write_bytes(vb.header({1: ("drive-scsi0", DATA_SIZE)}) + b"".join(vb.pack(kept)))
    async with serving(path, tmp_path / "s.sock") as sock:
        async with NbdClient.connect(f"unix:{sock}", "drive-scsi0") as client:
            with pytest.raises(NbdCommandError, match="missing cluster 2") as caught:
                await client.read(2 * 65536 + 100, 10)
            assert caught.value.errno == 5  # EIO
            assert await client.read(0, 2 * 65536) == image[: 2 * 65536]
            assert await client.block_status(2 * 65536, 65536) == [(65536, 1)]  # hole, not zero
        if shutil.which("nbdcopy"):
            result = await anyio.run_process(
                ["nbdcopy", uri(sock, "drive-scsi0"), str(tmp_path / "out.raw")], check=False
            )
            assert result.returncode != 0  # the copy fails loudly rather than filling zeroes
        async with NbdClient.connect(f"unix:{sock}", "drive-scsi0") as client:
            assert await client.read(3 * 65536, 4096) == image[3 * 65536 : 3 * 65536 + 4096]


async def test_a_compressed_archive_is_refused_with_the_reason(
    archive: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    zstandard = pytest.importorskip("zstandard")
    path, _ = archive
    compressed = tmp_path / "backup.vma.zst"
    compressed.write_bytes(zstandard.ZstdCompressor().compress(path.read_bytes()))
    with pytest.raises(SourceError, match="zstd-compressed: serving needs random access"):
        await serve_archive(compressed, unix_socket=tmp_path / "s.sock")
    assert not (tmp_path / "s.sock").exists()


# --- the command ----------------------------------------------------------------------


@requires_tools
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_vma_serve_command_serves_until_a_signal_and_removes_its_socket(
    archive: tuple[Path, dict[str, bytes]], tmp_path: Path, signum: int, anyio_backend_name: str
) -> None:
    path, disks = archive
    sock = tmp_path / "cli.sock"
    env = {**os.environ, "VMA_ASYNC_BACKEND": "trio" if anyio_backend_name == "trio" else "asyncio"}
    async with await anyio.open_process(
        [sys.executable, "-m", "vma_async", "serve", str(path), "--socket", str(sock)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        assert process.stdout is not None
        lines = b""
        while lines.count(b"\n") < len(disks):  # one URI per disk once it listens
            lines += await process.stdout.receive()
        assert sorted(lines.decode().split()) == sorted(uri(str(sock), n) for n in disks)
        assert await run("nbdcopy", uri(str(sock), "drive-scsi0"), "-") == disks["drive-scsi0"]
        process.send_signal(signum)
        assert await process.wait() == 0
    assert not sock.exists()


async def test_vma_serve_refuses_a_compressed_archive_in_one_line(
    archive: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    zstandard = pytest.importorskip("zstandard")
    path, _ = archive
    compressed = tmp_path / "backup.vma.zst"
    compressed.write_bytes(zstandard.ZstdCompressor().compress(path.read_bytes()))
    sock = tmp_path / "never.sock"
    result = await anyio.run_process(
        [sys.executable, "-m", "vma_async", "serve", str(compressed), "--socket", str(sock)],
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.decode() == (
        f"vma: {compressed} is zstd-compressed: serving needs random access to the disks,"
        " which a compressed stream cannot give; decompress it to a file first"
        " (e.g. zstd -d FILE)\n"
    )
    assert not await anyio.Path(sock).exists()


@requires_tools
async def test_tcp_on_localhost(archive: tuple[Path, dict[str, bytes]]) -> None:
    path, disks = archive
    async with anyio.create_task_group() as tg:
        host, port = await tg.start(
            lambda task_status: serve_archive(path, port=0, task_status=task_status)
        )
        assert host == "127.0.0.1"
        copied = await run("nbdcopy", f"nbd://{host}:{port}/drive-virtio1", "-")
        tg.cancel_scope.cancel()
    assert copied == disks["drive-virtio1"]


@pytest.fixture
def archive_on_a_block_device(archive: tuple[Path, dict[str, bytes]]) -> Iterator[Path]:
    """The archive behind a read-only loop device (needs root and /dev/loop*)."""
    path, _ = archive
    attach = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if attach.returncode != 0:
        pytest.skip(f"no loop device here: {attach.stderr.strip()}")
    device = Path(attach.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", str(device)], check=True)


@requires_tools
async def test_an_archive_on_a_block_device(
    archive: tuple[Path, dict[str, bytes]], archive_on_a_block_device: Path, tmp_path: Path
) -> None:
    _, disks = archive
    async with serving(archive_on_a_block_device, tmp_path / "s.sock") as sock:
        for name, data in disks.items():
            assert await run("nbdcopy", uri(sock, name), "-") == data
