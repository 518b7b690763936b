"""Random access to an archived disk: index build and random 1 MiB reads.

Goal (issue 10): ``VmaReader.open_device`` builds the index of a 16 GiB
disk in <= 0.2 s, and random 1 MiB reads through the ``DeviceView`` have a
p99 <= 1 ms, under asyncio, uvloop and trio.

Plan: a 16 GiB mostly-zero archive (one random cluster in 256, as
``bench_read.py`` builds it; about 64 MiB on disk, read once so the page
cache holds it), then per backend in a fresh process: the index build (best
of 3 opens), ``--reads`` reads of 1 MiB at random 4 KiB-aligned offsets
(mean, p50, p99, worst; the same offsets for every backend; most
fall in zero clusters, which cost microseconds), and the bytes of a
sample of them compared with what ``dissect.archive`` (an independent
reader, when installed) reads at the same offsets; the same reads timed
through dissect give the baseline ratio.

    .venv/bin/python benchmarks/bench_random_read.py [--size-gib 16]
        [--reads 2000] [--backends asyncio,uvloop,trio] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MIB = 1 << 20
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))


def offsets(size: int, count: int) -> list[int]:
    rng = random.Random(1)
    return [rng.randrange(0, size - MIB) // 4096 * 4096 for _ in range(count)]


def child(backend: str, archive: str, size: int, count: int) -> dict[str, Any]:
    import hashlib

    import anyio

    from vma_async import VmaReader

    where = offsets(size, count)

    async def main() -> dict[str, Any]:
        builds = []
        for _ in range(3):
            async with VmaReader.open(archive) as reader:
                start = time.perf_counter()
                await reader.open_device(1)
                builds.append(time.perf_counter() - start)
        latencies = []
        sample = hashlib.sha256()
        async with VmaReader.open(archive) as reader:
            view = await reader.open_device(1)
            for n, offset in enumerate(where):
                start = time.perf_counter()
                data = await view.read(offset, MIB)
                latencies.append(time.perf_counter() - start)
                if n % 50 == 0:
                    sample.update(data)
        latencies.sort()
        return {
            "index_s": min(builds),
            "mean_ms": statistics.mean(latencies) * 1000,
            "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[len(latencies) * 99 // 100] * 1000,
            "worst_ms": latencies[-1] * 1000,
            "sample": sample.hexdigest(),
        }

    options = {"use_uvloop": True} if backend == "uvloop" else {}
    return anyio.run(
        main, backend="asyncio" if backend == "uvloop" else backend, backend_options=options
    )


def dissect_baseline(archive: Path, size: int, count: int) -> dict[str, Any] | None:
    """The same reads through dissect.archive (blocking, no event loop)."""
    import hashlib

    try:
        from dissect.archive.vma import VMA  # type: ignore[import-untyped]
    except ImportError:
        return None
    where = offsets(size, count)
    with archive.open("rb") as f:
        start = time.perf_counter()
        device = next(iter(VMA(f).devices())).open()
        index_s = time.perf_counter() - start
        latencies = []
        sample = hashlib.sha256()
        for n, offset in enumerate(where):
            start = time.perf_counter()
            device.seek(offset)
            data = device.read(MIB)
            latencies.append(time.perf_counter() - start)
            if n % 50 == 0:
                sample.update(data)
    latencies.sort()
    return {
        "index_s": index_s,
        "mean_ms": statistics.mean(latencies) * 1000,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[len(latencies) * 99 // 100] * 1000,
        "worst_ms": latencies[-1] * 1000,
        "sample": sample.hexdigest(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=int, default=16)
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--backends", default="asyncio,uvloop,trio")
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        backend, archive, size, count = args.child
        print(json.dumps(child(backend, archive, int(size), int(count))))
        return

    import bench_read

    size = args.size_gib << 30
    workdir = Path(tempfile.mkdtemp(prefix="bench-random-", dir=args.dir or REPO))
    try:
        archive = workdir / "sparse.vma"
        bench_read.build_sparse_archive(archive, size)
        archive.read_bytes()  # into the page cache
        rows: dict[str, dict[str, Any]] = {}
        for backend in args.backends.split(","):
            run = subprocess.run(
                [sys.executable, __file__, "--child", backend, str(archive), str(size),
                 str(args.reads)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            rows[backend] = json.loads(run.stdout)
        baseline = dissect_baseline(archive, size, args.reads)
        print(
            f"{args.size_gib} GiB sparse archive ({archive.stat().st_size / MIB:.0f} MiB), "
            f"{args.reads} random 1 MiB reads"
        )
        print("| reader | index build | p50 | p99 | worst | mean | vs dissect (mean) |")
        print("|---|---|---|---|---|---|---|")
        if baseline is not None:
            rows["dissect.archive"] = baseline
        samples = {str(row["sample"]) for row in rows.values()}
        for name, row in rows.items():
            ratio = f"{baseline['mean_ms'] / row['mean_ms']:.1f}x" if baseline is not None else "-"
            print(
                f"| {name} | {row['index_s'] * 1000:.0f} ms "
                f"| {row['p50_ms']:.3f} ms | {row['p99_ms']:.3f} ms | {row['worst_ms']:.2f} ms "
                f"| {row['mean_ms']:.3f} ms | {ratio} |"
            )
        if len(samples) != 1:
            raise SystemExit("the readers disagree on the bytes read")
        ours = [r["p99_ms"] for n, r in rows.items() if n != "dissect.archive"]
        print(
            "targets: index build <= 200 ms, p99 <= 1 ms "
            f"(ours: median p99 over the backends {statistics.median(ours):.3f} ms)"
        )
    finally:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
