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

from ._assembler import ExtentAssembler
from ._backup import Image, backup_image, create_archive, open_image
from ._compress import CompressingTarget
from ._digest import (
    DigestRecorder,
    SidecarDigest,
    digest_path,
    read_digest_file,
    verify_with_digest,
    write_digest_file,
)
from ._errors import *  # noqa: F403
from ._errors import __all__ as _error_names
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
from ._targets import CommandTarget, FdTarget, FifoTarget, NewFileTarget, Target
from ._writer import StreamStatus, VmaWriter, WriterStats, WriterStatus

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
    *_error_names,
]
