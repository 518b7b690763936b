"""The reference tool's restore map (``vma extract -r MAP``), parsed sans-I/O.

Proxmox VE's ``qmrestore`` writes this map into a FIFO, one device a line,
and ends it with ``done`` or an empty line (it may keep the FIFO open after
that, so the reader must stop at the terminator, not wait for end of file)::

    [format=F:][throttling.bps=N:][throttling.group=G:][cache=C:]0|1:DEVNAME=PATH
    skip=DEVNAME

The option prefixes may come in any order, each at most once.  ``0:`` restores
without writing zero blocks (the target already reads back zeros), ``1:``
writes them.  ``skip=DEVNAME`` (current Proxmox ``vma``) restores nothing of
that device: its data is still read past, since the archive usually arrives
as a stream.  The parser keeps the reference's messages word for word, so an
operator who knows ``vma`` recognises them; what the reference leaves to QEMU's
block layer (formats, cache modes, throttle limits) is checked here too, with
the messages QEMU would give.  :func:`read_restore_map`, at the end, is the
one I/O part: reading a map from a file or a FIFO without blocking the loop.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass

import anyio
import anyio.to_thread

from ._errors import RestoreMapError
from ._fdio import open_for_reading
from ._qemu import QEMU_FORMATS

__all__ = [
    "CACHE_MODES",
    "MAX_THROTTLE_BPS",
    "SUPPORTED_FORMATS",
    "RestoreMapEntry",
    "map_is_complete",
    "parse_restore_map",
    "read_restore_map",
]

CACHE_MODES = frozenset({"none", "off", "writeback", "writethrough", "directsync", "unsafe"})
"""What QEMU's ``bdrv_parse_cache_mode`` accepts, and so what the reference does."""

MAX_THROTTLE_BPS = 10**15
"""QEMU's ``THROTTLE_VALUE_MAX``: a larger limit is refused by ``throttle_is_valid``."""

SUPPORTED_FORMATS = QEMU_FORMATS
"""``raw`` is written directly; the others through ``qemu-nbd -f FMT`` (see ``_nbd_sink``)."""

_OPTIONS = ("format", "throttling.bps", "throttling.group", "cache")
_UNSIGNED = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")


@dataclass(frozen=True, slots=True)
class RestoreMapEntry:
    """Where one device of the archive goes, and how it is written there."""

    devname: str
    path: str
    write_zeroes: bool
    format: str | None = None
    throttling_bps: int = 0
    throttling_group: str | None = None
    cache: str | None = None
    skip: bool = False
    """``skip=DEVNAME``: nothing of this device is written (``path`` is empty)."""

    @property
    def throttle_key(self) -> str:
        """The throttle group this target belongs to: QEMU puts a device with a
        limit but no group name in a group of its own, named after its path."""
        return self.throttling_group if self.throttling_group is not None else self.path


def _parse_number(text: str) -> int:
    """``qemu_strtou64(text, base 0)`` with the whole text required: decimal,
    ``0x`` hex or leading-zero octal, no sign, no spaces, no underscores."""
    if not _UNSIGNED.fullmatch(text):
        raise RestoreMapError(f"read map failed - not a number: {text}")
    if text[:2] in ("0x", "0X"):
        return int(text[2:], 16)
    if text.startswith("0"):
        return int(text, 8)
    return int(text)


def _parse_line(line: str) -> RestoreMapEntry:
    if line.startswith("skip"):
        # The reference: strncmp(line, "skip", 4), then '=' and a name required.
        if len(line) < 6 or line[4] != "=":
            raise RestoreMapError(f"read map failed - option 'skip' has no value ('{line}')")
        return RestoreMapEntry(devname=line[5:], path="", write_zeroes=False, skip=True)
    options: dict[str, str] = {}
    rest = line
    matched = True
    while matched:
        matched = False
        for name in _OPTIONS:
            if not rest.startswith(name + "="):
                continue
            if name in options:
                raise RestoreMapError(f"read map failed - duplicate value for option '{name}'")
            value, colon, after = rest[len(name) + 1 :].partition(":")
            if not colon:
                raise RestoreMapError(
                    f"read map failed - option '{name}' not terminated ('{line}')"
                )
            options[name] = value
            rest = after
            matched = True

    bps = _parse_number(options["throttling.bps"]) if "throttling.bps" in options else 0
    if rest[:2] not in ("0:", "1:"):
        raise RestoreMapError(f"read map failed - parse error ('{line}')")
    devname, equals, path = rest[2:].partition("=")
    if not equals:
        raise RestoreMapError(f"read map failed - no dev name specified ('{line}')")

    fmt = options.get("format")
    if fmt is not None and fmt not in SUPPORTED_FORMATS:
        # The reference's words, from QEMU's blk_new_open with an unknown driver.
        raise RestoreMapError(f"can't open file {path} - Unknown driver '{fmt}'")
    cache = options.get("cache")
    if cache is not None and cache not in CACHE_MODES:
        raise RestoreMapError(f"invalid cache option: {cache}")
    if bps > MAX_THROTTLE_BPS:
        raise RestoreMapError(
            f"failed to apply throttling - bps must be within [0, {MAX_THROTTLE_BPS}]"
        )
    return RestoreMapEntry(
        devname=devname,
        path=path,
        write_zeroes=rest[0] == "1",
        format=fmt,
        throttling_bps=bps,
        throttling_group=options.get("throttling.group"),
        cache=cache,
    )


def parse_restore_map(lines: Iterable[str]) -> dict[str, RestoreMapEntry]:
    """Entries by device name, read up to ``done``, an empty line or the end.

    ``lines`` may keep their line endings.  A later line for the same device
    replaces an earlier one, as in the reference (a hash table insert).  Unlike
    the reference, a final ``done`` without a newline also ends the map.
    """
    entries: dict[str, RestoreMapEntry] = {}
    for raw in lines:
        line = raw[:-1] if raw.endswith("\n") else raw
        if line in ("", "done"):
            break
        entry = _parse_line(line)
        entries[entry.devname] = entry
    return entries


def map_is_complete(text: str) -> bool:
    """Whether ``text`` already holds the map's terminator, so a reader of a
    FIFO can stop without waiting for the writer to close it."""
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            return False
        if line in ("\n", "done\n"):
            return True
    return False


# --- reading a map from a file or FIFO (the module's one I/O part) ---------------------------


async def read_restore_map(path: str | os.PathLike[str]) -> dict[str, RestoreMapEntry]:
    """Read and parse a restore map from a file or a FIFO.

    A FIFO is read non-blocking through the event loop (its writer may keep it
    open after ``done``, so reading stops at the terminator); a regular file
    is read in a worker thread.  The ``open`` (non-blocking, so a FIFO without
    a writer does not wait) and ``fstat`` run in a worker thread too.
    """
    name = os.fspath(path)
    try:
        fd, mode = await anyio.to_thread.run_sync(open_for_reading, name)
        regular = stat.S_ISREG(mode)
    except OSError as exc:
        raise RestoreMapError(f"unable to open fifo {name} - {exc.strerror}") from exc
    try:
        if regular:
            data = await anyio.to_thread.run_sync(_read_all, fd)
        else:
            data = await _read_until_terminator(fd)
    except OSError as exc:
        raise RestoreMapError(f"read map failed - {exc.strerror}") from exc
    finally:
        if not regular:
            anyio.notify_closing(fd)
        os.close(fd)
    text = data.decode("utf-8", "surrogateescape")
    return parse_restore_map(text.splitlines(keepends=True))


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 65536):
        parts.append(chunk)
    return b"".join(parts)


async def _read_until_terminator(fd: int) -> bytes:
    data = bytearray()
    while not map_is_complete(data.decode("utf-8", "surrogateescape")):
        await anyio.wait_readable(fd)
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not chunk:
            break
        data += chunk
    return bytes(data)
