"""Examine a claimed entry before anything is copied, and write its plan.

The entry side of the checks: the uploader's right to deliver, file types
(symlinks, FIFOs, sockets and devices are named and never opened), owners and
readability, found by walking directory fds opened O_NOFOLLOW. Every problem
is collected, and the entry fails with all of them. docs/design.md, "Examine".
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import grp
import os
import pwd
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass

from . import parallel
from .claim import Claim
from .config import StudyConfig
from .errors import EntryFailed, EntryRejected
from .fsops import CHUNK, DIR_FLAGS, join, user_name
from .log import printable
from .plan import Plan, spool_files

# How many names a failure reason lists before it says "and N more".
LIST_MAX = 20


class Findings:
    """Problems by kind, each with a count and the first few names."""

    def __init__(self) -> None:
        self.kinds: dict[str, tuple[int, list[str]]] = {}

    def add(self, kind: str, name: str) -> None:
        count, names = self.kinds.get(kind, (0, []))
        if len(names) < LIST_MAX:
            names.append(name)
        self.kinds[kind] = (count + 1, names)

    def text(self, kind: str) -> str:
        count, names = self.kinds[kind]
        more = f" and {count - len(names)} more" if count > len(names) else ""
        return ", ".join(printable(n) for n in names) + more

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def merge(self, kinds: dict[str, tuple[int, list[str]]]) -> None:
        """Add another Findings' kinds (a worker's), keeping the first names of each."""
        for kind, (count, names) in kinds.items():
            mine, kept = self.kinds.get(kind, (0, []))
            self.kinds[kind] = (mine + count, (kept + names)[:LIST_MAX])


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


def examine(study: StudyConfig, plan: Plan, entry: str, service_uid: int) -> None:
    """Walk processing/<id> into `plan` and check the entry; raise EntryFailed with every problem.

    The plan keeps its totals when the entry fails: the failure receipt counts them.
    """
    _authorize(study, plan.uploader_uid, service_uid)
    bad = Findings()
    proc_fd = os.open(study.processing, DIR_FLAGS)
    plan.open_for_writing()
    try:
        st = os.stat(plan.claim_id, dir_fd=proc_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            _walk_top(study, proc_fd, st, plan, bad)
        elif stat.S_ISREG(st.st_mode):
            plan.plain_file = True
            plan.add_dir("", 0, 0)
            if _ignored(study, entry):
                plan.add_skipped(entry)
            else:
                plan.add_file(entry, st.st_size, st.st_atime_ns, st.st_mtime_ns,
                              bool(st.st_mode & stat.S_IXUSR))
                _check_file(proc_fd, plan.claim_id, entry, st, plan.uploader_uid, bad)
        else:
            bad.add(kind_of(st.st_mode), entry)
    finally:
        plan.close_writing()
        os.close(proc_fd)
    if bad:
        raise EntryFailed("; ".join(f"{kind} not delivered: {bad.text(kind)}"
                                    for kind in sorted(bad.kinds))
                          + ". The entry was not delivered at all.")


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


def _ignored(study: StudyConfig, name: str) -> bool:
    return _ignore_matcher(study.ignore)(name) is not None


@functools.cache
def _ignore_matcher(patterns: tuple[str, ...]) -> Callable[[str], object]:
    """All patterns as one compiled regex (fnmatchcase's own translation): runs per name."""
    if not patterns:
        return lambda name: None
    return re.compile("|".join(fnmatch.translate(p) for p in patterns)).match


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


def _check_file(dir_fd: int, src_name: str, rel: str, st: os.stat_result, uid: int,
                bad: Findings) -> None:
    if uid != 0 and st.st_uid != uid:
        # The service can read any file; without this rule an uploader could
        # deliver another user's file that they could not read themselves.
        bad.add("files owned by another user than the uploader", rel)
        return
    # faccessat(AT_EACCESS) honours the service's capabilities like open()
    # would, at a fraction of the cost.
    if not os.access(src_name, os.R_OK, dir_fd=dir_fd, effective_ids=True,
                     follow_symlinks=False):
        bad.add("unreadable files", rel)


def _walk(study: StudyConfig, parent_fd: int, src_name: str, rel: str, st: os.stat_result,
          plan: Plan, bad: Findings) -> None:
    fd = _open_dir(parent_fd, src_name, rel, st, plan, bad)
    if fd is None:
        return
    try:
        for name in _scan(study, fd, rel, st, plan, bad):
            est = os.stat(name, dir_fd=fd, follow_symlinks=False)
            _walk(study, fd, name, join(rel, name), est, plan, bad)
    finally:
        os.close(fd)


def _open_dir(parent_fd: int, src_name: str, rel: str, st: os.stat_result, plan: Plan,
              bad: Findings) -> int | None:
    if plan.uploader_uid != 0 and st.st_uid != plan.uploader_uid:
        bad.add("files owned by another user than the uploader", rel + "/")
        return None
    try:
        return os.open(src_name, DIR_FLAGS, dir_fd=parent_fd)
    except OSError as e:
        bad.add(f"unreadable directories ({e.strerror})", rel + "/")
        return None


def _scan(study: StudyConfig, fd: int, rel: str, st: os.stat_result, plan: Plan,
          bad: Findings) -> list[str]:
    """Add a directory and its files to the plan; return its subdirectories' names."""
    plan.add_dir(rel, st.st_atime_ns, st.st_mtime_ns)
    subdirs = []
    ignored = _ignore_matcher(study.ignore)
    with os.scandir(fd) as it:
        names = sorted(de.name for de in it)
    for name in names:
        path = join(rel, name)
        if ignored(name) is not None:
            plan.add_skipped(path)
            continue
        try:
            est = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            bad.add("files that vanished during the check", path)
            continue
        if stat.S_ISDIR(est.st_mode):
            subdirs.append(name)
        elif stat.S_ISREG(est.st_mode):
            plan.add_file(name, est.st_size, est.st_atime_ns, est.st_mtime_ns,
                          bool(est.st_mode & stat.S_IXUSR))
            _check_file(fd, name, path, est, plan.uploader_uid, bad)
        else:
            bad.add(kind_of(est.st_mode), path)
    return subdirs


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


def _walk_top(study: StudyConfig, proc_fd: int, st: os.stat_result, plan: Plan,
              bad: Findings) -> None:
    """Walk the entry; its top-level directories in parallel workers when worth it.

    Each worker walks every n-th top-level directory into a part file of its
    own; the parts are then put together in walk order, so the plan reads as
    if one process had walked it.
    """
    fd = _open_dir(proc_fd, plan.claim_id, "", st, plan, bad)
    if fd is None:
        return
    try:
        subdirs = _scan(study, fd, "", st, plan, bad)
        n = parallel.walkers_for(len(subdirs))
        if n == 1:
            for name in subdirs:
                est = os.stat(name, dir_fd=fd, follow_symlinks=False)
                _walk(study, fd, name, name, est, plan, bad)
            return
        try:
            shares = parallel.run(n, lambda k: _walk_share(study, fd, plan, subdirs, k, n))
            _merge(plan, bad, sorted((t for share in shares for t in share),
                                     key=lambda t: t.index))
        finally:
            for k in range(n):
                plan.part_path(k).unlink(missing_ok=True)
    finally:
        os.close(fd)


def _walk_share(study: StudyConfig, top_fd: int, plan: Plan, subdirs: list[str], k: int,
                n: int) -> list[_Subtree]:
    part = Plan(claim_id=plan.claim_id, uploader_uid=plan.uploader_uid,
                uploader=plan.uploader, path=plan.part_path(k))
    out = part.open_for_writing()
    done = []
    try:
        for i in range(k, len(subdirs), n):
            start, before = out.tell(), _counts(part)
            part.skipped_sample = []
            found = Findings()
            est = os.stat(subdirs[i], dir_fd=top_fd, follow_symlinks=False)
            _walk(study, top_fd, subdirs[i], subdirs[i], est, part, found)
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
