"""Test harness shared by several test modules: fd-leak checks and the
concurrent producers that drive a :class:`~vma_async.VmaWriter`.

One copy of each, so every test that says "no fd leaked" or "written by
four producers in shuffled order" means exactly the same thing.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping

import anyio
import anyio.lowlevel

from vma_async import CLUSTER_SIZE, VmaWriter

# --- fd leaks ------------------------------------------------------------------------------------


class FdLeakCheck:
    """Snapshots of this process's open fds (the ``fd_leaks`` fixture).

    ``before = fd_leaks.snapshot()`` ... ``fd_leaks.assert_same(before)``:
    the assertion names what each leaked (or wrongly closed) fd points at.
    """

    @staticmethod
    def snapshot() -> frozenset[str]:
        return frozenset(os.listdir("/proc/self/fd"))

    def assert_same(self, before: frozenset[str], context: str = "") -> None:
        after = self.snapshot()
        if after == before:
            return
        leaked = {fd: _target(fd) for fd in sorted(after - before, key=int)}
        closed = sorted(before - after, key=int)
        raise AssertionError(f"fds leaked {leaked}, closed {closed} {context}".rstrip())


def _target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"  # the listdir's own fd, gone again


# --- concurrent producers ----------------------------------------------------------------------


def alternate_zero_clusters(cluster: int) -> bool:
    """Send an all-zero cluster as ``None`` for every other cluster number:
    both spellings of "zero" must work."""
    return cluster % 2 == 1


async def produce(
    writer: VmaWriter,
    images: Mapping[str, bytes],
    *,
    producers: int = 4,
    seed: int = 0,
    zero_as_none: Callable[[int], bool] = alternate_zero_clusters,
    yield_every: int = 1,
) -> dict[str, int]:
    """Register every image and write it from ``producers`` concurrent tasks
    in shuffled cluster order (``seed``; the ``vmstate`` stream, if any, by
    its own task in order); whoever writes a device's last cluster closes its
    stream.  An all-zero cluster goes as ``None`` when ``zero_as_none(n)``.
    Each task lets the others run every ``yield_every`` of its writes.  An
    archive without images is flushed.  Returns the dev_ids by name.
    """
    ids = {name: writer.register_stream(name, len(data)) for name, data in images.items()}
    clusters = {name: -(-len(data) // CLUSTER_SIZE) for name, data in images.items()}
    work = [(name, c) for name in images if name != "vmstate" for c in range(clusters[name])]
    random.Random(seed).shuffle(work)
    remaining = dict(clusters)
    steps = 0

    async def write_one(name: str, cluster: int) -> None:
        nonlocal steps
        data = images[name][cluster * CLUSTER_SIZE : (cluster + 1) * CLUSTER_SIZE]
        payload = None if data.count(0) == len(data) and zero_as_none(cluster) else data
        expected = CLUSTER_SIZE if name == "vmstate" else len(data)
        assert await writer.write(ids[name], cluster, payload) == expected
        steps += 1
        if steps % yield_every == 0:
            await anyio.lowlevel.checkpoint()  # let the other producers interleave
        remaining[name] -= 1
        if remaining[name] == 0:
            await writer.close_stream(ids[name])

    async def producer() -> None:
        while work:
            await write_one(*work.pop())

    async def vmstate_producer() -> None:
        for cluster in range(clusters["vmstate"]):
            await write_one("vmstate", cluster)

    async with anyio.create_task_group() as tg:
        for _ in range(producers):
            tg.start_soon(producer)
        if "vmstate" in images:
            tg.start_soon(vmstate_producer)
    if not images:
        await writer.flush()
    return ids
