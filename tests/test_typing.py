"""The public API type-checks the way callers write it: ``mypy --strict``
over a small caller (a real mypy subprocess, its own cache directory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CALLER = """
from collections.abc import Mapping

from vma_async import CallbackSink, RawFileSink, Sink, VmaReader


async def by_name(path: str, sinks: dict[str, RawFileSink]) -> None:
    async with VmaReader.open(path) as reader:
        await reader.restore(sinks)


async def by_id(reader: VmaReader, sinks: dict[int, Sink]) -> None:
    await reader.restore(sinks)


async def mixed(reader: VmaReader, sinks: Mapping[str | int, CallbackSink]) -> None:
    await reader.restore(sinks)


async def awaited(path: str) -> int:
    reader = await VmaReader.open(path)
    try:
        view = await reader.open_device("drive-scsi0", require_complete=False)
        return sum(length for length, flags in view.block_status(0, view.size) if flags == 0)
    finally:
        await reader.aclose()
"""


def test_restore_accepts_plain_dicts_of_concrete_sinks(tmp_path: Path) -> None:
    caller = tmp_path / "caller.py"
    caller.write_text(CALLER)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(caller),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found in 1 source file" in result.stdout
