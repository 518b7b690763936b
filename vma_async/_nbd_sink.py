"""Restoring into any QEMU image format: a sink that writes through qemu-nbd.

Goal: a restore-map line ``format=qcow2:...=PATH`` (what Proxmox sends for a
directory storage) and ``vma extract --format FMT`` write the virtual disk
into a qcow2, vmdk, vdi, vhdx or qed image exactly as QEMU would, with no
raw intermediate file.

Plan: :meth:`NbdSink.prepare` (called with the device before any data)
creates the image if asked (``O_EXCL`` first, so nothing existing is ever
replaced, then ``qemu-img create``), starts ``qemu-nbd -f FMT`` on it
(:class:`~vma_async._qemu.QemuImage`) and checks its virtual size the way the
reference checks a target (equal, or up to 4 MiB larger).  Data goes out as
``NBD_CMD_WRITE`` (contiguous runs of a batch merged into one request), zero
runs as ``NBD_CMD_WRITE_ZEROES`` (qemu marks zero clusters; with
``--discard=unmap`` it may free them), the end of the restore as
``NBD_CMD_FLUSH``, and :meth:`aclose` waits for qemu-nbd to close the image.

Worst case: qemu-nbd dies, or the disk under the image fills up: the failing
request raises :class:`SinkError` naming the image and qemu-nbd's exit status
and message; :meth:`abort` stops qemu-nbd and removes an image this sink
created, so no half-written image is left looking complete.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import anyio
import anyio.to_thread

from ._errors import DeviceSizeError, NbdError, QemuError, SinkError, SinkExistsError
from ._fdio import Buffer, create_exclusive, remove_created
from ._format import DeviceInfo
from ._opening import unwrap_group
from ._qemu import QemuImage, check_format, qemu_img_create
from ._sinks import SIZE_TOLERANCE, Sink

__all__ = ["NbdSink"]


class NbdSink(Sink):
    """One device restored into an image of format ``fmt`` through qemu-nbd.

    With ``create=True`` the image is new: ``path`` must not exist, and
    :meth:`abort` removes it again.  Otherwise ``path`` is an existing image
    (as Proxmox allocates volumes) whose virtual size must match the device
    (up to 4 MiB larger).  ``cache`` is the restore map's ``cache=`` mode,
    passed to ``qemu-nbd --cache``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fmt: str,
        *,
        create: bool = False,
        cache: str | None = None,
        name: str | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.format = check_format(fmt)
        self._create = create
        self._cache = cache
        self._name = name if name is not None else self.path
        self._image: QemuImage | None = None
        self._created = False
        self._closed = False

    async def prepare(self, device: DeviceInfo) -> None:
        """Create (if asked) and open the image; check its size against ``device``."""
        self._name = device.name
        if self._closed:
            raise SinkError(f"restore target for {self._name} is closed")
        if self._image is not None:
            return
        if self._create:
            await self._create_image(device.size)
        try:
            self._image = await QemuImage.open(
                self.path, self.format, read_only=False, cache=self._cache, discard=True
            )
        except QemuError as exc:
            raise SinkError(str(exc)) from exc
        actual = self._image.size
        if not 0 <= actual - device.size <= SIZE_TOLERANCE:
            raise DeviceSizeError(
                f"vma_reader_register_bs for stream {self._name} failed - "
                f"unexpected size {actual} != {device.size}"
            )

    async def _create_image(self, size: int) -> None:
        try:
            fd = await anyio.to_thread.run_sync(create_exclusive, None, self.path)
        except FileExistsError as exc:
            raise SinkExistsError(f"can't create file {self.path} - file exists") from exc
        except OSError as exc:
            raise SinkError(f"can't create file {self.path} - {exc.strerror}") from exc
        os.close(fd)
        self._created = True
        try:
            await qemu_img_create(self.path, self.format, size)
        except QemuError as exc:
            raise SinkError(f"can't create file {self.path} - {exc}") from exc

    def _ready(self) -> QemuImage:
        if self._image is None:
            raise SinkError(f"restore target for {self._name} is not open (prepare was not called)")
        return self._image

    async def write(self, offset: int, data: Buffer) -> None:
        image = self._ready()
        try:
            await image.client.write(offset, data)
        except NbdError as exc:
            raise SinkError(await image.failure("write to", exc)) from exc

    async def write_many(self, writes: Sequence[tuple[int, Buffer]]) -> None:
        """The batch's writes go out at once, pipelined on the one connection:
        qemu-nbd runs them in parallel (its I/O threads), where one request
        at a time would leave it idle between replies."""
        if len(writes) == 1:
            await self.write(*writes[0])
            return
        try:
            async with anyio.create_task_group() as tg:
                for offset, data in writes:
                    tg.start_soon(self.write, offset, data)
        except BaseExceptionGroup as group:
            raise unwrap_group(group) from None

    async def write_zeroes(self, offset: int, length: int) -> None:
        image = self._ready()
        try:
            await image.client.write_zeroes(offset, length)
        except NbdError as exc:
            raise SinkError(await image.failure("write zeroes to", exc)) from exc

    async def flush(self) -> None:
        image = self._ready()
        try:
            await image.client.flush()
        except NbdError as exc:
            raise SinkError(await image.failure("vma blk_flush", exc)) from exc

    async def aclose(self) -> None:
        """Disconnect and let qemu-nbd close the image; its failure is an error."""
        self._closed = True
        image, self._image = self._image, None
        if image is None:
            return
        try:
            await image.aclose()
        except QemuError as exc:
            raise SinkError(str(exc)) from exc

    async def abort(self) -> None:
        """Stop qemu-nbd at once, and remove the image if this sink created it."""
        self._closed = True
        image, self._image = self._image, None
        if image is not None:
            await image.abort()
        if self._created:
            self._created = False
            remove_created(None, self.path)
