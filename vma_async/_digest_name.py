"""Where an archive's digest sidecar lives.

Kept apart from ``_digest`` so that the ``vma`` command's start-up-bound
paths (a loop-free ``verify``) can look for a sidecar without importing the
hashing, reading and async code.
"""

from __future__ import annotations

import os

__all__ = ["DIGEST_SUFFIX", "digest_path"]

DIGEST_SUFFIX = ".digest"


def digest_path(archive: str | os.PathLike[str]) -> str:
    """Where the sidecar of ``archive`` lives."""
    return os.fspath(archive) + DIGEST_SUFFIX
