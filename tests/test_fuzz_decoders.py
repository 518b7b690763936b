"""The atheris target for the header and extent decoders, run for a bounded count."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TARGET = Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_decoders.py"


def test_decoders_survive_coverage_guided_fuzzing(tmp_path: Path) -> None:
    runs = 4000
    result = subprocess.run(
        [sys.executable, str(TARGET), f"-runs={runs}", "-seed=1", "-max_len=20000"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Done {runs} runs" in result.stderr
    assert not list(tmp_path.glob("crash-*"))
