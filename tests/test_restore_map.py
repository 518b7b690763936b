"""The restore map parser: the reference's syntax and its error messages."""

from __future__ import annotations

import pytest

from vma_async import RestoreMapError
from vma_async._restore_map import RestoreMapEntry, map_is_complete, parse_restore_map


def test_plain_lines_and_done() -> None:
    entries = parse_restore_map(
        ["0:drive-scsi0=/dev/vg/vm-100-disk-0\n", "1:drive-ide0=/tmp/x.raw\n", "done\n", "junk"]
    )
    assert entries == {
        "drive-scsi0": RestoreMapEntry("drive-scsi0", "/dev/vg/vm-100-disk-0", False),
        "drive-ide0": RestoreMapEntry("drive-ide0", "/tmp/x.raw", True),
    }


def test_empty_line_ends_the_map() -> None:
    assert list(parse_restore_map(["0:a=/x\n", "\n", "garbage\n"])) == ["a"]


def test_done_without_newline_ends_the_map() -> None:
    assert list(parse_restore_map(["0:a=/x\n", "done"])) == ["a"]


def test_all_options_in_any_order() -> None:
    line = "cache=writeback:throttling.group=g1:format=raw:throttling.bps=0x100:1:d=/p=q\n"
    assert parse_restore_map([line]) == {
        "d": RestoreMapEntry(
            devname="d",
            path="/p=q",
            write_zeroes=True,
            format="raw",
            throttling_bps=256,
            throttling_group="g1",
            cache="writeback",
        )
    }


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("1000", 1000), ("010", 8), ("0XfF", 255)])
def test_numbers_in_c_base_zero(text: str, value: int) -> None:
    entry = parse_restore_map([f"throttling.bps={text}:0:d=/p"])["d"]
    assert entry.throttling_bps == value


def test_later_line_for_a_device_wins() -> None:
    assert parse_restore_map(["0:d=/a\n", "1:d=/b\n"])["d"].path == "/b"


def test_throttle_key_defaults_to_path() -> None:
    entries = parse_restore_map(["throttling.bps=5:0:a=/p\n", "throttling.group=g:0:b=/q\n"])
    assert (entries["a"].throttle_key, entries["b"].throttle_key) == ("/p", "g")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("2:d=/p\n", "read map failed - parse error ('2:d=/p')"),
        ("d=/p\n", "read map failed - parse error ('d=/p')"),
        ("0:/p\n", "read map failed - no dev name specified ('0:/p')"),
        ("format=raw:format=raw:0:d=/p", "read map failed - duplicate value for option 'format'"),
        ("cache=none", "read map failed - option 'cache' not terminated ('cache=none')"),
        ("throttling.bps=12k:0:d=/p", "read map failed - not a number: 12k"),
        ("throttling.bps=:0:d=/p", "read map failed - not a number: "),
        ("throttling.bps=-1:0:d=/p", "read map failed - not a number: -1"),
        ("throttling.bps=1_000:0:d=/p", "read map failed - not a number: 1_000"),
        ("throttling.bps=08:0:d=/p", "read map failed - not a number: 08"),
        ("cache=fast:0:d=/p", "invalid cache option: fast"),
        ("format=qcow3:0:d=/p", "can't open file /p - Unknown driver 'qcow3'"),
        (
            "throttling.bps=1000000000000001:0:d=/p",
            "failed to apply throttling - bps must be within [0, 1000000000000000]",
        ),
    ],
)
def test_errors_use_the_reference_words(line: str, message: str) -> None:
    with pytest.raises(RestoreMapError) as info:
        parse_restore_map([line])
    assert str(info.value) == message


@pytest.mark.parametrize(
    "mode", ["none", "off", "writeback", "writethrough", "directsync", "unsafe"]
)
def test_every_reference_cache_mode_is_accepted(mode: str) -> None:
    assert parse_restore_map([f"cache={mode}:0:d=/p"])["d"].cache == mode


@pytest.mark.parametrize(
    ("text", "complete"),
    [("", False), ("0:a=/x\n", False), ("0:a=/x\ndone\n", True), ("0:a=/x\n\n", True),
     ("0:a=/x\ndone", False), ("0:a=/x\ndon", False)],
)  # fmt: skip
def test_map_is_complete(text: str, complete: bool) -> None:
    assert map_is_complete(text) is complete


def test_skip_line() -> None:
    entries = parse_restore_map(["skip=drive-scsi1\n", "0:drive-scsi0=/p\n", "done\n"])
    assert entries["drive-scsi1"] == RestoreMapEntry("drive-scsi1", "", False, skip=True)
    assert not entries["drive-scsi0"].skip


def test_later_skip_replaces_a_mapping() -> None:
    assert parse_restore_map(["0:d=/p\n", "skip=d\n"])["d"].skip


@pytest.mark.parametrize("line", ["skip", "skip=", "skipd=x", "skip:d"])
def test_skip_without_a_name_is_the_reference_error(line: str) -> None:
    with pytest.raises(RestoreMapError) as info:
        parse_restore_map([line + "\n"])
    assert str(info.value) == f"read map failed - option 'skip' has no value ('{line}')"
