"""Compare a planned entry with the destination: what is there already, what conflicts, room.

A destination file with the same content counts as delivered (re-uploads and
resumed crashes are idempotent); one with other content is a conflict and the
whole entry fails; an entry that does not fit now waits for a later run.
"""

from __future__ import annotations

import errno
import os
import stat

from . import fstype
from .config import StudyConfig
from .copier import hash_source
from .errors import ConfigError, EntryFailed, NoSpace, TemporaryError
from .examine import kind_of
from .findings import Findings
from .fsops import DIR_FLAGS, DirCache, Source, hash_at, join
from .log import printable
from .plan import EXISTS, PRESENT, DirPlan, FilePlan, Plan, State


def open_destination(study: StudyConfig) -> int:
    """An fd on the destination; a missing one is a temporary problem (not mounted?)."""
    fstype.check(study)  # mounted there since the run started
    try:
        return os.open(study.destination, DIR_FLAGS)
    except OSError as e:
        if os.path.islink(study.destination):
            raise ConfigError(symlinked_destination(study)) from None
        raise TemporaryError(f"destination {study.destination} is not available "
                             f"({e.strerror}); is it mounted?") from None


def symlinked_destination(study: StudyConfig) -> str:
    """Why a destination that is a symbolic link is refused, and the fix."""
    return (f"studies.{study.name}.destination: {study.destination} is a symbolic link (to "
            f"{os.readlink(study.destination)}): deliveries never follow one (the service's "
            "sandbox and its checks bind and open the path as configured); set destination "
            f"to the real directory, {os.path.realpath(study.destination)}")


def check_destination(study: StudyConfig, plan: Plan, dest_fd: int) -> None:
    """Mark files already delivered; fail on conflicts and on directories the service
    cannot write to; retry later if space is short."""
    if not _writable(dest_fd):
        raise ConfigError(f"the service cannot write to the destination {study.destination}: "
                          "it must be the service user's (`dittohead setup "
                          f"{study.name}`); the entry stays claimed in processing/")
    conflicts = Findings()
    closed = _Closed()
    block = os.fstatvfs(dest_fd).f_frsize or 4096
    need = 0  # bytes, each new file rounded up to whole blocks
    new_inodes = 0
    biggest = (0, "")  # the largest new file: named when the entry can never fit
    with plan.state() as state, plan.source() as src, DirCache(dest_fd) as dest:
        d: DirPlan | None = None
        dfd = -1  # the destination directory of d; -1: it does not exist yet
        for r in plan.records():
            if isinstance(r, FilePlan):
                if d is None:
                    continue
                if dfd >= 0:  # in a new directory every file is new: nothing to compare
                    conflict = _compare(plan, src, state, d, r, dfd)
                    if conflict is not None:
                        conflicts.add("c", join(d.rel, r.name) + conflict)
                        continue
                    if state.flags(r.index) & PRESENT:
                        continue
                    closed.check(d.rel, dfd)
                need += -(-r.size // block) * block
                new_inodes += 1
                if r.size > biggest[0]:
                    biggest = (r.size, join(d.rel, r.name))
            elif isinstance(r, DirPlan):
                d = r
                dfd = _dest_dir(dest, state, r, conflicts)
                if dfd == _NOT_A_DIR:
                    d = None  # its files are covered by that conflict
                elif dfd < 0:
                    new_inodes += 1
                    need += block  # a directory's first block
                    parent = r.rel.rpartition("/")[0]
                    if closed.unasked(parent):  # it exists: r is renamed into it
                        closed.check(parent, dest.dir_fd(parent))
                else:
                    closed.seen.setdefault(r.rel, None)
    if conflicts:
        raise EntryFailed(f"conflicts with files already in {study.destination} "
                          f"(different content, never overwritten): {conflicts.text('c')}."
                          " Nothing of this entry was delivered.")
    if closed.found:
        raise EntryFailed(f"the service cannot write to directories in {study.destination} "
                          f"that this entry adds to: {closed.found.text('w')}. An admin must "
                          "make them writable by the service user (chown them to it), then "
                          "retry the entry. Nothing of this entry was delivered.")
    _check_space(study, dest_fd, need, new_inodes, biggest)


_NOT_A_DIR = -2


class _Closed:
    """Existing destination directories an entry adds to that the service cannot write.

    Without CAP_DAC_OVERRIDE the service writes only where the modes (or ACLs)
    let it: a directory an admin made root's 0755 would fail the publish.
    """

    def __init__(self) -> None:
        self.seen: dict[str, bool | None] = {"": True}  # rel -> writable (None: not asked)
        self.found = Findings()

    def unasked(self, rel: str) -> bool:
        """Whether rel exists in the destination and its writability is not known yet."""
        return rel in self.seen and self.seen[rel] is None

    def check(self, rel: str, fd: int) -> None:
        if self.seen.get(rel) is None:
            self.seen[rel] = _writable(fd)
            if not self.seen[rel]:
                self.found.add("w", rel + "/")


def _writable(fd: int) -> bool:
    """Whether this process may add names to the directory fd (its capabilities count).

    A read-only filesystem counts as writable here: writing then fails with
    EROFS, a storage error (74) that keeps the entry, not a question of owners.
    """
    return (os.access(".", os.W_OK | os.X_OK, dir_fd=fd, effective_ids=True)
            or bool(os.fstatvfs(fd).f_flag & os.ST_RDONLY))


def _dest_dir(dest: DirCache, state: State, d: DirPlan, conflicts: Findings) -> int:
    """d's directory in the destination (marked EXISTS), -1 if missing, _NOT_A_DIR if taken."""
    try:
        fd = dest.dir_fd(d.rel)
    except FileNotFoundError:
        return -1
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        conflicts.add("c", d.rel + "/ (not a directory in the destination)")
        return _NOT_A_DIR
    state.set(d.index, EXISTS)
    return fd


def _compare(plan: Plan, src: Source, state: State, d: DirPlan, f: FilePlan,
             dfd: int) -> str | None:
    """None if the name is free or holds the same content; else why it conflicts."""
    try:
        st = os.stat(f.name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        return " (a directory in the destination)"
    if not stat.S_ISREG(st.st_mode):
        return f" (one of the {kind_of(st.st_mode)} in the destination)"
    if st.st_size != f.size:
        return ""
    try:
        existing = hash_at(dfd, f.name, f.size)
    except OSError as e:
        return f" (cannot read the destination copy: {e.strerror})"
    digest = hash_source(src.dir_fd(d.rel), f.src_name(plan), d.rel, f)
    if existing != digest:
        return ""
    state.set(f.index, PRESENT, digest)
    return None


def _check_space(study: StudyConfig, dest_fd: int, wanted: int, inodes: int,
                 biggest: tuple[int, str]) -> None:
    # `wanted` counts each file's data in whole blocks and a block per new
    # directory; inodes are counted apart. Not a block per file's inode too:
    # inode tables are allocated with the filesystem (ext4, XFS), and counting
    # them failed an entry of 30,000 empty files as "never fits" in 100 MiB.
    st = os.fstatvfs(dest_fd)
    size = st.f_blocks * st.f_frsize
    if wanted > size or (st.f_files and inodes > st.f_files):
        # No amount of waiting helps: tell the uploader now (docs/contract.md),
        # naming the file that most likely is the mistake.
        from .capacity import size as text
        largest = (f"; its largest file, {printable(biggest[1])}, is {text(biggest[0])} "
                   f"alone" if biggest[1] else "")
        raise EntryFailed(f"the entry can never fit in {study.destination}: it needs "
                          f"{text(wanted)} ({wanted} bytes) and {inodes} inodes, the whole "
                          f"filesystem has {text(size)} ({size} bytes) and "
                          f"{st.f_files or 'unlimited'} inodes{largest}. "
                          "Nothing of this entry was delivered.")
    free = st.f_bavail * st.f_frsize
    if wanted > free:
        raise NoSpace(f"not enough space in {study.destination}: the entry needs "
                             f"{wanted} bytes, {free} are free")
    if st.f_files and inodes > st.f_favail:
        raise NoSpace(f"not enough free inodes in {study.destination}: the entry "
                             f"needs {inodes}, {st.f_favail} are free")
