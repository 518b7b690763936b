"""``.vma.zst`` to qcow2 in one pass, against decompress + extract + ``qemu-img convert``.

Issue 9's figure: ``vma extract --format qcow2 ARCHIVE.vma.zst DIR`` (the
archive decompressed in-process, the disk written through qemu-nbd straight
into a new qcow2) against what users do today::

    zstd -dc ARCHIVE.vma.zst | vma extract - DIR      # a raw disk-NAME.raw
    qemu-img convert -O qcow2 DIR/disk-NAME.raw OUT.qcow2
    sync OUT.qcow2

Target: at least 1.3x faster, and no disk space beyond the final qcow2 (the
two-step path holds the raw image and the qcow2 at once).  Peak disk use is
sampled every 20 ms as the allocated blocks of everything in the work
directory except the input archive.

Durability: a restore is complete when its image is on disk.  The one pass
ends with ``NBD_CMD_FLUSH`` (qemu-nbd fsyncs the qcow2) and ``vma extract -``
fsyncs its raw file, but ``qemu-img convert`` does not sync its output, so
the two-step contender ends with ``sync OUT.qcow2`` (an fsync of the file)
inside the timed region: both contenders stop the clock with the final
qcow2 durable.

Fairness: the contenders are interleaved (run ``i`` of each back to back,
the order alternating between runs), so a burst of load or writeback from
an earlier run hits both alike; every run is printed, and the ratio is of
the medians (``best`` is printed too).  ``--baseline DIR`` adds a third
contender, the one pass with ``PYTHONPATH=DIR`` (a copy of an older
``vma_async`` package: ``git archive HEAD vma_async | tar -x -C DIR``), for an A/B
of a change in the same interleaved run.

The image is half random, half zero in 8 MiB runs (as ``bench_read.py``).
Every output is compared with the first (``qemu-img compare``): the same
virtual disk whichever way it was made.

    .venv/bin/python benchmarks/bench_formats.py [--size 256M] [--runs 3] [--dir DIR]
        [--baseline DIR]

``--size 4G`` gives the issue's figure.  DIR defaults to a fresh directory in
the repository (the checkout's disk, not a tmpfs); it is removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench_read import make_image  # the same half-random image (8 MiB runs)

REPO = Path(__file__).resolve().parent.parent
VMA = str(Path(sys.executable).with_name("vma"))

Contender = Callable[[Path, Path], tuple[float, int, Path]]


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1:].upper() in units:
        return int(float(text[:-1]) * units[text[-1:].upper()])
    return int(text)


class DiskSampler:
    """Peak allocated bytes under a directory (except ``ignore``), sampled in a thread."""

    def __init__(self, root: Path, ignore: set[Path]) -> None:
        self._root = root
        self._ignore = {p.resolve() for p in ignore}
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _used(self) -> int:
        total = 0
        for folder, _, names in os.walk(self._root):
            for name in names:
                path = Path(folder, name)
                if path.resolve() in self._ignore:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    total += path.lstat().st_blocks * 512
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._used())

    def __enter__(self) -> DiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._used())


def run(cmd: str, cwd: Path, env: dict[str, str] | None = None) -> None:
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=cwd, check=True, env=env)


def one_pass_with(pythonpath: str | None) -> Contender:
    """The one pass, with the installed ``vma_async`` or the one under ``pythonpath``."""
    env = None if pythonpath is None else {**os.environ, "PYTHONPATH": pythonpath}

    def one_pass(work: Path, archive: Path) -> tuple[float, int, Path]:
        out = work / "one"
        with DiskSampler(work, {archive, work / "reference.qcow2"}) as disk:
            start = time.perf_counter()
            cmd = f"'{VMA}' extract --quiet --format qcow2 '{archive}' '{out}' >/dev/null"
            run(cmd, work, env)
            elapsed = time.perf_counter() - start
        final = work / "one.qcow2"
        (out / "disk-drive-scsi0.qcow2").rename(final)
        shutil.rmtree(out)
        return elapsed, disk.peak, final

    return one_pass


def two_steps(work: Path, archive: Path) -> tuple[float, int, Path]:
    out = work / "two"
    final = work / "two.qcow2"
    with DiskSampler(work, {archive, work / "reference.qcow2"}) as disk:
        start = time.perf_counter()
        run(f"zstd -q -dc '{archive}' | '{VMA}' extract --quiet - '{out}' >/dev/null", work)
        run(f"qemu-img convert -q -f raw -O qcow2 '{out}/disk-drive-scsi0.raw' '{final}'", work)
        run(f"sync '{final}'", work)  # durable, as the one pass's NBD_CMD_FLUSH makes it
        elapsed = time.perf_counter() - start
    shutil.rmtree(out)
    return elapsed, disk.peak, final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256M", help="image size (256M, 4G, ...)")
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs of each contender")
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument(
        "--baseline", default=None, help="also time the one pass with PYTHONPATH=BASELINE"
    )
    args = parser.parse_args()
    size = parse_size(args.size)
    contenders: dict[str, Contender] = {"two steps": two_steps, "one pass": one_pass_with(None)}
    if args.baseline is not None:
        contenders["baseline"] = one_pass_with(str(Path(args.baseline).resolve()))
    work = Path(tempfile.mkdtemp(prefix="bench-formats-", dir=args.dir or REPO))
    try:
        image = work / "disk.raw"
        make_image(image, size)
        archive = work / "backup.vma.zst"
        run(f"'{VMA}' create --quiet 'exec:zstd -q -T0 -o {archive}' drive-scsi0='{image}'", work)
        image.unlink()
        run(f"cat '{archive}' > /dev/null; sync", work)  # all read it from the page cache
        print(
            f"image {size / (1 << 20):.0f} MiB (half random, half zero), archive"
            f" {archive.stat().st_size / (1 << 20):.0f} MiB (zstd), load average"
            f" {os.getloadavg()[0]:.2f}"
        )
        times: dict[str, list[float]] = {name: [] for name in contenders}
        peaks: dict[str, int] = dict.fromkeys(contenders, 0)
        reference = work / "reference.qcow2"
        names = list(contenders)
        for i in range(args.runs):
            order = names if i % 2 == 0 else names[::-1]
            for name in order:
                elapsed, peak, qcow2 = contenders[name](work, archive)
                final = qcow2.stat().st_blocks * 512
                times[name].append(elapsed)
                peaks[name] = max(peaks[name], peak)
                print(
                    f"  run {i + 1} {name:9}: {elapsed:7.2f} s, peak disk"
                    f" {peak / (1 << 20):7.1f} MiB (final qcow2 {final / (1 << 20):.1f} MiB)"
                )
                if not reference.exists():
                    qcow2.rename(reference)
                else:  # the same virtual disk either way
                    run(f"qemu-img compare -q -f qcow2 -F qcow2 '{reference}' '{qcow2}'", work)
                    qcow2.unlink()
        for name in names:
            print(
                f"{name:9}: median {statistics.median(times[name]):6.2f} s,"
                f" best {min(times[name]):6.2f} s"
            )
        for name in names[1:]:
            ratio = statistics.median(times["two steps"]) / statistics.median(times[name])
            best = min(times["two steps"]) / min(times[name])
            print(
                f"{name} is {ratio:.2f}x faster (medians; best {best:.2f}x) than"
                f" zstd -dc | vma extract - && qemu-img convert && sync (target >= 1.3x);"
                f" peak disk {peaks[name] / (1 << 20):.0f} MiB"
                f" vs {peaks['two steps'] / (1 << 20):.0f} MiB"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
