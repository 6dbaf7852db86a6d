"""The manifest, `<id>.sha256`: every file of an entry with its digest, in `sha256sum` format,
and the published record (`<id>.published`, `<id>.dirs`): what the delivery created.

Paths are relative to the destination, so `cd <destination> && sha256sum -c
done/<id>.sha256` verifies a delivery. Copying workers write their shares'
lines (stage.py joins them in plan order); filing moves it into done/.
"""

from __future__ import annotations

import os
import re
from binascii import hexlify
from pathlib import Path


def manifest_line(path: bytes, digest: bytes) -> bytes:
    """One line in `sha256sum` format, escaping names the way coreutils does."""
    if b"\\" in path or b"\n" in path or b"\r" in path:
        return b"\\%s  %s\n" % (hexlify(digest), _escape(path))
    return b"%s  %s\n" % (hexlify(digest), path)


def _escape(path: bytes) -> bytes:
    return path.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")


def _unescape(path: bytes) -> bytes:
    return re.sub(rb"\\(.)", lambda m: _UNESCAPES.get(m.group(1), m.group(0)), path)


_UNESCAPES = {b"\\": b"\\", b"n": b"\n", b"r": b"\r"}


def dir_line(path: bytes) -> bytes:
    """One line of a `.dirs` record: the path, escaped like a manifest's (a leading \\)."""
    if b"\\" in path or b"\n" in path or b"\r" in path:
        return b"\\%s\n" % _escape(path)
    return path + b"\n"


def parse_line(line: bytes) -> tuple[str, bytes]:
    """A manifest line's path and digest; ValueError if it is not one."""
    line = line.rstrip(b"\n")
    escaped = line.startswith(b"\\")
    digest, sep, path = line[escaped:].partition(b"  ")
    if not sep or len(digest) != 64 or not path:
        raise ValueError(f"not a manifest line: {line[:80]!r}")
    return os.fsdecode(_unescape(path) if escaped else path), bytes.fromhex(digest.decode())


def parse_dir_line(line: bytes) -> str:
    """A `.dirs` line's path."""
    line = line.rstrip(b"\n")
    if line.startswith(b"\\"):
        return os.fsdecode(_unescape(line[1:]))
    return os.fsdecode(line)


class Manifest:
    """Streams manifest lines (files delivered now or before) to a file."""

    def __init__(self, path: Path) -> None:
        self.out = open(path, "wb")  # noqa: SIM115 - closed by close()
        # One line per file, in plan order: the directory's part is encoded
        # once per directory.
        self.rel: str | None = None
        self.prefix = b""

    def add(self, rel: str, name: str, digest: bytes) -> bytes:
        """Write the file's line; return it (the published record takes it as it is)."""
        if rel != self.rel:
            self.rel = rel
            self.prefix = os.fsencode(rel) + b"/" if rel else b""
        line = manifest_line(self.prefix + os.fsencode(name), digest)
        self.out.write(line)
        return line

    def write(self, line: bytes) -> None:
        """Write a line another Manifest made."""
        self.out.write(line)

    def close(self) -> None:
        self.out.close()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def published_paths(plan_path: Path) -> tuple[Path, Path]:
    """Where an attempt spools its published record, beside its plan: the files it
    copies (`.published`, the manifest's format) and the directories it makes (`.dirs`)."""
    return plan_path.with_suffix(".published"), plan_path.with_suffix(".dirs")


def published_part(plan_path: Path, worker: int) -> Path:
    """The published-record lines of one copying worker's share (stage.py joins them)."""
    return plan_path.with_suffix(f".{worker}.published")


def install(spooled: Path, path: Path) -> None:
    """Put the manifest an attempt spooled at `path` durably (same filesystem: a rename)."""
    fd = os.open(spooled, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fchmod(fd, 0o640)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(spooled, path)
