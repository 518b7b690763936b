"""Whole-process ``vma`` commands against the reference tool (or against cp/cat/dd).

Goal (issue 10): show, on one machine in one run, how our ``vma`` command
compares with the reference C tool on the work Proxmox gives it: ``create``
(O_DIRECT output), ``verify``, ``extract`` and ``list`` of an image of
alternating 1 MiB random / 1 MiB zero data (written, not sparse), at 1 GiB
and 4 GiB.

Plan: make the image once per size (and read it once, so the page cache is
warm), make one seed archive from it with our tool, then for each command run
the reference and ours interleaved, ``--runs`` times, alternating which goes
first.  Every run is a fresh child process timed from spawn to reap; its peak
RSS and CPU come from GNU ``time`` (``os.wait4``'s rusage when ``time`` is
missing, which overstates small peaks).  Children run with Python's bytecode
cache on (in DIR), as an installed package would, whatever
``PYTHONDONTWRITEBYTECODE`` says; the seed run compiles it.  ``sync`` runs (untimed) before
every timed run so the writeback of one run's output does not land on the
next.  The ratio is the median of the pairwise ratios (reference / ours, above
1 means ours is faster), which cancels slow drifts of a loaded machine better
than a ratio of medians.

Without ``VMA_REFERENCE`` the "reference" column is the floor a command cannot
beat on this disk instead:

* ``create``  -> ``dd if=ARCHIVE of=OUT bs=4M oflag=direct`` (writes the
  archive's bytes with O_DIRECT, as ``create`` does);
* ``verify``  -> ``cat ARCHIVE > /dev/null`` (reads every archive byte);
* ``extract`` -> ``cp IMAGE OUT`` (writes the image's bytes through the page cache);
* ``list``    -> ``head -c 12288 ARCHIVE`` (a process that reads the header).

Worst case: a 4 GiB run needs about 4 GiB (image) + 2 x 2.1 GB (archives) +
4 GiB (an extract) free in ``--dir`` and takes minutes; ``--sizes 1G --runs 3``
is the short form.

    VMA_REFERENCE=/path/to/vma .venv/bin/python benchmarks/bench_vs_reference.py \
        [--sizes 1G,4G] [--runs 5] [--commands create,verify,extract,list] [--dir DIR]

DIR defaults to a fresh ``bench-vs-reference-*`` directory in the repository
(on the same disk as the checkout, not a tmpfs); it is removed afterwards
unless ``--keep`` is given.  Images already in DIR (from a ``--keep`` run) are
reused; a DIR you name is never removed, only the files made in it.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1 << 20
REPO = Path(__file__).resolve().parent.parent
COMMANDS = ("create", "verify", "extract", "list")
BASELINES = "dd oflag=direct / cat / cp / head"
CONFIG_TEXT = (
    b"bootdisk: scsi0\ncores: 2\nmemory: 2048\nname: bench\nscsi0: local:100/vm-100-disk-0.raw\n"
)


@dataclass(frozen=True, slots=True)
class Run:
    """One child process: wall time, CPU and peak RSS from its rusage."""

    seconds: float
    user: float
    system: float
    max_rss_kib: int


@dataclass(slots=True)
class Row:
    command: str
    size: int
    reference: list[Run] = field(default_factory=list)
    ours: list[Run] = field(default_factory=list)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def size_label(size: int) -> str:
    if size % (1 << 30) == 0:
        return f"{size >> 30} GiB"
    return f"{size / MIB:g} MiB"


def make_image(path: Path, size: int) -> None:
    """Alternating 1 MiB of random bytes and 1 MiB of zero bytes, all written
    (a sparse file would let ``cp`` and the readers skip the holes)."""
    if size % 65536:
        raise SystemExit(
            f"image size {size} is not a multiple of 64 KiB (the reference create needs that)"
        )
    if path.exists() and path.stat().st_size == size:
        return
    rng = random.Random(42)
    zero = bytes(MIB)
    with path.open("wb") as image:
        for offset in range(0, size, MIB):
            n = min(MIB, size - offset)
            image.write(rng.randbytes(n) if (offset // MIB) % 2 == 0 else zero[:n])


def warm(path: Path) -> None:
    with path.open("rb") as file:
        while file.read(8 * MIB):
            pass


TIME = shutil.which("time", path="/usr/bin:/bin")
"""GNU time, for the child's peak RSS: Linux carries the forking process's
peak RSS over ``exec`` into ``ru_maxrss``, so ``os.wait4`` on a child forked
from this (about 20 MiB) Python process would report at least that much.
``time`` is a small process, so the figure it reports is the command's own."""


def child_environment(work: Path) -> dict[str, str]:
    """The environment of every timed child: this one, but with Python's
    bytecode cache on, kept in ``work``.  An installed package has its
    ``.pyc`` files (pip compiles them); with ``PYTHONDONTWRITEBYTECODE`` set
    (as in some dev shells) every run of ours would compile its modules
    from source again, about 40 ms of start-up that no user pays."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    return env


def run_timed(argv: list[str], env: dict[str, str]) -> Run:
    """Spawn, reap, fail loudly on error; wall time from spawn to reap."""
    subprocess.run(["sync"], check=True)
    with tempfile.NamedTemporaryFile() as usage_file, tempfile.TemporaryFile() as errors:
        prefix = [TIME, "-o", usage_file.name, "-f", "%M %U %S"] if TIME else []
        start = time.perf_counter()
        child = subprocess.Popen(
            prefix + argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            env=env,
        )
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped: Popen must not wait
        if child.returncode != 0:
            errors.seek(0)
            message = errors.read().decode(errors="replace").strip()
            raise SystemExit(f"{' '.join(argv)} exited {child.returncode}: {message}")
        if TIME:
            max_rss, user, system = usage_file.read().decode().split()[-3:]
            return Run(seconds, float(user), float(system), int(max_rss))
    return Run(seconds, usage.ru_utime, usage.ru_stime, usage.ru_maxrss)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def command_argv(
    command: str,
    tool: str | None,
    ours: str,
    image: Path,
    archive: Path,
    config: Path,
    output: Path,
) -> list[str]:
    """The argv of one side of one command; ``tool`` None means our vma."""
    if tool is None or tool != "baseline":
        vma = ours if tool is None else tool
        return {
            "create": [vma, "create", str(output), "-c", str(config), str(image)],
            "verify": [vma, "verify", str(archive)],
            "extract": [vma, "extract", str(archive), str(output)],
            "list": [vma, "list", str(archive)],
        }[command]
    return {
        "create": ["dd", f"if={archive}", f"of={output}", "bs=4M", "oflag=direct", "status=none"],
        "verify": ["sh", "-c", 'exec cat "$1" >/dev/null', "sh", str(archive)],
        "extract": ["cp", str(image), str(output)],
        "list": ["head", "-c", "12288", str(archive)],
    }[command]


def bench_size(
    size: int, commands: list[str], runs: int, work: Path, reference: str | None, ours: str
) -> list[Row]:
    image = work / f"image-{size}.raw"
    print(f"# preparing {size_label(size)} image {image}", file=sys.stderr)
    make_image(image, size)
    warm(image)
    config = work / "qemu-server.conf"
    config.write_bytes(CONFIG_TEXT)
    archive = work / f"seed-{size}.vma"
    remove(archive)
    # The seed archive every read command (and the dd baseline) uses: made by
    # our tool, so both sides read the same bytes.
    env = child_environment(work)
    run_timed(command_argv("create", None, ours, image, archive, config, archive), env)
    warm(archive)
    other = reference if reference is not None else "baseline"
    rows = []
    for command in commands:
        row = Row(command, size)
        for index in range(runs):
            sides: list[tuple[str | None, list[Run]]] = [(other, row.reference), (None, row.ours)]
            if index % 2:
                sides.reverse()
            for tool, results in sides:
                output = work / ("out.vma" if command == "create" else "out")
                remove(output)
                argv = command_argv(command, tool, ours, image, archive, config, output)
                results.append(run_timed(argv, env))
                remove(output)
            print(
                f"# {command} {size_label(size)} run {index + 1}/{runs}: "
                f"{row.reference[-1].seconds:.3f} s vs ours {row.ours[-1].seconds:.3f} s",
                file=sys.stderr,
            )
        rows.append(row)
    remove(archive)
    return rows


def print_table(rows: list[Row], reference_name: str) -> None:
    name = reference_name
    print(
        f"| work | size | {name} (median) | ours (median) | ratio {name}/ours (median of pairs) "
        f"| peak RSS {name} | peak RSS ours | CPU user+sys {name} | CPU user+sys ours |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ratio = statistics.median(
            r.seconds / o.seconds for r, o in zip(row.reference, row.ours, strict=True)
        )

        def median_seconds(runs: list[Run]) -> float:
            return statistics.median(run.seconds for run in runs)

        def median_cpu(runs: list[Run]) -> str:
            user = statistics.median(run.user for run in runs)
            system = statistics.median(run.system for run in runs)
            return f"{user:.2f} + {system:.2f} s"

        def rss(runs: list[Run]) -> str:
            return f"{max(run.max_rss_kib for run in runs) / 1024:.1f} MiB"

        print(
            f"| `{row.command}` | {size_label(row.size)} "
            f"| {median_seconds(row.reference):.3f} s | {median_seconds(row.ours):.3f} s "
            f"| {ratio:.2f}x "
            f"| {rss(row.reference)} | {rss(row.ours)} "
            f"| {median_cpu(row.reference)} | {median_cpu(row.ours)} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="1G,4G", help="comma-separated image sizes (default 1G,4G)"
    )
    parser.add_argument(
        "--runs", type=int, default=5, help="interleaved pairs per command (default 5)"
    )
    parser.add_argument(
        "--commands", default=",".join(COMMANDS), help="subset of create,verify,extract,list"
    )
    parser.add_argument(
        "--dir", type=Path, help="working directory (default: a fresh one in the repository)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the working directory (and its images)"
    )
    parser.add_argument(
        "--ours", default=os.environ.get("VMA_OURS", str(REPO / ".venv" / "bin" / "vma"))
    )
    args = parser.parse_args()
    commands = [c for c in args.commands.split(",") if c]
    if unknown := set(commands) - set(COMMANDS):
        parser.error(f"unknown commands: {', '.join(sorted(unknown))}")
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    reference = os.environ.get("VMA_REFERENCE") or None
    fresh = args.dir is None
    work = Path(tempfile.mkdtemp(prefix="bench-vs-reference-", dir=REPO)) if fresh else args.dir
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = []
        for size in sizes:
            rows += bench_size(size, commands, args.runs, work, reference, args.ours)
            if not args.keep:
                remove(work / f"image-{size}.raw")
    finally:
        for leftover in (
            "out",
            "out.vma",
            "qemu-server.conf",
            *(f"seed-{size}.vma" for size in sizes),
        ):
            remove(work / leftover)
        if fresh and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    reference_name = "reference" if reference else "baseline"
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.node()} {os.cpu_count()} cpus, "
        f"load {os.getloadavg()[0]:.1f}, "
        f"runs={args.runs}, {reference_name}={reference or BASELINES}, ours={args.ours}"
    )
    print_table(rows, reference_name)


if __name__ == "__main__":
    main()
