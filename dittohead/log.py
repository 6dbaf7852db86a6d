"""Structured events for the journal, the audit log of every delivery.

Each kind of event has a fixed MESSAGE_ID, explained in the shipped catalog
(units/dittohead.catalog), so `journalctl MESSAGE_ID=... DITTOHEAD_STUDY=...`
finds them. Without a journal socket (a container, a host without systemd)
the message goes to stderr as a plain sentence; DITTOHEAD_LOG=stderr sends
every event there instead of the journal, as one line ending in its
KEY=value fields (for tests and scripts).

Names come from uploaders, so every name shown (in a message, a field, on
a terminal, in mail) goes through printable(), and every line written
through clean(): a name can neither send escape sequences to a terminal
nor split one log line into two.
"""

from __future__ import annotations

import os
import socket
import sys
import syslog
from collections.abc import Mapping
from typing import Any

from . import __version__

SYSLOG_IDENTIFIER = "dittohead"

# Fixed for ever: changing one breaks admins' saved journalctl queries.
MESSAGE_IDS: Mapping[str, str] = {
    "delivered": "38a8638a6c0e47ae85e1afdd33a44e53",
    "failed": "e3e512004cb645aa863366fbb0f85d87",
    "rejected": "f733b5a2b64c44f8b0c16dfdc3bd5292",
    "retry-later": "d7cda46d17c84f998c2c01c983331d91",
    "disk-warning": "6640f08ae1aa4f18906e215400188441",
    "config-error": "741b67835ddc4eb580bfc74611985daa",
    # Sent by units/dittohead-notify-failure (OnFailure= of the units).
    "unit-failed": "d49d0a088dd54a0286ba26b8f857ba0b",
    # dittohead purge (dittohead/purge.py).
    "purged": "a461bf2b74104b38bf8513a13f40b7cb",
    "abandoned-removed": "3b7d9720d1654fb081164abf96a9916a",
    "out-of-space": "9f00b37b35594764850e82a4d624610a",
    # `dittohead undo`: a delivery's files removed from the destination again.
    "undone": "d60c4116527043ee928011d3021a3b8d",
}

_PRIORITY = {
    "delivered": syslog.LOG_NOTICE,
    "failed": syslog.LOG_ERR,
    "rejected": syslog.LOG_WARNING,
    "retry-later": syslog.LOG_WARNING,
    "disk-warning": syslog.LOG_WARNING,
    "config-error": syslog.LOG_ERR,
    "unit-failed": syslog.LOG_ERR,
    "purged": syslog.LOG_INFO,
    "abandoned-removed": syslog.LOG_NOTICE,
    "out-of-space": syslog.LOG_WARNING,
    "undone": syslog.LOG_NOTICE,
}

JOURNAL_SOCKET = "/run/systemd/journal/socket"


# Shown as \uNNNN: Unicode line and paragraph separators and the bidi
# controls, which reorder what a terminal, a mail reader or a log viewer
# shows (Trojan Source), though they are not control characters.
_INVISIBLE = frozenset("\u061c\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e"
                       "\u2066\u2067\u2068\u2069")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(c: str) -> str:
    o = ord(c)
    if c in _SHORT:
        return _SHORT[c]
    if 0xDC80 <= o <= 0xDCFF:  # a byte that is not UTF-8 (surrogateescape)
        return f"\\x{o - 0xDC00:02x}"
    if o < 0x20 or o == 0x7F:
        return f"\\x{o:02x}"
    if 0x80 <= o <= 0x9F or c in _INVISIBLE or 0xD800 <= o <= 0xDFFF:
        return f"\\u{o:04x}"
    return c


def printable(name: str) -> str:
    """A name (file, entry, user) as one line of text that is safe on a terminal.

    The one rule for every name dittohead shows: bytes that are not UTF-8 as
    \\xNN, control characters as \\n, \\r, \\t or \\xNN (C1: \\u0080-\\u009f),
    bidi controls and line separators as \\uNNNN, a backslash as \\\\; the
    rest as it is. Nothing is lost: each escape stands for one byte or
    character, and an escape cannot be mistaken for a name's own backslash.
    """
    try:
        raw = os.fsencode(name)
    except UnicodeEncodeError:  # a lone surrogate that is not an undecodable byte
        raw = name.encode("utf-8", "surrogatepass")
    text = raw.decode("utf-8", "surrogateescape")
    if text.isprintable() and "\\" not in text:
        return text  # the common case, and every name of ASCII letters and digits
    return "".join("\\\\" if c == "\\" else _escape(c) for c in text)


def clean(text: str) -> str:
    """Text about names (a message, a reason) made safe to show, without escaping twice.

    The same escapes as printable() for control characters, except that a
    newline stays (messages may be multi-line by design; names in them are
    escaped already) and a backslash stays (it may begin an escape made by
    printable()).
    """
    if text.isprintable():
        return text
    return "".join(c if c == "\n" or c.isprintable() else _escape(c) for c in text)


# Event fields that hold a name as it is (escaped here); the others hold text.
NAME_FIELDS = frozenset({"entry", "uploader"})


def event(kind: str, message: str, **fields: Any) -> None:
    """Record one event; `fields` become DITTOHEAD_<NAME> journal fields.

    `entry` and `uploader` are names as they are (printable() escapes them);
    the message and other fields are text, with any name in them escaped.
    """
    journal_fields = {f"DITTOHEAD_{k.upper()}": _text(v, k in NAME_FIELDS)
                      for k, v in fields.items() if v is not None}
    journal_fields["MESSAGE_ID"] = MESSAGE_IDS[kind]
    # Which program did it: across an upgrade, runs of two versions log side by side.
    journal_fields["DITTOHEAD_VERSION"] = __version__
    _emit(message, _PRIORITY[kind], journal_fields, tell_person=False)


def send(message: str, *, priority: int, message_id: str | None = None,
         tell_person: bool = False, **fields: str) -> None:
    """Send to the journal when it is there, else one line on stderr.

    tell_person: also print the message on stderr when that is not the
    journal itself (a person at a terminal must see a config error).
    """
    if message_id:
        fields["MESSAGE_ID"] = message_id
    _emit(message, priority, fields, tell_person)


def _emit(message: str, priority: int, fields: dict[str, str], tell_person: bool) -> None:
    # The last line of defence: whatever a caller forgot to escape cannot
    # move a terminal's cursor or forge a line of the log.
    message = clean(message)
    fields = {k: clean(v) for k, v in fields.items()}
    wanted = os.environ.get("DITTOHEAD_LOG")
    if wanted != "stderr" and os.path.exists(JOURNAL_SOCKET):
        entry = {"MESSAGE": message, "PRIORITY": str(priority),
                 "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER, **fields}
        try:
            from systemd import journal
        except ImportError:
            # No systemd-python (EL 9 has none for python3.11): the same
            # fields through the journal's socket; stderr if that fails.
            sent = _send_native(entry)
        else:
            journal.send(**entry)
            sent = True
        if sent:
            if tell_person and not _stderr_is_journal():
                print(f"dittohead: {message}", file=sys.stderr, flush=True)
            return
    extra = " ".join(f"{k}={_quote(v)}" for k, v in sorted(fields.items()))
    if wanted != "stderr" or not extra:
        print(f"dittohead: {message}", file=sys.stderr, flush=True)
    else:
        print(f"dittohead: {message} [{extra}]", file=sys.stderr, flush=True)


def _send_native(entry: Mapping[str, str]) -> bool:
    """Send one entry in the journal's native protocol, as sd_journal_send() does."""
    data = bytearray()
    for key, value in entry.items():
        raw = value.encode("utf-8", "surrogateescape")
        if b"\n" in raw:  # KEY, newline, 64-bit little-endian length, value
            data += key.encode() + b"\n" + len(raw).to_bytes(8, "little") + raw + b"\n"
        else:
            data += key.encode() + b"=" + raw + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(bytes(data), JOURNAL_SOCKET)
    except OSError:  # no journald listening, or too big for one datagram
        return False
    return True


def _stderr_is_journal() -> bool:
    """Whether stderr is connected to the journal (systemd sets JOURNAL_STREAM=dev:ino)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(2)
        return bool(stream) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def _text(value: Any, name: bool) -> str:
    if isinstance(value, (list, tuple)):
        return "\n".join(_text(v, name) for v in value)
    return printable(str(value)) if name else clean(str(value))


def _quote(value: str) -> str:
    if value and not any(c in value for c in " \t\n\"'\\"):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
