"""Which rsync this machine has: both ends of `upload --host` ask, at start-up."""

from __future__ import annotations

import re
import subprocess

_VERSION = re.compile(r"version (\S+)")


class RsyncProbe:
    """`rsync --version`, started as soon as made; version() waits for its answer, so
    the question costs nothing while the caller does other work."""

    def __init__(self) -> None:
        try:
            self._p: subprocess.Popen[str] | None = subprocess.Popen(
                ["rsync", "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self._p = None  # no rsync on PATH

    def version(self) -> str | None:
        """Its version ("3.2.7"), None without an rsync."""
        if self._p is None:
            return None
        try:
            out, _ = self._p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self._p.kill()
            return None
        m = _VERSION.search(out.split("\n", 1)[0])
        return m.group(1) if self._p.returncode == 0 and m else None


def is_rsync3(version: str | None) -> bool:
    """Whether a version (or `rsync --version`'s first line) is rsync 3 or newer:
    --protect-args passes any name verbatim."""
    m = re.search(r"(\d+)\.\d", version or "")
    return m is not None and int(m.group(1)) >= 3
