"""The reader's mutation fuzzer, run long: inputs tried, outcome classes, crashes.

The engine (seed archives, mutations, the ways each input is read, the
per-input time, memory and fd checks) is ``tests/test_mutation_fuzz.py``;
the suite runs it for 750 inputs, this script for as many as asked, spread
over asyncio, uvloop and trio, with tracemalloc on (about 2x slower; switch
it off with ``--no-trace``).  Inputs that crash are saved under
``--crashes`` for replay.

    .venv/bin/python benchmarks/fuzz_reader.py --inputs 20000 --seed 7

Exit status 1 if any crash was found.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_mutation_fuzz import FuzzReport, run_campaign

BACKENDS: list[tuple[str, str, dict[str, Any]]] = [
    ("asyncio", "asyncio", {}),
    ("uvloop", "asyncio", {"use_uvloop": True}),
    ("trio", "trio", {}),
]


def run_backend(
    backend: str, options: dict[str, Any], label: str, count: int, seed: int, crashes: Path
) -> FuzzReport:
    """One campaign on one event loop, with a progress line every 10 s."""
    last = time.monotonic()

    def tick(report: FuzzReport) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= 10:
            last = now
            print(f"  {label}: {report.inputs}/{count} inputs", file=sys.stderr)

    async def campaign() -> FuzzReport:
        return await run_campaign(count, seed, keep_crashes=crashes, on_input=tick)

    return anyio.run(campaign, backend=backend, backend_options=options)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=6000, help="total inputs (default 6000)")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--crashes", type=Path, default=Path("fuzz-crashes"))
    parser.add_argument("--no-trace", action="store_true", help="skip the tracemalloc check")
    args = parser.parse_args()

    args.crashes.mkdir(parents=True, exist_ok=True)
    if not args.no_trace:
        tracemalloc.start()
    started = time.monotonic()
    total = Counter[str]()
    crashes: list[tuple[str, int, str, str, str]] = []
    slowest = 0.0
    peak = 0
    per_backend = args.inputs // len(BACKENDS)
    for index, (label, backend, options) in enumerate(BACKENDS):
        seed = args.seed + index
        count = per_backend + (args.inputs % len(BACKENDS) if index == 0 else 0)
        report = run_backend(backend, options, label, count, seed, args.crashes)
        total.update(report.outcomes)
        crashes += [(label, *crash) for crash in report.crashes]
        slowest = max(slowest, report.slowest)
        peak = max(peak, report.peak_memory)
        print(f"{label}: {report.inputs} inputs (seed {seed})")
    elapsed = time.monotonic() - started

    inputs = sum(total.values())
    print(f"\ninputs tried: {inputs} in {elapsed:.0f} s ({inputs / elapsed:.0f}/s)")
    print("outcome classes:")
    for outcome, n in total.most_common():
        print(f"  {n:7d}  {outcome}")
    print(f"crashes found: {len(crashes)}")
    for backend, index, label, mode, problem in crashes[:20]:
        print(f"  {backend} input {index} [{label}, {mode}]: {problem}")
    print(f"slowest input: {slowest:.3f} s")
    if not args.no_trace:
        print(f"peak traced memory for one input: {peak / 2**20:.1f} MiB")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of the process: {rss:.0f} MiB")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
