"""Filesystem operations the standard library lacks or that several stages share."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1


def _raise_errno(filename: str | None = None) -> None:
    e = ctypes.get_errno()
    raise OSError(e, os.strerror(e), filename)


def syncfs(fd: int) -> None:
    """Flush the whole filesystem holding fd: one sync per entry, not per file."""
    if _libc.syncfs(fd) != 0:
        _raise_errno()


def rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails with EEXIST instead of replacing dst."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst),
                       RENAME_NOREPLACE) != 0:
        _raise_errno(str(dst))


def write_atomic(path: Path, data: bytes, mode: int = 0o640) -> None:
    """Write, fsync and rename into place: a reader sees the old file or the whole new one."""
    tmp = path.with_name("." + path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def is_enospc(e: OSError) -> bool:
    """True for the errors that mean 'the filesystem is full'."""
    return e.errno in (errno.ENOSPC, errno.EDQUOT)
