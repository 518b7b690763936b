"""The ``.digest`` sidecar: what the VMA format cannot check, its data.

Goal.  The format checksums headers only (the archive header and each
extent header carry an MD5 of themselves); a flipped byte of cluster data in
an uncompressed archive passes ``verify`` and is restored silently.  ``vma
create --digest`` therefore writes ``ARCHIVE.digest`` beside the archive, and
``vma verify`` checks the data against it in the same single streaming pass.

Format (version 2).  One line of JSON, then binary tables::

    {"format": "vma-digest", "version": 2, "uuid": "<archive uuid>",
     "cluster_size": 65536, "cluster_digest": "blake3-128",
     "table_sha256": "<hex SHA-256 of all the tables>",
     "devices": [{"name": "drive-scsi0", "size": N, "sha256": "<hex>"}, ...]}\\n
    <device 1: ceil(size / 65536) digests of 16 bytes> <device 2: ...> ...

* ``sha256`` is the SHA-256 of the whole disk as ``vma extract`` restores it
  (``size`` bytes), so ``sha256sum disk-NAME.raw`` can be compared with it.
* Each cluster digest is the BLAKE3 of that cluster's bytes (the last one
  clipped at the device's size), 128 bits of output.  Clusters may arrive
  in any order (producers interleave, devices too), and each is checked the
  moment it is complete, so verify needs no second pass and no memory beyond
  the clusters it is assembling.  128 bits keep a 1 GiB disk's table at
  256 KiB (1/4096 of the data) while leaving 2^128 work to forge one cluster.
  BLAKE3 because it is the cheapest cryptographic hash at hand: 5.8 GB/s on
  64 KiB clusters here against 1.7 GB/s for hashlib's SHA-256 with the SHA
  extensions (issue 11: the digest must cost at most 15 % of create
  throughput, and the disk's SHA-256 already takes a core's 0.6 s per GiB).
  Version 1 sidecars (``sha256-128``: truncated SHA-256 per cluster) are
  still read and checked.
* ``table_sha256`` protects the tables themselves; the JSON line names the
  archive's uuid, so a sidecar of another archive is refused.

vmstate is not covered (a stream of unbounded length); neither are configs,
which sit in the checksummed header.

Writing is atomic: a temporary file in the archive's directory, fsynced,
then linked to its name (never over an existing file).  Hashing runs off
the event loop (hashlib and blake3 release the GIL), on chunks the
producers have already read: the cluster digests in the thread that read
the chunk, the disk's SHA-256 on a thread of its own.

Worst case.  Create: a SHA-256 pass over every disk (0.6 s of CPU per GiB
here) and a BLAKE3 pass over its clusters with data (0.2 s per GiB), on a
second core when there is one, and up to two 4 MiB chunks per disk held
until hashed.  Verify: each cluster hashed once, and memory for the
clusters that have partly arrived (a cluster's blocks sit in one extent, so
only a few).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid as uuid_mod
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import anyio
import anyio.to_thread
import blake3

from ._digest_name import DIGEST_SUFFIX, digest_path
from ._errors import DigestError, DigestMismatchError
from ._fdio import Buffer, create_exclusive, remove_created, write_all
from ._format import CLUSTER_SIZE, ZERO_CLUSTER, ArchiveHeader, DeviceInfo
from ._parser import ReadSummary
from ._progress import ProgressCallback
from ._reader import VmaReader
from ._sinks import Sink

__all__ = [
    "CLUSTER_DIGEST_SIZE",
    "DIGEST_SUFFIX",
    "DeviceDigest",
    "DigestPending",
    "DigestRecorder",
    "DigestSink",
    "SidecarDigest",
    "read_digest_file",
    "digest_path",
    "verify_with_digest",
    "write_digest_file",
]

CLUSTER_DIGEST_SIZE = 16
_FORMAT = "vma-digest"
_VERSION = 2
_MAX_JSON_LINE = 1 << 20

StrPath = str | os.PathLike[str]


def _blake3_128(data: Buffer) -> bytes:
    return blake3.blake3(data).digest(CLUSTER_DIGEST_SIZE)


def _sha256_128(data: Buffer) -> bytes:
    return hashlib.sha256(data).digest()[:CLUSTER_DIGEST_SIZE]


_CLUSTER_DIGESTS: dict[str, Callable[[Buffer], bytes]] = {
    "blake3-128": _blake3_128,  # version 2, written today
    "sha256-128": _sha256_128,  # version 1, still read
}
_SIDECAR_VERSIONS = {1: "sha256-128", 2: "blake3-128"}
"""The cluster digest each sidecar version uses."""

CLUSTER_DIGEST = _SIDECAR_VERSIONS[_VERSION]


def cluster_digest(data: Buffer, algorithm: str = CLUSTER_DIGEST) -> bytes:
    """The digest of one cluster's bytes, as a sidecar's table holds it."""
    return _CLUSTER_DIGESTS[algorithm](data)


DigestPending = tuple[Future[None], ...]
"""The hashing jobs still reading a chunk that :meth:`DeviceDigest.update` was given."""

_ZERO_DIGESTS: dict[tuple[str, int], bytes] = {}
_IN_FLIGHT = 2
"""Chunks a device may have queued for its SHA-256 before ``update`` waits."""


def _zero_digest(length: int, algorithm: str = CLUSTER_DIGEST) -> bytes:
    digest = _ZERO_DIGESTS.get((algorithm, length))
    if digest is None:
        digest = _ZERO_DIGESTS[algorithm, length] = cluster_digest(bytes(length), algorithm)
    return digest


# --- recording (create) --------------------------------------------------------------


class DeviceDigest:
    """The digests of one device, fed its content in order.

    :meth:`update` is called from the worker thread that has just read the
    chunk: it hashes the chunk's clusters there and then (BLAKE3, on data
    still in the CPU's cache) and hands the chunk to a thread of its own for
    the disk's SHA-256, which must see the chunks in order and is the long
    pole (0.6 s of CPU per GiB), so on a machine with a spare core it
    overlaps the packing on the event loop instead of adding to it.  (A
    third thread for the cluster digests cost twice as much create
    throughput: 13-17 % against 6-8 %, measured.)  At most
    :data:`_IN_FLIGHT` chunks per device wait for the SHA-256 (the caller's
    ``update`` blocks beyond that, in its worker thread): memory stays
    bounded when hashing is the slower side.  :meth:`finish` waits for the
    hashing and stops the thread; :meth:`close` stops it without waiting.
    """

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self._sha256 = hashlib.sha256()
        self._table = bytearray(-(-size // CLUSTER_SIZE) * CLUSTER_DIGEST_SIZE)
        self._fed = 0
        self._sha_thread = ThreadPoolExecutor(1, thread_name_prefix=f"sha256-{name}")
        self._in_flight: deque[Future[None]] = deque()

    def update(
        self, offset: int, data: Buffer, has_data: Sequence[bool] | None = None
    ) -> DigestPending:
        """Feed ``data`` found at ``offset`` (cluster-aligned, right after the
        previous call's data).  ``has_data[i]`` False says cluster ``i`` of the
        chunk is a hole.  The caller must not change ``data`` until the
        returned hashing jobs are done (:meth:`wait`): the backup
        reuses its read buffers.  Blocking (when hashing is behind): call it
        from a worker thread."""
        if offset != self._fed or offset % CLUSTER_SIZE:
            raise ValueError(f"digest of {self.name}: data at {offset}, expected {self._fed}")
        if offset + len(data) > self.size:
            raise ValueError(f"digest of {self.name}: data past the device's end")
        self._fed += len(data)
        while len(self._in_flight) >= _IN_FLIGHT:
            self._in_flight.popleft().result()
        jobs = (self._sha_thread.submit(self._sha256.update, data),)
        self._hash_clusters(offset, data, has_data)
        self._in_flight.extend(jobs)
        return jobs

    def _hash_clusters(self, offset: int, data: Buffer, has_data: Sequence[bool] | None) -> None:
        view = memoryview(data)
        first = offset // CLUSTER_SIZE
        # startswith is a memcmp (memoryview == bytes compares item by item).
        flat = data if isinstance(data, bytes | bytearray) else None
        for index, start in enumerate(range(0, len(view), CLUSTER_SIZE)):
            cluster = view[start : start + CLUSTER_SIZE]
            if has_data is not None and not has_data[index]:
                digest = _zero_digest(len(cluster))
            elif flat is not None and flat.startswith(ZERO_CLUSTER, start):
                digest = _zero_digest(CLUSTER_SIZE)  # zeros: a memcmp instead of a hash
            else:
                digest = cluster_digest(cluster)
            at = (first + index) * CLUSTER_DIGEST_SIZE
            self._table[at : at + CLUSTER_DIGEST_SIZE] = digest

    @staticmethod
    def wait(pending: DigestPending) -> None:
        """Block until the hashing of a chunk :meth:`update` returned is done
        (its buffer may then be reused); a failed job raises here too."""
        for job in pending:
            job.result()

    def finish(self) -> None:
        """Wait for the hashing (blocking) and stop the threads."""
        try:
            while self._in_flight:
                self._in_flight.popleft().result()
        finally:
            self.close()

    def close(self) -> None:
        """Stop the SHA-256 thread; pending work is dropped."""
        self._in_flight.clear()
        self._sha_thread.shutdown(wait=False, cancel_futures=True)

    @property
    def complete(self) -> bool:
        return self._fed == self.size

    def sha256(self) -> str:
        return self._sha256.hexdigest()

    def table(self) -> bytes:
        return bytes(self._table)


class DigestRecorder:
    """Collects the digests of every device of an archive being created.

    Hashing runs on threads of its own (see :class:`DeviceDigest`):
    :func:`write_digest_file` waits for them; a caller that gives up on the
    archive calls :meth:`close`.
    """

    def __init__(self) -> None:
        self.devices: dict[str, DeviceDigest] = {}

    def device(self, name: str, size: int) -> DeviceDigest:
        """The recorder of one device, made on first use."""
        digest = self.devices.get(name)
        if digest is None:
            digest = self.devices[name] = DeviceDigest(name, size)
        return digest

    def close(self) -> None:
        for device in self.devices.values():
            device.close()

    def encode(self, archive_uuid: uuid_mod.UUID, order: Sequence[str]) -> bytes:
        """The sidecar's bytes, devices in archive order (blocking: waits for
        the hashing)."""
        for device in self.devices.values():
            device.finish()
        missing = [name for name in order if not self.devices[name].complete]
        if missing:
            raise DigestError(f"digest incomplete for {', '.join(missing)}")
        tables = [self.devices[name].table() for name in order]
        document = {
            "format": _FORMAT,
            "version": _VERSION,
            "uuid": str(archive_uuid),
            "cluster_size": CLUSTER_SIZE,
            "cluster_digest": CLUSTER_DIGEST,
            "table_sha256": hashlib.sha256(b"".join(tables)).hexdigest(),
            "devices": [
                {
                    "name": name,
                    "size": self.devices[name].size,
                    "sha256": self.devices[name].sha256(),
                }
                for name in order
            ],
        }
        line = json.dumps(document, separators=(", ", ": "), ensure_ascii=True) + "\n"
        return line.encode("ascii") + b"".join(tables)


def _write_exclusive(path: str, data: bytes) -> None:
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = create_exclusive(None, tmp)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)  # unlike rename, never replaces an existing file
    finally:
        remove_created(None, tmp)


async def write_digest_file(
    path: StrPath, recorder: DigestRecorder, archive_uuid: uuid_mod.UUID, order: Sequence[str]
) -> None:
    """Write the sidecar atomically: complete under its name, or not there."""
    name = os.fspath(path)

    def encode_and_write() -> None:
        _write_exclusive(name, recorder.encode(archive_uuid, order))

    try:
        await anyio.to_thread.run_sync(encode_and_write)
    except OSError as exc:
        raise DigestError(f"unable to write digest {name} - {exc.strerror}") from exc


# --- reading and checking (verify) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class SidecarDigest:
    """A parsed sidecar: per device (by name) its size, SHA-256 and cluster table."""

    path: str
    uuid: uuid_mod.UUID
    cluster_digest: str
    """The algorithm of the cluster tables (``blake3-128``; ``sha256-128`` in version 1)."""
    sizes: Mapping[str, int]
    sha256: Mapping[str, str]
    tables: Mapping[str, bytes]

    def check_header(self, header: ArchiveHeader) -> None:
        """Refuse a sidecar that describes another archive."""
        if self.uuid != header.uuid:
            raise DigestError(
                f"digest {self.path} belongs to archive {self.uuid}, not {header.uuid}"
            )
        disks = {d.name: d.size for d in header.devices if not d.is_vmstate}
        if disks != dict(self.sizes):
            raise DigestError(f"digest {self.path} lists other devices than the archive")


def _parse(path: str, data: bytes) -> SidecarDigest:
    newline = data.find(b"\n", 0, _MAX_JSON_LINE)
    if newline < 0:
        raise DigestError(f"{path} is not a vma digest file (no header line)")
    try:
        document = json.loads(data[:newline])
        if document.get("format") != _FORMAT:
            raise DigestError(f"{path} is not a vma digest file")
        algorithm = _SIDECAR_VERSIONS.get(document.get("version"))
        if algorithm is None:
            raise DigestError(f"{path}: unsupported digest version {document.get('version')}")
        if document["cluster_size"] != CLUSTER_SIZE or document["cluster_digest"] != algorithm:
            raise DigestError(f"{path}: unsupported cluster digest")
        archive_uuid = uuid_mod.UUID(document["uuid"])
        devices = [(str(d["name"]), int(d["size"]), str(d["sha256"])) for d in document["devices"]]
        table_sha256 = str(document["table_sha256"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DigestError(f"{path}: damaged digest header ({exc})") from exc
    body = memoryview(data)[newline + 1 :]
    if hashlib.sha256(body).hexdigest() != table_sha256:
        raise DigestError(f"{path}: the digest tables are damaged (checksum mismatch)")
    tables: dict[str, bytes] = {}
    at = 0
    for name, size, _ in devices:
        length = -(-size // CLUSTER_SIZE) * CLUSTER_DIGEST_SIZE
        tables[name] = bytes(body[at : at + length])
        at += length
    if at != len(body):
        raise DigestError(f"{path}: digest tables do not match the device sizes")
    return SidecarDigest(
        path,
        archive_uuid,
        algorithm,
        {name: size for name, size, _ in devices},
        {name: sha for name, _, sha in devices},
        tables,
    )


async def read_digest_file(path: StrPath) -> SidecarDigest:
    """Read and check a sidecar (its own checksum); DigestError if unusable."""
    name = os.fspath(path)
    try:
        data = await anyio.Path(name).read_bytes()
    except OSError as exc:
        raise DigestError(f"unable to read digest {name} - {exc.strerror}") from exc
    return _parse(name, data)


class DigestSink(Sink):
    """A restore sink that checks one device's clusters against their digests.

    Used with ``write_zeroes=True`` so that every byte of every cluster
    arrives (data or zero run): a cluster is checked as soon as all of it
    has, whatever the order; partly arrived clusters are held (a cluster's
    blocks all sit in one extent, so few are pending at a time).
    """

    def __init__(self, device: DeviceInfo, table: bytes, algorithm: str = CLUSTER_DIGEST) -> None:
        self._device = device
        self._table = table
        self._algorithm = algorithm
        self._pending: dict[int, tuple[bytearray, int]] = {}
        self.clusters_checked = 0

    def _expect(self, cluster_num: int, digest: bytes) -> None:
        at = cluster_num * CLUSTER_DIGEST_SIZE
        if self._table[at : at + CLUSTER_DIGEST_SIZE] != digest:
            raise DigestMismatchError(
                f"data of {self._device.name} at offset {cluster_num * CLUSTER_SIZE}"
                f" (cluster {cluster_num}) does not match its digest"
            )
        self.clusters_checked += 1

    def _cluster_length(self, cluster_num: int) -> int:
        return min(CLUSTER_SIZE, self._device.size - cluster_num * CLUSTER_SIZE)

    def _add(self, offset: int, data: Buffer | None, length: int) -> None:
        """Account ``length`` bytes at ``offset`` (``data`` None: zeros).
        Blocking: hashes, so it runs in a worker thread for data."""
        view = memoryview(data) if data is not None else None
        pos = 0
        while pos < length:
            cluster_num, within = divmod(offset + pos, CLUSTER_SIZE)
            cluster_length = self._cluster_length(cluster_num)
            piece = min(length - pos, cluster_length - within)
            pending = self._pending.get(cluster_num)
            if pending is None and within == 0 and piece == cluster_length:
                if view is None:
                    self._expect(cluster_num, _zero_digest(cluster_length, self._algorithm))
                else:
                    digest = cluster_digest(view[pos : pos + piece], self._algorithm)
                    self._expect(cluster_num, digest)
            else:
                buf, filled = pending if pending is not None else (bytearray(cluster_length), 0)
                if view is not None:
                    buf[within : within + piece] = view[pos : pos + piece]
                filled += piece
                if filled == cluster_length:
                    del self._pending[cluster_num]
                    self._expect(cluster_num, cluster_digest(buf, self._algorithm))
                else:
                    self._pending[cluster_num] = (buf, filled)
            pos += piece

    def _add_many(self, writes: Sequence[tuple[int, Buffer]]) -> None:
        for offset, data in writes:
            self._add(offset, data, len(data))

    async def write(self, offset: int, data: Buffer) -> None:
        await anyio.to_thread.run_sync(self._add, offset, data, len(data))

    async def write_many(self, writes: Sequence[tuple[int, Buffer]]) -> None:
        await anyio.to_thread.run_sync(self._add_many, writes)

    async def write_zeroes(self, offset: int, length: int) -> None:
        self._add(offset, None, length)

    async def flush(self) -> None:
        return None

    async def aclose(self) -> None:
        if self._pending:
            first = min(self._pending)
            self._pending.clear()
            raise DigestMismatchError(
                f"cluster {first} of {self._device.name} arrived only in part"
            )

    async def abort(self) -> None:
        self._pending.clear()


async def verify_with_digest(
    reader: VmaReader, sidecar: SidecarDigest, progress: ProgressCallback | None = None
) -> ReadSummary:
    """Walk the archive once with every check of verify, and check each disk's
    clusters against ``sidecar`` (vmstate is read past unchecked)."""
    sidecar.check_header(reader.header)
    sinks: dict[str | int, Sink] = {
        dev.dev_id: DigestSink(dev, sidecar.tables[dev.name], sidecar.cluster_digest)
        for dev in reader.header.devices
        if not dev.is_vmstate
    }
    return await reader.restore(sinks, write_zeroes=True, progress=progress)
