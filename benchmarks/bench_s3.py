"""Archives in S3 (SeaweedFS on 127.0.0.1) against archives in a local file.

Five runs (four of the ``vma`` command), each a subprocess whose own peak RSS is
taken from ``wait4``:

* ``create FILE``          a local file (the baseline),
* ``create s3://B/K``      a multipart upload into SeaweedFS,
* ``put s3://``            the finished archive file uploaded by obstore alone
                           (same part size and parallelism): the store's ceiling,
* ``extract FILE``         from the local file (the baseline),
* ``extract s3://B/K``     ranged GETs with read-ahead from SeaweedFS.

The image is half random, half zero in 8 MiB runs (default 512 MiB; the
issue's figure is ``--size 4G``).  Targets (issue 12): each S3 run at least
0.5x the throughput of its local-file baseline; the S3 runs' peak RSS within
the stated bounds (target: (parts in flight + 1) x part size = 160 MiB, plus
the writer's ~15 MiB pool; source: read-ahead 4 x 8 MiB).

SeaweedFS shares the machine with the client (its CPU time counts against
the S3 runs), so this is a floor, not a prediction for a real store.

    .venv/bin/python benchmarks/bench_s3.py [--size 512M] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "benchmarks"))

from bench_read import make_image  # noqa: E402

from tests.s3_server import SeaweedServer  # noqa: E402

VMA = str(Path(sys.executable).with_name("vma"))


_PUT = """
import sys, obstore
from vma_async._s3 import DEFAULT_PART_SIZE, DEFAULT_PARTS_IN_FLIGHT, open_s3_store, parse_s3_url
bucket, key = parse_s3_url(sys.argv[2])
with open(sys.argv[1], "rb") as f:
    obstore.put(open_s3_store(bucket), key, f, chunk_size=DEFAULT_PART_SIZE,
                max_concurrency=DEFAULT_PARTS_IN_FLIGHT)
"""
"""The store's ceiling: obstore uploading the finished archive file with the
target's part size and parallelism (no archive to build, nothing to wait for)."""


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1:].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, int]:
    """Seconds and peak RSS (bytes) of one run of ``args``."""
    started = time.monotonic()
    process = subprocess.Popen(args, cwd=cwd, env=env, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.monotonic() - started
    assert process.stderr is not None
    error = process.stderr.read().decode()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {error}")
    return elapsed, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="512M", help="image size (512M, 4G, ...)")
    parser.add_argument("--dir", help="working directory (default: a new one in the repository)")
    options = parser.parse_args()
    size = parse_size(options.size)
    work = Path(tempfile.mkdtemp(prefix="bench-s3-", dir=options.dir or REPO))
    server = SeaweedServer(str(work))
    try:
        server.start()
        server.make_bucket("bench")
        env = {**os.environ, **server.env(), "VMA_ASYNC_BACKEND": "asyncio"}
        make_image(work / "disk.raw", size)
        url = "s3://bench/a.vma"
        rows = []
        for label, args in (
            ("create  file", [VMA, "create", "a.vma", "disk.raw"]),
            ("create  s3://", [VMA, "create", url, "disk.raw"]),
            ("put     s3://", [sys.executable, "-c", _PUT, "a.vma", "s3://bench/ceiling.vma"]),
            ("extract file", [VMA, "extract", "a.vma", "out-file"]),
            ("extract s3://", [VMA, "extract", url, "out-s3"]),
        ):
            seconds, rss = timed(args, work, env)
            rows.append((label, seconds, rss))
            print(
                f"{label:14} {seconds:7.2f} s {size / seconds / 1e6:8.1f} MB/s (image)"
                f"   peak RSS {rss / (1 << 20):6.1f} MiB",
                flush=True,
            )
        for out in ("out-file", "out-s3"):
            if (work / out / "disk-disk0.raw").read_bytes() != (work / "disk.raw").read_bytes():
                raise SystemExit(f"{out}: restored image differs")
        for what, file_row, s3_row in (("create", rows[0], rows[1]), ("extract", rows[3], rows[4])):
            print(f"{what}: s3:// at {file_row[1] / s3_row[1]:.2f}x the local file's throughput")
        print(f"create: s3:// at {rows[2][1] / rows[1][1]:.2f}x the store's ceiling (put)")
    finally:
        server.remove()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
