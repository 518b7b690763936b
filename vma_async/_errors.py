"""Every error vma_async raises, in one tree.

Callers catch :class:`VmaError` to handle anything this library reports, or one
of the branches below it to tell a damaged archive (:class:`FormatError`) from a
misused writer (:class:`WriterUsageError`) or a failing output or input
(:class:`TargetError`, :class:`SourceError`, :class:`SinkError`).  Messages name
what is wrong in the reference tool's words where it has some, so that an
operator who knows ``vma`` recognises them.

No code outside this module defines exception classes: one concept, one place.
"""

from __future__ import annotations

__all__ = [
    "BadMagicError",
    "BlobTableError",
    "ClusterRangeError",
    "CommandFailedError",
    "DeviceSizeError",
    "DuplicateClusterError",
    "ExtentBlockCountError",
    "ExtentChecksumError",
    "ExtentError",
    "ExtentMagicError",
    "ExtentUuidError",
    "FormatError",
    "HeaderChecksumError",
    "HeaderError",
    "HeaderSizeError",
    "InvalidConfigPointerError",
    "InvalidNameError",
    "MissingClusterError",
    "OpenStreamError",
    "IncompleteStreamError",
    "SinkError",
    "SinkExistsError",
    "SourceError",
    "StreamClosedError",
    "TargetError",
    "TargetExistsError",
    "TooManyConfigsError",
    "TooManyDevicesError",
    "TruncatedArchiveError",
    "UnknownDeviceError",
    "UnsupportedVersionError",
    "VmaError",
    "VmstateOrderError",
    "WriterUsageError",
    "BlobTooLargeError",
    "HeaderWrittenError",
    "InvalidStreamError",
    "BlockBeyondEndError",
    "UnsafeNameError",
    "RestoreMapError",
    "ClusterSizeError",
    "WriterAbortedError",
    "NbdError",
    "NbdProtocolError",
    "NbdCommandError",
    "NbdOptionError",
    "QemuError",
    "QemuMissingError",
    "DigestError",
    "DigestMismatchError",
    "DuplicateDeviceNameError",
]


class VmaError(Exception):
    """Base class of every error raised by vma_async."""


# --- damaged or hostile archives -------------------------------------------


class FormatError(VmaError):
    """The archive's bytes break a rule of the format."""


class HeaderError(FormatError):
    """The archive header is malformed."""


class BadMagicError(HeaderError):
    """The input does not start with ``VMA\\0``: not a VMA archive."""


class UnsupportedVersionError(HeaderError):
    """The header names a format version other than 1."""


class HeaderSizeError(HeaderError):
    """``header_size`` is too small, or too large to be a real header."""


class HeaderChecksumError(HeaderError):
    """The header's MD5 does not match its content."""


class BlobTableError(HeaderError):
    """``blob_buffer_offset``/``blob_buffer_size`` point outside the header."""


class InvalidConfigPointerError(HeaderError):
    """A config entry names a blob that does not exist or is not a string."""


class TruncatedArchiveError(FormatError):
    """The input ended inside the header or inside an extent."""


class ExtentError(FormatError):
    """An extent header or the data that follows it is malformed."""


class ExtentChecksumError(ExtentError):
    """An extent header's MD5 does not match its content."""


class ExtentUuidError(ExtentError):
    """An extent carries a uuid other than the archive's."""


class ExtentMagicError(ExtentError):
    """An extent header lacks ``VMAE`` or has a non-zero reserved field."""


class ExtentBlockCountError(ExtentError):
    """The blockinfo masks and ``block_count`` disagree."""


class UnknownDeviceError(FormatError):
    """An extent names a dev_id the header does not define (or that has no sink)."""


class DuplicateClusterError(FormatError):
    """A cluster of a device appears twice."""


class BlockBeyondEndError(FormatError):
    """A stored block starts at or past the device's end."""


class VmstateOrderError(FormatError):
    """vmstate clusters arrive out of order."""


class MissingClusterError(FormatError):
    """At end of input a cluster of a disk was never seen: a truncated archive."""


# --- writer misuse -----------------------------------------------------------


class WriterUsageError(VmaError):
    """A call to :class:`VmaWriter` breaks the reference writer's rules."""


class InvalidNameError(WriterUsageError):
    """A config or device name the header cannot store: it holds a NUL, or
    characters that have no UTF-8 (or raw byte) form."""


class HeaderWrittenError(WriterUsageError):
    """Configs and streams must be registered before the first cluster is written."""


class TooManyDevicesError(WriterUsageError):
    """More than 254 streams were registered."""


class TooManyConfigsError(WriterUsageError):
    """More than 256 config blobs were added."""


class BlobTooLargeError(WriterUsageError):
    """A config or name is longer than a blob can hold (65535 bytes), or the
    header would outgrow its 512 KiB buffer."""


class InvalidStreamError(WriterUsageError):
    """A dev_id that was never registered, or a stream size that is not > 0."""


class StreamClosedError(WriterUsageError):
    """A write to, or a second close of, a stream that was already closed."""


class ClusterRangeError(WriterUsageError):
    """A cluster number ≥ 2**32, past the device's end, or out of vmstate order."""


class ClusterSizeError(WriterUsageError):
    """Data for one cluster is longer than 64 KiB (shorter is zero-padded)."""


class WriterAbortedError(VmaError):
    """The archive was aborted (a producer failed, or the writer was cancelled);
    ``__cause__`` holds the reason.  It is the writer's sticky error."""


class OpenStreamError(WriterUsageError):
    """:meth:`VmaWriter.close` was called while a stream is still open."""


class IncompleteStreamError(WriterUsageError):
    """A closed stream did not transfer exactly its size."""


# --- the world outside --------------------------------------------------------


class TargetError(VmaError):
    """The writer's output failed: open, write, or the ``exec:`` command."""


class TargetExistsError(TargetError):
    """The output path exists already; the writer never overwrites."""


class CommandFailedError(TargetError):
    """An ``exec:`` command exited with a non-zero status or was killed."""


class SourceError(VmaError):
    """The reader's input failed (open, read, or decompression)."""


class SinkError(VmaError):
    """A restore sink failed to accept data."""


class SinkExistsError(SinkError):
    """A sink that creates its target found it existing; a sink never overwrites."""


class DeviceSizeError(SinkError):
    """A restore target is smaller than the device, or more than 4 MiB larger."""


class UnsafeNameError(VmaError):
    """A config or device name from the archive cannot be used as a file name."""


class DigestError(VmaError):
    """A ``.digest`` sidecar (``vma create --digest``) cannot be read or does not
    belong to the archive (another uuid, other devices, a damaged table)."""


class DigestMismatchError(DigestError):
    """Archive data does not match its sidecar digest: the archive was changed
    or damaged after it was written (the format itself checksums headers only)."""


class DuplicateDeviceNameError(WriterUsageError):
    """Two devices of one archive with the same name: no restore could tell
    them apart (the second disk's file or map line would be the first's)."""


class RestoreMapError(VmaError):
    """A restore map (``vma extract -r``) line is malformed or names an
    unsupported format, cache mode or throttle limit, or a device has no line."""


# --- NBD (network block device) --------------------------------------------


class NbdError(VmaError):
    """An NBD connection failed: the peer broke the protocol, refused an option
    or a command, or went away."""


class NbdProtocolError(NbdError):
    """The peer violated the NBD protocol (bad magic, impossible length, a reply
    to no request); the connection is unusable and is closed."""


class NbdOptionError(NbdError):
    """The server refused a handshake option (unknown export, unsupported
    option); ``reply_type`` holds the server's ``NBD_REP_ERR_*`` value."""

    def __init__(self, message: str, reply_type: int = 0) -> None:
        super().__init__(message)
        self.reply_type = reply_type


class NbdCommandError(NbdError):
    """The server answered a command with an error; ``errno`` holds the NBD
    error value (``errno.EIO``, ``errno.EINVAL``...).  The connection stays usable."""

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


# --- QEMU's tools (qemu-img, qemu-nbd) ---------------------------------------


class QemuError(VmaError):
    """qemu-img or qemu-nbd failed: it could not open or create an image (a
    missing file, the wrong format, a full disk), or it died mid-transfer.
    The message quotes the tool's own words and how it exited."""


class QemuMissingError(QemuError):
    """qemu-img or qemu-nbd is not installed; the message names the Debian
    package (``qemu-utils``) that provides them."""
