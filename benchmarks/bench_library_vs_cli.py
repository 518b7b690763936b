"""The library path of a backup daemon against the ``vma create`` command.

Goal (issue 10): a daemon that embeds :class:`VmaWriter` (one producer task
per disk, its own reading, the writer into a new file) gets the command's
throughput within 10 %, with the writer's memory bound and no loop stalls.

Plan: two images (default 1 GiB each, alternating 1 MiB random / 1 MiB
zero, written, not sparse) in DIR, read once so that every contender reads
from the page cache.  Each round runs, each as a fresh process timed from
spawn to exit (``sync`` before each, untimed), in an order that rotates:

* ``cli``: ``vma create OUT drive-scsi0=A drive-scsi1=B``;
* ``library, write_clusters``: ``VmaWriter.open(OUT)`` and one producer task
  per disk that reads 4 MiB chunks into a ring of buffers in a worker thread
  and hands each to :meth:`VmaWriter.write_clusters` (the batch call);
* ``library, write_clusters_from``: one producer task per disk that calls
  :meth:`VmaWriter.write_clusters_from` per 4 MiB with a ``read`` of its own
  (a blocking ``preadv`` into one 512 KiB buffer, which the writer runs in a
  worker thread and packs at once, while the bytes are in that core's cache);
* ``library, write``: the ring producers calling :meth:`VmaWriter.write` once
  per 64 KiB cluster (every call a checkpoint: the per-call price).

The library children also report their in-process time (after imports) and
the worst stall a 5 ms heartbeat task saw.  Every archive of the first round
is read back and each disk's SHA-256 compared with its image's.  The ratio
printed is the median over rounds of library / cli throughput.

    .venv/bin/python benchmarks/bench_library_vs_cli.py [--size-mib 1024]
        [--runs 5] [--backend asyncio|uvloop|trio] [--dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1 << 20
CLUSTER = 64 << 10
CHUNK = 4 * MIB
REPO = Path(__file__).resolve().parent.parent
VMA = [sys.executable, "-m", "vma_async"]


def make_image(path: Path, size: int, seed: int) -> str:
    """Alternating 1 MiB random / 1 MiB zero; returns its SHA-256."""
    rng = random.Random(seed)
    digest = hashlib.sha256()
    with path.open("wb") as image:
        for offset in range(0, size, MIB):
            data = rng.randbytes(MIB) if (offset // MIB) % 2 == 0 else bytes(MIB)
            image.write(data)
            digest.update(data)
    return digest.hexdigest()


# --- the library child --------------------------------------------------------------------------


def library_child(backend: str, mode: str, out: str, images: list[str]) -> dict[str, float]:
    """What a backup daemon does: a writer, one producer task per disk."""
    import anyio
    import anyio.to_thread
    from _heartbeat import Heartbeat

    from vma_async import VmaWriter

    heartbeat = Heartbeat()

    async def pack_from_reads(writer: VmaWriter, dev_id: int, fd: int, size: int) -> None:
        group = bytearray(8 * CLUSTER)

        def read(cluster_num: int, n: int) -> tuple[bytearray, None]:
            os.preadv(fd, [memoryview(group)[: n * CLUSTER]], cluster_num * CLUSTER)
            return group, None

        for offset in range(0, size, CHUNK):
            count = -(-min(CHUNK, size - offset) // CLUSTER)
            await writer.write_clusters_from(dev_id, offset // CLUSTER, count, read)

    async def pack_from_ring(writer: VmaWriter, dev_id: int, fd: int, size: int) -> None:
        ring = [bytearray(CHUNK) for _ in range(3)]
        send, receive = anyio.create_memory_object_stream[tuple[int, bytearray, int]](1)

        async def read_ahead() -> None:
            async with send:
                for n, offset in enumerate(range(0, size, CHUNK)):
                    buf = ring[n % len(ring)]  # free again: two chunks behind
                    got = await anyio.to_thread.run_sync(os.preadv, fd, [buf], offset)
                    await send.send((offset, buf, got))

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_ahead)
            async with receive:
                async for offset, buf, got in receive:
                    data = buf if got == CHUNK else buf[:got]
                    first = offset // CLUSTER
                    if mode == "write_clusters":
                        await writer.write_clusters(dev_id, first, data)
                    else:
                        view = memoryview(data)
                        for i in range(0, got, CLUSTER):
                            await writer.write(dev_id, first + i // CLUSTER, view[i : i + CLUSTER])

    async def produce(writer: VmaWriter, dev_id: int, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            pack = pack_from_reads if mode == "write_clusters_from" else pack_from_ring
            await pack(writer, dev_id, fd, size)
            await writer.close_stream(dev_id)
        finally:
            os.close(fd)

    sizes = [os.path.getsize(path) for path in images]

    async def main() -> float:
        done = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat.run, done)
            start = time.perf_counter()
            async with VmaWriter.open(out) as writer:
                ids = [
                    writer.register_stream(f"drive-scsi{n}", size) for n, size in enumerate(sizes)
                ]
                async with anyio.create_task_group() as producers:
                    for dev_id, path in zip(ids, images, strict=True):
                        producers.start_soon(produce, writer, dev_id, path)
            elapsed = time.perf_counter() - start
            done.set()
        return elapsed

    options = {"use_uvloop": True} if backend == "uvloop" else {}
    elapsed = anyio.run(
        main, backend="asyncio" if backend == "uvloop" else backend, backend_options=options
    )
    return {"inside_s": elapsed, "stall_ms": heartbeat.worst * 1000}


# --- the parent ---------------------------------------------------------------------------------


def disk_digests(archive: Path) -> list[str]:
    import anyio

    from vma_async import VmaReader

    async def main() -> list[str]:
        digests = []
        async with VmaReader.open(archive) as reader:
            for dev in reader.header.devices:
                view = await reader.open_device(dev.dev_id)
                digest = hashlib.sha256()
                for offset in range(0, dev.size, CHUNK):
                    digest.update(await view.read(offset, min(CHUNK, dev.size - offset)))
                digests.append(digest.hexdigest())
        return digests

    return anyio.run(main)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "uvloop", "trio"])
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        backend, mode, out, *images = args.child
        print(json.dumps(library_child(backend, mode, out, images)))
        return

    workdir = Path(tempfile.mkdtemp(prefix="bench-library-", dir=args.dir or REPO))
    try:
        images = [workdir / f"disk{n}.raw" for n in range(2)]
        expected = [make_image(path, args.size_mib * MIB, seed) for seed, path in enumerate(images)]
        for path in images:  # every contender reads from the page cache
            with path.open("rb") as warm:
                while warm.read(8 * MIB):
                    pass
        out = workdir / "out.vma"
        env_note = f"backend {args.backend}"
        cases = {
            "cli": [
                *VMA,
                "create",
                str(out),
                *(f"drive-scsi{n}={path}" for n, path in enumerate(images)),
            ],
            "library, write_clusters": [
                sys.executable,
                __file__,
                "--child",
                args.backend,
                "write_clusters",
                str(out),
                *map(str, images),
            ],
            "library, write_clusters_from": [
                sys.executable,
                __file__,
                "--child",
                args.backend,
                "write_clusters_from",
                str(out),
                *map(str, images),
            ],
            "library, write": [
                sys.executable,
                __file__,
                "--child",
                args.backend,
                "write",
                str(out),
                *map(str, images),
            ],
        }
        env = dict(os.environ)
        env["VMA_ASYNC_BACKEND"] = args.backend
        walls: dict[str, list[float]] = {name: [] for name in cases}
        inside: dict[str, list[float]] = {name: [] for name in cases}
        stalls: dict[str, list[float]] = {name: [] for name in cases}
        rss: dict[str, float] = dict.fromkeys(cases, 0.0)
        names = list(cases)
        for run in range(args.runs):
            order = names[run % len(names) :] + names[: run % len(names)]
            for name in order:
                subprocess.run(["sync"], check=True)
                start = time.perf_counter()
                with tempfile.TemporaryFile() as errors:
                    child = subprocess.Popen(
                        cases[name], stdout=subprocess.PIPE, stderr=errors, env=env
                    )
                    stdout = child.stdout.read() if child.stdout is not None else b""
                    _, status, usage = os.wait4(child.pid, 0)
                    errors.seek(0)
                    stderr = errors.read()
                walls[name].append(time.perf_counter() - start)
                if status != 0:
                    raise SystemExit(f"{name} failed: {stderr.decode()}")
                rss[name] = max(rss[name], usage.ru_maxrss / 1024)
                if stdout.strip():
                    report = json.loads(stdout)
                    inside[name].append(report["inside_s"])
                    stalls[name].append(report["stall_ms"])
                if run == 0 and disk_digests(out) != expected:
                    raise SystemExit(f"{name}: the archive's disks differ from the images")
                out.unlink()
        total_mb = 2 * args.size_mib * MIB / 1e6
        print(
            f"2 disks x {args.size_mib} MiB (alternating 1 MiB random / zero), {env_note}, "
            f"{args.runs} runs, load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        print("| case | wall (median) | MB/s | vs cli (median of pairs) | in-process | "
              "peak RSS | worst stall |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for name in cases:
            median = statistics.median(walls[name])
            ratio = statistics.median(c / w for c, w in zip(walls["cli"], walls[name], strict=True))
            inner = f"{statistics.median(inside[name]):.3f} s" if inside[name] else "-"
            stall = f"{max(stalls[name]):.1f} ms" if stalls[name] else "-"
            print(
                f"| {name} | {median:.3f} s | {total_mb / median:.0f} | {ratio:.2f}x | {inner} "
                f"| {rss[name]:.1f} MiB | {stall} |"
            )
        print("target: library >= 0.90x the cli; every disk byte-exact")
    finally:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
