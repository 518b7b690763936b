"""``vma serve`` throughput and latency over NBD, beside ``vma extract``.

Builds (with the independent test encoder, as bench_read does) an archive of
an image half random and half zero in 8 MiB runs (default 1 GiB; the issue's
figure is for ``--size 4G``), then:

* ``vma extract ARCHIVE DIR``: our own restore to a raw file (the baseline);
* ``nbdcopy nbd+unix:///drive-scsi0?socket=S out.raw`` against the archive
  served by ``serve_archive`` (what ``vma serve`` runs) in a child process,
  once per event loop; the copy is compared with the image;
* random 1 MiB reads (offsets on 4 KiB boundaries) through our
  :class:`NbdClient` on the same Unix socket, one at a time: median and p99
  latency.

Targets (issue 9): nbdcopy from the server >= 0.8x the extract's
throughput; median 1 MiB read <= 2 ms.  Peak RSS is the server's VmHWM and
the extract's ru_maxrss.  The archive and image are read once before timing
(page cache).  The machine may be shared: figures are the best of
``--repeats`` runs.

    .venv/bin/python benchmarks/bench_serve.py [--size 1G] [--reads 300]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_read import build_archive, make_image, warm  # noqa: E402

NAME = "drive-scsi0"


def serve_child(archive: str, sock: str, backend: str) -> None:
    """Run in a child process: serve until SIGTERM, print the address first."""
    import signal

    import anyio

    from vma_async._serve import serve_archive

    async def main() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as tg:
                address = await tg.start(
                    lambda task_status: serve_archive(
                        archive, unix_socket=sock, task_status=task_status
                    )
                )
                print(address, flush=True)
                async for _ in signals:
                    break
                tg.cancel_scope.cancel()

    if backend == "uvloop":
        anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
    else:
        anyio.run(main, backend=backend)


def vm_hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def time_extract(archive: Path, workdir: Path, repeats: int) -> tuple[float, float]:
    best = float("inf")
    for _ in range(repeats):
        target = workdir / "extracted"
        start = time.perf_counter()
        command = [sys.executable, "-m", "vma_async", "extract", str(archive), str(target)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - start)
        shutil.rmtree(target)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return best, rss


async def random_reads(sock: str, size: int, count: int) -> list[float]:
    from vma_async import NbdClient

    rng = random.Random(3)
    latencies = []
    async with NbdClient.connect(f"unix:{sock}", NAME) as client:
        for _ in range(count):
            offset = rng.randrange(0, (size - (1 << 20)) // 4096) * 4096
            start = time.perf_counter()
            await client.read(offset, 1 << 20)
            latencies.append(time.perf_counter() - start)
    return latencies


def bench_server(
    archive: Path, image: Path, workdir: Path, backend: str, repeats: int, reads: int
) -> dict[str, float]:
    import anyio

    sock = str(workdir / f"serve-{backend}.sock")
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(archive), sock, backend],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == f"unix:{sock}"  # listening
        uri = f"nbd+unix:///{NAME}?socket={sock}"
        out = workdir / "copy.raw"
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run(["nbdcopy", uri, str(out)], check=True)
            best = min(best, time.perf_counter() - start)
            if not filecmp_equal(out, image):
                raise SystemExit(f"nbdcopy through {backend} differs from the image")
            out.unlink()
        latencies = anyio.run(random_reads, sock, image.stat().st_size, reads)
        rss = vm_hwm_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    latencies.sort()
    return {
        "seconds": best,
        "rss_mib": rss,
        "median_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }


def filecmp_equal(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)], check=False).returncode == 0


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size", type=parse_size, default=1 << 30, help="image size: 1G (default), 4G, 512M"
    )
    parser.add_argument("--reads", type=int, default=300, help="random 1 MiB reads")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backends", default="asyncio,uvloop,trio")
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_child(*args.serve)
        return
    if not shutil.which("nbdcopy"):
        raise SystemExit("needs nbdcopy (apt-get install libnbd-bin)")

    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-", dir=args.dir or REPO))
    try:
        size = args.size
        image, archive = workdir / "image.raw", workdir / "backup.vma"
        make_image(image, size)
        build_archive(image, archive)
        warm(image)
        warm(archive)
        extract_s, extract_rss = time_extract(archive, workdir, args.repeats)
        extract_rate = size / extract_s / 1e6
        print(f"image {size >> 20} MiB, half random; load average {os.getloadavg()[0]:.1f}")
        print(
            f"{'case':<24}{'MB/s':>9}{'ratio':>8}{'peak RSS MiB':>14}"
            f"{'1 MiB read median / p99 ms':>30}"
        )
        print(f"{'vma extract':<24}{extract_rate:>9.0f}{1.0:>8.2f}{extract_rss:>14.0f}")
        for backend in args.backends.split(","):
            got = bench_server(archive, image, workdir, backend, args.repeats, args.reads)
            rate = size / got["seconds"] / 1e6
            print(
                f"{'nbdcopy <- serve ' + backend:<24}{rate:>9.0f}{rate / extract_rate:>8.2f}"
                f"{got['rss_mib']:>14.0f}{got['median_ms']:>19.2f} / {got['p99_ms']:.2f}"
            )
        print("targets: ratio >= 0.8, median <= 2 ms")
    finally:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
