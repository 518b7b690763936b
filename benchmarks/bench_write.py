"""Write a VMA archive from a 1 GiB image (half random, half zero) with VmaWriter.

For asyncio, uvloop and trio, each case in a fresh subprocess (so peak RSS is
that case's own), it prints throughput, peak RSS (VmHWM), the worst event-loop
stall a 5 ms heartbeat task saw and how often producers waited for a buffer,
beside baselines measured in the same run on the same directory:

* ``cp`` of the image: the baseline for the writer through the page cache
  (``NewFileTarget(direct=False)``); cp does not wait for the disk either;
* ``dd oflag=direct bs=4M`` of the image: the baseline for the writer with
  ``O_DIRECT`` (the default, as in the reference), which waits for the disk
  on every extent.  (Our archive is about half the image: zeros are elided.)

Targets (issue 2): throughput >= the baseline, peak RSS < 64 MiB, worst stall
< 20 ms.

    .venv/bin/python benchmarks/bench_write.py [--size-mib 1024] [--dir DIR]

DIR defaults to a fresh ``bench-write-*`` directory in the repository (on the
same disk as the checkout, not a tmpfs); it is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CLUSTER = 65536
CHUNK_CLUSTERS = 64
"""Clusters the producer reads per worker-thread call (4 MiB)."""
READ_RING = 3
"""Chunk buffers the reader thread cycles through (reading, queued, being
written); the writer copies a cluster before ``write`` returns."""


def make_image(path: Path, size: int) -> None:
    """First half random, second half zero bytes (written, not sparse)."""
    rng = random.Random(42)
    step = 8 << 20
    with path.open("wb") as image:
        for offset in range(0, size, step):
            n = min(step, size - offset)
            image.write(rng.randbytes(n) if offset < size // 2 else bytes(n))


def peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def idle_stalls(seconds: float = 2.0) -> list[float]:
    """The heartbeat alone on an idle asyncio loop: the machine's own stall
    floor (other processes' load, scheduling), to read the table against."""
    import anyio
    from _heartbeat import HEARTBEAT

    async def main() -> list[float]:
        stalls = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            await anyio.sleep(HEARTBEAT)
            stalls.append((time.perf_counter() - start - HEARTBEAT) * 1000)
        return stalls

    return anyio.run(main)


def run_case(backend: str, image: str, out: str, mode: str) -> dict[str, float]:
    """One archive, written in this process under ``backend``."""
    import anyio
    import anyio.from_thread
    import anyio.to_thread
    from _heartbeat import Heartbeat

    from vma_async import NewFileTarget, VmaWriter

    size = os.path.getsize(image)
    clusters = (size + CLUSTER - 1) // CLUSTER
    heartbeat = Heartbeat()

    ring = [[bytearray(CLUSTER) for _ in range(CHUNK_CLUSTERS)] for _ in range(READ_RING)]
    free_slots = threading.Semaphore(READ_RING)
    stop = threading.Event()

    def read_all(fd: int, send: Any) -> None:
        """One worker thread reads the image back to back into the ring (one
        syscall per chunk) and hands each chunk to the event loop; a slot is
        reused once the producer has written its clusters."""
        try:
            for first in range(0, clusters, CHUNK_CLUSTERS):
                free_slots.acquire()
                if stop.is_set():
                    return
                slot = ring[first // CHUNK_CLUSTERS % READ_RING]
                chunk = slot[: min(CHUNK_CLUSTERS, clusters - first)]
                os.preadv(fd, chunk, first * CLUSTER)
                anyio.from_thread.run_sync(send.send_nowait, (first, chunk))
        finally:
            anyio.from_thread.run_sync(send.close)

    async def main() -> float:
        done = anyio.Event()
        fd = os.open(image, os.O_RDONLY)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(heartbeat.run, done)
                start, start_cpu = time.perf_counter(), time.thread_time()
                target = NewFileTarget(out, direct=mode == "direct")
                async with VmaWriter.open(target) as writer:
                    dev_id = writer.register_stream("drive-scsi0", size)
                    send, receive = anyio.create_memory_object_stream[tuple[int, list[bytearray]]](
                        READ_RING
                    )
                    try:
                        async with anyio.create_task_group() as producers:
                            producers.start_soon(anyio.to_thread.run_sync, read_all, fd, send)
                            async with receive:
                                async for first, chunk in receive:
                                    for i, data in enumerate(chunk):
                                        await writer.write(dev_id, first + i, data)
                                    free_slots.release()
                    finally:
                        stop.set()
                        free_slots.release()
                    await writer.close_stream(dev_id)
                elapsed = time.perf_counter() - start
                loop_cpu = time.thread_time() - start_cpu
                done.set()
        finally:
            os.close(fd)
        stats.update(
            waits=writer.stats.producer_waits, direct=target.direct, loop_pct=loop_cpu / elapsed
        )
        return elapsed

    stats: dict[str, float] = {}

    if backend == "uvloop":
        elapsed = anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
    else:
        elapsed = anyio.run(main, backend=backend)
    check_archive(out, clusters)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "seconds": elapsed,
        "bytes": size,
        "archive_bytes": os.path.getsize(out),
        "rss_mib": peak_rss_mib(),
        "stall_ms": heartbeat.worst * 1000,
        "producer_waits": stats["waits"],
        "direct": stats["direct"],
        "loop_cpu_pct": 100 * stats["loop_pct"],
    }


def check_archive(path: str, clusters: int) -> None:
    """Walk the extent headers: every cluster once, the file ends on an extent."""
    from vma_async._format import EXTENT_HEADER_SIZE, decode_extent_header, decode_header

    with open(path, "rb") as archive:
        header = decode_header(archive.read(512 * 1024))
        pos, seen = header.header_size, 0
        while archive.seek(pos) == pos and (raw := archive.read(EXTENT_HEADER_SIZE)):
            extent = decode_extent_header(raw, header.uuid)
            seen += len(extent.entries)
            pos += extent.size
        if seen != clusters or pos != os.path.getsize(path):
            raise SystemExit(f"bad archive: {seen} of {clusters} clusters, ends at {pos}")


def time_copy(command: list[str], out: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    elapsed = time.perf_counter() - start
    out.unlink()
    return elapsed


def baselines(image: Path, workdir: Path) -> dict[str, float]:
    out = workdir / "copy.out"
    return {
        "page": time_copy(["cp", str(image), str(out)], out),
        "direct": time_copy(
            ["dd", f"if={image}", f"of={out}", "bs=4M", "oflag=direct", "status=none"], out
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--backends", default="asyncio,uvloop,trio")
    parser.add_argument("--modes", default="page,direct", help="page (cache) and/or direct")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child[0] == "idle":
            print(json.dumps({"stall_ms": max(idle_stalls())}))
        else:
            print(json.dumps(run_case(*args.child)))
        return

    repo = Path(__file__).resolve().parent.parent
    workdir = Path(tempfile.mkdtemp(prefix="bench-write-", dir=args.dir or repo))
    try:
        image = workdir / "image.raw"
        size = args.size_mib << 20
        make_image(image, size)
        with image.open("rb") as warm:  # every contender reads from the page cache
            while warm.read(8 << 20):
                pass
        base: dict[str, list[float]] = {"page": [], "direct": []}
        runs: dict[tuple[str, str], list[dict[str, float]]] = {}
        idle_worst: list[float] = []
        for _ in range(args.repeat):  # interleaved, so that load changes hit all alike
            for mode, seconds in baselines(image, workdir).items():
                base[mode].append(seconds)
            idle = subprocess.run(
                [sys.executable, __file__, "--child", "idle", "-", "-", "-"],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            idle_worst.append(json.loads(idle.stdout)["stall_ms"])
            for mode in args.modes.split(","):
                for backend in args.backends.split(","):
                    out = workdir / f"{backend}.vma"
                    child = subprocess.run(
                        [sys.executable, __file__, "--child", backend, str(image), str(out), mode],
                        check=True, capture_output=True, text=True,
                    )  # fmt: skip
                    runs.setdefault((backend, mode), []).append(json.loads(child.stdout))
                    out.unlink()
        print_table(args.size_mib, workdir.parent, args.repeat, base, runs, idle_worst)
    finally:
        shutil.rmtree(workdir)


def print_table(
    size_mib: int,
    where: Path,
    repeat: int,
    base: dict[str, list[float]],
    runs: dict[tuple[str, str], list[dict[str, float]]],
    idle_worst: list[float],
) -> None:
    mb = (size_mib << 20) / 1e6
    names = {"page": "cp", "direct": "dd oflag=direct"}
    best_base = {mode: min(times) for mode, times in base.items()}
    print(f"image: {size_mib} MiB (half random, half zero), files in {where}, best of {repeat}")
    print(f"load average before the table: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(
        f"{'case':<16} {'output':<7} {'seconds':>8} {'MB/s':>6} {'vs base':>7} "
        f"{'peak RSS MiB':>12} {'stall ms worst/median':>21} {'waits':>6} {'loop CPU %':>10}"
    )
    for mode, seconds in best_base.items():
        print(f"{names[mode]:<16} {mode:<7} {seconds:>8.3f} {mb / seconds:>6.0f} {1:>7.2f}")
    idle = sorted(idle_worst)
    print(
        f"{'idle loop, 2 s':<16} {'-':<7} {'':>8} {'':>6} {'':>7} {'':>12} "
        f"{idle[-1]:>12.1f} / {idle[len(idle) // 2]:>6.1f}"
    )
    for (backend, mode), results in runs.items():
        best = min(results, key=lambda r: r["seconds"])
        stalls = sorted(r["stall_ms"] for r in results)
        output = "direct" if best["direct"] else "page"
        print(
            f"{backend:<16} {output:<7} {best['seconds']:>8.3f} {mb / best['seconds']:>6.0f} "
            f"{best_base[mode] / best['seconds']:>7.2f} "
            f"{max(r['rss_mib'] for r in results):>12.1f} "
            f"{stalls[-1]:>12.1f} / {stalls[len(stalls) // 2]:>6.1f} "
            f"{int(best['producer_waits']):>6} {best['loop_cpu_pct']:>10.0f} {best['cpu_s']:>13.2f}"
        )
    print("targets: vs base >= 1.00, peak RSS < 64 MiB, worst stall < 20 ms")


if __name__ == "__main__":
    main()
