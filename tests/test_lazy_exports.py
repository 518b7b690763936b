"""Start-up (issue 10): ``import vma_async`` and the ``vma`` commands that need
no event loop load none of the library's I/O layers; every public name still
resolves, to the object its module defines; ``list`` and ``config`` of a plain
file print exactly what the event-loop path prints.

Each check runs in a fresh interpreter: this process has imported everything.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vma_async

INIT = Path(vma_async.__file__)
CLI = "import sys\nfrom vma_async._cli import main\nsys.exit(main(sys.argv[1:]))"
HEAVY = (
    "anyio",
    "asyncio",
    "trio",
    "vma_async._reader",
    "vma_async._writer",
    "vma_async._nbd_client",
)


def run_python(
    code: str, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-c", code, *args], input=stdin, capture_output=True, check=False
    )


def loaded_after(code: str) -> set[str]:
    result = run_python(f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))")
    assert result.returncode == 0, result.stderr.decode()
    return set(json.loads(result.stdout.decode().splitlines()[-1]))


def test_import_loads_no_io_layer() -> None:
    loaded = loaded_after("import vma_async")
    assert not loaded & set(HEAVY)
    assert "vma_async._errors" in loaded  # errors are eager: cheap, and caught by callers


def test_every_public_name_resolves_to_its_module_object() -> None:
    code = """
import importlib, json, vma_async
table = vma_async._LAZY_EXPORTS
wrong = [
    name for name in vma_async.__all__
    if name in table
    and getattr(vma_async, name)
    is not getattr(importlib.import_module("vma_async." + table[name]), name)
]
missing = [name for name in vma_async.__all__ if not hasattr(vma_async, name)]
print(json.dumps([wrong, missing]))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout) == [[], []]


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="module 'vma_async' has no attribute 'NoSuchThing'"):
        _ = vma_async.NoSuchThing  # type: ignore[attr-defined]


def test_lazy_table_matches_the_type_checking_imports() -> None:
    """The names type checkers see (the TYPE_CHECKING imports) are the names
    ``__getattr__`` serves, from the same modules, and all are in __all__."""
    tree = ast.parse(INIT.read_text())
    block = next(
        node
        for node in tree.body
        if isinstance(node, ast.If)
        and isinstance(node.test, ast.Name)
        and node.test.id == "TYPE_CHECKING"
    )
    imported = {
        alias.name: node.module
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert imported == vma_async._LAZY_EXPORTS  # type: ignore[attr-defined]
    assert set(imported) <= set(vma_async.__all__)


def test_version_loads_no_io_layer() -> None:
    code = "from vma_async._cli import main\nassert main(['--version']) == 0"
    loaded = loaded_after(code)
    assert not loaded & set(HEAVY)


def make_archive(tmp_path: Path) -> Path:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\x01" * 70000)
    config = tmp_path / "qemu-server.conf"
    config.write_bytes(b"cores: 2\nname: vm\xc3\xa9\n")
    archive = tmp_path / "a.vma"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vma_async",
            "create",
            str(archive),
            "-c",
            str(config),
            f"drive-scsi0={disk}",
        ],
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return archive


@pytest.mark.parametrize(
    "argv",
    [["list"], ["list", "--json"], ["config"], ["config", "-c", "nosuch.conf"]],
    ids=["list", "list-json", "config", "config-missing"],
)
def test_list_and_config_of_a_plain_file_skip_the_event_loop(
    tmp_path: Path, argv: list[str]
) -> None:
    archive = make_archive(tmp_path)
    probe = (
        "import sys, json\nfrom vma_async._cli import main\nstatus = main(sys.argv[1:])\n"
        "sys.stdout.flush()\nsys.stderr.write(json.dumps(sorted(sys.modules)))\n"
        "sys.exit(status)"
    )
    fast = run_python(probe, *argv, str(archive))
    loaded = set(json.loads(fast.stderr.decode().splitlines()[-1]))
    assert not loaded & set(HEAVY)
    # The same archive from standard input takes the event-loop path:
    # same output, same status, same message.
    slow = run_python(CLI, *argv, "-", stdin=archive.read_bytes())
    assert fast.stdout == slow.stdout
    assert fast.returncode == slow.returncode
    assert fast.stderr.decode().splitlines()[:-1] == slow.stderr.decode().splitlines()


def test_a_damaged_plain_file_takes_the_event_loop_path_and_its_error(tmp_path: Path) -> None:
    archive = make_archive(tmp_path)
    data = bytearray(archive.read_bytes())
    data[100] ^= 0xFF  # inside the header: its MD5 no longer matches
    archive.write_bytes(data)
    result = run_python(CLI, "list", str(archive))
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode().startswith("vma: wrong vma header checksum")


def test_list_of_a_fifo_reads_it_once_through_the_event_loop(tmp_path: Path) -> None:
    """The header probe must neither wait for a FIFO's writer nor eat its data."""
    archive = make_archive(tmp_path)
    expected = run_python(CLI, "list", str(archive))
    fifo = tmp_path / "archive.fifo"
    os.mkfifo(fifo)
    child = subprocess.Popen(
        [sys.executable, "-c", CLI, "list", str(fifo)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    with fifo.open("wb") as writer:  # blocks until the child opens its end
        writer.write(archive.read_bytes())
    stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 0, stderr.decode()
    assert stdout == expected.stdout
