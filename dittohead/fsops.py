"""File-descriptor-level operations the standard library lacks or several stages share.

Every pass over an entry or a destination works below directory file
descriptors opened O_NOFOLLOW (DirCache), so a symlink swapped in after a
check can never be followed (docs/design.md).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import pwd
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import __version__

CHUNK = 1 << 20  # bytes per read and write of file data
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in for a checked file cannot hang the open.
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK

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


# Errors of the storage itself, not of an entry: kept claimed, exit 74.
STORAGE_ERRNOS = frozenset({errno.EIO, errno.EROFS, errno.EUCLEAN})


@contextmanager
def storage_errors_ignored() -> Iterator[None]:
    """For tidying after a failed storage was reported: its error is not raised again."""
    try:
        yield
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:
            raise


def join(rel: str, name: str) -> str:
    """rel/name, or name alone at the top ("")."""
    return f"{rel}/{name}" if rel else name


# The user database files the unit binds into its sandbox (units/dittohead@.service).
USER_DATABASE = ("/etc/passwd", "/etc/group")


def user_database_replaced() -> bool:
    """Whether /etc/passwd or /etc/group was replaced since this process's sandbox was made.

    The unit binds these files, so a run sees the inodes they had when it
    started; useradd and groupadd replace a file by rename, which leaves the
    bound inode with no name (st_nlink 0). Such a run would not know a user
    added since: whom an entry belongs to, or whether they may upload.
    """
    for path in USER_DATABASE:
        try:
            if os.stat(path).st_nlink == 0:
                return True
        except OSError:
            continue
    return False


# The installed program as this process loaded it. Every upgrade (dpkg, rpm,
# `make install`) puts a new __init__.py in place, a new inode with a new mtime;
# the unit binds the program's directory, so a run sees it change.
_PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__init__.py")


def _program_key() -> tuple[int, ...]:
    try:
        st = os.stat(_PROGRAM)
    except OSError:  # removed: changed too
        return ()
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


_PROGRAM_LOADED = _program_key()


def program_replaced() -> bool:
    """Whether the installed program was upgraded (or removed) since this process started."""
    return _program_key() != _PROGRAM_LOADED


def outdated_run() -> str:
    """Why this run must claim nothing more, if it must: it runs with the users,
    groups and program it started with, and the next run gets the current ones."""
    if user_database_replaced():
        return "the user database changed (a user or group was added or changed)"
    if program_replaced():
        return f"dittohead {__version__} was upgraded or reinstalled"
    return ""


def user_name(uid: int) -> str:
    """The user's name, or the numeric uid when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def hash_fd(fd: int, size_hint: int = CHUNK) -> bytes:
    """sha256 of everything readable from fd."""
    h = hashlib.sha256()
    buf = bytearray(min(size_hint + 4096, CHUNK))
    view = memoryview(buf)
    while n := os.readv(fd, [buf]):
        h.update(view[:n])
        if n < len(buf):
            break  # a short read of a regular file is its end: no read() just for EOF
    return h.digest()


def hash_at(dir_fd: int, name: str, size_hint: int = CHUNK) -> bytes:
    """sha256 of the file `name` below dir_fd, opened without following a symlink."""
    fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
    try:
        return hash_fd(fd, size_hint)
    finally:
        os.close(fd)


class DirCache:
    """Opens directories below a root by walking with O_NOFOLLOW; keeps the last one open.

    Passes stream the plan parents first, so a cache of one avoids re-opening
    while never risking the fd limit.
    """

    def __init__(self, root_fd: int, top: str | None = None) -> None:
        self.root_fd = root_fd
        self.top = top  # a first component below root (the claim id), if any
        self.rel: str | None = None
        self.fd = -1

    def dir_fd(self, rel: str) -> int:
        """An fd on root/top/rel, valid until the next call or close()."""
        if self.rel == rel:
            return self.fd
        self.close()
        fd = os.dup(self.root_fd)
        try:
            parts = ([self.top] if self.top else []) + (rel.split("/") if rel else [])
            for part in parts:
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        self.rel, self.fd = rel, fd
        return fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.rel, self.fd = None, -1

    def __enter__(self) -> DirCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Source(DirCache):
    """A claimed entry's directories below processing/ (a plain-file entry is processing/<id>)."""

    def __init__(self, processing: Path, claim_id: str, plain_file: bool) -> None:
        self.proc_fd = os.open(processing, DIR_FLAGS)
        super().__init__(self.proc_fd, None if plain_file else claim_id)

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self.proc_fd >= 0:
            os.close(self.proc_fd)
            self.proc_fd = -1
