"""Rough edges of the ``vma`` command a new user hit: usage errors that say what
is wrong, a device name given twice, ``create -`` to standard output, and a
progress bar that fits the terminal and clears its line on ^C."""

from __future__ import annotations

import io
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vma_async._cli import USAGE, ProgressBar, fit_progress_line

VMA = [sys.executable, "-m", "vma_async"]


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["extrct", "a.vma", "dir"], {}, "unknown command 'extrct' (did you mean 'extract'?)"),
        (["extract", "a.vma"], {}, "extract needs FILE and TARGETDIR (got 1 argument)"),
        (["verify", "--json", "a.vma"], {}, "--json is not an option of 'verify' (only of list)"),
        (["list", "a.vma"], {"VMA_ASYNC_BACKEND": "curio"},
         "invalid VMA_ASYNC_BACKEND 'curio' (use asyncio, uvloop or trio)"),
        ([], {}, "no command given"),
        (["create", "--uuid", "nope", "x.vma", "a.raw"], {}, "--uuid: not a UUID: 'nope'"),
        (["create", "--ctime", "yesterday", "x.vma", "a.raw"], {},
         "--ctime: not a number of seconds: 'yesterday'"),
        (["create", "x.vma", "a.raw"], {"SOURCE_DATE_EPOCH": "-5"},
         "SOURCE_DATE_EPOCH: out of range: -5"),
        (["create", "--digest", "-", "a.raw"], {}, "--digest needs an archive file name"),
        (["extract", "-x", "a.vma", "dir"], {}, "extract: option -x not recognized"),
        (["repack", "in.vma"], {}, "repack needs FILE and NEWFILE (got 1 argument)"),
    ],
)  # fmt: skip
def test_usage_errors_say_what_is_wrong_then_the_usage(
    tmp_path: Path, argv: list[str], env: dict[str, str], message: str
) -> None:
    run = subprocess.run(
        [*VMA, *argv], capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **env}
    )
    assert run.returncode == 1
    assert run.stderr.startswith(f"vma: {message}")  # one line: the reason
    assert run.stderr.count("\n") == 1
    assert run.stdout == USAGE
    assert not (tmp_path / "x.vma").exists()


def test_short_h_prints_the_usage_alone_as_the_reference() -> None:
    run = subprocess.run([*VMA, "list", "-h"], capture_output=True, text=True)
    assert (run.returncode, run.stderr, run.stdout) == (1, "", USAGE)


def test_the_same_device_name_twice_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.raw").write_bytes(b"a" * 4096)
    (tmp_path / "b.raw").write_bytes(b"b" * 4096)
    run = subprocess.run(
        [
            *VMA,
            "create",
            str(tmp_path / "x.vma"),
            f"d={tmp_path / 'a.raw'}",
            f"d={tmp_path / 'b.raw'}",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert "device name 'd' given twice" in run.stderr
    assert not (tmp_path / "x.vma").exists()


@pytest.mark.parametrize(
    ("device_args", "path"),
    [(["-d", "format=qcow3:drive-a=a.raw"], "a.raw"), (["format=qcow3:b.raw"], "b.raw")],
)
def test_create_unknown_format_in_the_reference_words(
    tmp_path: Path, device_args: list[str], path: str
) -> None:
    """Current Proxmox vma says ``bdrv_open 'a.raw' failed - Unknown driver 'qcow3'``
    (checked against a build of it, docs/compatibility.md); no archive is left."""
    (tmp_path / path).write_bytes(b"a" * 65536)
    run = subprocess.run(
        [*VMA, "create", "x.vma", *device_args], capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 1
    assert run.stderr == (
        f"vma: bdrv_open '{path}' failed - Unknown driver 'qcow3' (archive x.vma)\n"
    )
    assert not (tmp_path / "x.vma").exists()


def test_create_dash_writes_the_archive_to_stdout(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(300_000)
    (tmp_path / "disk.raw").write_bytes(data)
    with (tmp_path / "out.vma").open("wb") as out:
        run = subprocess.run(
            [*VMA, "create", "-", f"drive-scsi0={tmp_path / 'disk.raw'}"],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
    assert run.returncode == 0, run.stderr
    assert not (tmp_path / "-").exists()
    subprocess.run([*VMA, "extract", str(tmp_path / "out.vma"), str(tmp_path / "x")], check=True)
    restored = (tmp_path / "x" / "disk-drive-scsi0.raw").read_bytes()
    assert restored == data + bytes(len(restored) - len(data))


def test_create_dash_refuses_a_terminal(tmp_path: Path) -> None:
    (tmp_path / "disk.raw").write_bytes(b"x" * 512)
    master, slave = os.openpty()
    try:
        run = subprocess.run(
            [*VMA, "create", "-", str(tmp_path / "disk.raw")], stdout=slave, stderr=subprocess.PIPE
        )
    finally:
        os.close(slave)
        os.close(master)
    assert run.returncode == 1
    assert b"refusing to write an archive to a terminal" in run.stderr


@pytest.mark.parametrize("columns", [80, 60, 40])
def test_the_bar_fits_the_terminal(columns: int) -> None:
    line = fit_progress_line(
        columns, "create", 0.5, "2.0 GiB/4.0 GiB", "812.4 MiB/s", "ETA 0:03",
        ["drive-scsi0 48%", "drive-scsi1 52%"],
    )  # fmt: skip
    assert len(line) <= columns - 1
    assert line.startswith("create [")
    assert "ETA 0:03" in line


def _read_until(fd: int, wanted: bytes, deadline: float) -> bytes:
    out = b""
    while wanted not in out:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {wanted!r} in {out!r}")
        try:
            out += os.read(fd, 65536)
        except OSError as exc:  # EIO: the child exited
            raise AssertionError(f"no {wanted!r} in {out!r}") from exc
    return out


def _drain(fd: int) -> bytes:
    out = b""
    while True:
        ready, _, _ = select.select([fd], [], [], 5)
        if not ready:
            return out
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child's side is closed
            return out
        if not chunk:
            return out
        out += chunk


def test_ctrl_c_clears_the_bar_line_and_every_draw_fits_80_columns(tmp_path: Path) -> None:
    rng = random.Random(2)
    for name in ("a", "b"):
        (tmp_path / f"{name}.raw").write_bytes(rng.randbytes(24 << 20))
    master, slave = os.openpty()
    # The archive goes to a command that never reads: the writer stalls, the bar stays.
    proc = subprocess.Popen(
        [*VMA, "create", "exec:sleep 60",
         f"drive-scsi0={tmp_path / 'a.raw'}", f"drive-scsi1={tmp_path / 'b.raw'}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave,
        env={**os.environ, "COLUMNS": "80", "LINES": "24"},
    )  # fmt: skip
    os.close(slave)
    try:
        out = _read_until(master, b"] ", time.monotonic() + 30)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        out += _drain(master)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = out.decode().replace("\r\n", "\n")
    assert text.endswith("\r\x1b[Kvma: interrupted\n")
    draws = [piece.removesuffix("\x1b[K") for piece in text.split("\r")[1:-1]]
    assert draws
    assert all(len(draw) <= 79 for draw in draws), draws


def test_the_eta_comes_from_bytes_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Half the device walked (its holes are free) but a tenth of the data read:
    the estimate follows the reading, not the walking."""
    clock = iter([0.0, 10.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    monkeypatch.setenv("COLUMNS", "120")
    stream = io.StringIO()
    bar = ProgressBar(stream, "create")
    mib = 1 << 20
    bar.update(500 * mib, 1000 * mib, read=100 * mib, read_total=1000 * mib)
    line = stream.getvalue()
    assert " 10.0%" in line
    assert "ETA 1:30" in line  # 900 MiB left at 10 MiB/s; walked bytes would say 0:10
    bar.clear()
    assert stream.getvalue().endswith("\r\x1b[K")
