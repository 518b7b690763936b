"""How well do VMA archives deduplicate in a real deduplicating store (borgbackup)?

A VM of two disks (``--size`` MiB in all, default 1024; three quarters random
data, one quarter zero clusters) is backed up, then ``--changed`` (default
1 %) of its clusters get new random content, and it is backed up again.  Each
archive goes into a fresh borg repository (``borg create --stdin-name``,
lz4 as borg's default); the figure is the store's growth from the second
archive (``unique_csize`` after it, less after the first), against the first
one's stored size.  Three ways to make the archives:

(a) ``vma create`` as it is by default (and as the reference and vzdump
    write them): one producer per disk, so clusters of the two disks
    interleave in whatever order the producers ran, and a random uuid in
    every extent header;
(b) ``vma create --reproducible --uuid U``: devices one after another,
    clusters ascending, a fixed uuid;
(c) ``vma repack`` of the (a) archives with ``--uuid U``.

Each with borg's default chunker (``buzhash,19,23,21,4095``: 2 MiB chunks on
average) and with a finer one for VM images (``--fine``, default
``buzhash,10,20,14,4095``: 16 KiB on average).  With changes scattered one
cluster at a time, a 2 MiB chunk holds 32 clusters, so about a quarter of all
chunks hold a changed cluster whatever the archive order: only a chunker
finer than that can get near the change rate.  ``--run N`` changes runs of N
clusters instead (a rewritten file rather than scattered blocks).

Target (issue 11): (b)/(c) add <= 3 % of the first archive's stored size.

    .venv/bin/python benchmarks/bench_dedup.py [--size 1024] [--changed 0.01]
        [--run 1] [--fine buzhash,10,20,14,4095] [--dir DIR]

Needs ``borg`` (Debian: ``apt-get install borgbackup``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLUSTER = 65536
VMA = [sys.executable, "-m", "vma_async"]
FIXED_UUID = "0b5e55ed-0000-4000-8000-000000000100"
DEFAULT_CHUNKER = "buzhash,19,23,21,4095"


def make_disk(path: Path, clusters: int, rng: random.Random) -> None:
    with path.open("wb") as disk:
        for cluster in range(clusters):
            zero = (cluster // 64) % 4 == 3  # zero runs of 4 MiB: a quarter of the disk
            disk.write(bytes(CLUSTER) if zero else rng.randbytes(CLUSTER))


def change_clusters(paths: list[Path], fraction: float, run: int, rng: random.Random) -> int:
    """Give ``fraction`` of all clusters new random content, in runs of ``run``."""
    sizes = [p.stat().st_size // CLUSTER for p in paths]
    total = sum(sizes)
    wanted = max(1, int(total * fraction))
    changed: set[tuple[int, int]] = set()
    while len(changed) < wanted:
        disk = rng.randrange(len(paths))
        start = rng.randrange(sizes[disk] - run + 1)
        for cluster in range(start, start + run):
            if len(changed) < wanted:
                changed.add((disk, cluster))
    for disk, path in enumerate(paths):
        with path.open("r+b") as f:
            for d, cluster in sorted(changed):
                if d == disk:
                    f.seek(cluster * CLUSTER)
                    f.write(rng.randbytes(CLUSTER))
    return len(changed)


def vma(*args: str) -> None:
    subprocess.run([*VMA, "--quiet", *args], check=True)


def borg_env(base: Path) -> dict[str, str]:
    return {
        **os.environ,
        "BORG_BASE_DIR": str(base / "borg-home"),
        "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
        "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
    }


def stored(repo: Path, env: dict[str, str]) -> int:
    info = subprocess.run(
        ["borg", "info", "--json", str(repo)], capture_output=True, check=True, env=env
    )
    return int(json.loads(info.stdout)["cache"]["stats"]["unique_csize"])


def store_growth(base: Path, archives: list[Path], chunker: str, label: str) -> tuple[int, int]:
    """Stored size after the first archive, and what the second one added."""
    repo = base / f"repo-{label}"
    env = borg_env(base)
    subprocess.run(
        ["borg", "init", "-e", "none", str(repo)], check=True, env=env, capture_output=True
    )
    sizes = []
    for index, archive in enumerate(archives):
        with archive.open("rb") as stdin:
            subprocess.run(
                ["borg", "create", "--chunker-params", chunker, "--stdin-name", "vzdump.vma",
                 f"{repo}::backup{index}", "-"],
                stdin=stdin, check=True, env=env,
            )  # fmt: skip
        sizes.append(stored(repo, env))
    shutil.rmtree(repo)
    return sizes[0], sizes[1] - sizes[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="MiB in all (two disks)")
    parser.add_argument("--changed", type=float, default=0.01)
    parser.add_argument("--run", type=int, default=1, help="clusters per changed run")
    parser.add_argument("--fine", default="buzhash,10,20,14,4095", help="finer borg chunker")
    parser.add_argument("--dir", type=Path)
    args = parser.parse_args()
    if shutil.which("borg") is None:
        sys.exit("bench_dedup: needs borg (apt-get install borgbackup)")
    base = args.dir or Path(tempfile.mkdtemp(prefix="bench-dedup-", dir=Path(__file__).parents[1]))
    base.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        rng = random.Random(11)
        clusters = (args.size << 20) // CLUSTER
        disks = [base / "disk0.raw", base / "disk1.raw"]
        make_disk(disks[0], clusters // 2, rng)
        make_disk(disks[1], clusters - clusters // 2, rng)
        devices = [f"drive-scsi{i}={p}" for i, p in enumerate(disks)]
        (base / "qemu-server.conf").write_text("cores: 2\nmemory: 2048\n")
        conf = ["-c", str(base / "qemu-server.conf")]

        made: dict[str, list[Path]] = {"a": [], "b": [], "c": []}
        for backup in (0, 1):
            if backup:
                count = change_clusters(disks, args.changed, args.run, rng)
            a, b, c = (base / f"{mode}{backup}.vma" for mode in "abc")
            vma("create", str(a), *conf, *devices)
            vma("create", "--reproducible", "--uuid", FIXED_UUID, str(b), *conf, *devices)
            vma("repack", str(a), str(c), "--uuid", FIXED_UUID)
            for mode, path in zip("abc", (a, b, c), strict=True):
                made[mode].append(path)

        print(
            f"VM of {args.size} MiB (2 disks, 1/4 zero), {count} of {clusters} clusters"
            f" ({100 * count / clusters:.2f} %) changed in runs of {args.run};"
            f" archives {made['a'][0].stat().st_size >> 20} MiB"
        )
        names = {
            "a": "(a) default create (interleaved, random uuid)",
            "b": "(b) create --reproducible --uuid",
            "c": "(c) repack --uuid of (a)",
        }
        for chunker in (DEFAULT_CHUNKER, args.fine):
            print(f"borg --chunker-params {chunker}:")
            for mode in "abc":
                first, growth = store_growth(base, made[mode], chunker, mode)
                print(
                    f"  {names[mode]:48} first {first / 2**20:7.1f} MiB,"
                    f" second adds {growth / 2**20:7.1f} MiB = {100 * growth / first:5.1f} %"
                )
        print(f"(target for (b)/(c): <= 3 %; {time.monotonic() - started:.0f} s)")
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
