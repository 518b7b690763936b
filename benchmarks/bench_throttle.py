"""Throttling (``throttling.bps`` in a restore map) holds the set rate within 10 %.

Part 1 drives :class:`ThrottledSink` directly: several concurrent writers of
one throttle group share a limiter and write 64 KiB clusters into a file as
fast as they can; the rate achieved must be within 10 % of the limit, and the
unthrottled baseline (same writers, no limiter) is printed for comparison.

Part 2 runs the real thing end to end: ``vma extract -r MAP`` of a generated
archive with ``throttling.bps`` in the map, the map written into a FIFO by
another process, timed from outside.

Run: ``.venv/bin/python benchmarks/bench_throttle.py`` (about 30 s on 2 cores).
"""

from __future__ import annotations

import filecmp
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

from vma_async import RateLimiter, ThrottledSink

CLUSTER = 65536
RATE = 32 * 1024 * 1024  # bytes per second
DURATION = 3.0  # seconds of throttled writing per measurement
TOLERANCE = 0.10


class FileSink:
    """The smallest sink: pwrite into an open file (in a worker thread)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.written = 0

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        await anyio.to_thread.run_sync(os.pwrite, self.fd, data, offset)
        self.written += len(data)

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self.write(offset, bytes(length))

    async def flush(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def run_writers(
    directory: Path, limiter: RateLimiter | None, total: int, writers: int
) -> float:
    """Write ``total`` bytes split over ``writers`` concurrent sinks; return bytes/s."""
    per_writer = total // writers
    data = os.urandom(CLUSTER)
    fds = [
        os.open(directory / f"w{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC) for i in range(writers)
    ]
    try:

        async def writer(fd: int) -> None:
            sink = FileSink(fd)
            target = ThrottledSink(sink, limiter) if limiter is not None else sink
            for offset in range(0, per_writer, CLUSTER):
                await target.write(offset, data)

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for fd in fds:
                tg.start_soon(writer, fd)
        elapsed = time.perf_counter() - start
    finally:
        for fd in fds:
            os.close(fd)
    return per_writer * writers / elapsed


def check(label: str, measured: float, limit: float) -> bool:
    error = measured / limit - 1
    ok = abs(error) <= TOLERANCE
    print(
        f"{label}: {measured / 2**20:8.2f} MiB/s against a limit of {limit / 2**20:.2f} MiB/s"
        f" ({error:+.1%}) {'OK' if ok else 'FAIL'}"
    )
    return ok


def _timed(args: list[str | Path]) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def end_to_end(directory: Path) -> bool:
    """``vma extract -r`` with ``throttling.bps``, timed from outside.

    The wall clock includes a fixed cost the throttle does not govern (Python
    start-up, imports, reading the header): measured here as the median of
    three ``vma list`` runs of the same archive, and subtracted.
    """
    vma = Path(sys.executable).with_name("vma")
    image = directory / "disk.raw"
    size = int(RATE * DURATION * 2)
    with image.open("wb") as f:
        for _ in range(0, size, 1 << 20):
            f.write(os.urandom(1 << 20))
    archive = directory / "a.vma"
    subprocess.run([vma, "create", archive, f"drive-scsi0={image}"], check=True)
    fixed = sorted(_timed([vma, "list", archive]) for _ in range(3))[1]
    restored = directory / "restored.raw"
    restored.write_bytes(b"")
    os.truncate(restored, size)
    fifo = directory / "map.fifo"
    os.mkfifo(fifo)
    map_text = f"throttling.bps={RATE}:throttling.group=g0:1:drive-scsi0={restored}\ndone\n"
    feeder = subprocess.Popen(
        [sys.executable, "-c", f"open({str(fifo)!r}, 'w').write({map_text!r})"]
    )
    elapsed = _timed([vma, "extract", "-r", fifo, archive, directory / "out"])
    feeder.wait()
    same = filecmp.cmp(restored, image, shallow=False)
    print(f"end to end: restored bytes equal the image: {same}")
    print(
        f"vma extract -r: {size / 2**20:.0f} MiB in {elapsed:.2f} s wall clock"
        f" ({size / elapsed / 2**20:.2f} MiB/s), fixed start-up cost {fixed:.2f} s"
    )
    return (
        check("vma extract -r (throttling.bps), start-up excluded", size / (elapsed - fixed), RATE)
        and same
    )


async def in_process(directory: Path) -> bool:
    total = int(RATE * DURATION)
    baseline = await run_writers(directory, None, total, writers=3)
    print(f"unthrottled baseline (3 writers): {baseline / 2**20:8.2f} MiB/s")
    ok = True
    for writers in (1, 3):
        rate = await run_writers(directory, RateLimiter(RATE), total, writers)
        ok &= check(f"ThrottledSink, {writers} writer(s) sharing one group", rate, RATE)
    print(f"throttled/baseline ratio: {RATE / baseline:.3f}")
    return ok


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        ok = True
        for backend in ("asyncio", "trio"):
            print(f"-- backend {backend}")
            ok &= anyio.run(in_process, directory, backend=backend)
        ok &= end_to_end(directory)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS: {peak:.1f} MiB (this process), {children:.1f} MiB (largest child process)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
