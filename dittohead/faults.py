"""Fault injection for the crash-safety tests: a no-op unless DITTOHEAD_TEST_FAULT is set.

`DITTOHEAD_TEST_FAULT=<point>` SIGKILLs the process when it reaches that
point; `<point>=wait:<file>` instead waits until <file> exists (so a test can
fill a disk at a chosen moment). Points are named where `point()` is called:
chowned, claimed, taking:REL (a directory of the entry, between its fstat and its
takeover), checked, staged:N, synced, published:N, verified, receipt, filed,
mailing and mail-queued (notify.py, around queueing a mail); and in `undo`:
unpublished:N, undo-recorded, undo-moved.
`DITTOHEAD_TEST_FAULT=no-lease` makes the copy act as on a filesystem
without leases (NFS), so the timestamp checks alone can be tested.
"""

from __future__ import annotations

import os
import signal
import time

_WANT = os.environ.get("DITTOHEAD_TEST_FAULT")  # read once: point() runs once per file


def enabled() -> bool:
    """True when a test asked for a fault (some speed-ups step aside then)."""
    return bool(_WANT)


def no_leases() -> bool:
    """True when a test asks the copy to act as on a filesystem without leases."""
    return _WANT == "no-lease"


def point(name: str) -> None:
    """Crash or wait here if the test environment asks for it."""
    want = _WANT
    if not want:
        return
    where, _, action = want.partition("=")
    if where != name:
        return
    if action.startswith("wait:"):
        path = action[len("wait:"):]
        while not os.path.exists(path):
            time.sleep(0.02)
        return
    os.kill(os.getpid(), signal.SIGKILL)
