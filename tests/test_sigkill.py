"""A writer killed with SIGKILL mid-backup leaves a file that verify rejects.

No clean-up code runs after SIGKILL, so what is on disk is whatever the
writer had written: the header and some whole or partial extents.  The
reader must reject every such file (a short extent, or missing clusters at
the end), never pass it.

Synchronisation is by lines, not sleeps: the child prints ``at N`` after it
has queued N clusters, and either stops there reading its stdin (so the kill
lands at a known point, for N across the first extents) or carries on (so
the kill lands wherever the backup happens to be, including mid-write).
The ``vma create`` command is killed the same way on its ``progress 10%`` line.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from vma_async import FormatError, VmaReader

CLUSTER = 65536
CLUSTERS = 200
"""About 13 MiB: three and a half extents."""

CHILD = textwrap.dedent(
    """
    import random, sys
    import anyio
    from vma_async import VmaWriter

    path, hold_at, clusters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(5)

    async def main() -> None:
        async with VmaWriter.open(path) as writer:
            dev_id = writer.register_stream("drive-scsi0", clusters * 65536)
            for cluster in range(clusters):
                await writer.write(dev_id, cluster, rng.randbytes(65536))
                if cluster + 1 == hold_at or hold_at < 0:
                    print(f"at {cluster + 1}", flush=True)
                if cluster + 1 == hold_at:
                    await anyio.to_thread.run_sync(sys.stdin.readline)
            await writer.close_stream(dev_id)
        print("done", flush=True)

    anyio.run(main)
    """
)


async def verify_error(path: Path) -> FormatError | None:
    try:
        async with await VmaReader.open(path) as reader:
            await reader.verify()
    except FormatError as exc:
        return exc
    return None


def run_child(path: Path, hold_at: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(hold_at), str(CLUSTERS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def kill(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    assert child.stdout is not None
    assert child.stdin is not None
    child.stdout.close()
    child.stdin.close()


@pytest.mark.parametrize("hold_at", [1, 57, 58, 59, 116, 117, 150, CLUSTERS])
def test_killed_while_held_leaves_an_archive_verify_rejects(tmp_path: Path, hold_at: int) -> None:
    path = tmp_path / "killed.vma"
    child = run_child(path, hold_at)
    assert child.stdout is not None
    assert child.stdout.readline() == f"at {hold_at}\n"
    kill(child)
    error = anyio.run(verify_error, path)
    assert error is not None, f"killed after {hold_at} clusters, the archive verifies"
    assert type(error).__name__ in ("MissingClusterError", "TruncatedArchiveError")


def test_killed_while_running_never_leaves_a_passing_archive(tmp_path: Path) -> None:
    """The kill lands wherever the writer is: the file may end anywhere."""
    outcomes: dict[str, int] = {}
    for index, after in enumerate(random.Random(9).sample(range(1, CLUSTERS), 6)):
        path = tmp_path / f"running{index}.vma"
        child = run_child(path, -1)
        assert child.stdout is not None
        for line in child.stdout:
            if line == f"at {after}\n":
                break
        kill(child)
        error = anyio.run(verify_error, path)
        assert error is not None, f"killed after {after} clusters, the archive verifies"
        outcomes[type(error).__name__] = outcomes.get(type(error).__name__, 0) + 1
    assert set(outcomes) <= {"MissingClusterError", "TruncatedArchiveError"}


def test_vma_create_killed_at_ten_percent(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(random.Random(3).randbytes(1024 * CLUSTER))  # 64 MiB
    path = tmp_path / "cli.vma"
    child = subprocess.Popen(
        [sys.executable, "-m", "vma_async", "create", "-v", str(path), str(image)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TERM": "dumb"},
    )
    assert child.stderr is not None
    for line in child.stderr:
        # progress is reported per 4 MiB chunk: 0 %, 6 %, 12 %, ... of 64 MiB
        if line.startswith("progress ") and int(line.split()[1].rstrip("%")) >= 10:
            break
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    child.stderr.close()
    error = anyio.run(verify_error, path)
    assert error is not None
    assert type(error).__name__ in ("MissingClusterError", "TruncatedArchiveError")
    result = subprocess.run(
        [sys.executable, "-m", "vma_async", "verify", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    # Killed under load, the output may not even hold the whole header yet.
    assert result.stderr.startswith(("vma: verify failed - ", "vma: can't read vma header")), (
        result.stderr
    )
