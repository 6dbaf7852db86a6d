"""Publish staged files under their final names, never replacing anything.

Order, and why:
1. syncfs: the staged data is durable before any final name points at it,
   so even a power cut never leaves a partial file under a final name.
2. mkdir the missing directories, link() each staged inode to its final name.
   link() fails with EEXIST instead of replacing: a file that appeared since
   the check is a conflict, and everything this delivery published is rolled
   back (only names whose inode is still ours are removed).
3. syncfs again (now only metadata), while the published files are re-read
   and checked against the manifest; then the staging directory goes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from dataclasses import dataclass, field

from .check import DIR_FLAGS, FILE_FLAGS, Plan, hash_fd, join
from .claim import is_enospc
from .errors import EntryFailed, TemporaryError
from .faults import point
from .log import printable
from .stage import Ownership, Staging

_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(fd: int) -> None:
    """Flush the whole filesystem holding fd: one sync per entry, not per file."""
    if _libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@dataclass
class Published:
    """What one delivery added to the destination, so it can be rolled back."""

    created_dirs: list[str] = field(default_factory=list)  # parents first
    links: list[tuple[str, str, int]] = field(default_factory=list)  # (dir rel, name, ino)


def publish(plan: Plan, staging: Staging, owner: Ownership) -> Published:
    """Make the staged files visible under their final names (all or nothing)."""
    syncfs(staging.fd)
    point("synced")
    done = Published()
    try:
        _make_dirs(plan, staging.dest_fd, owner, done)
        current: tuple[str, int] | None = None
        for d, f, staged, ino in staging.staged:
            if current is None or current[0] != d.rel:
                if current is not None:
                    os.close(current[1])
                current = (d.rel, _open_dir(staging.dest_fd, d.rel))
            try:
                os.link(staged, f.name, src_dir_fd=staging.fd, dst_dir_fd=current[1],
                        follow_symlinks=False)
            except FileExistsError:
                raise EntryFailed(
                    f"{printable(join(d.rel, f.name))} appeared in the destination during "
                    "the delivery (never overwritten); nothing of this entry was "
                    "delivered.") from None
            done.links.append((d.rel, f.name, ino))
            point(f"published:{len(done.links)}")
        if current is not None:
            os.close(current[1])
        _set_dir_times(plan, staging.dest_fd, done)
    except BaseException as e:
        rollback(staging.dest_fd, done)
        if isinstance(e, OSError):
            raise _classify(e, "publishing") from e
        raise
    return done


def finish(plan: Plan, staging: Staging, done: Published) -> None:
    """Sync the new names and verify every copied file; roll back on a mismatch."""
    errors: list[BaseException] = []

    def sync() -> None:
        try:
            syncfs(staging.dest_fd)
        except OSError as e:
            errors.append(e)

    syncer = threading.Thread(target=sync, name="syncfs")
    syncer.start()
    try:
        bad = verify(plan, staging)
    finally:
        syncer.join()
    if errors or bad:
        rollback(staging.dest_fd, done)
        if errors:
            assert isinstance(errors[0], OSError)
            raise _classify(errors[0], "syncing")
        raise EntryFailed("the published copy of " + ", ".join(printable(b) for b in bad[:20])
                          + " did not match the manifest (changed while it was being "
                          "delivered?); nothing of this entry was delivered.")


def verify(plan: Plan, staging: Staging) -> list[str]:
    """Re-read each file this delivery copied, by its final name; list mismatches."""
    bad = []
    current: tuple[str, int] | None = None
    try:
        for d, f, _staged, _ino in staging.staged:
            if current is None or current[0] != d.rel:
                if current is not None:
                    os.close(current[1])
                current = (d.rel, _open_dir(staging.dest_fd, d.rel))
            fd = os.open(f.name, FILE_FLAGS, dir_fd=current[1])
            try:
                if hash_fd(fd) != f.sha256:
                    bad.append(join(d.rel, f.name))
            finally:
                os.close(fd)
    finally:
        if current is not None:
            os.close(current[1])
    return bad


def rollback(dest_fd: int, done: Published) -> None:
    """Remove what this delivery published: only names still pointing at our inodes."""
    for rel, name, ino in reversed(done.links):
        try:
            dfd = _open_dir(dest_fd, rel)
        except OSError:
            continue
        try:
            if os.stat(name, dir_fd=dfd, follow_symlinks=False).st_ino == ino:
                os.unlink(name, dir_fd=dfd)
        except OSError:
            pass
        finally:
            os.close(dfd)
    for rel in reversed(done.created_dirs):
        try:
            os.rmdir(rel, dir_fd=dest_fd)
        except OSError:
            pass  # not empty: someone else put something there; it stays
    done.links.clear()
    done.created_dirs.clear()


def _open_dir(dest_fd: int, rel: str) -> int:
    fd = os.dup(dest_fd)
    for part in rel.split("/") if rel else ():
        try:
            nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nfd
    return fd


def _make_dirs(plan: Plan, dest_fd: int, owner: Ownership, done: Published) -> None:
    for d in plan.dirs:
        if d.exists or not d.rel:
            continue
        parent, _, name = d.rel.rpartition("/")
        pfd = _open_dir(dest_fd, parent)
        try:
            try:
                # The final permission bits right away (a setgid parent adds S_ISGID).
                os.mkdir(name, owner.dir_mode & 0o777, dir_fd=pfd)
            except FileExistsError:
                # Made by someone else since the check; fine if it is a real directory.
                os.close(os.open(name, DIR_FLAGS, dir_fd=pfd))
                continue
            done.created_dirs.append(d.rel)
            fd = os.open(name, DIR_FLAGS, dir_fd=pfd)
            try:
                owner.apply(fd, owner.dir_mode)
            finally:
                os.close(fd)
        finally:
            os.close(pfd)


def _set_dir_times(plan: Plan, dest_fd: int, done: Published) -> None:
    created = set(done.created_dirs)
    # Deepest first: setting a child's times does not touch its parent's mtime,
    # but linking into it did, so this runs after every link.
    for d in sorted((d for d in plan.dirs if d.rel in created), key=lambda d: -d.rel.count("/")):
        fd = _open_dir(dest_fd, d.rel)
        try:
            os.utime(fd, ns=(d.atime_ns, d.mtime_ns))
        finally:
            os.close(fd)


def _classify(e: OSError, doing: str) -> Exception:
    if is_enospc(e):
        return TemporaryError(f"the destination filled up while {doing}; rolled back, "
                              "will retry")
    if e.errno in (errno.ENOENT, errno.ESTALE, errno.EIO, errno.ENOTCONN, errno.ENODEV):
        return TemporaryError(f"the destination went away while {doing} ({e.strerror}); "
                              "rolled back, will retry")
    if e.errno in (errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ):
        return EntryFailed(f"the destination's filesystem refused a name ({e.strerror}: "
                           f"{printable(str(e.filename or ''))}); nothing of this entry was "
                           "delivered.")
    if e.errno == errno.EPERM:
        return TemporaryError(f"not permitted while {doing} ({e.strerror}); does the "
                              "service have CAP_CHOWN for the study group?")
    return e
