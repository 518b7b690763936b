"""The ``vma`` command: a drop-in for the reference tool, as a thin client of the API.

Scripts written for the reference ``vma`` (Proxmox VE's ``qmrestore`` among
them) parse its output, so every line it prints is reproduced to the byte:
the ``list`` lines, ``DEVINFO``, the ``-v`` progress and summary lines (C's
``%.3g`` is Python's ``%.3g``), its usage text on ``-h`` or a bad option
(status 1).  Options are parsed GNU-getopt style like the reference, so they
may also follow the positional arguments.

Beyond the reference: ``--json`` for ``list``, a live progress bar on a
terminal (stderr; ``-v`` or a non-terminal prints the plain lines instead,
``--quiet`` silences both), ``--help`` with examples per command,
``--version``, and errors as one ``vma: ...`` line naming the file and the
problem, never a traceback unless ``--debug``.  Every failure exits 1 (the
reference dies with status 133 from ``g_error``; see ``docs/cli.md``).
"""

from __future__ import annotations

import functools
import getopt
import os
import shutil
import signal
import stat
import sys
import time
import uuid as uuid_mod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

# The public API only: the command is a client of the library like any other.
# Imported where used: `vma --version`, `--help` and `list` must not load the
# event loop and the whole library first (issue 10: start-up <= 60 ms).
from . import FormatError, SourceError, VmaError, __version__

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up)
if TYPE_CHECKING:
    from typing import TextIO

    import anyio.abc

    from . import (
        ArchiveHeader,
        DeviceInfo,
        Progress,
        ReadSummary,
        RestoreMapEntry,
    )

USAGE = """\
usage: vma command [command options]

vma list <filename>
vma config <filename> [-c config]
vma create <filename> [-c config] [-v] [--uuid UUID] [--ctime EPOCH] [--reproducible]
           [--digest] [--compress zstd|gzip] [devname=]pathname ...
vma create <filename> [create options] -d format=<format>:<device name>=<path> [-d ...]
vma extract <filename> [-v] [-d <drive-list>] [-r <fifo> | --format <format>] <targetdir>
vma verify <filename> [-v] [--digest PATH]
vma repack <filename> <newfile> [--uuid UUID] [--ctime EPOCH]
vma serve <filename> [--socket PATH | --listen [HOST:]PORT]

'vma COMMAND --help' explains a command, with examples; 'vma --version' prints the version.
"""

COMMON_HELP = """
Options of every command:
  --quiet        no progress output (neither the bar nor the -v lines)
  --debug        show a traceback on errors
  --help         this text
  -h             the short usage text (exit status 1, as the reference tool)

An archive to read may be compressed with zstd, gzip, bzip2 or lzop
(detected by content; lzop needs the lzop program), from a file, a pipe
or standard input ('-'); s3://BUCKET/KEY reads an object (AWS_ENDPOINT_URL
and the other AWS_* variables say where and as whom; see
docs/object-storage.md).
Exit status: 0 on success, 1 on any error.
"""

HELP = {
    "list": """\
vma list [--json] FILE

Print the archive's configs, devices and creation time:
  CFG: size: N name: NAME
  DEV: dev_id=N size: N devname: NAME
  VMSTATE: dev_id=N memory: N
  CTIME: <ctime(3) text, local time>
--json prints uuid, ctime (ISO 8601), configs with sizes and devices instead.

Examples:
  vma list vzdump-qemu-100.vma.zst
  zstd -dc backup.vma.zst | vma list -
  vma list --json backup.vma | jq '.devices[].name'
""",
    "config": """\
vma config FILE [-c NAME]

Write one config blob (default qemu-server.conf) to standard output.

Examples:
  vma config backup.vma > 100.conf
  vma config backup.vma -c qemu-server.fw
""",
    "create": """\
vma create FILE [-c CONFIG]... [-v] [--uuid UUID] [--ctime EPOCH]
           [--reproducible] [--digest] [--compress zstd|gzip] [NAME=]PATH...

Back up disk images (raw files or block devices, or qcow2, vmdk, vdi, vhdx,
qed and vpc images read through qemu-nbd) into a new archive (never
overwritten).  Devices are named disk0, disk1, ... unless NAME= is given
(a name given twice is refused); each size is rounded up to a multiple of
512 bytes, as the reference does.  FILE may be 'exec:COMMAND' (the archive
goes to the command's stdin), '-' (standard output, not a terminal) or
's3://BUCKET/KEY' (an object, created when the archive is complete; the
store comes from AWS_ENDPOINT_URL and the other AWS_* variables).
  -c CONFIG        add a config file (stored under its base name); repeatable
  -v               print the reference's progress and per-image lines on stderr
  --uuid UUID      the archive's uuid (default: random)
  --ctime EPOCH    its creation time in seconds since 1970 (default: now, or
                   SOURCE_DATE_EPOCH when set)
  --reproducible   devices one after another, clusters in ascending order, so
                   the same input gives a byte-identical archive that
                   deduplicates (borg, restic); uuid then defaults to one
                   derived from the device names and sizes, ctime to the
                   images' newest modification time
  --digest         also write FILE.digest: SHA-256 of each disk and a digest
                   of every cluster, which 'vma verify' checks (the format
                   itself checksums headers only)
  -d format=FMT:[NAME=]PATH
                   a device, as Proxmox's current vma has it (repeatable; not
                   mixed with positional devices); FMT is raw, qcow2, vmdk,
                   vdi, vhdx, qed or vpc.  A positional PATH is probed: such
                   an image is read through QEMU too, never stored as its
                   container file (needs qemu-nbd: Debian package qemu-utils)
  --compress zstd|gzip
                   compress in-process (zstd on half the CPUs); a failed or
                   interrupted backup leaves no file, unlike exec:zstd -o

Examples:
  vma create backup.vma -c qemu-server.conf drive-scsi0=/dev/vg/vm-100-disk-0
  vma create 'exec:zstd -q -o backup.vma.zst' disk.raw
  vma create backup.vma -d format=qcow2:drive-scsi0=vm-100-disk-0.qcow2
  vma create --reproducible --digest backup.vma drive-scsi0=disk.raw
  vma create - disk.raw | ssh backup 'cat > vm.vma'
  vma create --compress zstd s3://backups/vzdump-qemu-100.vma.zst disk.raw
""",
    "extract": """\
vma extract FILE [-v] [-d DRIVES] [-r MAP | --format FMT] TARGETDIR

Restore into TARGETDIR, which must not exist: one file per config,
vmstate.bin, and disk-NAME.raw per disk (written as tmp-disk-NAME.raw and
renamed when complete; a DEVINFO line is printed for each).
  -d DRIVES  restore only these disks (comma-separated names; repeatable);
             configs and vmstate always; an unknown name is an error
  -r MAP     read a restore map (file or FIFO) instead: lines
             [format=FMT:][throttling.bps=N:][throttling.group=G:][cache=C:]0|1:NAME=PATH
             or skip=NAME (restore nothing of that disk), ended by 'done'
             or an empty line; 1: writes zero blocks too
             (a FMT other than raw is written through qemu-nbd)
  --format FMT  each disk a new image of that format, disk-NAME.FMT: qcow2,
             vmdk, vdi, vhdx, qed, vpc (qemu-img create, then filled through
             qemu-nbd straight from the archive: no raw intermediate)
  -v         print progress and the summary lines on stdout

Examples:
  vma extract backup.vma.zst /var/tmp/restore
  vma extract -v - restore < backup.vma
  vma extract -r map.fifo backup.vma /var/tmp/restore
  vma extract -d drive-scsi0,drive-scsi2 backup.vma /var/tmp/restore
  vma extract --format qcow2 vzdump-qemu-100.vma.zst /var/tmp/restore
""",
    "verify": """\
vma verify FILE [-v] [--digest PATH]

Read the whole archive and check every extent and cluster, writing nothing.
The VMA format checksums its headers only: a damaged data byte in an
uncompressed archive passes this check (compressed archives have their own
checksums).  When FILE.digest (from 'vma create --digest') exists, or with
--digest PATH, every disk's data is also checked against it.
  -v              print the archive's contents, progress and the summary lines
  --digest PATH   check the data against this sidecar digest file

Examples:
  vma verify -v backup.vma.zst
  vma verify --digest backup.vma.digest - < backup.vma
""",
    "repack": """\
vma repack FILE NEWFILE [--uuid UUID] [--ctime EPOCH]

Write FILE again as NEWFILE in canonical order: configs and devices as
they were, devices one after another, clusters ascending, so that backups
of one VM deduplicate.  Keeps uuid and ctime unless given (pass a fixed
--uuid for dedup).  FILE must be an uncompressed archive in a file
(decompress first: zstd -d backup.vma.zst); NEWFILE may be '-' or exec:.

Examples:
  zstd -d vzdump-qemu-100.vma.zst -o /tmp/in.vma
  vma repack /tmp/in.vma canonical.vma --uuid 6f1c0a3e-0000-4000-8000-000000000100
""",
    "serve": """\
vma serve FILE [--socket PATH | --listen [HOST:]PORT]

Export every disk of an uncompressed archive (a file or block device)
read-only over NBD, under its device name.  Once it listens, prints one
NBD URI per disk on stdout.  Any NBD client reads them: qemu-img, nbdcopy,
nbdinfo, guestfish.  SIGINT or SIGTERM stops it: no new clients, requests
in flight answered (a second signal, or 10 s, cuts them off), the socket
file removed, exit 0.  Zero and absent clusters show as holes in block status.
  --socket PATH          a Unix socket (mode 0600; never replaces a file)
  --listen [HOST:]PORT   TCP (HOST defaults to 127.0.0.1: local only)
Without either: TCP on 127.0.0.1:10809, the NBD port.  A compressed
archive is refused: decompress it first (zstd -d backup.vma.zst).

Examples:
  vma serve backup.vma --socket /run/vma.sock
  nbdinfo --list 'nbd+unix:///?socket=/run/vma.sock'
  qemu-img convert -O qcow2 'nbd+unix:///drive-scsi0?socket=/run/vma.sock' disk.qcow2
  nbdcopy nbd://127.0.0.1/drive-scsi0 - | sha256sum
""",
}

_SHORT_OPTIONS = {
    "list": "h",
    "config": "hc:",
    "create": "hvc:d:",
    "extract": "hvd:r:",
    "verify": "hv",
    "repack": "h",
    "serve": "h",
}
_COMMON_LONG = ["quiet", "debug", "help"]
_LONG_OPTIONS = {
    "list": [*_COMMON_LONG, "json"],
    "create": [*_COMMON_LONG, "uuid=", "ctime=", "reproducible", "digest", "compress="],
    "extract": [*_COMMON_LONG, "format="],
    "verify": [*_COMMON_LONG, "digest="],
    "repack": [*_COMMON_LONG, "uuid=", "ctime="],
    "serve": [*_COMMON_LONG, "socket=", "listen="],
}
_ARGUMENTS = {
    "list": "FILE",
    "config": "FILE",
    "create": "FILE",
    "extract": "FILE and TARGETDIR",
    "verify": "FILE",
    "repack": "FILE and NEWFILE",
    "serve": "FILE",
}


class UsageError(Exception):
    """Bad command line: the reference prints its usage text and exits 1.
    The message (if any) says what is wrong; it goes to stderr first."""


@dataclass(slots=True)
class Options:
    command: str
    args: list[str]
    verbose: bool = False
    quiet: bool = False
    debug: bool = False
    json: bool = False
    config: str | None = None
    configs: tuple[str, ...] = ()
    restore_map: str | None = None
    drives: tuple[str, ...] | None = None
    disks: tuple[str, ...] = ()
    image_format: str = "raw"
    uuid: uuid_mod.UUID | None = None
    ctime: int | None = None
    reproducible: bool = False
    digest: bool = False
    digest_path: str | None = None
    compress: str | None = None
    socket: str | None = None
    listen: tuple[str, int] | None = None


def parse_args(argv: Sequence[str]) -> Options | str:
    """Options for a command, or the text to print for ``--help``/``--version``."""
    args = list(argv)
    debug = quiet = False
    while args and args[0] in ("--debug", "--quiet"):
        debug = debug or args[0] == "--debug"
        quiet = quiet or args[0] == "--quiet"
        args.pop(0)
    if args and args[0] == "--version":
        return f"vma (vma_async) {__version__}\n"
    if args and args[0] == "--help":
        return USAGE + COMMON_HELP
    if not args:
        raise UsageError("no command given")
    if args[0] not in _SHORT_OPTIONS:
        import difflib  # only for a mistyped command (start-up: issue 10)

        close = difflib.get_close_matches(args[0], list(_SHORT_OPTIONS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UsageError(f"unknown command '{args[0]}'{hint}")
    command = args.pop(0)
    try:
        pairs, positional = getopt.gnu_getopt(
            args, _SHORT_OPTIONS[command], _LONG_OPTIONS.get(command, _COMMON_LONG)
        )
    except getopt.GetoptError as exc:
        raise UsageError(_option_problem(command, exc)) from exc
    opts = Options(command, positional, quiet=quiet, debug=debug)
    configs = []
    for flag, value in pairs:
        if flag == "--help":
            return HELP[command] + COMMON_HELP
        if flag == "-h":
            raise UsageError
        if flag == "-v":
            opts.verbose = True
        elif flag == "--quiet":
            opts.quiet = True
        elif flag == "--debug":
            opts.debug = True
        elif flag == "--json":
            opts.json = True
        elif flag == "-r":
            opts.restore_map = value
        elif flag == "-d" and command == "create":
            opts.disks = (*opts.disks, value)
        elif flag == "-d":
            opts.drives = (*(opts.drives or ()), *(n for n in value.split(",") if n))
        elif flag == "--uuid":
            try:
                opts.uuid = uuid_mod.UUID(value)
            except ValueError:
                raise UsageError(f"--uuid: not a UUID: '{value}'") from None
        elif flag == "--ctime":
            opts.ctime = _epoch(value, "--ctime")
        elif flag == "--format":
            from . import QEMU_FORMATS

            if value not in QEMU_FORMATS:
                known = ", ".join(sorted(QEMU_FORMATS))
                raise UsageError(f"--format: unknown image format '{value}' (one of {known})")
            opts.image_format = value
        elif flag == "--reproducible":
            opts.reproducible = True
        elif flag == "--compress":
            if value not in ("zstd", "gzip"):
                raise UsageError(f"--compress: expected zstd or gzip, not '{value}'")
            opts.compress = value
        elif flag == "--digest" and command == "create":
            opts.digest = True
        elif flag == "--digest":
            opts.digest_path = value
        elif flag == "-c" and command == "create":
            configs.append(value)
        elif flag == "-c":
            opts.config = value
        elif flag == "--socket":
            opts.socket = value
        elif flag == "--listen":
            opts.listen = _listen_address(value)
    opts.configs = tuple(configs)
    if opts.socket is not None and opts.listen is not None:
        raise UsageError("serve takes --socket or --listen, not both")
    if opts.restore_map is not None and opts.image_format != "raw":
        raise UsageError("--format makes new images; with -r the map's format= gives each target's")
    wanted = {"extract": 2, "repack": 2, "create": -1}.get(command, 1)
    if (wanted == -1 and not positional) or (wanted > 0 and len(positional) != wanted):
        count = f"{len(positional)} argument{'s' if len(positional) != 1 else ''}"
        raise UsageError(f"{command} needs {_ARGUMENTS[command]} (got {count})")
    output = {"create": positional[0], "repack": positional[-1]}.get(command)
    not_a_file = output is not None and (output == "-" or output.startswith(("exec:", "s3://")))
    if opts.digest and not_a_file:
        raise UsageError("--digest needs an archive file name (not '-', exec: or s3://)")
    if output == "-" and os.isatty(sys.stdout.fileno()):
        raise UsageError("refusing to write an archive to a terminal")
    if command == "create" and opts.ctime is None and "SOURCE_DATE_EPOCH" in os.environ:
        opts.ctime = _epoch(os.environ["SOURCE_DATE_EPOCH"], "SOURCE_DATE_EPOCH")
    return opts


def _epoch(value: str, what: str) -> int:
    try:
        epoch = int(value)
    except ValueError:
        raise UsageError(f"{what}: not a number of seconds: '{value}'") from None
    if not 0 <= epoch < 1 << 63:
        raise UsageError(f"{what}: out of range: {value}")
    return epoch


def _option_problem(command: str, exc: getopt.GetoptError) -> str:
    """getopt's complaint, and where an option that exists elsewhere belongs."""
    option = exc.opt
    if option and len(option) > 1:
        owners = [
            name
            for name, longs in _LONG_OPTIONS.items()
            if any(o.rstrip("=") == option for o in longs)
        ]
        if owners:
            return f"--{option} is not an option of '{command}' (only of {', '.join(owners)})"
    return f"{command}: {exc.msg}"


# --- output ---------------------------------------------------------------------------


def _emit(stream: TextIO, text: str) -> None:
    stream.write(text)
    stream.flush()


async def _emit_off_loop(stream: TextIO, text: str) -> None:
    """:func:`_emit` in a worker thread: stdout may be a pipe whose reader is
    slow, and a blocked write must not stall the restore or backup."""
    import anyio

    await anyio.to_thread.run_sync(_emit, stream, text)


def _ctime_text(ctime: int) -> str:
    try:
        return time.ctime(ctime) + "\n"
    except (OverflowError, ValueError, OSError):
        return "(null)"  # what glibc's printf("%s", NULL) shows for an unrepresentable time


def content_lines(header: ArchiveHeader) -> str:
    """The reference's ``print_content``: configs, devices 1..254, then ctime."""
    lines = [f"CFG: size: {len(data)} name: {name}\n" for name, data in header.configs]
    for dev in header.devices:
        if dev.dev_id >= 255:
            continue
        if dev.is_vmstate:
            lines.append(f"VMSTATE: dev_id={dev.dev_id} memory: {dev.size}\n")
        else:
            lines.append(f"DEV: dev_id={dev.dev_id} size: {dev.size} devname: {dev.name}\n")
    lines.append(f"CTIME: {_ctime_text(header.ctime)}")
    return "".join(lines)


def content_json(header: ArchiveHeader) -> str:
    import json  # here, with datetime: start-up of the other commands (issue 10)
    from datetime import UTC, datetime

    try:
        ctime_iso: str | None = datetime.fromtimestamp(header.ctime, UTC).isoformat()
    except (OverflowError, ValueError, OSError):
        ctime_iso = None
    document = {
        "uuid": str(header.uuid),
        "ctime": ctime_iso,
        "ctime_epoch": header.ctime,
        "configs": [{"name": name, "size": len(data)} for name, data in header.configs],
        "devices": [
            {"dev_id": d.dev_id, "name": d.name, "size": d.size, "vmstate": d.is_vmstate}
            for d in header.devices
        ],
    }
    return json.dumps(document, indent=2) + "\n"


def summary_lines(summary: ReadSummary) -> str:
    """The two ``-v`` summary lines of the reference reader (C ``%.3g``)."""
    if not summary.bytes_read:
        return "vma archive contains no image data\n"
    sparse = summary.sparse_bytes
    text = (
        f"total bytes read {summary.bytes_read}, sparse bytes {sparse}"
        f" ({100.0 * sparse / summary.bytes_read:.3g}%)\n"
    )
    datasize = summary.bytes_read - sparse
    if datasize:
        reduction = 100.0 * summary.partial_zero_bytes / datasize
        text += f"space reduction due to 4K zero blocks {reduction:.3g}%\n"
    return text


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class ProgressBar:
    """A one-line live progress display on a terminal (stderr), redrawn at most
    ten times a second so that it costs nothing per cluster.

    The line always fits the terminal (``shutil.get_terminal_size``, read at
    each redraw so a resize is followed): per-device parts go first, then the
    bar narrows, then the rate and sizes go.  The ETA comes from the bytes
    actually read when the caller knows how many there are to read (a sparse
    disk walks its holes for free, so walked bytes mislead).  The bar drawn
    last is remembered, so an interrupt or error clears its line first.
    """

    live: ProgressBar | None = None

    def __init__(self, stream: TextIO, label: str) -> None:
        self._stream = stream
        self._label = label
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    def update(
        self,
        done: int,
        total: int,
        parts: Sequence[tuple[str, int, int]] = (),
        *,
        read: int | None = None,
        read_total: int | None = None,
    ) -> None:
        now = time.monotonic()
        if now - self._last_draw < 0.1 and done < total:
            return
        self._last_draw = now
        elapsed = max(now - self._start, 1e-9)
        if read is not None and read_total:
            fraction = min(read / read_total, 1.0)
            rate = read / elapsed
            eta = (read_total - read) / rate if rate > 0 else 0.0
        else:
            fraction = done / total if total else 1.0
            rate = done / elapsed
            eta = (total - done) / rate if rate > 0 else 0.0
        line = fit_progress_line(
            shutil.get_terminal_size((80, 24)).columns,
            self._label,
            min(fraction, 1.0),
            f"{_human(done)}/{_human(total)}",
            f"{_human(rate)}/s",
            f"ETA {int(eta) // 60}:{int(eta) % 60:02d}",
            [f"{name} {100 * d // s if s else 100}%" for name, d, s in parts]
            if len(parts) > 1
            else [],
        )
        self._stream.write("\r" + line + "\x1b[K")
        self._stream.flush()
        self._drawn = True
        ProgressBar.live = self

    def clear(self) -> None:
        """Remove the bar's line (before an error message, or on ^C)."""
        if self._drawn:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._drawn = False
        if ProgressBar.live is self:
            ProgressBar.live = None

    def finish(self, done: int) -> None:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        self.clear()
        self._stream.write(
            f"{self._label}: {_human(done)} in {elapsed:.1f} s ({_human(done / elapsed)}/s)\n"
        )
        self._stream.flush()


def fit_progress_line(
    columns: int,
    label: str,
    fraction: float,
    sizes: str,
    rate: str,
    eta: str,
    parts: Sequence[str],
) -> str:
    """The bar's text in at most ``columns - 1`` characters (the last column
    would wrap on some terminals): optional pieces are dropped in order."""
    limit = max(columns - 1, 10)
    percent = f"{fraction * 100:5.1f}%"
    tails = [
        [sizes, rate, eta, "|", *parts] if parts else [sizes, rate, eta],
        [sizes, rate, eta],
        [sizes, eta],
        [eta],
        [],
    ]
    for tail in tails:
        fixed = " ".join([label, "[]", percent, *tail])
        room = limit - len(fixed) - 1
        if room >= 10 or (not tail and room >= 0):
            width = min(max(room, 0), 24)
            filled = int(width * fraction)
            bar = "#" * filled + "-" * (width - filled)
            return " ".join([label, f"[{bar}]", percent, *tail])
    return f"{label} {percent}"[:limit]


class ReadReporter:
    """Turns the reader's progress into the reference's ``progress`` lines, or a bar.

    The reference prints a line whenever the integer percentage of clusters
    read changes, checked after every cluster, starting from 0 (so "0%" is
    never printed), against the sum of ``size // 65536`` over the devices it
    counts.  The reader reports once per batch (a :class:`Progress`); the
    clusters are ``done_bytes // 65536`` and every cluster in between is
    replayed so the same lines come out.  Output goes through a worker thread
    (the bar: only when a redraw is due).
    """

    def __init__(
        self,
        mode: str,
        counted: Sequence[DeviceInfo],
        label: str,
        read_total: int | None = None,
    ) -> None:
        from . import CLUSTER_SIZE

        self._mode = mode
        self._read_total = read_total
        self._cluster_count = sum(dev.size // CLUSTER_SIZE for dev in counted)
        self._clusters = 0
        self._percent = 0
        # Whole seconds, as the reference's time(NULL): its "duration" is the
        # number of second boundaries crossed since the start.
        self._start = int(time.time())
        self._bar = ProgressBar(sys.stderr, label) if mode == "bar" else None
        self._bar_due = 0.0

    async def __call__(self, progress: Progress) -> None:
        import anyio

        from . import CLUSTER_SIZE

        read = progress.done_bytes // CLUSTER_SIZE
        if self._bar is not None:
            # The bar counts every cluster walked, partial last ones included,
            # so it ends at 100 %.
            now = time.monotonic()
            if now >= self._bar_due or progress.done_bytes >= progress.total_bytes:
                self._bar_due = now + 0.1
                parts = [(d.name, d.done_bytes, d.total_bytes) for d in progress.devices]
                done, total = progress.done_bytes, max(progress.done_bytes, progress.total_bytes)
                update = partial(
                    self._bar.update, read=progress.read_bytes, read_total=self._read_total
                )
                await anyio.to_thread.run_sync(update, done, total, parts)
            return
        if self._mode != "lines" or not self._cluster_count:
            return
        duration = int(time.time()) - self._start
        out = []
        for clusters in range(self._clusters + 1, read + 1):
            percent = clusters * 100 // self._cluster_count
            if percent != self._percent:
                out.append(
                    f"progress {percent}% (read {clusters * CLUSTER_SIZE} bytes,"
                    f" duration {duration} sec)\n"
                )
                self._percent = percent
        self._clusters = max(self._clusters, read)
        if out:
            await _emit_off_loop(sys.stdout, "".join(out))

    def finish(self, summary: ReadSummary) -> None:
        if self._bar is not None:
            self._bar.finish(summary.bytes_read)
        elif self._mode == "lines":
            _emit(sys.stdout, summary_lines(summary))


def _progress_mode(opts: Options) -> str:
    if opts.quiet:
        return "none"
    if opts.verbose:
        return "lines"
    return "bar" if sys.stderr.isatty() else "none"


# --- commands ------------------------------------------------------------------------


async def cmd_list(opts: Options) -> int:
    from . import VmaReader

    async with VmaReader.open(opts.args[0]) as reader:
        header = reader.header
    return show_header(opts, header)


def show_header(opts: Options, header: ArchiveHeader) -> int:
    """What ``list`` and ``config`` print: both need the header only."""
    if opts.command == "list":
        _emit(sys.stdout, content_json(header) if opts.json else content_lines(header))
        return 0
    name = opts.config if opts.config is not None else "qemu-server.conf"
    data = header.config(name)
    if data is None:
        sys.stderr.write(f"unable to find configuration data '{name}'\n")
        return 1
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0


async def cmd_verify(opts: Options) -> int:
    import anyio

    from . import VmaReader, digest_path, read_digest_file, verify_with_digest

    archive = opts.args[0]
    digest_file = opts.digest_path
    if digest_file is None and archive != "-" and await anyio.Path(digest_path(archive)).exists():
        digest_file = digest_path(archive)
    sidecar = await read_digest_file(digest_file) if digest_file is not None else None
    async with VmaReader.open(archive) as reader:
        header = reader.header
        if opts.verbose and not opts.quiet:
            _emit(sys.stdout, content_lines(header))
        devices = header.devices
        read_total = await _archive_read_total(archive)
        mode = _progress_mode(opts)
        reporter = ReadReporter(mode, devices, "verify", read_total)
        progress = reporter if mode != "none" else None  # nothing built per batch
        try:
            if sidecar is not None:
                summary = await verify_with_digest(reader, sidecar, progress=progress)
            else:
                summary = await reader.verify(progress=progress)
        except VmaError as exc:
            raise VmaError(f"verify failed - {exc}") from exc
    reporter.finish(summary)
    if sidecar is not None and opts.verbose and not opts.quiet:
        _emit(sys.stdout, f"data of every disk matches {sidecar.path}\n")
    return 0


async def cmd_extract(opts: Options) -> int:
    from . import extract_archive, read_restore_map

    source, targetdir = opts.args
    mode = _progress_mode(opts)
    reporter: ReadReporter | None = None

    def announce(path: str, size: int) -> None:
        _emit(sys.stdout, f"DEVINFO {path} {size}\n")

    async def on_progress(progress: Progress) -> None:
        if reporter is not None:
            await reporter(progress)

    restore_map: Callable[[ArchiveHeader], Awaitable[Mapping[str, RestoreMapEntry]]] | None = None
    if opts.restore_map is not None:
        map_path = opts.restore_map

        async def read_map(header: ArchiveHeader) -> Mapping[str, RestoreMapEntry]:
            await _emit_off_loop(sys.stdout, content_lines(header))
            return await read_restore_map(map_path)

        restore_map = read_map

    async def start(header: ArchiveHeader) -> Mapping[str, RestoreMapEntry] | None:
        nonlocal reporter
        entries = await restore_map(header) if restore_map is not None else None
        # The reference's extract counts only disks in its percentage; disks
        # skipped (-d, skip=) are walked past without being counted here.
        disks = [
            dev
            for dev in header.devices
            if not dev.is_vmstate
            and (opts.drives is None or dev.name in opts.drives)
            and not (entries is not None and dev.name in entries and entries[dev.name].skip)
        ]
        reporter = ReadReporter(mode, disks, "extract", await _archive_read_total(source))
        return entries

    try:
        result = await extract_archive(
            source,
            targetdir,
            restore_map=start,
            announce=announce,
            progress=on_progress if mode != "none" else None,
            devices=opts.drives,
            image_format=opts.image_format,
        )
    except (FormatError, SourceError) as exc:
        if reporter is None:  # the header was bad: there was no restore yet
            raise
        raise type(exc)(f"restore failed - {exc}") from exc
    if reporter is not None:
        reporter.finish(result.summary)
    return 0


async def _archive_read_total(name: str) -> int | None:
    """How many bytes reading the archive means, for the bar's ETA: the file's
    size when it is a regular file holding an uncompressed archive (a
    compressed or piped one has no size known up front)."""

    import anyio

    def probe() -> int | None:
        try:
            with open(name, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode) or f.read(4) != b"VMA\0":
                    return None
                return os.fstat(f.fileno()).st_size
        except OSError:
            return None

    if name == "-" or "://" in name:
        return None
    return await anyio.to_thread.run_sync(probe)


def _image_read_total(devices: Sequence[tuple[str, str, str | None]]) -> int | None:
    """The bytes ``create`` will read from its images, for the bar's ETA:
    their allocated size (holes are never read).  Blocking."""
    total = 0
    for _, path, _ in devices:
        try:
            info = os.stat(path)
        except OSError:
            return None
        if stat.S_ISREG(info.st_mode):
            total += min(info.st_blocks * 512, info.st_size)
        else:
            return None
    return total


def _archive_target(name: str) -> str | int:
    """Where ``create``/``repack`` write: a path, ``exec:``, or ``-`` (stdout)."""
    if name == "-":
        sys.stdout.flush()
        return os.dup(sys.stdout.fileno())  # the writer closes its own copy
    return name


def create_devices(
    disk_options: Sequence[str], positional: Sequence[str]
) -> list[tuple[str, str, str | None]]:
    """``vma create``'s devices as ``(name, path, format)``, parsed as
    Proxmox's current tool does: ``-d format=FMT:[NAME=]PATH`` (repeatable,
    the format required) or the older positional ``[format=FMT:][NAME=]PATH``
    (format None: the library probes the image), never both.  Unnamed
    devices are disk0, disk1, ... in order."""
    from ._qemu import QEMU_FORMATS

    if disk_options and positional:
        raise VmaError("Unexpected extra argument - specify all devices via '-d'")
    devices: list[tuple[str, str, str | None]] = []
    for index, spec in enumerate(disk_options or positional):
        fmt, rest = None, spec
        if spec.startswith("format="):
            fmt, colon, rest = spec[len("format=") :].partition(":")
            if not colon:
                raise VmaError(f"read map failed - option 'format' not terminated ('{spec}')")
        elif disk_options:
            raise VmaError(f"No format specified for device: '{spec}'")
        name, equals, path = rest.partition("=")
        if fmt is not None and fmt not in QEMU_FORMATS:
            # The reference's words (QEMU's blk_new_open), as a restore map's format= gets.
            raise VmaError(
                f"bdrv_open '{path if equals else rest}' failed - Unknown driver '{fmt}'"
            )
        devices.append((name, path, fmt) if equals else (f"disk{index}", rest, fmt))
    return devices


async def cmd_create(opts: Options) -> int:
    import anyio

    from . import create_archive

    archive, *paths = opts.args
    target = _archive_target(archive)
    recorder = None
    if opts.digest:  # the digest code is imported only when asked for (start-up)
        from . import DigestRecorder, digest_path

        if await anyio.Path(digest_path(archive)).exists():
            raise VmaError(f"digest file {digest_path(archive)} already exists")
        recorder = DigestRecorder()
    configs = []
    for name in opts.configs:
        try:
            configs.append((name, await anyio.Path(name).read_bytes()))
        except OSError as exc:
            raise VmaError(f"Unable to read file: {name}: {exc.strerror}") from exc
    devices = create_devices(opts.disks, paths)

    mode = _progress_mode(opts)
    bar = ProgressBar(sys.stderr, "create") if mode == "bar" else None
    read_total = await anyio.to_thread.run_sync(_image_read_total, devices) if bar else None
    last_percent = -1
    bar_due = 0.0

    async def on_progress(progress: Progress) -> None:
        # Once per 4 MiB chunk (never per cluster; not at all under --quiet).
        # Sizes are device bytes walked, in whole clusters.
        nonlocal last_percent, bar_due
        done, total = progress.done_bytes, progress.total_bytes
        if bar is not None:
            now = time.monotonic()
            if now >= bar_due or done >= total:
                bar_due = now + 0.1
                parts = [(d.name, d.done_bytes, d.total_bytes) for d in progress.devices]
                update = partial(bar.update, read=progress.read_bytes, read_total=read_total)
                await anyio.to_thread.run_sync(update, done, total, parts)
        elif mode == "lines" and total:
            percent = done * 100 // total
            if percent != last_percent:
                line = f"progress {percent}% {done}/{total} {progress.zero_bytes}\n"
                await _emit_off_loop(sys.stderr, line)
                last_percent = percent

    try:
        status = await create_archive(
            target,
            devices,
            configs=configs,
            progress=on_progress if mode != "none" else None,
            size_multiple=512,
            uuid=opts.uuid,
            ctime=opts.ctime,
            reproducible=opts.reproducible,
            digest=recorder,
            compress=opts.compress,
        )
    except BaseException as exc:
        if recorder is not None:
            recorder.close()  # its hashing threads
        if isinstance(exc, VmaError):
            raise VmaError(f"creating vma archive failed - {exc}") from exc
        raise
    if recorder is not None:
        from . import digest_path, write_digest_file

        await write_digest_file(
            digest_path(archive), recorder, status.uuid, [name for name, *_ in devices]
        )
    if bar is not None:
        bar.finish(sum(s.size for s in status.streams))
    elif mode == "lines":
        _emit(
            sys.stderr,
            "".join(
                f"image {s.name}: size={s.size} zeros={s.zero_bytes}"
                f" saved={s.size - s.zero_bytes}\n"
                for s in status.streams
            ),
        )
    return 0


async def cmd_repack(opts: Options) -> int:
    from . import repack_archive

    source, output = opts.args
    try:
        await repack_archive(source, _archive_target(output), uuid=opts.uuid, ctime=opts.ctime)
    except VmaError as exc:
        raise VmaError(f"repack failed - {exc}") from exc
    return 0


def _listen_address(value: str) -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[IPV6]:PORT``; the host defaults to 127.0.0.1."""
    host, _, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen: expected [HOST:]PORT, not '{value}'")
    return host, int(port)


def _nbd_uri(address: str | tuple[str, int], name: str) -> str:
    import urllib.parse

    export = urllib.parse.quote(name)
    if isinstance(address, str):  # "unix:PATH"
        return f"nbd+unix:///{export}?socket={address.removeprefix('unix:')}"
    host, port = address
    return f"nbd://{f'[{host}]' if ':' in host else host}:{port}/{export}"


async def cmd_serve(opts: Options) -> int:
    import anyio

    from . import VmaReader, serve_archive

    archive = opts.args[0]
    async with VmaReader.open(archive) as reader:
        names = [dev.name for dev in reader.header.devices if not dev.is_vmstate]
    host, port = opts.listen or ("127.0.0.1", 10809)
    stop = anyio.Event()
    serve = (
        functools.partial(serve_archive, archive, unix_socket=opts.socket, stop=stop)
        if opts.socket is not None
        else functools.partial(serve_archive, archive, host=host, port=port, stop=stop)
    )

    async def serving(*, task_status: anyio.abc.TaskStatus[str | tuple[str, int]]) -> None:
        await serve(task_status=task_status)
        tg.cancel_scope.cancel()  # stopped gracefully: stop waiting for signals

    # The signals are caught before the socket exists, so a stop request
    # always takes the path that removes it.  The first one stops gracefully
    # (requests in flight are answered, for up to 10 s); a second one at once.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            async with anyio.create_task_group() as tg:
                address = await tg.start(serving)
                _emit(sys.stdout, "".join(f"{_nbd_uri(address, name)}\n" for name in names))
                async for _ in signals:
                    if stop.is_set():
                        tg.cancel_scope.cancel()
                    stop.set()
        except BaseExceptionGroup as group:  # a refused archive or socket: one line, no traceback
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
                raise group.exceptions[0] from None
            raise
    return 0


COMMANDS: dict[str, Callable[[Options], Awaitable[int]]] = {
    "list": cmd_list,
    "config": cmd_list,
    "create": cmd_create,
    "extract": cmd_extract,
    "verify": cmd_verify,
    "repack": cmd_repack,
    "serve": cmd_serve,
}


def _backend() -> tuple[str, dict[str, bool]]:
    """``VMA_ASYNC_BACKEND`` picks the event loop: asyncio (default), uvloop or trio."""
    name = os.environ.get("VMA_ASYNC_BACKEND", "asyncio")
    if name == "uvloop":
        return "asyncio", {"use_uvloop": True}
    if name in ("asyncio", "trio"):
        return name, {}
    raise UsageError(f"invalid VMA_ASYNC_BACKEND '{name}' (use asyncio, uvloop or trio)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``vma`` command; returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    # Names from an archive are bytes; print them as the reference does, raw.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    try:
        parsed = parse_args(args)
        if isinstance(parsed, str):
            _emit(sys.stdout, parsed)
            return 0
        backend, backend_options = _backend()
    except UsageError as exc:
        if str(exc):
            _emit(sys.stderr, f"vma: {exc}\n")
        _emit(sys.stdout, USAGE)
        return 1
    debug = parsed.debug
    if parsed.command in ("list", "config"):
        header = plain_file_header(parsed.args[0])
        if header is not None:
            return _run_without_loop(show_header, parsed, header)
    if parsed.command == "verify":
        status = verify_without_loop(parsed)
        if status is not None:
            return status
    # SIGTERM takes Ctrl-C's path, so that a killed `create` or `extract` also
    # cancels its tasks and removes what it had created.
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))
    try:
        import anyio

        return anyio.run(
            COMMANDS[parsed.command], parsed, backend=backend, backend_options=backend_options
        )
    except KeyboardInterrupt:
        if ProgressBar.live is not None:
            ProgressBar.live.clear()  # ^C was echoed onto the bar's line
        sys.stderr.write("vma: interrupted\n")
        return 130
    except BrokenPipeError:
        # The reader of our output went away (``vma config ... | head``).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (VmaError, OSError) as exc:
        if ProgressBar.live is not None:
            ProgressBar.live.clear()
        if debug:
            import traceback

            traceback.print_exc()
        sys.stderr.write(f"vma: {_one_line(exc, parsed.args[0])}\n")
        return 1


def plain_file_header(path: str) -> ArchiveHeader | None:
    """The header of an uncompressed archive in a regular file, read with
    blocking calls before any event loop exists; None for anything else.

    ``list`` and ``config`` need the header only, and starting asyncio (or
    trio) and the reader costs more than the rest of the command: Proxmox
    runs one ``vma list`` per backup file (issue 10: start-up <= 60 ms).
    Standard input, FIFOs, ``s3://``, compressed archives and every error
    take the normal path instead, which reads them and reports the error in
    its own words.
    """
    from ._format import HEADER_FIXED_SIZE, decode_header, header_size_from_prefix

    fd = _plain_archive_fd(path)
    if fd is None:
        return None
    try:
        data = os.pread(fd, HEADER_FIXED_SIZE, 0)
        size = header_size_from_prefix(data)
        return decode_header(data + os.pread(fd, size - len(data), len(data)))
    except (OSError, VmaError):
        return None
    finally:
        os.close(fd)


def verify_without_loop(opts: Options) -> int | None:
    """``verify`` of an uncompressed archive in a regular file, with no
    sidecar and nothing to print, run with blocking calls before any event
    loop exists; None when the normal path must run instead.

    Why: the walk of a 4 GiB archive takes about 0.15 s (the data is skimmed
    with ``sendfile``), and importing and starting asyncio and anyio took
    0.05 s more (issue 10: verify >= 1.0x the reference).  The walk is the
    reader's own (``_file_reader.pull_batch`` over the same parser), so the
    checks and the messages are the same.
    """
    from ._digest_name import digest_path

    path = opts.args[0]
    if opts.digest_path is not None or opts.verbose or _progress_mode(opts) != "none":
        return None
    if os.path.lexists(digest_path(path)):
        return None
    fd = _plain_archive_fd(path)
    if fd is None:
        return None
    try:
        from ._file_reader import verify_file

        verify_file(fd)
    except VmaError as exc:  # as main() reports cmd_verify's error
        sys.stderr.write(f"vma: {_one_line(VmaError(f'verify failed - {exc}'), path)}\n")
        return 1
    except OSError:
        return None
    finally:
        os.close(fd)
    return 0


def _plain_archive_fd(path: str) -> int | None:
    """A blocking fd of ``path`` if it is a regular file that starts with the
    VMA magic (an uncompressed archive), else None: the test of the
    loop-free paths.  Standard input and FIFOs are never opened (opening a
    FIFO would release its writer, or wait for one): stat comes first."""
    from ._format import VMA_MAGIC

    try:
        if path == "-" or not stat.S_ISREG(os.stat(path).st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.set_blocking(fd, True)
            if os.pread(fd, len(VMA_MAGIC), 0) == VMA_MAGIC:
                return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _run_without_loop(
    command: Callable[[Options, ArchiveHeader], int], opts: Options, header: ArchiveHeader
) -> int:
    """``main``'s error handling for a command that runs without an event loop."""
    try:
        return command(opts, header)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _one_line(exc: BaseException, archive: str) -> str:
    """The reference's message, on one line, with the archive named when the
    message does not already name a file (a damaged extent, say)."""
    if isinstance(exc, OSError) and not isinstance(exc, VmaError):
        where = f"{exc.filename}: " if exc.filename is not None else ""
        message = f"{where}{exc.strerror or exc}"
    else:
        message = " ".join(str(exc).split()) or type(exc).__name__
    if archive == "-":
        archive = "standard input"
    return message if archive in message else f"{message} (archive {archive})"
