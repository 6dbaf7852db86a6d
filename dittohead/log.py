"""Structured events for the journal, the audit log of every delivery.

Each kind of event has a fixed MESSAGE_ID, explained in the shipped catalog
(units/dittohead.catalog), so `journalctl MESSAGE_ID=... DITTOHEAD_STUDY=...`
finds them. Without a journal socket (a test, a container, a demo without
systemd) the same event goes to stderr as one line of KEY=value pairs.
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
    send(message, priority=_PRIORITY[kind], message_id=MESSAGE_IDS[kind], **journal_fields)


def send(message: str, *, priority: int, message_id: str | None = None,
         **fields: str) -> None:
    """Send to the journal when it is there, else one line on stderr."""
    if message_id:
        fields["MESSAGE_ID"] = message_id
    if os.environ.get("DITTOHEAD_LOG") != "stderr" and os.path.exists(JOURNAL_SOCKET):
        try:
            from systemd import journal
        except ImportError:  # pragma: no cover - a broken install still logs
            pass
        else:
            journal.send(message, PRIORITY=str(priority),
                         SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER, **fields)
            return
    extra = " ".join(f"{k}={_quote(v)}" for k, v in sorted(fields.items()))
    print(f"dittohead: {message}" + (f" [{extra}]" if extra else ""), file=sys.stderr,
          flush=True)


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "\n".join(printable(str(v)) for v in value)
    return printable(str(value))


def _quote(value: str) -> str:
    if value and not any(c in value for c in " \t\n\"'\\"):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
