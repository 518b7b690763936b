"""What every atheris target here shares: start from valid seeds when no
corpus directory is given (coverage-guided fuzzing from nothing rarely gets
past a magic number), then hand over to atheris."""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris


def fuzz(test_one_input: Callable[[bytes], None], seeds: list[bytes], prefix: str) -> None:
    argv = list(sys.argv)
    if all(arg.startswith("-") for arg in argv[1:]):
        corpus = Path(tempfile.mkdtemp(prefix=prefix))
        atexit.register(shutil.rmtree, corpus, ignore_errors=True)
        for index, seed in enumerate(seeds):
            (corpus / f"seed-{index}").write_bytes(seed)
        argv.append(str(corpus))
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
