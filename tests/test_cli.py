"""End to end: the installed ``vma`` console script, run as a subprocess.

Every test runs the real command a user (or ``qmrestore``) runs, and checks
its bytes: output lines against the reference's formats, restored images
against the originals, and for every error a non-zero status and one line.
"""

from __future__ import annotations

import gzip
import os
import signal
import struct
import subprocess
import sys
import threading
import time as time_module
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from vma_async import BLOCK_SIZE, CLUSTER_SIZE, DeviceInfo, Progress
from vma_async._cli import ReadReporter
from vma_async._format import (
    decode_header,
    encode_extent_header,
    encode_header,
    make_blockinfo,
)

VMA = str(Path(sys.executable).with_name("vma"))
ENV = {**os.environ, "TZ": "UTC"}


def vma(
    *args: str | Path,
    cwd: Path,
    status: int = 0,
    stdin: bytes | None = None,
    backend: str = "asyncio",
) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(
        [VMA, *map(str, args)],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        env={**ENV, "VMA_ASYNC_BACKEND": backend},
        check=False,
        timeout=60,
    )
    assert result.returncode == status, result.stderr.decode()
    return result


def one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    """The single line a failing command prints on stderr (no traceback)."""
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def ctime_text(ctime: int) -> str:
    """C's ctime(3) for TZ=UTC: day of month padded with a space."""
    dt = datetime.fromtimestamp(ctime, UTC)
    return f"{dt:%a %b} {dt.day:2d} {dt:%H:%M:%S} {dt.year}"


def make_image(path: Path, clusters: Sequence[bytes | None], tail: bytes = b"") -> bytes:
    """Write an image cluster by cluster (``None`` = a hole); return its bytes."""
    with open(path, "wb") as f:
        for cluster in clusters:
            if cluster is None:
                f.seek(CLUSTER_SIZE, os.SEEK_CUR)
            else:
                f.write(cluster)
        f.write(tail)
        f.truncate()
    return path.read_bytes()


def mixed_cluster(seed: int, zero_blocks: Sequence[int] = ()) -> bytes:
    """A cluster of non-zero blocks except those listed."""
    blocks = [
        bytes(BLOCK_SIZE) if i in zero_blocks else bytes([seed + 1 + i]) * BLOCK_SIZE
        for i in range(16)
    ]
    return b"".join(blocks)


def header_of(path: Path) -> tuple[int, int]:
    """(header size, ctime) of an archive."""
    raw = path.read_bytes()
    header = decode_header(raw[: struct.unpack_from(">I", raw, 56)[0]])
    return header.header_size, header.ctime


def restored_equals(restored: Path, original: bytes) -> None:
    """A restored disk is the original, then zeros up to the 512-byte rounding."""
    data = restored.read_bytes()
    assert len(data) == -(-len(original) // 512) * 512
    assert data[: len(original)] == original
    assert data[len(original) :] == bytes(len(data) - len(original))


@pytest.fixture
def images(tmp_path: Path) -> dict[str, bytes]:
    """disk0: data, zero blocks, a hole and an odd tail; disk1: sparse."""
    disk0 = make_image(
        tmp_path / "disk0.raw",
        [
            mixed_cluster(1),
            mixed_cluster(2, [0, 5, 15]),
            None,
            bytes(CLUSTER_SIZE),
            mixed_cluster(3),
        ],
        tail=b"\x7f" * 1000,
    )
    with open(tmp_path / "disk1.raw", "wb") as f:
        f.truncate(8 * CLUSTER_SIZE)
        f.seek(3 * CLUSTER_SIZE + 4096)
        f.write(b"\x01" * 4096)
    (tmp_path / "qemu-server.conf").write_bytes(b"memory: 512\nname: test\n")
    (tmp_path / "qemu-server.fw").write_bytes(b"[OPTIONS]\nenable: 1\n")
    return {"disk0": disk0, "disk1": (tmp_path / "disk1.raw").read_bytes()}


# --- the main round trip ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "uvloop", "trio"])
def test_create_list_config_verify_extract(
    tmp_path: Path, images: dict[str, bytes], backend: str
) -> None:
    def run(*args: str | Path, status: int = 0) -> subprocess.CompletedProcess[bytes]:
        return vma(*args, cwd=tmp_path, status=status, backend=backend)

    run("create", "a.vma", "-c", "qemu-server.conf", "-c", f"{tmp_path}/qemu-server.fw",
        "disk0.raw", "drive-scsi1=disk1.raw")  # fmt: skip
    _, ctime = header_of(tmp_path / "a.vma")
    assert run("list", "a.vma").stdout.decode() == (
        "CFG: size: 23 name: qemu-server.conf\n"
        "CFG: size: 20 name: qemu-server.fw\n"
        f"DEV: dev_id=1 size: {5 * CLUSTER_SIZE + 1024} devname: disk0\n"
        f"DEV: dev_id=2 size: {8 * CLUSTER_SIZE} devname: drive-scsi1\n"
        f"CTIME: {ctime_text(ctime)}\n"
    )
    assert run("config", "a.vma").stdout == b"memory: 512\nname: test\n"
    assert run("config", "a.vma", "-c", "qemu-server.fw").stdout == b"[OPTIONS]\nenable: 1\n"
    assert run("verify", "a.vma").stdout == b""
    out = run("extract", "a.vma", "restored").stdout.decode()
    assert out == (
        f"DEVINFO restored/tmp-disk-disk0.raw {5 * CLUSTER_SIZE + 1024}\n"
        f"DEVINFO restored/tmp-disk-drive-scsi1.raw {8 * CLUSTER_SIZE}\n"
    )
    restored = tmp_path / "restored"
    assert sorted(p.name for p in restored.iterdir()) == [
        "disk-disk0.raw", "disk-drive-scsi1.raw", "qemu-server.conf", "qemu-server.fw"
    ]  # fmt: skip
    restored_equals(restored / "disk-disk0.raw", images["disk0"])
    assert (restored / "disk-drive-scsi1.raw").read_bytes() == images["disk1"]
    assert (restored / "qemu-server.fw").read_bytes() == b"[OPTIONS]\nenable: 1\n"


def test_python_dash_m_runs_the_same_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vma_async", "--version"], capture_output=True, check=True
    )
    assert result.stdout == vma("--version", cwd=tmp_path).stdout
    assert result.stdout.startswith(b"vma (vma_async) ")


def test_list_json(tmp_path: Path, images: dict[str, bytes]) -> None:
    vma(
        "create",
        "a.vma",
        "-c",
        "qemu-server.conf",
        "vmstate=disk1.raw",
        "d=disk0.raw",
        cwd=tmp_path,
    )
    raw = (tmp_path / "a.vma").read_bytes()
    header = decode_header(raw[: struct.unpack_from(">I", raw, 56)[0]])
    import json

    document = json.loads(vma("list", "--json", "a.vma", cwd=tmp_path).stdout)
    assert document == {
        "uuid": str(header.uuid),
        "ctime": datetime.fromtimestamp(header.ctime, UTC).isoformat(),
        "ctime_epoch": header.ctime,
        "configs": [{"name": "qemu-server.conf", "size": 23}],
        "devices": [
            {"dev_id": 1, "name": "vmstate", "size": 8 * CLUSTER_SIZE, "vmstate": True},
            {"dev_id": 2, "name": "d", "size": 5 * CLUSTER_SIZE + 1024, "vmstate": False},
        ],
    }


def test_vmstate_round_trip_and_list_line(tmp_path: Path, images: dict[str, bytes]) -> None:
    vma("create", "a.vma", "vmstate=disk1.raw", "disk0.raw", cwd=tmp_path)
    _, ctime = header_of(tmp_path / "a.vma")
    assert vma("list", "a.vma", cwd=tmp_path).stdout.decode() == (
        f"VMSTATE: dev_id=1 memory: {8 * CLUSTER_SIZE}\n"
        f"DEV: dev_id=2 size: {5 * CLUSTER_SIZE + 1024} devname: disk1\n"
        f"CTIME: {ctime_text(ctime)}\n"
    )
    vma("extract", "a.vma", "out", cwd=tmp_path)
    assert (tmp_path / "out" / "vmstate.bin").read_bytes() == images["disk1"]
    restored_equals(tmp_path / "out" / "disk-disk1.raw", images["disk0"])


# --- compressed, exec: and pipes -------------------------------------------------------------


def test_create_into_exec_zstd_then_extract_the_zst(
    tmp_path: Path, images: dict[str, bytes]
) -> None:
    vma("create", "exec:zstd -q -o a.vma.zst", "disk0.raw", cwd=tmp_path)
    assert (tmp_path / "a.vma.zst").read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    vma("extract", "a.vma.zst", "out", cwd=tmp_path)
    restored_equals(tmp_path / "out" / "disk-disk0.raw", images["disk0"])


def test_compression_is_detected_by_content_not_name(
    tmp_path: Path, images: dict[str, bytes]
) -> None:
    vma("create", "a.vma", "disk0.raw", cwd=tmp_path)
    (tmp_path / "plain-looking.vma").write_bytes(gzip.compress((tmp_path / "a.vma").read_bytes()))
    assert (
        vma("list", "plain-looking.vma", cwd=tmp_path).stdout
        == vma("list", "a.vma", cwd=tmp_path).stdout
    )
    vma("verify", "plain-looking.vma", cwd=tmp_path)


def test_dash_reads_the_archive_from_a_pipe(tmp_path: Path, images: dict[str, bytes]) -> None:
    vma("create", "a.vma", "-c", "qemu-server.conf", "disk0.raw", cwd=tmp_path)
    archive = (tmp_path / "a.vma").read_bytes()
    assert (
        vma("list", "-", cwd=tmp_path, stdin=archive).stdout
        == vma("list", "a.vma", cwd=tmp_path).stdout
    )
    assert vma("config", "-", cwd=tmp_path, stdin=archive).stdout == b"memory: 512\nname: test\n"
    vma("verify", "-", cwd=tmp_path, stdin=archive)
    vma("extract", "-", "out", cwd=tmp_path, stdin=archive)
    restored_equals(tmp_path / "out" / "disk-disk0.raw", images["disk0"])


def test_extract_with_a_map_through_a_fifo(tmp_path: Path, images: dict[str, bytes]) -> None:
    vma("create", "a.vma", "-c", "qemu-server.conf", "disk0.raw", "drive-scsi1=disk1.raw",
        cwd=tmp_path)  # fmt: skip
    _, ctime = header_of(tmp_path / "a.vma")
    # Target 1 holds garbage and asks for zeros to be written (1:); target 2
    # is a fresh sparse file, so zeros need not be written (0:).
    target0 = tmp_path / "target0.raw"
    target0.write_bytes(b"\xee" * (5 * CLUSTER_SIZE + 1024))
    target1 = tmp_path / "target1.raw"
    target1.write_bytes(b"")
    os.truncate(target1, 8 * CLUSTER_SIZE)
    fifo = tmp_path / "map.fifo"
    os.mkfifo(fifo)
    map_text = (
        f"format=raw:throttling.bps=1000000000:throttling.group=g:cache=none:1:disk0={target0}\n"
        f"cache=writeback:0:drive-scsi1={target1}\n"
        "done\n"
    )
    # Another process writes the map into the FIFO and then keeps it open, as
    # qmrestore does: vma must stop reading at "done".
    feeder = subprocess.Popen(
        [sys.executable, "-c",
         f"import sys\nf = open({str(fifo)!r}, 'w')\nf.write({map_text!r})\nf.flush()\n"
         "sys.stdin.read()"],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    try:
        result = vma("extract", "-r", str(fifo), "a.vma", "out", cwd=tmp_path)
    finally:
        assert feeder.stdin is not None
        feeder.stdin.close()
        feeder.wait()
    assert result.stdout.decode() == (
        "CFG: size: 23 name: qemu-server.conf\n"
        f"DEV: dev_id=1 size: {5 * CLUSTER_SIZE + 1024} devname: disk0\n"
        f"DEV: dev_id=2 size: {8 * CLUSTER_SIZE} devname: drive-scsi1\n"
        f"CTIME: {ctime_text(ctime)}\n"
    )
    restored_equals(target0, images["disk0"])
    assert target1.read_bytes() == images["disk1"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["qemu-server.conf"]


def test_map_without_a_line_for_a_device(tmp_path: Path, images: dict[str, bytes]) -> None:
    vma("create", "a.vma", "-c", "qemu-server.conf", "disk0.raw", "disk1.raw", cwd=tmp_path)
    (tmp_path / "t").write_bytes(bytes(5 * CLUSTER_SIZE + 1024))
    (tmp_path / "map").write_text(f"0:disk0={tmp_path / 't'}\n\n")
    result = vma("extract", "-r", "map", "a.vma", "out", cwd=tmp_path, status=1)
    assert one_error_line(result) == "vma: no device name mapping for disk1 (archive a.vma)"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("2:disk0=/x", "read map failed - parse error ('2:disk0=/x')"),
        ("format=qcow3:0:disk0=/x", "can't open file /x - Unknown driver 'qcow3'"),
        ("cache=fast:0:disk0=/x", "invalid cache option: fast"),
    ],
)  # fmt: skip
def test_map_errors(tmp_path: Path, images: dict[str, bytes], line: str, message: str) -> None:
    vma("create", "a.vma", "disk0.raw", cwd=tmp_path)
    (tmp_path / "map").write_text(line + "\ndone\n")
    result = vma("extract", "-r", "map", "a.vma", "out", cwd=tmp_path, status=1)
    assert one_error_line(result) == f"vma: {message} (archive a.vma)"


# --- golden output of -v --------------------------------------------------------------------


def _model(clusters: Sequence[bytes | None], size: int) -> list[tuple[int, int, int]]:
    """Per cluster: (bytes transferred, zero bytes counted by the writer,
    zero bytes the reader counts); and the mask is nonzero or not."""
    rows = []
    for index, cluster in enumerate(clusters):
        start = index * CLUSTER_SIZE
        inside = min(size - start, CLUSTER_SIZE)
        blocks = -(-inside // BLOCK_SIZE)
        stored = (
            0
            if cluster is None
            else sum(
                1
                for b in range(blocks)
                if cluster[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE].strip(b"\0")
            )
        )
        # the reader counts zero blocks by 512-byte sectors, clipped at the end
        reader_zero = sum(
            min(BLOCK_SIZE, inside - b * BLOCK_SIZE)
            for b in range(blocks)
            if cluster is None or not cluster[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE].strip(b"\0")
        )
        rows.append((inside, (16 - stored) * BLOCK_SIZE, reader_zero if stored else -reader_zero))
    return rows


GOLDEN_CLUSTERS: list[bytes | None] = [
    mixed_cluster(1),
    mixed_cluster(2, [0, 1, 2]),
    None,
    mixed_cluster(3, list(range(16))),
    *[mixed_cluster(10 + i, [i]) for i in range(12)],
    mixed_cluster(4, [3]),
]
GOLDEN_TAIL = mixed_cluster(5)[: 3 * BLOCK_SIZE]  # a partial last cluster of 3 blocks
GOLDEN_SIZE = len(GOLDEN_CLUSTERS) * CLUSTER_SIZE + len(GOLDEN_TAIL)


def _golden_archive(tmp_path: Path) -> Path:
    make_image(tmp_path / "g.raw", GOLDEN_CLUSTERS, tail=GOLDEN_TAIL)
    vma("create", "g.vma", "g.raw", cwd=tmp_path)
    return tmp_path / "g.vma"


def _golden_rows() -> list[tuple[int, int, int]]:
    tail_cluster = GOLDEN_TAIL + bytes(CLUSTER_SIZE - len(GOLDEN_TAIL))
    return _model([*GOLDEN_CLUSTERS, tail_cluster], GOLDEN_SIZE)


def test_create_v_golden(tmp_path: Path) -> None:
    make_image(tmp_path / "g.raw", GOLDEN_CLUSTERS, tail=GOLDEN_TAIL)
    result = vma("create", "-v", "g.vma", "g.raw", cwd=tmp_path)
    assert result.stdout == b""
    # Progress comes once per 4 MiB chunk (never per cluster), in device bytes
    # walked: whole clusters.  The golden image is one chunk: 0 %, then 100 %.
    walked = -(-GOLDEN_SIZE // CLUSTER_SIZE) * CLUSTER_SIZE
    zeros = sum(writer_zero for _, writer_zero, _ in _golden_rows())
    expected = [f"progress 0% 0/{walked} 0", f"progress 100% {walked}/{walked} {zeros}"]
    expected.append(f"image disk0: size={GOLDEN_SIZE} zeros={zeros} saved={GOLDEN_SIZE - zeros}")
    assert result.stderr.decode().splitlines() == expected


def test_verify_v_golden(tmp_path: Path) -> None:
    archive = _golden_archive(tmp_path)
    _, ctime = header_of(archive)
    lines = vma("verify", "-v", archive, cwd=tmp_path).stdout.decode().splitlines()
    rows = _golden_rows()
    cluster_count = GOLDEN_SIZE // CLUSTER_SIZE  # the reference's whole clusters
    expected_progress = []
    last = 0
    for read in range(1, len(rows) + 1):
        percent = read * 100 // cluster_count
        if percent != last:
            expected_progress.append(
                f"progress {percent}% (read {read * CLUSTER_SIZE} bytes, duration "
            )
            last = percent
    sparse = sum(abs(row[2]) for row in rows)
    partial = sum(row[2] for row in rows if row[2] > 0)
    total = len(rows) * CLUSTER_SIZE
    assert lines[:2] == [
        f"DEV: dev_id=1 size: {GOLDEN_SIZE} devname: disk0",
        f"CTIME: {ctime_text(ctime)}",
    ]
    progress = lines[2:-2]
    assert [line[: line.index("duration ") + 9] for line in progress] == expected_progress
    assert all(
        line.endswith(" sec)") and line[line.index("duration ") + 9 : -5].isdigit()
        for line in progress
    )
    # C's printf formats, spelled as the reference spells them
    c_total = "total bytes read %d, sparse bytes %d (%.3g%%)"
    c_reduction = "space reduction due to 4K zero blocks %.3g%%"
    assert lines[-2:] == [
        c_total % (total, sparse, 100.0 * sparse / total),
        c_reduction % (100.0 * partial / (total - sparse)),
    ]
    # the numbers are not trivial: the model exercises every branch
    assert 0 < partial < sparse < total


def test_extract_v_prints_devinfo_progress_and_summary(tmp_path: Path) -> None:
    archive = _golden_archive(tmp_path)
    lines = vma("extract", "-v", archive, "out", cwd=tmp_path).stdout.decode().splitlines()
    verify_lines = vma("verify", "-v", archive, cwd=tmp_path).stdout.decode().splitlines()
    assert lines[0] == f"DEVINFO out/tmp-disk-disk0.raw {GOLDEN_SIZE}"
    strip = [line.split(" duration")[0] for line in lines[1:]]
    assert strip == [line.split(" duration")[0] for line in verify_lines[2:]]


def test_verify_v_on_an_archive_without_data(tmp_path: Path) -> None:
    vma("create", "e.vma", cwd=tmp_path)
    _, ctime = header_of(tmp_path / "e.vma")
    assert vma("verify", "-v", "e.vma", cwd=tmp_path).stdout.decode() == (
        f"CTIME: {ctime_text(ctime)}\nvma archive contains no image data\n"
    )


def test_quiet_silences_the_v_lines(tmp_path: Path) -> None:
    archive = _golden_archive(tmp_path)
    assert vma("verify", "-v", "--quiet", archive, cwd=tmp_path).stdout == b""
    make_image(tmp_path / "h.raw", [mixed_cluster(1)])
    assert vma("create", "--quiet", "-v", "h.vma", "h.raw", cwd=tmp_path).stderr == b""


# --- hostile archives -------------------------------------------------------------------------


def craft_archive(
    path: Path, configs: Sequence[tuple[str, bytes]], devices: dict[int, tuple[str, int]]
) -> None:
    """An archive whose names no honest writer would produce; every device has
    one stored cluster of 0x41 bytes."""
    uuid = os.urandom(16)
    parts = [encode_header(uuid, 1_700_000_000, configs, devices)]
    for dev_id in devices:
        parts.append(encode_extent_header(uuid, [make_blockinfo(dev_id, 0, 0xFFFF)]))
        parts.append(b"A" * CLUSTER_SIZE)
    path.write_bytes(b"".join(parts))


@pytest.mark.parametrize(
    ("configs", "devices", "message"),
    [
        ([("../evil", b"x")], {}, "refusing unsafe config name '../evil': it contains '/'"),
        ([("/tmp/abs", b"x")], {}, "refusing unsafe config name '/tmp/abs': it contains '/'"),
        ([("..", b"x")], {}, "refusing unsafe config name '..': it is not a file name"),
        ([(".", b"x")], {}, "refusing unsafe config name '.': it is not a file name"),
        ([("x" * 300, b"x")], {}, "refusing unsafe config name '" + "x" * 300
         + "': it is longer than 255 bytes"),
        ([], {1: ("../../escape", CLUSTER_SIZE)},
         "refusing unsafe device name 'tmp-disk-../../escape.raw': it contains '/'"),
        ([], {1: ("y" * 250, CLUSTER_SIZE)},
         "refusing unsafe device name 'tmp-disk-" + "y" * 250
         + ".raw': it is longer than 255 bytes"),
    ],
)  # fmt: skip
def test_hostile_names_are_refused_and_nothing_is_written(
    tmp_path: Path,
    configs: list[tuple[str, bytes]],
    devices: dict[int, tuple[str, int]],
    message: str,
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    craft_archive(work / "h.vma", configs, devices)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    result = vma("extract", "h.vma", "out", cwd=work, status=1)
    assert one_error_line(result) == f"vma: {message} (archive h.vma)"
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_a_config_named_like_a_disk_file_never_overwrites_it(tmp_path: Path) -> None:
    craft_archive(tmp_path / "h.vma", [("tmp-disk-d.raw", b"config")], {1: ("d", CLUSTER_SIZE)})
    result = vma("extract", "h.vma", "out", cwd=tmp_path, status=1)
    assert one_error_line(result) == (
        f"vma: can't create file {tmp_path}/out/tmp-disk-d.raw - File exists (archive h.vma)"
    )
    assert not (tmp_path / "out").exists()


def test_a_crafted_archive_with_safe_names_extracts(tmp_path: Path) -> None:
    craft_archive(tmp_path / "h.vma", [("..conf", b"c")], {1: ("..", CLUSTER_SIZE)})
    vma("extract", "h.vma", "out", cwd=tmp_path)
    assert (tmp_path / "out" / "..conf").read_bytes() == b"c"
    assert (tmp_path / "out" / "disk-...raw").read_bytes() == b"A" * CLUSTER_SIZE


def test_extract_refuses_an_existing_target_or_a_symlink_to_one(tmp_path: Path) -> None:
    craft_archive(tmp_path / "h.vma", [], {1: ("d", CLUSTER_SIZE)})
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "elsewhere")
    result = vma("extract", "h.vma", "out", cwd=tmp_path, status=1)
    assert one_error_line(result) == (
        "vma: unable to create target directory out - File exists (archive h.vma)"
    )
    assert list((tmp_path / "elsewhere").iterdir()) == []


# --- errors: non-zero status and one line -------------------------------------------------


def test_errors_are_one_line_with_status_1(tmp_path: Path, images: dict[str, bytes]) -> None:
    def error(*args: str) -> str:
        return one_error_line(vma(*args, cwd=tmp_path, status=1))

    assert error("list", "missing.vma") == (
        "vma: can't open file missing.vma - No such file or directory"
    )
    assert error("verify", "disk0.raw") == (
        "vma: not a vma file - wrong magic number (archive disk0.raw)"
    )
    assert error("create", "a.vma", "missing.raw") == (
        "vma: creating vma archive failed - bdrv_open 'missing.raw' failed"
        " - No such file or directory (archive a.vma)"
    )
    assert not (tmp_path / "a.vma").exists()
    assert error("create", "a.vma", "-c", "nope.conf", "disk0.raw") == (
        "vma: Unable to read file: nope.conf: No such file or directory (archive a.vma)"
    )
    vma("create", "a.vma", "disk0.raw", cwd=tmp_path)
    original = (tmp_path / "a.vma").read_bytes()
    assert error("create", "a.vma", "disk1.raw").startswith(
        "vma: creating vma archive failed - can't open file a.vma - File exists"
    )
    assert (tmp_path / "a.vma").read_bytes() == original
    assert error("config", "a.vma", "-c", "nope") == "unable to find configuration data 'nope'"
    assert error("create", "exec:exit 3", "disk0.raw") == (
        "vma: creating vma archive failed - command 'exit 3' exited with status 3"
        " (archive exec:exit 3)"
    )


def test_a_truncated_archive_fails_and_leaves_nothing(
    tmp_path: Path, images: dict[str, bytes]
) -> None:
    vma("create", "a.vma", "disk0.raw", cwd=tmp_path)
    data = (tmp_path / "a.vma").read_bytes()
    header_size, _ = header_of(tmp_path / "a.vma")
    (tmp_path / "t.vma").write_bytes(data[: header_size + 512 + 3 * BLOCK_SIZE])
    result = vma("extract", "t.vma", "out", cwd=tmp_path, status=1)
    assert one_error_line(result).startswith("vma: restore failed - short vma extent (")
    assert not (tmp_path / "out").exists()
    assert one_error_line(vma("verify", "t.vma", cwd=tmp_path, status=1)).startswith(
        "vma: verify failed - short vma extent ("
    )
    # cut at an extent boundary: only the missing-cluster check can tell
    (tmp_path / "t2.vma").write_bytes(data[:header_size])
    result = vma("extract", "t2.vma", "out", cwd=tmp_path, status=1)
    assert one_error_line(result) == (
        "vma: restore failed - detected missing cluster 0 for stream disk0 (archive t2.vma)"
    )


USAGE_START = b"usage: vma command [command options]\n"


@pytest.mark.parametrize(
    "args",
    [[], ["bogus"], ["list"], ["list", "a", "b"], ["list", "-x", "a"], ["-h"],
     ["verify", "-h", "a"], ["extract", "a"], ["config", "-c"], ["create"]],
)  # fmt: skip
def test_usage_errors_print_the_usage_and_exit_1(tmp_path: Path, args: list[str]) -> None:
    result = vma(*args, cwd=tmp_path, status=1)
    assert result.stdout.startswith(USAGE_START)
    if args[-2:-1] == ["-h"]:  # help asked of a command: no problem to name
        assert result.stderr == b""
    else:  # one line naming the problem (tests/test_cli_usage.py checks the words)
        assert result.stderr.startswith(b"vma: ")
        assert result.stderr.count(b"\n") == 1


@pytest.mark.parametrize("command", ["list", "config", "create", "extract", "verify"])
def test_help_on_every_command_has_examples(tmp_path: Path, command: str) -> None:
    out = vma(command, "--help", cwd=tmp_path).stdout.decode()
    assert out.startswith(f"vma {command} ")
    assert "\nExamples:\n  vma " in out


def test_options_may_follow_positionals_as_with_gnu_getopt(tmp_path: Path) -> None:
    craft_archive(tmp_path / "h.vma", [], {1: ("d", CLUSTER_SIZE)})
    assert vma("verify", "h.vma", "-v", cwd=tmp_path).stdout.decode().splitlines()[-2] == (
        "total bytes read 65536, sparse bytes 0 (0%)"
    )


# --- the live progress bar on a terminal ----------------------------------------------------


def run_on_a_terminal(args: Sequence[str], cwd: Path) -> tuple[int, bytes]:
    """Run vma with stderr on a pseudo-terminal; return (status, what it showed)."""
    import pty

    master, slave = pty.openpty()
    try:
        process = subprocess.Popen(
            [VMA, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=slave, env=ENV
        )
        os.close(slave)
        shown = bytearray()
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not chunk:
                break
            shown += chunk
        return process.wait(timeout=60), bytes(shown)
    finally:
        os.close(master)


def test_a_terminal_gets_a_progress_bar_and_a_summary(tmp_path: Path) -> None:
    make_image(tmp_path / "g.raw", GOLDEN_CLUSTERS, tail=GOLDEN_TAIL)
    status, shown = run_on_a_terminal(["create", "g.vma", "g.raw", "x=g.raw"], tmp_path)
    assert status == 0
    text = shown.decode()
    assert "\rcreate [" in text
    assert "ETA" in text
    assert "| disk0 " in text  # per device
    assert " x " in text
    assert "progress " not in text  # not the -v lines
    last = text.replace("\r\n", "\n").rstrip("\n").split("\r")[-1]
    assert last.startswith("\x1b[Kcreate: 2.1 MiB in ")
    assert last.endswith("/s)")
    status, shown = run_on_a_terminal(["verify", "g.vma"], tmp_path)
    assert status == 0
    text = shown.decode()
    assert "\rverify [########################] 100.0% 2.2 MiB/2.2 MiB " in text
    assert "\r\x1b[Kverify: 2.2 MiB in " in text
    status, shown = run_on_a_terminal(["verify", "--quiet", "g.vma"], tmp_path)
    assert (status, shown) == (0, b"")


# --- interruption ------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_create_cleans_up(
    tmp_path: Path, images: dict[str, bytes], signum: int
) -> None:
    """Killed mid-archive (the exec: command has said it is running, and keeps
    the archive waiting), vma stops its command, reaps it and exits 130."""
    ready = tmp_path / "ready.fifo"
    os.mkfifo(ready)
    process = subprocess.Popen(
        [VMA, "create", f"exec:echo $$ > {ready}; exec sleep 60", "disk0.raw"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    with open(ready) as f:
        child = int(f.read())
    process.send_signal(signum)
    assert process.wait(timeout=30) == 130
    assert process.stderr is not None
    assert process.stderr.read() == b"vma: interrupted\n"
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # terminated and reaped, not left running or a zombie


def test_names_that_are_not_utf8_are_printed_as_raw_bytes(tmp_path: Path) -> None:
    craft_archive(tmp_path / "h.vma", [("c\udcff", b"x")], {1: ("d\udcfe", CLUSTER_SIZE)})
    out = vma("list", "h.vma", cwd=tmp_path).stdout
    assert out.startswith(b"CFG: size: 1 name: c\xff\nDEV: dev_id=1 size: 65536 devname: d\xfe\n")
    vma("extract", "h.vma", "out", cwd=tmp_path)
    assert sorted(os.listdir(os.fsencode(tmp_path / "out"))) == [b"c\xff", b"disk-d\xfe.raw"]


# --- progress output never blocks the event loop (issue 8) ------------------------------------


class _ThreadRecordingStream:
    """Stands in for stdout: records which thread writes and flushes."""

    def __init__(self) -> None:
        self.text = ""
        self.threads: set[int] = set()

    def write(self, text: str) -> int:
        self.threads.add(threading.get_ident())
        self.text += text
        return len(text)

    def flush(self) -> None:
        self.threads.add(threading.get_ident())


@pytest.mark.anyio
async def test_progress_lines_are_written_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """stdout may be a pipe whose reader is slow: the -v lines are written
    and flushed by a worker thread, never by the event loop's thread."""
    stream = _ThreadRecordingStream()
    monkeypatch.setattr(sys, "stdout", stream)
    device = DeviceInfo(1, "d", 100 * CLUSTER_SIZE)
    reporter = ReadReporter("lines", [device], "verify")
    for done in (0, 30, 100):
        await reporter(Progress("verify", done * CLUSTER_SIZE, 100 * CLUSTER_SIZE, 0, 0, 0.0, ()))
    lines = stream.text.splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"progress {p}%" for p in range(1, 101)]
    assert stream.threads
    assert threading.get_ident() not in stream.threads


@pytest.mark.anyio
async def test_progress_duration_counts_whole_seconds_as_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reference prints ``time(NULL) - start_time``: whole seconds on
    both sides, so 0.2 s that cross a second boundary read "duration 1 sec"
    (and 0.9 s that do not, "0 sec")."""
    stream = _ThreadRecordingStream()
    monkeypatch.setattr(sys, "stdout", stream)
    times = [100.9, 101.1, 101.8, 102.0]  # the start, then one per report
    monkeypatch.setattr(time_module, "time", lambda: times.pop(0))
    reporter = ReadReporter("lines", [DeviceInfo(1, "d", 100 * CLUSTER_SIZE)], "verify")
    for done in (1, 2, 3):
        await reporter(Progress("verify", done * CLUSTER_SIZE, 100 * CLUSTER_SIZE, 0, 0, 0.0, ()))
    assert stream.text.splitlines() == [
        "progress 1% (read 65536 bytes, duration 1 sec)",
        "progress 2% (read 131072 bytes, duration 1 sec)",
        "progress 3% (read 196608 bytes, duration 2 sec)",
    ]
