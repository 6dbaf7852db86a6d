"""Filesystem and process operations the standard library lacks or several stages share."""

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


def rename_noreplace(src: Path | str, dst: Path | str, src_dir_fd: int = AT_FDCWD,
                     dst_dir_fd: int = AT_FDCWD) -> None:
    """renameat2(RENAME_NOREPLACE): fails with EEXIST instead of replacing dst.

    Filesystems without the flag (NFS, some FUSE) fail with EINVAL.
    """
    if _libc.renameat2(src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst),
                       RENAME_NOREPLACE) != 0:
        _raise_errno(os.fsdecode(dst))


_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this forked process when its parent (pid before fork) dies."""
    if _libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0) != 0:
        _raise_errno()
    # The parent's pid as it was before fork(): asked only here, getppid()
    # would already name the reaper had the parent died in between.
    if os.getppid() != parent:  # it died before the prctl
        os._exit(1)


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


def used_percent(st: os.statvfs_result) -> float:
    """Used space as df shows it: against what ordinary users can have, not the raw size."""
    used = st.f_blocks - st.f_bfree
    total = used + st.f_bavail
    return 100.0 * used / total if total else 0.0


def is_enospc(e: OSError) -> bool:
    """True for the errors that mean 'the filesystem is full'."""
    return e.errno in (errno.ENOSPC, errno.EDQUOT)
