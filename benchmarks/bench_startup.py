"""Start-up of the ``vma`` command, whole process (issue 10: <= 60 ms).

Goal: the figure Proxmox feels, which runs one ``vma list`` (and ``vma config
-``) per backup file: the time from spawn to exit of ``vma --version`` and of
``vma list`` / ``vma config`` on a small archive, beside ``python -c pass``
(the interpreter's own floor) and, with ``VMA_REFERENCE`` set, the reference
tool's ``list``.

Plan: make a 1 MiB archive with our tool, then run every case ``--runs``
times, interleaved (case A, B, C, A, B, C, ...) so a load spike hits them
all; print the median and best wall time and the median user+sys CPU (GNU
``time``), then the modules that cost most to import for ``vma list``
(``python -X importtime``, median of five runs; cumulative microseconds).
Children run with the bytecode cache on (as an installed package has it).

    .venv/bin/python benchmarks/bench_startup.py [--runs 30] [--top 15]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIME = shutil.which("time", path="/usr/bin:/bin")


def child_environment(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    return env


def run_once(argv: list[str], env: dict[str, str], usage: Path) -> tuple[float, float]:
    """Wall seconds and user+sys CPU seconds of one run (CPU 0 without GNU time)."""
    prefix = [TIME, "-o", str(usage), "-f", "%U %S"] if TIME else []
    start = time.perf_counter()
    result = subprocess.run(
        prefix + argv, stdin=subprocess.DEVNULL, capture_output=True, env=env, check=False
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.decode()}")
    cpu = sum(map(float, usage.read_text().split()[-2:])) if TIME else 0.0
    return wall, cpu


def import_profile(argv: list[str], env: dict[str, str], top: int) -> list[tuple[int, str]]:
    """The modules imported directly by the command (depth 0 and 1), by the
    median over five runs of their cumulative import time."""
    samples: dict[str, list[int]] = {}
    for _ in range(5):
        result = subprocess.run(
            [sys.executable, "-X", "importtime", *argv],
            capture_output=True,
            env=env,
            check=True,
        )
        for line in result.stderr.decode().splitlines():
            if not line.startswith("import time:") or "cumulative" in line:
                continue
            _, cumulative, name = line[len("import time:") :].split("|")
            depth = (len(name) - len(name.lstrip())) // 2
            if depth <= 1:
                samples.setdefault(name.rstrip(), []).append(int(cumulative))
    ranked = sorted(((int(statistics.median(v)), k) for k, v in samples.items()), reverse=True)
    return ranked[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--top", type=int, default=15, help="modules to list in the import profile")
    parser.add_argument(
        "--ours", default=os.environ.get("VMA_OURS", str(REPO / ".venv" / "bin" / "vma"))
    )
    args = parser.parse_args()
    reference = os.environ.get("VMA_REFERENCE") or None
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = Path(tmp)
        env = child_environment(work)
        disk = work / "disk.raw"
        disk.write_bytes(os.urandom(1 << 20))
        config = work / "qemu-server.conf"
        config.write_bytes(b"cores: 2\nmemory: 2048\n")
        archive = work / "small.vma"
        subprocess.run(
            [args.ours, "create", str(archive), "-c", str(config), str(disk)], env=env, check=True
        )
        cases = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "vma --version": [args.ours, "--version"],
            "vma list": [args.ours, "list", str(archive)],
            "vma config": [args.ours, "config", str(archive)],
        }
        if reference:
            cases["reference vma list"] = [reference, "list", str(archive)]
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
        usage = work / "usage"
        for argv in cases.values():  # warm-up: compiles the .pyc files
            run_once(argv, env, usage)
        for _ in range(args.runs):
            for name, argv in cases.items():
                results[name].append(run_once(argv, env, usage))
        print(
            f"# {time.strftime('%Y-%m-%d %H:%M')} {os.cpu_count()} cpus, "
            f"load {os.getloadavg()[0]:.1f}, runs={args.runs}, ours={args.ours}"
        )
        print("| case | median wall | best wall | median user+sys CPU |")
        print("|---|---|---|---|")
        for name, runs in results.items():
            walls = [wall for wall, _ in runs]
            cpus = [cpu for _, cpu in runs]
            median_wall, best_wall = statistics.median(walls) * 1000, min(walls) * 1000
            print(
                f"| `{name}` | {median_wall:.1f} ms | {best_wall:.1f} ms "
                f"| {statistics.median(cpus) * 1000:.0f} ms |"
            )
        print(f"\nimport profile of `vma list` (cumulative us, median of 5; top {args.top}):")
        list_argv = [args.ours, "list", str(archive)]
        entry = Path(args.ours)
        if entry.read_bytes()[:2] == b"#!":  # a console script: run it with our interpreter
            for cumulative, name in import_profile([str(entry), *list_argv[1:]], env, args.top):
                print(f"{cumulative:9d}  {name}")


if __name__ == "__main__":
    main()
