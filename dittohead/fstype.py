"""The filesystem a destination is on, and the kinds deliveries refuse (docs/design.md,
"Network filesystems"; the measurements: docs/field-notes.md, "sshfs").

Looked up by path in /proc/self/mountinfo, never by opening the destination: a
mount whose server went away answers every access with ENOTCONN, and a FUSE
mount made without allow_other answers the service with EACCES, yet both are
still listed with their type.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import ConfigError
from .settings import StudyConfig

MOUNTINFO = "/proc/self/mountinfo"

# Filesystem types a delivery cannot be made safe on, and why (measured).
REFUSED = {
    "fuse.sshfs": "sshfs has no RENAME_NOREPLACE, shows a hard link as another inode and "
                  "keeps whole seconds of a time only, so a published name cannot be told to "
                  "be the verified copy and a failed delivery could not be rolled back; and "
                  "syncfs() never reaches the server",
}


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo: where, what type, of what."""

    point: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse(text: str) -> list[Mount]:
    """The mounts of a mountinfo text, in its order (a later one may cover an earlier)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        if "-" not in fields[6:]:
            continue  # not a mountinfo line
        sep = fields.index("-", 6)
        mounts.append(Mount(_unescape(fields[4]), fields[sep + 1],
                            _unescape(fields[sep + 2]) if len(fields) > sep + 2 else ""))
    return mounts


def mount_of(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount that holds path: the deepest mount point above it, the last one listed."""
    best: Mount | None = None
    for m in mounts:
        top = m.point.rstrip("/")
        if (path == m.point or path.startswith(top + "/")) and \
                (best is None or len(m.point) >= len(best.point)):
            best = m
    return best


def refused(study: StudyConfig) -> str | None:
    """Why the study's destination is on a filesystem deliveries refuse, or None."""
    try:
        with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError:
        return None  # no /proc: the delivery's own checks still apply
    # realpath: a parent may be a symlink (the destination itself never is).
    m = mount_of(os.path.realpath(study.destination), parse(text))
    if m is None or m.fstype not in REFUSED:
        return None
    return (f"the destination {study.destination} is on {m.fstype} (mounted on {m.point} "
            f"from {m.source}), which deliveries refuse: {REFUSED[m.fstype]}. Nothing was "
            "delivered; entries wait: put the destination on a local filesystem or NFS "
            "(docs/contract.md, Installing)")


def check(study: StudyConfig) -> None:
    """Raise ConfigError (exit 78) when the destination is on a refused filesystem."""
    why = refused(study)
    if why is not None:
        raise ConfigError(why)
