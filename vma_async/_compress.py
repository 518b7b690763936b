"""In-process compression of an archive on its way to any target.

Goal: ``vma create --compress zstd`` (and ``VmaWriter.open(..., compress=)``)
writes a ``.vma.zst`` or ``.vma.gz`` to a file, a pipe, ``exec:`` or
``s3://`` without a compressor child process, and an aborted backup undoes
the compressed output exactly as the wrapped target undoes its own (a file
the target created is removed, an upload is aborted).

Plan: :class:`CompressingTarget` wraps another target.  Each write is
compressed in an anyio worker thread (python-zstandard releases the GIL; with
``threads >= 1`` zstd compresses on its own worker threads as well, and zlib
releases the GIL for large inputs), then the compressed bytes go to the inner
target with an ordinary awaited write.  Nothing is queued in between: the
writer's next extent waits until this one is compressed and handed on, so a
slow inner target still pushes back on the producers, and memory is the
compressor's own working set (zstd: a few jobs of a few MiB per thread) plus
one extent of output.

Worst case: gzip is single-threaded (~30-60 MB/s per core); choose zstd for
large archives.
"""

from __future__ import annotations

import os
import zlib
from typing import Final, Literal, Protocol

import anyio
import anyio.to_thread

from ._targets import NewFileTarget, Target

__all__ = ["COMPRESSIONS", "CompressingTarget"]

Compression = Literal["zstd", "gzip"]
COMPRESSIONS: Final = ("zstd", "gzip")
DEFAULT_LEVELS: Final = {"zstd": 3, "gzip": 6}


class _Compressor(Protocol):
    def compress(self, data: memoryview, /) -> bytes: ...
    def flush(self) -> bytes: ...


def _default_threads() -> int:
    """Half the CPUs, as vzdump's ``zstd: 0`` does: a backup should not
    starve the guests running on the host."""
    return max(1, (os.cpu_count() or 2) // 2)


class CompressingTarget(Target):
    """Compress everything written (``"zstd"`` or ``"gzip"``) into ``inner``.

    ``level`` defaults to 3 for zstd and 6 for gzip; ``threads`` (zstd only)
    defaults to half the CPUs.  ``inner``'s own rules hold: a path is never
    overwritten, an ``s3://`` object appears only when complete.
    """

    def __init__(
        self,
        inner: Target,
        compression: str = "zstd",
        *,
        level: int | None = None,
        threads: int | None = None,
    ) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(
                f"unknown compression {compression!r}: expected one of {', '.join(COMPRESSIONS)}"
            )
        self.inner = inner
        self.compression = compression
        self.level = DEFAULT_LEVELS[compression] if level is None else level
        self.threads = _default_threads() if threads is None else threads
        if isinstance(inner, NewFileTarget):
            # Compressed chunks have any length and come from Python bytes at
            # any address: O_DIRECT would only bounce them back to the page cache.
            inner.direct = False
        self._compressor: _Compressor | None = None
        self.bytes_in = 0
        self.bytes_out = 0

    def _make_compressor(self) -> _Compressor:
        if self.compression == "zstd":
            import zstandard

            return zstandard.ZstdCompressor(level=self.level, threads=self.threads).compressobj()
        return zlib.compressobj(self.level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)

    async def open(self) -> None:
        self._compressor = self._make_compressor()
        await self.inner.open()

    async def write(self, data: memoryview) -> None:
        compressor = self._compressor
        assert compressor is not None, "write() before open()"
        out = await anyio.to_thread.run_sync(compressor.compress, data)
        self.bytes_in += len(data)
        if out:
            self.bytes_out += len(out)
            await self.inner.write(memoryview(out))

    async def close(self) -> None:
        compressor = self._compressor
        assert compressor is not None, "close() before open()"
        # On failure the writer calls abort(), which undoes the inner target.
        out = await anyio.to_thread.run_sync(compressor.flush)
        if out:
            self.bytes_out += len(out)
            await self.inner.write(memoryview(out))
        self._compressor = None
        await self.inner.close()

    async def abort(self) -> None:
        self._compressor = None
        await self.inner.abort()
