"""Examine a claimed entry before anything is copied, and write its plan.

The entry side of the checks: the uploader's right to deliver, file types
(symlinks, FIFOs, sockets and devices are named and never opened), owners and
readability, found by walking directory fds opened O_NOFOLLOW. Every problem
is collected, and the entry fails with all of them. docs/design.md, "Examine".
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
from collections.abc import Callable
from dataclasses import dataclass

from . import faults, parallel, readiness
from .claim import Claim
from .config import StudyConfig
from .errors import EntryFailed, EntryRejected
from .faults import point
from .findings import Findings
from .fsops import CHUNK, DIR_FLAGS, join, user_name
from .lockdown import Lockdown
from .ownership import Ownership
from .plan import Plan, spool_files
from .stage import STAGING_PREFIX

# Limits of what can be delivered (docs/contract.md): deeper trees and longer
# paths fail with a reason, in the run that finds them, instead of stopping
# the walk (Python's recursion) or the copy (PATH_MAX) on every run.
MAX_DEPTH = 100  # directories below the entry's top
PATH_MAX = 4096  # <linux/limits.h>, with the terminating NUL
# The plan records times as signed 64-bit nanoseconds: 1677 to 2262.
_TIME_RANGE = range(-(1 << 63), 1 << 63)
_TOO_DEEP = f"directories nested deeper than {MAX_DEPTH} levels"
_TOO_LONG = f"paths longer than Linux allows ({PATH_MAX - 1} bytes with the destination's)"
_RESERVED = (f"names dittohead keeps for itself at the top of a destination "
             f"({STAGING_PREFIX}*; rename them)")
_ODD_TIME = ("files dated before 1677 or after 2262 (their times cannot be kept; "
             "`touch` them)")


def new_plan(study: StudyConfig, c: Claim) -> Plan:
    """An empty plan for the claimed entry processing/<id>, of the uploader the claim names."""
    uid = uploader_uid(study, c)
    return Plan(claim_id=c.id, uploader_uid=uid, uploader=user_name(uid),
                path=spool_files(study.processing, c.id)[0])


def uploader_uid(study: StudyConfig, c: Claim) -> int:
    """Who dropped the entry: from the claim record, else (an older record) its owner."""
    if c.uploader_uid >= 0:
        return c.uploader_uid
    return os.lstat(study.processing / c.id).st_uid


def examine(study: StudyConfig, plan: Plan, entry: str, owner: Ownership) -> None:
    """Take the entry over from its uploader and walk it into `plan`; raise EntryFailed
    with every problem. The plan keeps its totals when the entry fails (for the receipt).
    """
    _authorize(study, plan.uploader_uid, owner.uid)
    walker = _Walker(readiness.ignore_matcher(study.ignore),
                     Lockdown(plan.uploader_uid, owner.uid, owner.service_gid), plan, Findings(),
                     PATH_MAX - 2 - len(os.fsencode(str(study.destination))))
    proc_fd = os.open(study.processing, DIR_FLAGS)
    plan.open_for_writing()
    try:
        st = os.stat(plan.claim_id, dir_fd=proc_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            _walk_top(walker, proc_fd)
        elif stat.S_ISREG(st.st_mode):
            plan.plain_file = True
            plan.add_dir("", 0, 0)
            skip = walker.ignored(entry) is not None
            if skip:
                plan.add_skipped(entry)
            walker.file(proc_fd, plan.claim_id, entry, st, skip)
        else:
            walker.bad.add(kind_of(st.st_mode), entry)
    finally:
        plan.close_writing()
        os.close(proc_fd)
    bad = walker.bad
    if bad:
        raise EntryFailed("; ".join(f"{kind} not delivered: {bad.text(kind)}"
                                    for kind in sorted(bad.kinds))
                          + ". The entry was not delivered at all.")


def _plannable(st: os.stat_result) -> bool:
    """Whether the plan can record the inode's times exactly."""
    return st.st_mtime_ns in _TIME_RANGE and st.st_atime_ns in _TIME_RANGE


def _authorize(study: StudyConfig, uid: int, service_uid: int) -> None:
    # Root and the service itself can write the destination anyway: refusing
    # them protects nothing. Everyone else must be in an `uploaders` group.
    if study.uploaders is None or uid in (0, service_uid):
        return
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        raise EntryRejected(f"uploader uid {uid} has no user name, so is in none of the "
                            f"uploaders groups ({', '.join(study.uploaders)})") from None
    for g in study.uploaders:
        try:
            gr = grp.getgrnam(g)
        except KeyError:
            continue
        if gr.gr_gid == pw.pw_gid or pw.pw_name in gr.gr_mem:
            return
    raise EntryRejected(f"{pw.pw_name} is not in any of the uploaders groups of study "
                        f"{study.name} ({', '.join(study.uploaders)})")


def kind_of(mode: int) -> str:
    """What a non-regular, non-directory inode is, in the plural, for a reason."""
    if stat.S_ISLNK(mode):
        return "symlinks"
    if stat.S_ISFIFO(mode):
        return "FIFOs"
    if stat.S_ISSOCK(mode):
        return "sockets"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device nodes"
    return "files of unknown type"


_NOT_THEIRS = "files owned by another user than the uploader"
# Linux turns a chown of another user's setuid or setgid file into a chmod too (it
# drops the bits), which needs CAP_FOWNER, which the service lacks: EPERM. Such a
# file could never be taken over. docs/field-notes.md, "Set-id files".
_SET_ID = ("files with a setuid or setgid bit (they cannot be taken over from their "
           "uploader; upload them without it: chmod u-s,g-s)")
_LINKED = ("files with other names (hard links, as cp -al or rsync --link-dest make: "
           "they could change through a name outside the entry; upload a copy)")


def _set_id(st: os.stat_result) -> bool:
    """A mode whose chown by another user the kernel turns into a chmod (a kill of set-id)."""
    return bool(st.st_mode & (stat.S_ISUID | stat.S_ISGID))


class _Walker:
    """Walks an entry (or a worker's share of it) into a plan, taking it over on the way.

    Each directory is taken over before its listing is read, each file before
    it is planned (lockdown.py); a name in a directory taken over cannot
    change, so stat and chown by name are safe there.
    """

    def __init__(self, ignored: Callable[[str], object], lockdown: Lockdown, plan: Plan,
                 bad: Findings, room: int) -> None:
        self.ignored = ignored
        self.lockdown = lockdown
        self.plan = plan
        self.bad = bad
        self.room = room  # the longest path below the destination, in bytes

    def like(self, plan: Plan, bad: Findings) -> _Walker:
        """A walker with the same rules into another plan (a worker's share)."""
        return _Walker(self.ignored, self.lockdown, plan, bad, self.room)

    def walk(self, parent_fd: int, name: str, rel: str) -> None:
        """The directory parent/name and everything below it."""
        opened = self.open_dir(parent_fd, name, rel)
        if opened is None:
            return
        fd, st = opened
        try:
            for sub in self.scan(fd, rel, st):
                self.walk(fd, sub, join(rel, sub))
        finally:
            os.close(fd)

    def open_dir(self, parent_fd: int, name: str, rel: str) -> tuple[int, os.stat_result] | None:
        """Open a directory and take it over; None (and a finding) if it is not the uploader's,
        or deeper than MAX_DEPTH (not opened: what is below stays its uploader's)."""
        if rel.count("/") >= MAX_DEPTH:
            self.bad.add(_TOO_DEEP, rel + "/")
            return None
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
        except OSError as e:
            self.bad.add(f"unreadable directories ({e.strerror})", rel + "/")
            return None
        try:
            st = os.fstat(fd)
            if not self.lockdown.owned(st):
                self.bad.add(_NOT_THEIRS, rel + "/")
                os.close(fd)
                return None
            if faults.enabled():
                point(f"taking:{rel}")  # the race tests act between the fstat and the chown
            self.lockdown.take_dir(fd, st)
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def scan(self, fd: int, rel: str, st: os.stat_result) -> list[str]:
        """Plan a directory taken over and its files; return its subdirectories' names."""
        if not _plannable(st):
            self.bad.add(_ODD_TIME, rel + "/")
            return []
        self.plan.add_dir(rel, st.st_atime_ns, st.st_mtime_ns)
        subdirs = []
        with os.scandir(fd) as it:
            names = sorted(de.name for de in it)
        for name in names:
            path = join(rel, name)
            if len(os.fsencode(path)) > self.room:
                self.bad.add(_TOO_LONG, path)
                continue
            if not rel and name.startswith(STAGING_PREFIX):
                self.bad.add(_RESERVED, path)  # it would meet a delivery's staging
                continue
            skip = self.ignored(name) is not None
            if skip:
                self.plan.add_skipped(path)
            try:
                est = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                self.bad.add("files that vanished during the check", path)
                continue
            if stat.S_ISDIR(est.st_mode):
                if skip:
                    self.take_ignored_dir(fd, name, path)
                else:
                    subdirs.append(name)
            elif stat.S_ISREG(est.st_mode):
                self.file(fd, name, path, est, skip)
            else:  # ignored or not: never filed in done/ unnoticed
                self.bad.add(kind_of(est.st_mode), path)
        return subdirs

    def file(self, dir_fd: int, name: str, rel: str, st: os.stat_result, skip: bool) -> None:
        """Take over and plan one regular file (an ignored one is only taken over)."""
        if not skip and readiness.is_temp(rel.rpartition("/")[2]):
            self.bad.add(readiness.TEMP_KIND, rel)  # held back until stale: partial
        problem = (_NOT_THEIRS if not self.lockdown.owned(st)
                   else _LINKED if st.st_nlink > 1
                   else _SET_ID if _set_id(st) and st.st_uid != self.lockdown.uid else None)
        if problem is not None:
            # Ignored or not: never taken, and never filed unnoticed in done/.
            self.bad.add(problem, rel)
            return
        self.lockdown.take_file(dir_fd, name, st)
        if not skip and not _plannable(st):
            self.bad.add(_ODD_TIME, rel)
        elif not skip:
            self.plan.add_file(rel.rpartition("/")[2], st.st_size, st.st_atime_ns,
                               st.st_mtime_ns, bool(st.st_mode & stat.S_IXUSR))

    def take_ignored_dir(self, parent_fd: int, name: str, rel: str) -> None:
        """Take over an ignored directory and its contents: never delivered, but filed.

        Ignored means only "not delivered": every other rule holds inside
        (owners, other names, types, depth), since all of it is filed in done/.
        """
        opened = self.open_dir(parent_fd, name, rel)
        if opened is None:
            return
        fd, _ = opened
        try:
            with os.scandir(fd) as it:
                names = sorted(de.name for de in it)
            for sub in names:
                path = join(rel, sub)
                try:
                    est = os.stat(sub, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(est.st_mode):
                    self.take_ignored_dir(fd, sub, path)
                elif stat.S_ISREG(est.st_mode):
                    self.file(fd, sub, path, est, skip=True)
                else:
                    self.bad.add(kind_of(est.st_mode), path)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class _Subtree:
    """One top-level directory as a walking worker saw it: where its records are, totals."""

    index: int  # among the top directory's subdirectories
    worker: int  # whose part file holds its records
    start: int
    end: int
    records: int
    files: int
    nbytes: int
    dirs: int
    skipped: int
    skipped_sample: list[str]
    findings: dict[str, tuple[int, list[str]]]


def _walk_top(walker: _Walker, proc_fd: int) -> None:
    """Walk the entry; its top-level directories in parallel workers when worth it.

    Each worker walks every n-th top-level directory into a part file of its
    own; the parts are then put together in walk order, so the plan reads as
    if one process had walked it.
    """
    plan = walker.plan
    opened = walker.open_dir(proc_fd, plan.claim_id, "")
    if opened is None:
        return
    fd, st = opened
    try:
        subdirs = walker.scan(fd, "", st)
        n = parallel.walkers_for(len(subdirs))
        if n == 1:
            for name in subdirs:
                walker.walk(fd, name, name)
            return
        try:
            shares = parallel.run(n, lambda k: _walk_share(walker, fd, subdirs, k, n))
            _merge(plan, walker.bad, sorted((t for share in shares for t in share),
                                            key=lambda t: t.index))
        finally:
            for k in range(n):
                plan.part_path(k).unlink(missing_ok=True)
    finally:
        os.close(fd)


def _walk_share(walker: _Walker, top_fd: int, subdirs: list[str], k: int,
                n: int) -> list[_Subtree]:
    plan = walker.plan
    part = Plan(claim_id=plan.claim_id, uploader_uid=plan.uploader_uid,
                uploader=plan.uploader, path=plan.part_path(k))
    out = part.open_for_writing()
    done = []
    try:
        for i in range(k, len(subdirs), n):
            start, before = out.tell(), _counts(part)
            part.skipped_sample = []
            found = Findings()
            walker.like(part, found).walk(top_fd, subdirs[i], subdirs[i])
            records, files, nbytes, dirs, skipped = (
                now - then for now, then in zip(_counts(part), before, strict=True))
            done.append(_Subtree(i, k, start, out.tell(), records, files, nbytes, dirs,
                                 skipped, part.skipped_sample, found.kinds))
    finally:
        out.close()
    return done


def _counts(p: Plan) -> tuple[int, int, int, int, int]:
    """The running totals a _Subtree carries, in its order."""
    return p.records_written, p.files, p.nbytes, p.dirs, p.skipped


def _merge(plan: Plan, bad: Findings, subtrees: list[_Subtree]) -> None:
    fds: dict[int, int] = {}
    try:
        for t in subtrees:
            if t.worker not in fds:
                fds[t.worker] = os.open(plan.part_path(t.worker), os.O_RDONLY | os.O_CLOEXEC)
            pos = t.start
            while pos < t.end:
                data = os.pread(fds[t.worker], min(CHUNK, t.end - pos), pos)
                if not data:
                    raise OSError(errno.EIO, "a walk's part file is shorter than reported")
                plan.append_raw(data)
                pos += len(data)
            plan.add_totals(t.records, t.files, t.nbytes, t.dirs, t.skipped, t.skipped_sample)
            bad.merge(t.findings)
    finally:
        for fd in fds.values():
            os.close(fd)
