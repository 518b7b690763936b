"""What ``vma create --digest`` costs: create throughput with and without the sidecar.

The image (default 1 GiB) is three quarters random data and one quarter
zero clusters (written, not sparse), so both the data path and the zero
path are hashed.  Each case runs ``create_archive`` in-process on a fresh
archive in the same directory, alternating plain and digest runs; the median
of ``--runs`` runs per case is compared.  The digest runs also write and
fsync the sidecar.  Hashing happens in threads of its own (hashlib releases
the GIL), beside the packing on the event loop, so the cost in wall time
depends on a spare core: the process CPU time of both cases is printed too,
and the load average (other jobs on the machine take that core).

Target (issue 11): the digest costs <= 15 % of create throughput.

    .venv/bin/python benchmarks/bench_digest.py [--size-mib 1024] [--runs 3]
        [--dir DIR] [--backend asyncio|uvloop|trio]

DIR defaults to a fresh ``bench-digest-*`` directory in the repository (a
real disk, not tmpfs); it is removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import anyio

from vma_async import DigestRecorder, create_archive, digest_path, write_digest_file

CLUSTER = 65536


def make_image(path: Path, size: int) -> None:
    rng = random.Random(7)
    with path.open("wb") as image:
        for cluster in range(size // CLUSTER):
            image.write(bytes(CLUSTER) if cluster % 4 == 3 else rng.randbytes(CLUSTER))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def one_run(image: Path, archive: Path, digest: bool) -> tuple[float, float]:
    recorder = DigestRecorder() if digest else None
    archive_uuid = uuid.uuid4()
    cpu = cpu_seconds()
    start = time.perf_counter()
    await create_archive(
        archive, [("drive-scsi0", image)], uuid=archive_uuid, size_multiple=512, digest=recorder
    )
    if recorder is not None:
        await write_digest_file(digest_path(archive), recorder, archive_uuid, ["drive-scsi0"])
    return time.perf_counter() - start, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "uvloop", "trio"])
    args = parser.parse_args()
    size = args.size_mib << 20
    base = args.dir or Path(tempfile.mkdtemp(prefix="bench-digest-", dir=Path(__file__).parents[1]))
    base.mkdir(parents=True, exist_ok=True)
    backend, options = (
        ("asyncio", {"use_uvloop": True}) if args.backend == "uvloop" else (args.backend, {})
    )
    try:
        image = base / "image.raw"
        make_image(image, size)
        times: dict[bool, list[float]] = {False: [], True: []}
        cpus: dict[bool, list[float]] = {False: [], True: []}
        for run in range(args.runs):
            for digest in (False, True) if run % 2 == 0 else (True, False):
                archive = base / f"run-{run}-{int(digest)}.vma"
                wall, cpu = anyio.run(
                    one_run, image, archive, digest, backend=backend, backend_options=options
                )
                times[digest].append(wall)
                cpus[digest].append(cpu)
                archive.unlink()
                Path(digest_path(archive)).unlink(missing_ok=True)
        plain, hashed = statistics.median(times[False]), statistics.median(times[True])
        mib = size / (1 << 20)
        print(
            f"image {mib:.0f} MiB (3/4 random, 1/4 zero), backend {args.backend}, {args.runs} runs"
        )
        cpu_plain, cpu_hashed = statistics.median(cpus[False]), statistics.median(cpus[True])
        for label, wall, cpu in (
            ("create         ", plain, cpu_plain),
            ("create --digest", hashed, cpu_hashed),
        ):
            print(f"{label}  {mib / wall:8.1f} MiB/s  (median {wall:.2f} s, CPU {cpu:.2f} s)")
        print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        cost = (hashed - plain) / hashed * 100
        print(f"digest cost: {cost:.1f} % of create throughput (target <= 15 %)")
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
