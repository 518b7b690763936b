"""Property: whatever archive the writer is asked to make, the reader gives it back.

Hypothesis draws an archive (devices of any size, including sizes that are
not multiples of 4 KiB or 64 KiB, zero / random / half-zero content, configs,
a vmstate), a cluster order, how many concurrent producers write it and how
they interleave, and how the writer is driven (``async with`` or awaited
open).  The archive is written to a file through :class:`VmaWriter`, then:

* :meth:`VmaReader.restore` gives back every device byte for byte (with
  ``write_zeroes`` into sinks pre-filled with garbage, or without into zeros);
* :meth:`VmaReader.verify` passes and counts every cluster;
* ``dissect.archive`` (an independent reader) reads the same configs and bytes.

Every example runs under one backend, asyncio, uvloop and trio in turn.
``derandomize=True`` makes the run reproducible, and the number of cases run
is printed (``pytest -s tests/test_property.py``) and checked.
"""

from __future__ import annotations

import random
import tempfile
import uuid as uuid_mod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import produce as produce_concurrently
from tests.helpers_dissect import check_structure, read_with_dissect
from vma_async import BLOCK_SIZE, CLUSTER_SIZE, CallbackSink, Sink, VmaReader, VmaWriter

BLOCK = BLOCK_SIZE
BACKENDS: list[tuple[str, dict[str, Any]]] = [
    ("asyncio", {}),
    ("asyncio", {"use_uvloop": True}),
    ("trio", {}),
]
MAX_EXAMPLES = 150

SIZES = st.one_of(
    st.sampled_from([1, 511, 512, 4095, 4096, 4097, 65535, 65536, 65537, 3 * CLUSTER_SIZE - 1]),
    st.integers(1, 6 * CLUSTER_SIZE + 3 * BLOCK),
    st.integers(57 * CLUSTER_SIZE, 70 * CLUSTER_SIZE),  # spans extents
)
KINDS = st.sampled_from(["zero", "random", "mixed", "sparse"])


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    size: int
    kind: str
    seed: int


@dataclass(frozen=True)
class ArchiveSpec:
    devices: tuple[DeviceSpec, ...]
    vmstate: DeviceSpec | None
    configs: tuple[tuple[str, bytes], ...]
    producers: int
    order_seed: int
    yield_every: int
    zero_as_none: bool
    context_manager: bool
    buffer_count: int
    write_zeroes: bool


def image(spec: DeviceSpec) -> bytes:
    rng = random.Random(spec.seed)
    if spec.kind == "zero":
        return bytes(spec.size)
    if spec.kind == "random":
        return rng.randbytes(spec.size)
    blocks = -(-spec.size // BLOCK)
    density = 0.5 if spec.kind == "mixed" else 0.1
    data = b"".join(
        rng.randbytes(BLOCK) if rng.random() < density else bytes(BLOCK) for _ in range(blocks)
    )
    return data[: spec.size]


@st.composite
def archive_specs(draw: st.DrawFn) -> ArchiveSpec:
    count = draw(st.integers(0, 4))
    names = draw(
        st.lists(
            st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=20).filter(
                lambda n: n not in (".", "..", "vmstate")
            ),
            min_size=count,
            max_size=count,
            unique=True,
        )
    )
    devices = tuple(
        DeviceSpec(name, draw(SIZES), draw(KINDS), draw(st.integers(0, 2**32))) for name in names
    )
    vmstate = None
    if draw(st.booleans()):
        vmstate = DeviceSpec(
            "vmstate", draw(SIZES), draw(st.sampled_from(["random", "mixed"])), draw(st.integers())
        )
    config_names = draw(
        st.lists(
            st.sampled_from(["qemu-server.conf", "qemu-server.fw", "lxc.conf", "notes.txt"]),
            max_size=3,
            unique=True,
        )
    )
    configs = tuple(
        (name, draw(st.binary(max_size=3000).filter(lambda b: b"\0" not in b)))
        for name in config_names
    )
    return ArchiveSpec(
        devices=devices,
        vmstate=vmstate,
        configs=configs,
        producers=draw(st.integers(1, 4)),
        order_seed=draw(st.integers(0, 2**32)),
        yield_every=draw(st.integers(1, 4)),
        zero_as_none=draw(st.booleans()),
        context_manager=draw(st.booleans()),
        buffer_count=draw(st.integers(2, 4)),
        write_zeroes=draw(st.booleans()),
    )


async def write_archive(
    path: Path, spec: ArchiveSpec, images: dict[str, bytes], uid: uuid_mod.UUID
) -> None:
    """Write ``images`` from ``spec.producers`` tasks taking clusters from one
    shuffled work list; the vmstate, which must be in order, has its own task.
    Whoever writes a device's last cluster closes its stream."""

    async def produce(writer: VmaWriter) -> None:
        for name, data in spec.configs:
            writer.add_config(name, data)
        await produce_concurrently(
            writer,
            images,
            producers=spec.producers,
            seed=spec.order_seed,
            zero_as_none=lambda cluster: spec.zero_as_none,
            yield_every=spec.yield_every,
        )

    if spec.context_manager:
        async with VmaWriter.open(
            path, uuid=uid, ctime=1_700_000_000, buffer_count=spec.buffer_count
        ) as writer:
            await produce(writer)
    else:
        writer = await VmaWriter.open(
            path, uuid=uid, ctime=1_700_000_000, buffer_count=spec.buffer_count
        )
        try:
            await produce(writer)
            await writer.aclose()
        except BaseException:
            await writer.abort()
            raise
    assert writer.stats.buffered_bytes_high_water <= writer.stats.bound


async def restore_archive(
    path: Path, images: dict[str, bytes], write_zeroes: bool
) -> dict[str, bytes]:
    """Restore every device into memory; with ``write_zeroes`` the buffers start
    as garbage, so the zero runs the reader reports must cover every hole."""
    fill = 0xA5 if write_zeroes else 0
    restored = {name: bytearray([fill]) * len(data) for name, data in images.items()}
    if "vmstate" in restored:  # a stream, whole clusters, every byte sent in order
        restored["vmstate"] = bytearray()

    def sink_for(buffer: bytearray) -> Sink:
        grows = buffer is restored.get("vmstate")

        async def put(offset: int, data: bytes | memoryview) -> None:
            if grows:
                assert offset == len(buffer)
                buffer.extend(data)
            else:
                assert offset + len(data) <= len(buffer)
                buffer[offset : offset + len(data)] = data

        async def write(offset: int, data: memoryview) -> None:
            await put(offset, data)

        async def zeroes(offset: int, length: int) -> None:
            await put(offset, bytes(length))

        return CallbackSink(write, zeroes=zeroes)

    async with await VmaReader.open(path) as reader:
        assert [d.name for d in reader.header.devices] == list(images)
        assert [d.size for d in reader.header.devices] == [len(d) for d in images.values()]
        await reader.restore(
            {name: sink_for(buffer) for name, buffer in restored.items()},
            write_zeroes=write_zeroes,
        )
    async with await VmaReader.open(path) as reader:
        summary = await reader.verify()
    assert summary.clusters_read == sum(-(-len(d) // CLUSTER_SIZE) for d in images.values())
    return {name: bytes(buffer) for name, buffer in restored.items()}


def test_writer_then_reader_round_trip() -> None:
    cases: list[str] = []

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(spec=archive_specs())
    def round_trip_property(spec: ArchiveSpec) -> None:
        images = {dev.name: image(dev) for dev in spec.devices}
        if spec.vmstate is not None:
            images["vmstate"] = image(spec.vmstate)
        uid = uuid_mod.UUID(int=spec.order_seed)
        backend, options = BACKENDS[len(cases) % len(BACKENDS)]  # each in turn
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "archive.vma"

            async def round_trip() -> dict[str, bytes]:
                await write_archive(path, spec, images, uid)
                return await restore_archive(path, images, spec.write_zeroes)

            restored = anyio.run(round_trip, backend=backend, backend_options=options)
            archive = path.read_bytes()
        if "vmstate" in images:
            # The size of a vmstate is no bound: the reader restores whole clusters.
            vmstate = images["vmstate"]
            padded = vmstate + bytes(-len(vmstate) % CLUSTER_SIZE)
            assert restored.pop("vmstate") == padded
            restored["vmstate"] = vmstate
        assert restored == images
        header, _ = check_structure(archive)
        assert header.uuid == uid
        configs, devices = read_with_dissect(archive)
        assert configs == dict(spec.configs)
        assert devices == images
        cases.append(f"{backend}{'+uvloop' if options else ''}")

    round_trip_property()
    per_backend = {name: cases.count(name) for name in sorted(set(cases))}
    print(f"\nproperty cases run: {len(cases)} {per_backend}")
    assert len(cases) == MAX_EXAMPLES
    assert len(per_backend) == len(BACKENDS)
