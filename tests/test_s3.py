"""Archives in a real S3 store (SeaweedFS on 127.0.0.1, see ``tests/s3_server.py``).

What must hold: an archive created into ``s3://`` is a valid archive (the
reference tool verifies and extracts the downloaded object byte-exact), every
reader path works from ``s3://`` (plain and zstd), the object appears only
when complete and never replaces an existing one, a failed, cancelled or
interrupted backup leaves no object and no multipart upload, and memory stays
within the bound the target states, also for 20 backups at once.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import pytest

from tests.helpers_dissect import check_structure, read_with_dissect
from tests.s3_server import SeaweedServer
from tests.test_compress_target import half_random, write_archive
from vma_async import (
    CLUSTER_SIZE,
    S3Source,
    S3Target,
    TargetError,
    TargetExistsError,
    VmaReader,
    VmaWriter,
    extract_archive,
)
from vma_async._s3 import MIN_PART_SIZE, open_s3_store

VMA = str(Path(sys.executable).with_name("vma"))
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BACKENDS = ["asyncio", "uvloop", "trio"]


@pytest.fixture(scope="module")
def shared_bucket(s3_server: SeaweedServer) -> str:
    """One bucket for the module: SeaweedFS sets up volumes per bucket (slow)."""
    name = f"vma-tests-{uuid.uuid4().hex[:8]}"
    s3_server.make_bucket(name)
    return name


@pytest.fixture
def bucket(shared_bucket: str) -> str:
    """``BUCKET/PREFIX``: a test's own place in the shared bucket (the server
    helpers list only under the prefix)."""
    return f"{shared_bucket}/{uuid.uuid4().hex[:12]}"


def assert_nothing_left(server: SeaweedServer, bucket: str) -> None:
    assert server.list_keys(bucket) == []
    assert server.list_uploads(bucket) == []


# --- the library, under asyncio, uvloop and trio -------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("compress", [None, "zstd"])
async def test_round_trip_multipart_within_the_memory_bound(
    s3_server: SeaweedServer, bucket: str, tmp_path: Path, compress: str | None
) -> None:
    image = half_random(24 << 20, 1)
    url = f"s3://{bucket}/vm-100.vma" + (".zst" if compress else "")
    target = S3Target(url, part_size=MIN_PART_SIZE, parts_in_flight=1)
    await write_archive(target, image, compress=compress)
    stats = target.stats
    if compress is None:
        assert stats.parts_sent >= 3  # really a multipart upload
    assert not stats.single_put or compress  # zstd shrinks it below one part
    assert 1 <= stats.parts_alive_high_water <= stats.parts_in_flight + 1
    assert stats.parts_alive == 0
    assert stats.memory_bound == 2 * MIN_PART_SIZE
    assert s3_server.list_keys(bucket) == [url.rsplit("/", 1)[1]]
    assert s3_server.list_uploads(bucket) == []
    if compress:
        assert s3_server.get_object(bucket, url.rsplit("/", 1)[1]).startswith(ZSTD_MAGIC)

    # in order: verify and extract
    async with VmaReader.open(url) as reader:
        assert reader.header.devices[0].name == "disk0"
        summary = await reader.verify()
        assert summary is not None
    await extract_archive(url, tmp_path / "out")
    assert (tmp_path / "out" / "disk-disk0.raw").read_bytes() == image


@pytest.mark.anyio
async def test_random_access_reads_the_headers_in_few_requests(
    s3_server: SeaweedServer, bucket: str
) -> None:
    image = half_random(16 << 20, 2)
    url = f"s3://{bucket}/random.vma"
    await write_archive(S3Target(url), image)
    source = await S3Source.open(url)
    async with VmaReader.open(source) as reader:
        before = source.requests
        assert before <= 2  # the header: the sniffing window and one chunk, no read-ahead yet
        view = await reader.open_device("disk0")
        index_requests = source.requests - before
        extents = -(-len(image) // (59 * CLUSTER_SIZE))  # at most 59 clusters per extent
        assert index_requests <= extents + 2
        rng = random.Random(3)
        for _ in range(20):
            offset = rng.randrange(0, len(image) - 200_000)
            size = rng.randrange(1, 200_000)
            assert await view.read(offset, size) == image[offset : offset + size]
        assert await view.read(len(image) - 4096, 8192) == image[-4096:]


@pytest.mark.anyio
async def test_an_existing_key_is_never_replaced(s3_server: SeaweedServer, bucket: str) -> None:
    s3_server.put_object(bucket, "taken.vma", b"precious")
    with pytest.raises(TargetExistsError, match=rf"s3://{bucket}/taken.vma - the object exists"):
        await write_archive(f"s3://{bucket}/taken.vma", half_random(1 << 20, 4))
    assert s3_server.get_object(bucket, "taken.vma") == b"precious"
    assert s3_server.list_uploads(bucket) == []


@pytest.mark.anyio
async def test_a_key_taken_during_the_upload_is_not_replaced(
    s3_server: SeaweedServer, bucket: str
) -> None:
    """Small archive: the conditional PUT refuses; multipart: the check before
    completing refuses and the upload is aborted."""
    for name, size in (("small.vma", 1 << 20), ("large.vma", 24 << 20)):
        target = S3Target(f"s3://{bucket}/{name}", part_size=MIN_PART_SIZE)
        writer = await VmaWriter.open(target)
        dev = writer.register_stream("disk0", size)
        image = half_random(size, 5)
        for cluster in range(size // CLUSTER_SIZE):
            await writer.write(
                dev, cluster, image[cluster * CLUSTER_SIZE : (cluster + 1) * CLUSTER_SIZE]
            )
        await writer.close_stream(dev)
        await anyio.to_thread.run_sync(s3_server.put_object, bucket, name, b"racer")
        with pytest.raises(TargetExistsError, match="the object exists"):
            await writer.aclose()
        # small: refused by the conditional PUT; large: by the check before completing
        assert (target.stats.parts_sent >= 2) == (name == "large.vma")
        assert s3_server.get_object(bucket, name) == b"racer"
    assert s3_server.list_uploads(bucket) == []


@pytest.mark.anyio
async def test_a_failing_producer_leaves_no_object_and_no_upload(
    s3_server: SeaweedServer, bucket: str
) -> None:
    target = S3Target(f"s3://{bucket}/failed.vma", part_size=MIN_PART_SIZE)
    with pytest.raises(RuntimeError, match="producer failed"):
        await write_archive(target, half_random(32 << 20, 6), fail_at=400)
    assert target.stats.parts_sent >= 1  # the multipart upload existed before the failure
    assert_nothing_left(s3_server, bucket)


async def back_up_until_uploading(
    target: S3Target, image: bytes, then: Callable[[], Awaitable[object]]
) -> None:
    """Back ``image`` up; once the first part has gone to the store (so the
    multipart upload exists there), await ``then()`` once and go on writing."""
    done = False
    async with VmaWriter.open(target) as writer:
        dev = writer.register_stream("disk0", len(image))
        for cluster in range(len(image) // CLUSTER_SIZE):
            await writer.write(
                dev, cluster, image[cluster * CLUSTER_SIZE : (cluster + 1) * CLUSTER_SIZE]
            )
            if not done and target.stats.parts_sent >= 1:
                done = True
                await then()
        await writer.close_stream(dev)
    raise AssertionError("the backup completed: the interruption came too late")


@pytest.mark.anyio
async def test_a_cancelled_backup_leaves_no_object_and_no_upload(
    s3_server: SeaweedServer, bucket: str
) -> None:
    target = S3Target(f"s3://{bucket}/cancelled.vma", part_size=MIN_PART_SIZE)
    uploads_seen: list[str] = []
    with anyio.CancelScope() as scope:

        async def look_then_cancel() -> None:
            uploads_seen.extend(await anyio.to_thread.run_sync(s3_server.list_uploads, bucket))
            scope.cancel()

        await back_up_until_uploading(target, half_random(32 << 20, 7), look_then_cancel)
    assert scope.cancelled_caught
    assert uploads_seen == ["cancelled.vma"]  # cancelled mid-upload
    assert_nothing_left(s3_server, bucket)


@pytest.mark.anyio
async def test_a_missing_object_or_bucket_is_a_source_error(
    s3_server: SeaweedServer, bucket: str
) -> None:
    from vma_async import SourceError

    with pytest.raises(SourceError, match=rf"can't open file s3://{bucket}/nope.vma - No such"):
        await VmaReader.open(f"s3://{bucket}/nope.vma")
    with pytest.raises(SourceError, match="expected s3://BUCKET/KEY"):
        await VmaReader.open("s3://only-a-bucket")


@pytest.mark.anyio
async def test_a_missing_bucket_is_a_target_error_with_the_stores_answer(
    s3_server: SeaweedServer,
) -> None:
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    with pytest.raises(TargetError, match=rf"uploading s3://{bucket}/k.vma.* - AccessDenied"):
        await write_archive(f"s3://{bucket}/k.vma", half_random(1 << 20, 14))


# --- the store dies mid-upload (a server of the test's own) ---------------------------------


@pytest.fixture(scope="module")
def own_server() -> Iterator[SeaweedServer]:
    server = SeaweedServer()
    server.start()
    try:
        yield server
    finally:
        server.remove()


@pytest.mark.anyio
async def test_the_store_killed_mid_upload(
    own_server: SeaweedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clear error within the retry budget, no object; the upload the dead
    store could not be told to abort is reported by the target (and is what
    a lifecycle rule removes), then cleaned here."""
    if own_server.process is None:
        await anyio.to_thread.run_sync(own_server.start)
    name = f"k{uuid.uuid4().hex[:12]}"
    own_server.make_bucket(name)
    for variable, value in own_server.env().items():
        monkeypatch.setenv(variable, value)
    store = open_s3_store(name, timeout=10, connect_timeout=2, max_retries=1, retry_timeout=3)
    target = S3Target(f"s3://{name}/dead.vma", store=store, part_size=MIN_PART_SIZE)
    started = time.monotonic()
    with pytest.raises(TargetError, match=rf"uploading s3://{name}/dead.vma: .*error") as caught:
        await back_up_until_uploading(
            target, half_random(64 << 20, 8), lambda: anyio.to_thread.run_sync(own_server.kill)
        )
    assert "error sending request" in str(caught.value) or "connect" in str(caught.value)
    assert time.monotonic() - started < 30
    assert own_server.process is None
    await anyio.to_thread.run_sync(own_server.start)  # same directory and ports
    assert own_server.list_keys(name) == []
    leftover = own_server.list_uploads(name)
    assert leftover in ([], ["dead.vma"])
    if leftover:
        assert target.stats.abort_failed is not None
        await anyio.to_thread.run_sync(own_server.abort_uploads, name)
    assert own_server.list_uploads(name) == []


# --- the command, as a user runs it ---------------------------------------------------------


def cli(
    *args: str | Path, cwd: Path, backend: str = "asyncio", check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(
        [VMA, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        env={**os.environ, "VMA_ASYNC_BACKEND": backend, "TZ": "UTC"},
        check=False,
        timeout=60,
    )
    if check:
        assert result.returncode == 0, result.stderr.decode()
    return result


def test_cli_create_into_s3_reads_back_everywhere(
    s3_server: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    """Once (the backends are covered by the other tests: the budget is time)."""
    backend = "trio"
    image = half_random(8 << 20, 9)
    (tmp_path / "disk.raw").write_bytes(image)
    (tmp_path / "qemu-server.conf").write_bytes(b"memory: 512\n")
    url = f"s3://{bucket}/vzdump-qemu-100.vma"
    cli(
        "create",
        url,
        "-c",
        "qemu-server.conf",
        "drive-scsi0=disk.raw",
        cwd=tmp_path,
        backend=backend,
    )
    assert s3_server.list_uploads(bucket) == []
    s3_server.download(bucket, "vzdump-qemu-100.vma", tmp_path / "dl.vma")
    # list, config, verify, extract straight from s3:// agree with the downloaded file
    assert cli("list", url, cwd=tmp_path).stdout == cli("list", "dl.vma", cwd=tmp_path).stdout
    assert cli("config", url, cwd=tmp_path, backend=backend).stdout == b"memory: 512\n"
    cli("verify", url, cwd=tmp_path, backend=backend)
    cli("extract", url, "ours", cwd=tmp_path, backend=backend)
    assert (tmp_path / "ours" / "disk-drive-scsi0.raw").read_bytes() == image
    # An independent reader (dissect.archive) agrees: structure, configs and
    # bytes.  The reference tool's verify/extract of such a download is in
    # docs/object-storage.md (it needs a reference build, so it is not a suite test).
    archive = (tmp_path / "dl.vma").read_bytes()
    check_structure(archive)
    configs, devices = read_with_dissect(archive)
    assert configs["qemu-server.conf"] == b"memory: 512\n"
    assert devices["drive-scsi0"][: len(image)] == image


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_compressed_into_s3_lists_verifies_extracts(
    s3_server: SeaweedServer, bucket: str, tmp_path: Path, backend: str
) -> None:
    image = half_random(8 << 20, 10)
    (tmp_path / "disk.raw").write_bytes(image)
    url = f"s3://{bucket}/b.vma.zst"
    cli("create", "--compress", "zstd", url, "disk.raw", cwd=tmp_path, backend=backend)
    assert s3_server.get_object(bucket, "b.vma.zst").startswith(ZSTD_MAGIC)
    listing = json.loads(cli("list", "--json", url, cwd=tmp_path, backend=backend).stdout)
    assert [d["name"] for d in listing["devices"]] == ["disk0"]
    cli("verify", url, cwd=tmp_path, backend=backend)
    cli("extract", url, "out", cwd=tmp_path, backend=backend)
    assert (tmp_path / "out" / "disk-disk0.raw").read_bytes() == image
    again = cli("create", url, "disk.raw", cwd=tmp_path, check=False)
    assert again.returncode == 1
    assert b"the object exists" in again.stderr


def test_cli_sigint_mid_upload_leaves_nothing(
    s3_server: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    (tmp_path / "disk.raw").write_bytes(random.Random(11).randbytes(160 << 20))
    process = subprocess.Popen(
        [VMA, "create", f"s3://{bucket}/interrupted.vma", "disk.raw"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 40
    while s3_server.list_uploads(bucket) != ["interrupted.vma"]:
        assert process.poll() is None, "finished before it could be interrupted"
        assert time.monotonic() < deadline, "no multipart upload appeared"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 130
    assert process.stderr is not None
    assert process.stderr.read() == b"vma: interrupted\n"
    assert_nothing_left(s3_server, bucket)


# --- 20 backups at once, peak RSS measured in a process of its own ---------------------------

_CONCURRENT = textwrap.dedent(
    """
    import json, random, resource, sys
    import anyio
    from vma_async import CLUSTER_SIZE, S3Target, VmaReader, VmaWriter
    from vma_async._writer import BUFFER_SIZE, DEFAULT_BUFFER_COUNT

    bucket, count, size, backend = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    PART = 5 << 20

    def image(seed):
        rng = random.Random(seed)
        out = bytearray(size)
        for start in range(0, size, 512 << 10):
            out[start:start + (256 << 10)] = rng.randbytes(256 << 10)
        return bytes(out)

    async def backup(i, targets):
        target = S3Target(f"s3://{bucket}/vm-{i}.vma", part_size=PART, parts_in_flight=2)
        targets.append(target)
        data = image(i)
        async with VmaWriter.open(target) as writer:
            dev = writer.register_stream("disk0", size)
            for cluster in range(size // CLUSTER_SIZE):
                at = cluster * CLUSTER_SIZE
                await writer.write(dev, cluster, data[at:at + CLUSTER_SIZE])
            await writer.close_stream(dev)

    async def main():
        targets = []
        # the images are made inside each backup, so only the baseline is measured here
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(backup, i, targets)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        per_backup = DEFAULT_BUFFER_COUNT * BUFFER_SIZE + targets[0].memory_bound + 2 * size
        # then every archive is read back from the store (random access) and compared
        exact = 0
        for i in range(count):
            async with VmaReader.open(f"s3://{bucket}/vm-{i}.vma") as reader:
                view = await reader.open_device("disk0")
                exact += await view.read(0, size) == image(i)
        print(json.dumps({
            "baseline": baseline, "peak": peak, "per_backup": per_backup, "exact": exact,
            "high_water": max(t.stats.parts_alive_high_water for t in targets),
            "parts": sum(t.stats.parts_sent for t in targets),
        }))

    anyio.run(main, backend="trio" if backend == "trio" else "asyncio",
              backend_options={"use_uvloop": True} if backend == "uvloop" else {})
    """
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_twenty_concurrent_backups_within_the_memory_bound(
    s3_server: SeaweedServer, bucket: str, tmp_path: Path, backend: str
) -> None:
    count, size = 20, 12 << 20
    script = tmp_path / "s3_concurrent_backups.py"
    script.write_text(_CONCURRENT)
    result = subprocess.run(
        [sys.executable, str(script), bucket, str(count), str(size), backend],
        capture_output=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert result.returncode == 0, result.stderr.decode()
    figures = json.loads(result.stdout)
    assert figures["high_water"] <= 3  # parts_in_flight + 1
    assert figures["parts"] >= count * 2  # each archive (~6 MiB) took two parts
    assert figures["exact"] == count  # every archive restores byte-exact
    grown = figures["peak"] - figures["baseline"]
    bound = count * figures["per_backup"] + (64 << 20)  # + allocator and thread slack
    assert grown <= bound, (grown, bound)
    assert s3_server.list_keys(bucket) == sorted(f"vm-{i}.vma" for i in range(count))
    assert s3_server.list_uploads(bucket) == []
    # and one downloaded object restores with the command too
    s3_server.download(bucket, "vm-7.vma", tmp_path / "vm-7.vma")
    cli("verify", "vm-7.vma", cwd=tmp_path)


# --- vma serve s3://: random access over NBD -------------------------------------------------


def test_vma_serve_from_s3_is_read_byte_exact_by_nbdcopy(
    s3_server: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    image = half_random(12 << 20, 13)
    (tmp_path / "disk.raw").write_bytes(image)
    url = f"s3://{bucket}/served.vma"
    cli("create", url, "drive-scsi0=disk.raw", cwd=tmp_path)
    sock = tmp_path / "nbd.sock"
    server = subprocess.Popen(
        [VMA, "serve", url, "--socket", str(sock)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        uri_line = server.stdout.readline().decode().strip()  # printed once it listens
        assert uri_line.startswith("nbd+unix:///drive-scsi0?socket="), uri_line
        subprocess.run(["nbdcopy", uri_line, str(tmp_path / "out.raw")], check=True, timeout=60)
        assert (tmp_path / "out.raw").read_bytes() == image
    finally:
        server.send_signal(signal.SIGINT)
        status = server.wait(timeout=30)
    assert status == 0
    assert not sock.exists()
