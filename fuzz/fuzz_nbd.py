"""Coverage-guided fuzz target (atheris) for the NBD protocol state machines.

The first byte picks the machine: even feeds the rest to a server
(``ServerConnection`` answered by the test peer ``ToyServer``), odd to a
client (``ClientConnection`` driven by ``ToyClient``, which sends its
options and requests as the replies come).  The second byte picks how the
bytes are cut into pieces.  The only acceptable outcomes are events and
:class:`NbdProtocolError`; anything else (IndexError, struct.error, a
RuntimeError from a machine misused by its own parsing, a receive buffer
growing past one message) is a bug.

Run:   .venv/bin/python fuzz/fuzz_nbd.py -runs=100000 -seed=1 [corpus_dir]
The test suite runs it for a bounded number of inputs with a fixed seed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris
from _runner import fuzz

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

with atheris.instrument_imports():
    from nbd_peers import ToyClient, ToyServer, recorded_session

    from vma_async import _nbd_proto as proto
    from vma_async._errors import NbdProtocolError

PIECES = (1, 3, 16, 100, 4096, 1 << 20)
BUFFER_BOUND = proto.MAX_OPTION_LENGTH + (1 << 20) + 64


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    peer: ToyServer | ToyClient = ToyServer() if data[0] % 2 == 0 else ToyClient()
    piece = PIECES[data[1] % len(PIECES)]
    body = data[2:]
    try:
        for at in range(0, len(body), piece):
            peer.feed(body[at : at + piece])
            assert len(peer.conn._buffer) <= BUFFER_BOUND
            if peer.events and isinstance(
                peer.events[-1], proto.ConnectionClosed | proto.Disconnect
            ):
                return
        peer.feed(b"")
    except NbdProtocolError:
        return


def seeds() -> list[bytes]:
    """A whole session's bytes as each side received them."""
    to_server, to_client = recorded_session()
    return [b"\x00\x04" + to_server, b"\x01\x04" + to_client, b"\x00\x00" + to_server[:200]]


def main() -> None:
    fuzz(test_one_input, seeds(), "nbd-fuzz-corpus-")


if __name__ == "__main__":
    main()
