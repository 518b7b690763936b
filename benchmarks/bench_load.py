"""Load: one event loop running 50 backups at once, then 50 restores at once.

Each backup is :func:`create_archive` of 4 small images (2 MiB each, half of
the 4 KiB blocks random, half zero) into its own archive; each restore is
:func:`extract_archive` of one of them.  Every restored image is compared
byte for byte with its source.

Measured, for the concurrent run and for a baseline of the same 50 jobs run
one after another on the same loop (ratios printed):

* throughput (image bytes per second);
* peak RSS above the process's RSS before the phase, sampled every 5 ms,
  against the bound the library promises: for a backup the writer's buffer
  pool (``WriterStats.bound``) plus each device's read buffer (one group of
  ``PACK_GROUP`` clusters: raw images are read and packed 512 KiB at a
  time); for a restore the
  reader's batch plus two queued extents per sink;
* the event loop's worst stall: a task asks to sleep 1 ms and records how
  late it wakes.

    .venv/bin/python benchmarks/bench_load.py [--jobs 50] [--backend asyncio|uvloop|trio]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vma_async import CLUSTER_SIZE, MAX_EXTENT_SIZE, create_archive, extract_archive
from vma_async._reader import _BATCH_BYTES, _SINK_QUEUE
from vma_async._writer import BUFFER_SIZE, DEFAULT_BUFFER_COUNT, PACK_GROUP

DEVICES = 4
IMAGE_SIZE = 2 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def make_images(directory: Path) -> list[Path]:
    rng = random.Random(50)
    paths = []
    for index in range(DEVICES):
        blocks = [
            rng.randbytes(4096) if rng.random() < 0.5 else bytes(4096)
            for _ in range(IMAGE_SIZE // 4096)
        ]
        path = directory / f"image{index}.raw"
        path.write_bytes(b"".join(blocks))
        paths.append(path)
    return paths


class Monitor:
    """Samples RSS and measures how late a 1 ms sleep wakes up."""

    def __init__(self) -> None:
        self.base = rss()
        self.peak = self.base
        self.worst_stall = 0.0

    async def run(self) -> None:
        while True:
            before = time.perf_counter()
            await anyio.sleep(0.001)
            self.worst_stall = max(self.worst_stall, time.perf_counter() - before - 0.001)
            self.peak = max(self.peak, rss())


async def measure(jobs: list[Callable[[], Awaitable[None]]], concurrent: bool) -> dict[str, float]:
    monitor = Monitor()
    started = time.perf_counter()
    async with anyio.create_task_group() as outer:
        outer.start_soon(monitor.run)
        if concurrent:
            async with anyio.create_task_group() as tg:
                for job in jobs:
                    tg.start_soon(job)
        else:
            for job in jobs:
                await job()
        outer.cancel_scope.cancel()
    return {
        "seconds": time.perf_counter() - started,
        "peak_rss": monitor.peak - monitor.base,
        "stall": monitor.worst_stall,
    }


def report(
    name: str, jobs: int, concurrent: dict[str, float], serial: dict[str, float], bound: int
) -> None:
    volume = jobs * DEVICES * IMAGE_SIZE
    mib = 2**20
    print(f"\n{name}: {jobs} jobs x {DEVICES} devices x {IMAGE_SIZE // mib} MiB")
    for label, result in (("one at a time", serial), (f"{jobs} at once", concurrent)):
        print(
            f"  {label:>14}: {volume / result['seconds'] / mib:7.0f} MiB/s, "
            f"peak RSS +{result['peak_rss'] / mib:6.1f} MiB, "
            f"worst loop stall {result['stall'] * 1000:6.1f} ms"
        )
    print(
        f"  ratios at once / one at a time: throughput "
        f"{serial['seconds'] / concurrent['seconds']:.2f}x, "
        f"peak RSS {concurrent['peak_rss'] / max(serial['peak_rss'], 1):.1f}x"
    )
    print(
        f"  bound: {bound / mib:.0f} MiB per job x {jobs} = {jobs * bound / mib:.0f} MiB; "
        f"measured {concurrent['peak_rss'] / mib:.0f} MiB "
        f"({concurrent['peak_rss'] / (jobs * bound):.0%} of the bound)"
    )
    assert concurrent["peak_rss"] <= jobs * bound, "peak memory above the bound"


async def main(jobs: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench_load-"))
    try:
        images = make_images(work)
        sources = [p.read_bytes() for p in images]
        devices = [(f"drive-scsi{i}", path) for i, path in enumerate(images)]

        def backup(directory: Path, index: int) -> Callable[[], Awaitable[None]]:
            async def job() -> None:
                await create_archive(directory / f"b{index}.vma", devices)

            return job

        def restore(directory: Path, index: int) -> Callable[[], Awaitable[None]]:
            async def job() -> None:
                out = directory / f"r{index}"
                await extract_archive(directory / f"b{index}.vma", out)
                for i, source in enumerate(sources):
                    restored = await anyio.Path(out / f"disk-drive-scsi{i}.raw").read_bytes()
                    assert restored == source, f"restore {index} device {i} differs"

            return job

        results: dict[str, dict[str, dict[str, float]]] = {"backup": {}, "restore": {}}
        for mode in ("serial", "concurrent"):
            directory = work / mode
            directory.mkdir()
            concurrent = mode == "concurrent"
            results["backup"][mode] = await measure(
                [backup(directory, i) for i in range(jobs)], concurrent
            )
            results["restore"][mode] = await measure(
                [restore(directory, i) for i in range(jobs)], concurrent
            )
            shutil.rmtree(directory)

        read_buffers = DEVICES * PACK_GROUP * CLUSTER_SIZE
        backup_bound = DEFAULT_BUFFER_COUNT * BUFFER_SIZE + read_buffers
        restore_bound = _BATCH_BYTES + DEVICES * _SINK_QUEUE * MAX_EXTENT_SIZE
        for name, bound in (("backup", backup_bound), ("restore", restore_bound)):
            report(name, jobs, results[name]["concurrent"], results[name]["serial"], bound)
        print("\nall restores byte-exact")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--backend", choices=["asyncio", "uvloop", "trio"], default="asyncio")
    args = parser.parse_args()
    backend = "trio" if args.backend == "trio" else "asyncio"
    options: dict[str, Any] = {"use_uvloop": True} if args.backend == "uvloop" else {}
    print(f"backend {args.backend}, peak RSS of the process before: {rss() / 2**20:.0f} MiB")
    anyio.run(main, args.jobs, backend=backend, backend_options=options)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of the process: {peak:.0f} MiB")
