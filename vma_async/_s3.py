"""Archives in S3-compatible object storage: ``s3://BUCKET/KEY`` as a target and a source.

Goal: a backup daemon streams an archive straight into an object with the
same backpressure and atomicity it has for files, and a restore service reads
one in order or at random without downloading it first.

Client.  obstore (Rust's ``object_store`` crate) does the HTTP, signing,
retries and multipart bookkeeping.  Only its *synchronous* calls are used:
they release the GIL and block a thread, so they run in anyio worker threads
under asyncio, uvloop and trio alike (its async API is asyncio-only).  The
endpoint and credentials come from the standard ``AWS_*`` environment
variables (see ``docs/object-storage.md``).

Target plan.  Writes are copied into a part buffer of ``part_size`` bytes; a
full part is handed to obstore's multipart writer, whose ``write`` returns
once fewer than ``parts_in_flight`` part uploads are running.  That wait is
the backpressure (a slow store stalls the writer as a slow pipe does), and it
bounds memory: at most ``parts_in_flight`` parts uploading plus the one being
filled, ``(parts_in_flight + 1) * part_size`` bytes (:attr:`S3Target.memory_bound`).
obstore keeps a zero-copy reference to each part until its upload ends; a
finaliser on the part's memoryview counts the parts alive, so the bound is
checked from the target's own counters (:class:`S3TargetStats`).

Atomicity.  The object appears only at ``close``: an archive smaller than one
part goes up in one conditional PUT (``If-None-Match: *``: an existing key is
never replaced); a larger one becomes visible at CompleteMultipartUpload.
Multipart completion has no portable condition, so the key is checked with a
HEAD when the target opens and again just before completing (a writer racing
in between can still win: stated in the docs).  ``abort`` aborts the
multipart upload, so a failed or cancelled backup leaves no object and no
upload behind, unless the store cannot be reached to abort it.

Source plan.  Ranged GETs of ``read_chunk_size`` bytes, up to ``read_ahead``
of them ahead of the reader, in a small thread pool of the source's own
(memory: ``read_ahead * read_chunk_size`` plus the chunk being consumed).
Random access (``pread``) reads small ranges through a cache of aligned
windows, so indexing the extent headers of a sparse archive costs one GET per
window rather than one per extent.

Worst case: a store that stops answering stalls a call until obstore's
timeout and retries give up (``timeout``/``max_retries`` below); a cancelled
write waits for the part hand-off in progress, never longer.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.to_thread

from ._errors import SourceError, TargetError, TargetExistsError, VmaError
from ._sources import READ_SIZE, ArchiveSource
from ._targets import Target

if TYPE_CHECKING:
    from obstore.store import S3Store

__all__ = ["S3_PREFIX", "S3Source", "S3Target", "S3TargetStats", "open_s3_store", "parse_s3_url"]

S3_PREFIX: Final = "s3://"
MIN_PART_SIZE: Final = 5 << 20
"""S3's smallest part (all but the last)."""
MAX_PARTS: Final = 10_000
"""S3's most parts in one upload: an archive holds at most this many parts."""
DEFAULT_PART_SIZE: Final = 32 << 20
DEFAULT_PARTS_IN_FLIGHT: Final = 4
DEFAULT_READ_CHUNK: Final = 8 << 20
DEFAULT_READ_AHEAD: Final = 4
_WINDOW: Final = 128 << 10
"""Small preads are served from cached windows of this size (aligned)."""
_WINDOWS_CACHED: Final = 16
_ERROR_TEXT_MAX: Final = 400


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET/KEY`` -> ``(bucket, key)``; a :class:`ValueError` names what is missing."""
    if not url.startswith(S3_PREFIX):
        raise ValueError(f"{url!r} is not an s3:// URL")
    bucket, _, key = url[len(S3_PREFIX) :].partition("/")
    if not bucket or not key or key.endswith("/"):
        raise ValueError(f"{url!r}: expected s3://BUCKET/KEY with a bucket and an object key")
    return bucket, key


def _parse(url: str, error: type[VmaError]) -> tuple[str, str]:
    try:
        return parse_s3_url(url)
    except ValueError as exc:
        raise error(str(exc)) from exc


def open_s3_store(
    bucket: str,
    *,
    timeout: float = 300.0,
    connect_timeout: float = 10.0,
    max_retries: int = 3,
    retry_timeout: float = 60.0,
) -> S3Store:
    """An obstore ``S3Store`` for ``bucket``, configured the standard way.

    obstore reads ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``),
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
    ``AWS_REGION`` and the rest of the ``AWS_*`` family from the environment.
    An ``http://`` endpoint is allowed as given (local stores); requests are
    path-style unless ``AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true``.  Retries are
    few and bounded, so a dead store fails a backup within about
    ``retry_timeout`` seconds rather than obstore's default three minutes.
    """
    try:
        from obstore.store import S3Store
    except ImportError as exc:
        raise TargetError(
            "s3:// archives need the obstore package: pip install 'vma_async[s3]'"
        ) from exc
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")
    client_options: dict[str, Any] = {
        "timeout": timedelta(seconds=timeout),
        "connect_timeout": timedelta(seconds=connect_timeout),
    }
    if endpoint.startswith("http://"):
        client_options["allow_http"] = True
    return S3Store(
        bucket,
        client_options=client_options,  # type: ignore[arg-type]
        retry_config={
            "max_retries": max_retries,
            "retry_timeout": timedelta(seconds=retry_timeout),
        },
    )


def _describe(exc: BaseException) -> str:
    """obstore's message on one bounded line: the store's error code and
    message first (from the XML body), then what obstore says it did."""
    text = str(exc).split("\n\nDebug source", 1)[0].strip()
    if not text:
        return type(exc).__name__
    line = text.split("<?xml", 1)[0].strip().rstrip(":").splitlines()[0]
    code = re.search(r"<Code>([^<]*)</Code>", text)
    if code:
        message = re.search(r"<Message>([^<]*)</Message>", text)
        said = f"{code.group(1)}: {message.group(1)}" if message else code.group(1)
        line = f"{said} ({line})"
    return line if len(line) <= _ERROR_TEXT_MAX else line[: _ERROR_TEXT_MAX - 3] + "..."


def _is_not_found(exc: BaseException) -> bool:
    from obstore.exceptions import NotFoundError

    return isinstance(exc, (NotFoundError, FileNotFoundError))


# --- target ----------------------------------------------------------------------------------


@dataclass(slots=True)
class S3TargetStats:
    """What an :class:`S3Target` counted (for tests and tuning)."""

    part_size: int
    parts_in_flight: int
    parts_sent: int = 0
    bytes_sent: int = 0
    parts_alive: int = 0
    """Part buffers in memory now: the one being filled and those uploading."""
    parts_alive_high_water: int = 0
    single_put: bool = False
    """True when the archive fit in one part and went up in one conditional PUT."""
    abort_failed: str | None = None
    """Why aborting the multipart upload failed (the store unreachable): the
    upload then stays until the store's lifecycle rule removes it."""

    @property
    def memory_bound(self) -> int:
        """Bytes the target's parts can hold at once: ``parts_alive`` never
        exceeds ``parts_in_flight + 1``."""
        return (self.parts_in_flight + 1) * self.part_size


class S3Target(Target):
    """``s3://BUCKET/KEY``: a new object, written by multipart upload.

    See the module docstring for backpressure, the memory bound and
    atomicity.  ``store`` is an obstore store for the bucket (default:
    :func:`open_s3_store` from the environment).  ``part_size`` is at least
    5 MiB (S3's minimum); an archive can have at most 10,000 parts, so the
    default 32 MiB parts hold archives up to 312 GiB: pass a larger
    ``part_size`` for larger ones.
    """

    def __init__(
        self,
        url: str,
        *,
        store: S3Store | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        parts_in_flight: int = DEFAULT_PARTS_IN_FLIGHT,
    ) -> None:
        self.bucket, self.key = _parse(url, TargetError)
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum)")
        if parts_in_flight < 1:
            raise ValueError("parts_in_flight must be at least 1")
        self.url = url
        self._store = store
        self.stats = S3TargetStats(part_size, parts_in_flight)
        self._lock = threading.Lock()
        self._part: bytearray | None = None
        self._filled = 0
        self._upload: Any = None  # obstore WritableFile once the first part is full
        self._finished = False

    @property
    def memory_bound(self) -> int:
        return self.stats.memory_bound

    def _error(self, what: str, exc: BaseException) -> TargetError:
        return TargetError(f"{what} {self.url} failed - {_describe(exc)}")

    def _exists_error(self) -> TargetExistsError:
        return TargetExistsError(f"can't create {self.url} - the object exists")

    async def open(self) -> None:
        await anyio.to_thread.run_sync(self._check_absent)

    def _check_absent(self) -> None:
        import obstore

        if self._store is None:
            self._store = open_s3_store(self.bucket)
        try:
            obstore.head(self._store, self.key)
        except Exception as exc:
            if _is_not_found(exc):
                return
            raise self._error("checking", exc) from exc
        raise self._exists_error()

    # -- writing --

    async def write(self, data: memoryview) -> None:
        await anyio.to_thread.run_sync(self._write_blocking, data)

    def _new_part(self) -> bytearray:
        part = bytearray(self.stats.part_size)
        with self._lock:
            self.stats.parts_alive += 1
            self.stats.parts_alive_high_water = max(
                self.stats.parts_alive_high_water, self.stats.parts_alive
            )
        return part

    def _part_released(self) -> None:
        with self._lock:
            self.stats.parts_alive -= 1

    def _write_blocking(self, data: memoryview) -> None:
        size = self.stats.part_size
        while data:
            if self._part is None:
                self._part = self._new_part()
                self._filled = 0
            take = min(len(data), size - self._filled)
            self._part[self._filled : self._filled + take] = data[:take]
            self._filled += take
            data = data[take:]
            if self._filled == size:
                self._send_part()

    def _send_part(self) -> None:
        """Hand the current part to the multipart writer; blocks while
        ``parts_in_flight`` uploads are running (the backpressure)."""
        import obstore

        part, filled = self._part, self._filled
        assert part is not None
        self._part, self._filled = None, 0
        if self.stats.parts_sent >= MAX_PARTS:
            self._part_released()
            raise TargetError(
                f"vma_queue_write: write error - {self.url} would need more than {MAX_PARTS}"
                f" parts of {self.stats.part_size} bytes: use a larger part size"
            )
        view = memoryview(part)[:filled]
        del part
        # obstore keeps ``view`` (zero-copy) until the part's upload ends.
        weakref.finalize(view, self._part_released)
        try:
            if self._upload is None:
                assert self._store is not None
                self._upload = obstore.open_writer(
                    self._store,
                    self.key,
                    buffer_size=self.stats.part_size,
                    max_concurrency=self.stats.parts_in_flight,
                )
            self._upload.write(view)
        except Exception as exc:
            raise TargetError(
                f"vma_queue_write: write error - uploading {self.url}: {_describe(exc)}"
            ) from exc
        finally:
            del view
        self.stats.parts_sent += 1
        self.stats.bytes_sent += filled

    # -- finishing --

    async def close(self) -> None:
        try:
            await anyio.to_thread.run_sync(self._close_blocking)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.abort()
            raise

    def _close_blocking(self) -> None:
        import obstore

        if self._upload is None:
            # Fits in one part: one PUT that the store refuses if the key exists.
            data = memoryview(self._part or b"")[: self._filled]
            try:
                assert self._store is not None
                obstore.put(self._store, self.key, data, mode="create", use_multipart=False)
            except Exception as exc:
                from obstore.exceptions import AlreadyExistsError, PreconditionError

                if isinstance(exc, (AlreadyExistsError, PreconditionError)):
                    raise self._exists_error() from exc
                raise self._error("vma_writer_close: uploading", exc) from exc
            finally:
                self._drop_part()
            self.stats.single_put = True
            self.stats.bytes_sent += len(data)
            self._finished = True
            return
        if self._filled:
            self._send_part()  # the last, short part
        self._drop_part()
        # No portable conditional CompleteMultipartUpload: check once more.
        self._check_absent()
        try:
            self._upload.close()
        except Exception as exc:
            raise self._error("vma_writer_close: completing the upload of", exc) from exc
        self._finished = True

    def _drop_part(self) -> None:
        if self._part is not None:
            self._part = None
            self._filled = 0
            self._part_released()

    async def abort(self) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._abort_blocking)

    def _abort_blocking(self) -> None:
        self._drop_part()
        upload, self._upload = self._upload, None
        if upload is None or self._finished:
            return
        # obstore aborts the multipart upload when its context exits with an
        # error: it cancels the part uploads in flight, then sends the abort.
        # (S3 documents that a part the store is still storing when the abort
        # arrives may survive it; the lifecycle rule covers that rare case.)
        try:
            upload.__exit__(TargetError, TargetError("aborted"), None)
        except Exception as exc:
            self.stats.abort_failed = _describe(exc)


# --- source ----------------------------------------------------------------------------------


class S3Source(ArchiveSource):
    """``s3://BUCKET/KEY`` read by ranged GETs: sequential reads with bounded
    read-ahead, and random access through :meth:`pread`.

    Create with :meth:`open` (it needs a HEAD request for the size).
    """

    blocking = True
    seekable = True

    def __init__(
        self,
        url: str,
        *,
        store: S3Store | None = None,
        read_chunk_size: int = DEFAULT_READ_CHUNK,
        read_ahead: int = DEFAULT_READ_AHEAD,
    ) -> None:
        self.bucket, self.key = _parse(url, SourceError)
        if read_chunk_size <= 0 or read_ahead < 1:
            raise ValueError("read_chunk_size and read_ahead must be positive")
        self.url = url
        self._store = store
        self._chunk = read_chunk_size
        self._read_ahead = read_ahead
        self._ahead = 1
        """Chunks kept in flight now: doubles as the reader consumes chunks, up
        to ``read_ahead``, so ``vma list`` (the header only) costs one GET."""
        self._size = 0
        self._pos = 0
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: dict[int, concurrent.futures.Future[memoryview]] = {}
        self._windows: OrderedDict[int, bytes] = OrderedDict()
        self._windows_lock = threading.Lock()
        self.requests = 0
        """GET requests made so far (tests check how few the index needs)."""

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> S3Source:
        """Open ``url``: one HEAD request for its size."""
        source = cls(url, **kwargs)
        await anyio.to_thread.run_sync(source._head)
        return source

    def _head(self) -> None:
        import obstore

        if self._store is None:
            try:
                self._store = open_s3_store(self.bucket)
            except TargetError as exc:
                raise SourceError(str(exc)) from exc
        try:
            meta = obstore.head(self._store, self.key)
        except Exception as exc:
            if _is_not_found(exc):
                raise SourceError(f"can't open file {self.url} - No such object") from exc
            raise SourceError(f"can't open file {self.url} - {_describe(exc)}") from exc
        self._size = int(meta["size"])

    def _get(self, start: int, end: int) -> memoryview:
        import obstore

        assert self._store is not None
        self.requests += 1
        try:
            data = obstore.get_range(self._store, self.key, start=start, end=end)
        except Exception as exc:
            raise SourceError(f"read failed - {self.url}: {_describe(exc)}") from exc
        view = memoryview(data)
        if len(view) != end - start:
            raise SourceError(f"read failed - {self.url}: short read (the object changed?)")
        return view

    # -- sequential --

    async def read(self, max_bytes: int) -> memoryview:
        return await anyio.to_thread.run_sync(self.read_blocking, max_bytes)

    def _schedule(self, first: int) -> None:
        """Keep GETs running for chunks ``first .. first + read_ahead - 1``."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self._read_ahead, thread_name_prefix="vma-s3-read"
            )
        for index in [i for i in self._pending if i < first]:
            self._pending.pop(index).cancel()
        last = min(first + self._ahead, -(-self._size // self._chunk))
        for index in range(first, last):
            if index not in self._pending:
                start = index * self._chunk
                end = min(start + self._chunk, self._size)
                self._pending[index] = self._pool.submit(self._get, start, end)

    def read_blocking(self, max_bytes: int) -> memoryview:
        if self._pos >= self._size or max_bytes <= 0:
            return memoryview(b"")
        index = self._pos // self._chunk
        self._schedule(index)
        chunk = self._pending[index].result()
        start = self._pos - index * self._chunk
        count = min(max_bytes, READ_SIZE, len(chunk) - start)
        self._pos += count
        if start + count == len(chunk):
            del self._pending[index]
            self._ahead = min(2 * self._ahead, self._read_ahead)
        return chunk[start : start + count]

    # -- random access --

    def pread(self, offset: int, size: int) -> bytes:
        """Bytes at ``offset``; small reads come from cached aligned windows
        (the index walk reads 512-byte extent headers one after another)."""
        end = min(offset + size, self._size)
        if offset >= end:
            return b""
        window = offset // _WINDOW
        if end - offset > _WINDOW or (end - 1) // _WINDOW != window:
            return bytes(self._get(offset, end))
        with self._windows_lock:
            data = self._windows.get(window)
            if data is not None:
                self._windows.move_to_end(window)
        if data is None:
            start = window * _WINDOW
            data = bytes(self._get(start, min(start + _WINDOW, self._size)))
            with self._windows_lock:
                self._windows[window] = data
                while len(self._windows) > _WINDOWS_CACHED:
                    self._windows.popitem(last=False)
        base = window * _WINDOW
        return data[offset - base : end - base]

    def archive_size(self) -> int:
        return self._size

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        pending, self._pending = self._pending, {}
        for future in pending.values():
            future.cancel()
        if pool is not None:
            # Not waiting for GETs already running (aclose must not wait for a
            # peer): their threads end with the request, within the timeout.
            pool.shutdown(wait=False, cancel_futures=True)
