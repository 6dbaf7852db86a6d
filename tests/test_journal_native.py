"""Events without systemd-python (EL 9's python3.11 has none; see packaging/rpm/dittohead.spec).

log.py then speaks the journal's native protocol on its socket itself: here a real datagram
socket in tmp_path stands for journald's, and the datagram is parsed as journald does.
(tests/test_rpm.py's booted box checks that a real journald stores the fields.)
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dittohead import __version__, log


def parse_native(data: bytes) -> dict[str, str]:
    """journald's reading of one native-protocol datagram."""
    fields: dict[str, str] = {}
    while data:
        line, sep, rest = data.partition(b"\n")
        assert sep, data
        if b"=" in line:
            key, _, value = line.partition(b"=")
            data = rest
        else:
            key, size = line, int.from_bytes(rest[:8], "little")
            value, data = rest[8:8 + size], rest[8 + size:]
            assert data[:1] == b"\n", data
            data = data[1:]
        fields[key.decode()] = value.decode("utf-8", "surrogateescape")
    return fields


@pytest.fixture
def journal_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket in place of journald's, and no systemd-python to import."""
    path = tmp_path / "journal.socket"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setattr(log, "JOURNAL_SOCKET", str(path))
    monkeypatch.setitem(sys.modules, "systemd", None)  # `from systemd import ...` fails
    monkeypatch.delenv("DITTOHEAD_LOG", raising=False)
    with sock:
        yield sock


def test_event_without_systemd_python_reaches_the_journal_with_its_fields(
        journal_socket: socket.socket, capsys: pytest.CaptureFixture[str]) -> None:
    log.event("delivered", "delivered visit1 to s1\nsecond line", study="s1",
              entry="visit\u00e91", files=3)
    fields = parse_native(journal_socket.recv(65536))
    assert fields == {
        "MESSAGE": "delivered visit1 to s1\nsecond line",
        "PRIORITY": "5",
        "SYSLOG_IDENTIFIER": "dittohead",
        "MESSAGE_ID": log.MESSAGE_IDS["delivered"],
        "DITTOHEAD_STUDY": "s1",
        "DITTOHEAD_ENTRY": "visit\u00e91",
        "DITTOHEAD_FILES": "3",
        "DITTOHEAD_VERSION": __version__,
    }
    assert capsys.readouterr().err == ""  # the journal has it: nothing on stderr


def test_without_journald_listening_the_event_goes_to_stderr(
        journal_socket: socket.socket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    gone = tmp_path / "gone.socket"
    gone.touch()  # exists, but nothing listens: sendto fails (ECONNREFUSED)
    monkeypatch.setattr(log, "JOURNAL_SOCKET", str(gone))
    log.event("failed", "visit1 failed", study="s1")
    assert capsys.readouterr().err == "dittohead: visit1 failed\n"
