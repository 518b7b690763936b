"""vma_async: read and write Proxmox VE VMA backup archives from async Python.

Layers, bottom to top (see ``docs/architecture.md`` for the modules and
the data flow):

* sans-I/O, public: the format codecs (``ArchiveHeader``, ``DeviceInfo``, the
  constants), :class:`ArchiveParser` (archive bytes in, header and extents
  out; ``feed``/``next_event``/``end_of_input``, as h11) and
  :class:`ExtentAssembler` (the reference writer's state machine: clusters
  in, extent bytes into buffers the caller owns);
* the async layer on anyio (asyncio, uvloop and trio): :class:`VmaWriter`
  with its targets (where an archive goes), :class:`VmaReader` with its
  sources (where an archive comes from) and sinks (where restored devices
  go); every ``X.open(...)`` works awaited or as ``async with``;
* the one-call layer: :func:`create_archive` / :func:`backup_image`,
  :func:`extract_archive`, throttling sink wrappers, restore maps; every
  long operation reports one :class:`Progress` convention;
* the ``vma`` command line, a client of the public API only.
"""

import importlib

from ._errors import *  # noqa: F403
from ._errors import __all__ as _error_names

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up)

if TYPE_CHECKING:
    from ._assembler import ExtentAssembler
    from ._backup import Image, backup_image, create_archive, open_image
    from ._compress import CompressingTarget
    from ._digest import (
        DigestRecorder,
        SidecarDigest,
        read_digest_file,
        verify_with_digest,
        write_digest_file,
    )
    from ._digest_name import digest_path
    from ._extract import ExtractResult, extract_archive
    from ._format import (
        BLOCK_SIZE,
        CLUSTER_SIZE,
        EXTENT_HEADER_SIZE,
        MAX_EXTENT_SIZE,
        ArchiveHeader,
        ClusterEntry,
        DeviceInfo,
        ExtentHeader,
    )
    from ._nbd_client import NbdClient, list_nbd_exports
    from ._nbd_server import NbdExport, serve_nbd
    from ._nbd_sink import NbdSink
    from ._opening import AsyncResource, Opening
    from ._parser import ArchiveParser, DeviceReadStats, ParsedExtent, ReadSummary
    from ._progress import DeviceProgress, Progress, ProgressCallback
    from ._qemu import QEMU_FORMATS, QemuImage, probe_format
    from ._reader import DeviceView, VmaReader
    from ._repack import repack_archive
    from ._restore_map import RestoreMapEntry, parse_restore_map, read_restore_map
    from ._s3 import S3Source, S3Target, S3TargetStats
    from ._serve import serve_archive
    from ._sink_wrappers import RateLimiter, SinkWrapper, ThrottledSink
    from ._sinks import CallbackSink, ExistingFileSink, RawFileSink, SequentialSink, Sink
    from ._sources import ArchiveSource, open_source
    from ._targets import CommandTarget, FdTarget, FifoTarget, NewFileTarget, Target
    from ._writer import ClusterRead, StreamStatus, VmaWriter, WriterStats, WriterStatus

__version__ = "0.1.0"

__all__ = [
    "DigestRecorder",
    "SidecarDigest",
    "digest_path",
    "read_digest_file",
    "repack_archive",
    "verify_with_digest",
    "write_digest_file",
    "BLOCK_SIZE",
    "CLUSTER_SIZE",
    "EXTENT_HEADER_SIZE",
    "MAX_EXTENT_SIZE",
    "ArchiveHeader",
    "ClusterEntry",
    "DeviceInfo",
    "ExtentHeader",
    "CallbackSink",
    "DeviceReadStats",
    "DeviceView",
    "ExistingFileSink",
    "ParsedExtent",
    "RawFileSink",
    "ArchiveParser",
    "ExtentAssembler",
    "Progress",
    "DeviceProgress",
    "ProgressCallback",
    "ReadSummary",
    "SequentialSink",
    "Sink",
    "VmaReader",
    "CommandTarget",
    "FdTarget",
    "FifoTarget",
    "NewFileTarget",
    "CompressingTarget",
    "S3Source",
    "S3Target",
    "S3TargetStats",
    "StreamStatus",
    "Target",
    "ClusterRead",
    "VmaWriter",
    "WriterStats",
    "WriterStatus",
    "ExtractResult",
    "Image",
    "RateLimiter",
    "RestoreMapEntry",
    "SinkWrapper",
    "ThrottledSink",
    "backup_image",
    "create_archive",
    "extract_archive",
    "open_image",
    "parse_restore_map",
    "read_restore_map",
    "__version__",
    "NbdClient",
    "NbdSink",
    "QEMU_FORMATS",
    "QemuImage",
    "probe_format",
    "list_nbd_exports",
    "NbdExport",
    "serve_nbd",
    "serve_archive",
    "ArchiveSource",
    "open_source",
    "AsyncResource",
    "Opening",
    *_error_names,
]

# Lazy exports (PEP 562): ``import vma_async`` loads only the errors; each
# public name imports its module on first use.  ``vma --version`` and ``vma
# list`` must not pay for the event loop, the writer, NBD and S3 (issue 10:
# start-up <= 60 ms).  The TYPE_CHECKING imports above are the same names for
# type checkers; tests/test_lazy_exports.py checks that both lists agree.
_LAZY_EXPORTS: dict[str, str] = {
    "ExtentAssembler": "_assembler",
    "Image": "_backup",
    "backup_image": "_backup",
    "create_archive": "_backup",
    "open_image": "_backup",
    "CompressingTarget": "_compress",
    "DigestRecorder": "_digest",
    "SidecarDigest": "_digest",
    "digest_path": "_digest_name",
    "read_digest_file": "_digest",
    "verify_with_digest": "_digest",
    "write_digest_file": "_digest",
    "ExtractResult": "_extract",
    "extract_archive": "_extract",
    "BLOCK_SIZE": "_format",
    "CLUSTER_SIZE": "_format",
    "EXTENT_HEADER_SIZE": "_format",
    "MAX_EXTENT_SIZE": "_format",
    "ArchiveHeader": "_format",
    "ClusterEntry": "_format",
    "DeviceInfo": "_format",
    "ExtentHeader": "_format",
    "NbdClient": "_nbd_client",
    "list_nbd_exports": "_nbd_client",
    "NbdExport": "_nbd_server",
    "serve_nbd": "_nbd_server",
    "NbdSink": "_nbd_sink",
    "AsyncResource": "_opening",
    "Opening": "_opening",
    "ArchiveParser": "_parser",
    "DeviceReadStats": "_parser",
    "ParsedExtent": "_parser",
    "ReadSummary": "_parser",
    "DeviceProgress": "_progress",
    "Progress": "_progress",
    "ProgressCallback": "_progress",
    "QEMU_FORMATS": "_qemu",
    "QemuImage": "_qemu",
    "probe_format": "_qemu",
    "DeviceView": "_reader",
    "VmaReader": "_reader",
    "repack_archive": "_repack",
    "RestoreMapEntry": "_restore_map",
    "parse_restore_map": "_restore_map",
    "read_restore_map": "_restore_map",
    "S3Source": "_s3",
    "S3Target": "_s3",
    "S3TargetStats": "_s3",
    "serve_archive": "_serve",
    "ArchiveSource": "_sources",
    "open_source": "_sources",
    "RateLimiter": "_sink_wrappers",
    "SinkWrapper": "_sink_wrappers",
    "ThrottledSink": "_sink_wrappers",
    "CallbackSink": "_sinks",
    "ExistingFileSink": "_sinks",
    "RawFileSink": "_sinks",
    "SequentialSink": "_sinks",
    "Sink": "_sinks",
    "CommandTarget": "_targets",
    "FdTarget": "_targets",
    "FifoTarget": "_targets",
    "NewFileTarget": "_targets",
    "Target": "_targets",
    "ClusterRead": "_writer",
    "StreamStatus": "_writer",
    "VmaWriter": "_writer",
    "WriterStats": "_writer",
    "WriterStatus": "_writer",
}


def __getattr__(name: str) -> object:
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
