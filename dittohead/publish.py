"""Publish staged files under their final names, never replacing anything.

Order, and why:
1. syncfs, while every staged file is re-read and checked against the
   manifest (the two overlap: one waits on the disk, the other on the CPU).
   The data is durable and verified before any final name points at it, so
   even a power cut never leaves a partial file under a final name.
2. mkdir the missing directories, link() each staged inode to its final name.
   link() fails with EEXIST instead of replacing: a file that appeared since
   the check is a conflict, and everything this delivery published is rolled
   back (only names whose inode is still ours are removed).
3. Each final name is checked to be the verified inode, syncfs again (now
   only metadata), and the destination checked to be still where it was
   configured; then the staging directory goes.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable

from .check import DIR_FLAGS, LIST_MAX, DirCache, hash_at, join
from .errors import EntryFailed, TemporaryError
from .faults import point
from .fsops import is_enospc, syncfs
from .log import printable
from .plan import COPIED, CREATED, EXISTS, Plan, State
from .stage import Ownership, Staging, bucket


def publish(plan: Plan, staging: Staging, owner: Ownership) -> None:
    """Verify and sync the staged files, then give them their final names (all or nothing)."""
    bad = _in_parallel_with_sync(staging.fd, lambda: verify(plan, staging))
    if bad:
        raise EntryFailed("the staged copy of " + ", ".join(printable(b) for b in bad)
                          + " did not match the manifest (changed while it was being "
                          "delivered?); nothing of this entry was delivered.")
    point("synced")
    try:
        with plan.state() as state:
            _make_dirs(plan, state, staging.dest_fd, owner)
            linked = 0
            with DirCache(staging.dest_fd) as dest, DirCache(staging.fd) as buckets:
                for d, f in plan.iter_files():
                    if not state.flags(f.index) & COPIED:
                        continue
                    try:
                        os.link(str(f.index), f.name, src_dir_fd=buckets.dir_fd(bucket(d)),
                                dst_dir_fd=dest.dir_fd(d.rel), follow_symlinks=False)
                    except FileExistsError:
                        raise EntryFailed(
                            f"{printable(join(d.rel, f.name))} appeared in the destination "
                            "during the delivery (never overwritten); nothing of this entry "
                            "was delivered.") from None
                    linked += 1
                    point(f"published:{linked}")
                # Linking changed the directories' mtimes: set them now. A child's
                # utime does not touch its parent, so walk order is fine.
                for dp in plan.iter_dirs():
                    if state.flags(dp.index) & CREATED:
                        os.utime(dest.dir_fd(dp.rel), ns=(dp.atime_ns, dp.mtime_ns))
    except BaseException as e:
        rollback(plan, staging)
        if isinstance(e, OSError):
            raise _classify(e, "publishing") from e
        raise


def finish(plan: Plan, staging: Staging) -> None:
    """Check every final name is its verified inode, sync the names; roll back if not."""
    wrong = _in_parallel_with_sync(staging.dest_fd, lambda: _check_links(plan, staging))
    moved = _destination_moved(staging)
    if wrong or moved:
        rollback(plan, staging)
        if moved:
            raise TemporaryError(moved)
        raise EntryFailed("the published name of " + ", ".join(printable(b) for b in wrong)
                          + " does not lead to the verified copy; nothing of this entry was"
                          " delivered.")


def _in_parallel_with_sync(fd: int, work: Callable[[], list[str]]) -> list[str]:
    """Run work() while syncfs(fd) runs on a second thread; raise what the sync raised."""
    errors: list[OSError] = []

    def sync() -> None:
        try:
            syncfs(fd)
        except OSError as e:
            errors.append(e)

    syncer = threading.Thread(target=sync, name="syncfs")
    syncer.start()
    try:
        result = work()
    finally:
        syncer.join()
    if errors:
        raise _classify(errors[0], "syncing")
    return result


def _check_links(plan: Plan, staging: Staging) -> list[str]:
    wrong: list[str] = []
    with plan.state() as state, DirCache(staging.dest_fd) as dest, \
            DirCache(staging.fd) as buckets:
        for d, f in plan.iter_files():
            if not state.flags(f.index) & COPIED:
                continue
            ours = os.stat(str(f.index), dir_fd=buckets.dir_fd(bucket(d)),
                           follow_symlinks=False)
            there = os.stat(f.name, dir_fd=dest.dir_fd(d.rel), follow_symlinks=False)
            if (there.st_ino, there.st_dev) != (ours.st_ino, ours.st_dev) \
                    and len(wrong) < LIST_MAX:
                wrong.append(join(d.rel, f.name))
    return wrong


def _destination_moved(staging: Staging) -> str | None:
    """Why the configured destination no longer leads to where we delivered, if so.

    Everything here works on file descriptors, so a destination unmounted
    (even lazily) or renamed during the delivery would silently receive the
    data somewhere no one looks: checked before the delivery is called done.
    """
    here = os.fstat(staging.dest_fd)
    try:
        there = os.stat(staging.destination)
    except OSError as e:
        return (f"the destination {staging.destination} went away during the delivery "
                f"({e.strerror}); rolled back, will retry")
    if (here.st_dev, here.st_ino) != (there.st_dev, there.st_ino):
        return (f"the destination {staging.destination} was unmounted or replaced during "
                "the delivery; rolled back, will retry")
    return None


def verify(plan: Plan, staging: Staging) -> list[str]:
    """Re-read each staged file and check it against the manifest; list mismatches."""
    bad: list[str] = []
    with plan.state() as state, DirCache(staging.fd) as buckets:
        for d, f in plan.iter_files():
            if not state.flags(f.index) & COPIED:
                continue
            if hash_at(buckets.dir_fd(bucket(d)), str(f.index), f.size) \
                    != state.digest(f.index) and len(bad) < LIST_MAX:
                bad.append(join(d.rel, f.name))
    return bad


def rollback(plan: Plan, staging: Staging) -> None:
    """Remove what this delivery published: only names still linked to our staged inodes."""
    with plan.state() as state, DirCache(staging.dest_fd) as dest, \
            DirCache(staging.fd) as buckets:
        for d, f in plan.iter_files():
            if not state.flags(f.index) & COPIED:
                continue
            try:
                ours = os.stat(str(f.index), dir_fd=buckets.dir_fd(bucket(d)),
                               follow_symlinks=False)
                dfd = dest.dir_fd(d.rel)
                there = os.stat(f.name, dir_fd=dfd, follow_symlinks=False)
                if (there.st_ino, there.st_dev) == (ours.st_ino, ours.st_dev):
                    os.unlink(f.name, dir_fd=dfd)
            except OSError:
                pass  # not published, or its directory is gone
        created = [dp.rel for dp in plan.iter_dirs() if state.flags(dp.index) & CREATED]
    for rel in reversed(created):  # children first
        try:
            os.rmdir(rel, dir_fd=staging.dest_fd)
        except OSError:
            pass  # not empty: someone else put something there; it stays


def _make_dirs(plan: Plan, state: State, dest_fd: int, owner: Ownership) -> None:
    with DirCache(dest_fd) as dest:
        for d in plan.iter_dirs():
            if not d.rel or state.flags(d.index) & EXISTS:
                continue
            parent, _, name = d.rel.rpartition("/")
            pfd = dest.dir_fd(parent)
            try:
                # The final permission bits at once (a setgid parent adds S_ISGID).
                os.mkdir(name, owner.dir_mode & 0o777, dir_fd=pfd)
            except FileExistsError:
                # Made by someone else since the check; fine if it is a real directory.
                os.close(os.open(name, DIR_FLAGS, dir_fd=pfd))
                continue
            state.add_flag(d.index, CREATED)
            fd = os.open(name, DIR_FLAGS, dir_fd=pfd)
            try:
                owner.apply(fd, owner.dir_mode)
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
    return e
