"""Structured events for the journal, the audit log of every delivery.

Each kind of event has a fixed MESSAGE_ID, explained in the shipped catalog
(units/dittohead.catalog), so `journalctl MESSAGE_ID=... DITTOHEAD_STUDY=...`
finds them. Without a journal socket (a container, a host without systemd)
the message goes to stderr as a plain sentence; DITTOHEAD_LOG=stderr sends
every event there instead of the journal, as one line ending in its
KEY=value fields (for tests and scripts).
"""

from __future__ import annotations

import os
import sys
import syslog
from collections.abc import Mapping
from typing import Any

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
}

_PRIORITY = {
    "delivered": syslog.LOG_NOTICE,
    "failed": syslog.LOG_ERR,
    "rejected": syslog.LOG_WARNING,
    "retry-later": syslog.LOG_WARNING,
    "disk-warning": syslog.LOG_WARNING,
    "config-error": syslog.LOG_ERR,
    "unit-failed": syslog.LOG_ERR,
}

JOURNAL_SOCKET = "/run/systemd/journal/socket"


def printable(name: str) -> str:
    """A file name as text for humans and JSON: undecodable bytes become \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace").replace("\n", "\\n")


def event(kind: str, message: str, **fields: Any) -> None:
    """Record one event; `fields` become DITTOHEAD_<NAME> journal fields."""
    journal_fields = {f"DITTOHEAD_{k.upper()}": _text(v) for k, v in fields.items()
                      if v is not None}
    journal_fields["MESSAGE_ID"] = MESSAGE_IDS[kind]
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
    wanted = os.environ.get("DITTOHEAD_LOG")
    if wanted != "stderr" and os.path.exists(JOURNAL_SOCKET):
        try:
            from systemd import journal
        except ImportError:  # pragma: no cover - a broken install still logs
            pass
        else:
            journal.send(message, PRIORITY=str(priority),
                         SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER, **fields)
            if tell_person and not _stderr_is_journal():
                print(f"dittohead: {message}", file=sys.stderr, flush=True)
            return
    extra = " ".join(f"{k}={_quote(v)}" for k, v in sorted(fields.items()))
    if wanted != "stderr" or not extra:
        print(f"dittohead: {message}", file=sys.stderr, flush=True)
    else:
        print(f"dittohead: {message} [{extra}]", file=sys.stderr, flush=True)


def _stderr_is_journal() -> bool:
    """Whether stderr is connected to the journal (systemd sets JOURNAL_STREAM=dev:ino)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(2)
        return bool(stream) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "\n".join(printable(str(v)) for v in value)
    return printable(str(value))


def _quote(value: str) -> str:
    if value and not any(c in value for c in " \t\n\"'\\"):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
