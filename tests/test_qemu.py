"""qemu-img and qemu-nbd as child processes (vma_async._qemu), with the real tools.

What must hold: formats are told apart by their magic bytes; a missing tool
names the Debian package; qemu-nbd is started on a private socket, a failure to
open an image is a clear QemuError quoting qemu-nbd, and on every path
(success, failure, cancellation) the child is reaped, its directory removed
and no fd is left open.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import anyio
import anyio.abc
import pytest

from vma_async import QemuError, QemuMissingError, _qemu
from vma_async._qemu import (
    QemuNbdServer,
    _direct_io_works,
    find_tool,
    probe_file_format,
    probe_format,
    qemu_img_create,
    qemu_img_info,
)

MiB = 1 << 20


def qemu_children() -> list[int]:
    """Our qemu-nbd/qemu-img children still alive (or unreaped zombies)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if fields.get("PPid", "").strip() == str(os.getpid()) and fields.get(
            "Name", ""
        ).strip().startswith("qemu-"):
            found.append(int(entry))
    return found


def exists(path: str) -> bool:
    return os.path.lexists(path)


def open_fds() -> set[str]:
    """Our open fds as ``"FD -> target"``, except /dev/null: uvloop opens it
    at its first subprocess with ``stdin=DEVNULL`` and keeps it for the next
    ones.  The target in each entry makes a leak's report say what leaked."""
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the fd listdir itself used, closed by now
            continue
        if target != "/dev/null":
            fds.add(f"{fd} -> {target}")
    return fds


def img_create(path: Path, fmt: str, size: int = 4 * MiB) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True)
    return path


# --- probing (sync, no event loop) -----------------------------------------------


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vdi", "vhdx", "qed", "vpc"])
def test_probe_knows_every_container_format(tmp_path: Path, fmt: str) -> None:
    image = img_create(tmp_path / f"disk.{fmt}", fmt)
    fd = os.open(image, os.O_RDONLY)
    try:
        assert probe_file_format(fd) == fmt
    finally:
        os.close(fd)


def test_probe_vmdk_text_descriptor_and_raw() -> None:
    assert probe_format(b"# Disk DescriptorFile\nversion=1\n") == "vmdk"
    assert probe_format(bytes(512)) is None
    assert probe_format(b"QFI") is None  # too short to be a qcow2 header
    vdi = bytearray(512)
    vdi[0x40:0x44] = (0xBEDA107F).to_bytes(4, "little")
    assert probe_format(bytes(vdi)) == "vdi"
    vdi[0x40] ^= 1
    assert probe_format(bytes(vdi)) is None


def test_missing_tool_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(QemuMissingError, match=r"qemu-nbd not found: install .*qemu-utils"):
        find_tool("qemu-nbd")


def test_unknown_format_is_refused() -> None:
    with pytest.raises(QemuError, match="unsupported image format 'qcow3'"):
        _qemu.check_format("qcow3")


# --- qemu-img --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_img_create_and_info(tmp_path: Path) -> None:
    path = tmp_path / "new.qcow2"
    await qemu_img_create(path, "qcow2", 3 * MiB + 512)
    info = await qemu_img_info(path)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 3 * MiB + 512
    with pytest.raises(QemuError, match=r"qemu-img create qcow2 image .*missing/x.qcow2 failed"):
        await qemu_img_create(tmp_path / "missing" / "x.qcow2", "qcow2", MiB)
    assert qemu_children() == []


# --- qemu-nbd ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_nbd_server_serves_and_is_reaped(tmp_path: Path) -> None:
    image = img_create(tmp_path / "disk.qcow2", "qcow2")
    before = open_fds()
    server, stream = await QemuNbdServer.start(image, "qcow2", read_only=True)
    directory = os.path.dirname(server.socket_path)
    assert os.stat(directory).st_mode & 0o777 == 0o700
    try:
        greeting = b""
        while len(greeting) < 16:
            greeting += await stream.receive()
        assert greeting[:16] == b"NBDMAGICIHAVEOPT"
    finally:
        await stream.aclose()
        status = await server.stop(graceful=False)
        await server.remove_directory()
    assert status is not None
    assert not exists(directory)
    assert qemu_children() == []
    assert open_fds() == before


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("make", "fmt", "message"),
    [
        (
            "missing",
            "qcow2",
            r"can't open file .*gone\.qcow2 - qemu-nbd exit status 1: .*No such file",
        ),
        (
            "raw",
            "qcow2",
            r"can't open file .*disk\.raw - qemu-nbd exit status 1: .*not in qcow2 format",
        ),
    ],
)
async def test_nbd_server_open_failure_is_clear(
    tmp_path: Path, make: str, fmt: str, message: str
) -> None:
    if make == "raw":
        path = tmp_path / "disk.raw"
        path.write_bytes(bytes(MiB))
    else:
        path = tmp_path / "gone.qcow2"
    before = open_fds()
    with pytest.raises(QemuError, match=message):
        await QemuNbdServer.start(path, fmt, read_only=False)
    assert qemu_children() == []
    assert open_fds() == before


@pytest.mark.anyio
async def test_nbd_server_cancelled_while_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled after the child exists, before it accepts: reaped, nothing left."""
    image = img_create(tmp_path / "disk.qcow2", "qcow2")
    spawned: list[QemuNbdServer] = []
    real_connect = QemuNbdServer._connect

    with anyio.CancelScope() as scope:

        async def cancelling_connect(self: QemuNbdServer) -> anyio.abc.SocketStream:
            spawned.append(self)
            scope.cancel()
            return await real_connect(self)

        monkeypatch.setattr(QemuNbdServer, "_connect", cancelling_connect)
        before = open_fds()
        await QemuNbdServer.start(image, "qcow2", read_only=True)
    assert scope.cancelled_caught
    assert len(spawned) == 1
    assert spawned[0].returncode is not None
    assert not exists(os.path.dirname(spawned[0].socket_path))
    assert qemu_children() == []
    assert open_fds() == before


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("read_only", "cache", "expected"),
    [
        (False, None, "direct"),  # writes reach the disk during a restore, not at the flush
        (False, "writeback", "--cache=writeback"),
        (False, "off", "--cache=none"),  # the restore map's alias
        (True, None, None),  # a backup only reads: qemu-nbd's default
    ],
)
async def test_nbd_server_cache_mode(
    tmp_path: Path, read_only: bool, cache: str | None, expected: str | None
) -> None:
    """The cache mode qemu-nbd really runs with (read from /proc)."""
    image = img_create(tmp_path / "disk.qcow2", "qcow2")
    server, stream = await QemuNbdServer.start(image, "qcow2", read_only=read_only, cache=cache)
    try:
        cmdline = await anyio.Path(f"/proc/{server._process.pid}/cmdline").read_bytes()
        argv = cmdline.split(b"\0")
    finally:
        await stream.aclose()
        await server.stop(graceful=False)
        await server.remove_directory()
    caches = [arg.decode() for arg in argv if arg.startswith(b"--cache")]
    if expected == "direct":
        # --cache=none needs O_DIRECT; where the file system lacks it, qemu-nbd's default stays
        assert caches == (["--cache=none"] if _direct_io_works(str(image)) else [])
    else:
        assert caches == ([expected] if expected else [])
    assert qemu_children() == []
