"""Publish a staged entry under its final names, all or nothing, never replacing anything.

syncfs, then renameat2(RENAME_NOREPLACE) each staged new directory and each
file of an existing one (link() or mkdir + rename where the flag is missing),
then every final name checked to be the staged inode while the names are
synced, and the destination checked to be still where it is configured.
publish() is the one owner of undo: on any failure it removes what it
published before the error goes up. docs/design.md, "Publish".
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from .errors import DittoheadError, EntryFailed, NoSpace, TemporaryError
from .faults import point
from .findings import LIST_MAX
from .fsops import DirCache, is_enospc, join, rename_noreplace, syncfs
from .log import printable
from .plan import COPIED, CREATED, DirPlan, FilePlan, Plan, State, killed_plans
from .stage import Staging


def publish(plan: Plan, staging: Staging) -> None:
    """Sync the staged files, give them their final names, check and sync those names.

    All or nothing: on any failure, whatever this call published is removed
    again (rolled back) before the error is raised.
    """
    try:
        syncfs(staging.fd)
    except OSError as e:
        _raise_classified(e, "syncing")
    point("synced")
    try:
        with plan.state() as state:
            _publish(plan, state, staging)
        _finish(plan, staging)
    except BaseException as e:
        _rollback(plan, staging)
        if isinstance(e, OSError):
            _raise_classified(e, "publishing")
        raise


_Mover = Callable[[str, str, int, int], None]


def _publish(plan: Plan, state: State, staging: Staging) -> None:
    move_file: _Mover = rename_noreplace
    move_dir: _Mover = rename_noreplace
    published = 0
    with DirCache(staging.dest_fd) as dest, DirCache(staging.fd) as staged:
        d: DirPlan | None = None
        for r in plan.placed(state):
            if isinstance(r, DirPlan):
                d = r
                if d.root:
                    parent, _, name = d.rel.rpartition("/")
                    try:
                        move_dir = _move(move_dir, _mkdir_rename, d.staged, name,
                                         staging.fd, dest.dir_fd(parent))
                    except FileExistsError:
                        raise TemporaryError(
                            f"{printable(d.rel)}/ appeared in the destination during the "
                            "delivery; rolled back, will retry (and merge into it)") from None
                    published += 1
                    point(f"published:{published}")
                if d.new:
                    state.add_flag(d.index, CREATED)
                continue
            if d is None or d.new or not isinstance(r, FilePlan) \
                    or not state.flags(r.index) & COPIED:
                continue  # went with its directory, or not copied by this delivery
            try:
                move_file = _move(move_file, _link, d.staged_name(r), r.name,
                                  staged.dir_fd(d.staged), dest.dir_fd(d.rel))
            except FileExistsError:
                raise EntryFailed(
                    f"{printable(join(d.rel, r.name))} appeared in the destination during "
                    "the delivery (never overwritten); nothing of this entry was "
                    "delivered.") from None
            published += 1
            point(f"published:{published}")
        # Publishing changed the new directories' mtimes: set them now. A
        # child's utime does not touch its parent, so walk order is fine.
        for dp in plan.iter_dirs():
            if state.flags(dp.index) & CREATED:
                os.utime(dest.dir_fd(dp.rel), ns=(dp.atime_ns, dp.mtime_ns))


def _move(move: _Mover, fallback: _Mover, src: str, dst: str, src_fd: int,
          dst_fd: int) -> _Mover:
    """move(); where the filesystem lacks RENAME_NOREPLACE, fallback(). Returns what worked."""
    try:
        move(src, dst, src_fd, dst_fd)
        return move
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS) or move is fallback:
            raise
    fallback(src, dst, src_fd, dst_fd)
    return fallback


def _link(src: str, dst: str, src_fd: int, dst_fd: int) -> None:
    # The staged name stays; it goes with the staging directory.
    os.link(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)


def _mkdir_rename(src: str, dst: str, src_fd: int, dst_fd: int) -> None:
    # mkdir fails if anything has the name; rename(2) then replaces only that
    # empty directory of ours (a non-empty one fails with ENOTEMPTY).
    os.mkdir(dst, 0o700, dir_fd=dst_fd)
    os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)


def _finish(plan: Plan, staging: Staging) -> None:
    """Check every final name is its staged inode while syncing the names."""
    wrong = _in_parallel_with_sync(staging.dest_fd, lambda: _check_names(plan, staging))
    moved = _destination_moved(staging)
    if moved:
        raise TemporaryError(moved)
    if wrong:
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
        _raise_classified(errors[0], "syncing")
    return result


def _check_names(plan: Plan, staging: Staging) -> list[str]:
    # A new directory is checked as a whole (it is the staged inode, so every
    # name in it is the one staged in a 0700 directory nobody else could
    # enter); a file published into an existing directory, one by one.
    wrong: list[str] = []
    with plan.state() as state, DirCache(staging.dest_fd) as dest:
        d: DirPlan | None = None
        for r in plan.placed(state):
            if isinstance(r, FilePlan):
                if d is not None and not d.new and state.flags(r.index) & COPIED \
                        and not _is_our_file(d, r, state, dest):
                    wrong.append(join(d.rel, r.name))
            elif isinstance(r, DirPlan):
                d = r
                if d.root and not _is_our_dir(d, state, dest):
                    wrong.append(d.rel + "/")
    return wrong[:LIST_MAX]


def _is_our_dir(d: DirPlan, state: State, dest: DirCache) -> bool:
    parent, _, name = d.rel.rpartition("/")
    try:
        st = os.stat(name, dir_fd=dest.dir_fd(parent), follow_symlinks=False)
    except FileNotFoundError:
        return False
    return st.st_ino == state.inode(d.index)


def _is_our_file(d: DirPlan, f: FilePlan, state: State, dest: DirCache) -> bool:
    try:
        st = os.stat(f.name, dir_fd=dest.dir_fd(d.rel), follow_symlinks=False)
    except FileNotFoundError:
        return False
    # An inode number alone could be reused once ours is freed (renamed over);
    # with the size and the nanosecond mtime we gave it, that cannot pass by
    # chance. st_dev is not compared: overlayfs reports a file's st_dev from
    # its layer but a directory's from the overlay, and publishing renamed
    # within one filesystem anyway (a rename cannot cross one).
    return (st.st_ino == state.inode(f.index)
            and st.st_size == f.size and st.st_mtime_ns == f.mtime_ns)


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


def undo_killed(processing: Path, claim_id: str, dest_fd: int) -> None:
    """Remove what killed attempts at this claim published (their kept plans, plan.py)."""
    for path in killed_plans(processing, claim_id):
        if path.with_suffix(".state").exists():  # else nothing says which inodes were its
            _undo(Plan(claim_id=claim_id, uploader_uid=-1, uploader="", path=path), dest_fd)


def _rollback(plan: Plan, staging: Staging) -> None:
    _undo(plan, staging.dest_fd)


def _undo(plan: Plan, dest_fd: int) -> None:
    """Remove what a delivery published: only names that still lead to its staged inodes."""
    with plan.state() as state, DirCache(dest_fd) as dest:
        for d, f in plan.iter_files():
            if not state.flags(f.index) & COPIED:
                continue
            try:
                if _is_our_file(d, f, state, dest):
                    os.unlink(f.name, dir_fd=dest.dir_fd(d.rel))
            except OSError:
                pass  # not published, or its directory is gone
        created = _created_dirs(plan, state, dest)
    for rel in reversed(created):  # children first
        try:
            os.rmdir(rel, dir_fd=dest_fd)
        except OSError:
            pass  # not empty: someone else put something there; it stays


def _created_dirs(plan: Plan, state: State, dest: DirCache) -> list[str]:
    """The new directories a delivery published, parents first.

    CREATED is set once a new directory is published; a kill right after the
    rename of its subtree's root leaves it unset, so a root whose name leads to
    the inode we staged counts too, with everything new below it.
    """
    created = []
    ours = False  # the current new subtree's root is the one we staged
    for r in plan.placed(state):
        if isinstance(r, DirPlan):
            if r.root:
                ours = _is_our_dir(r, state, dest)
            if r.new and (ours or state.flags(r.index) & CREATED):
                created.append(r.rel)
    return created


def _raise_classified(e: OSError, doing: str) -> NoReturn:
    """Raise what e means for the entry (retry later, or fail it); e itself if nothing known."""
    known = _classify(e, doing)
    if known is None:
        raise e
    raise known from e


def _classify(e: OSError, doing: str) -> DittoheadError | None:
    if is_enospc(e):
        return NoSpace(f"the destination filled up while {doing}; rolled back, "
                              "will retry")
    # Not EIO: that is the storage failing (exit 74, an admin is told), not going away.
    if e.errno in (errno.ENOENT, errno.ESTALE, errno.ENOTCONN, errno.ENODEV):
        return TemporaryError(f"the destination went away while {doing} ({e.strerror}); "
                              "rolled back, will retry")
    if e.errno in (errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ):
        return EntryFailed(f"the destination's filesystem refused a name ({e.strerror}: "
                           f"{printable(str(e.filename or ''))}); nothing of this entry was "
                           "delivered.")
    return None
