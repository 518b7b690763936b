"""The atheris targets (VMA header and extent decoders, the NBD state
machines), each run for a bounded count with a fixed seed: a crash, a hang
or an exception other than the library's own fails the test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"


@pytest.mark.parametrize(("target", "runs"), [("fuzz_decoders.py", 4000), ("fuzz_nbd.py", 3000)])
def test_target_survives_coverage_guided_fuzzing(tmp_path: Path, target: str, runs: int) -> None:
    result = subprocess.run(
        [sys.executable, str(FUZZ / target), f"-runs={runs}", "-seed=1", "-max_len=20000"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Done {runs} runs" in result.stderr
    assert not list(tmp_path.glob("crash-*"))
