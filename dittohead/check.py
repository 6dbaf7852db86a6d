"""Check a claimed entry before anything is copied, and plan its delivery.

Every check that can fail an entry runs here, before a byte reaches the
destination: the uploader's right to deliver, file types (symlinks, FIFOs,
sockets and devices are named and never opened), ownership, readability,
conflicts with the destination (same content counts as already delivered,
other content fails the whole entry) and free space.

The entry is walked with directory file descriptors opened O_NOFOLLOW, so a
symlink swapped in by the uploader after the walk still cannot be followed.
Names are Python `str` with surrogate escapes: exact bytes round-trip. The
plan is spooled to disk (plan.py), so memory does not grow with the entry.
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import grp
import hashlib
import os
import pwd
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass

from . import parallel
from .config import StudyConfig
from .errors import EntryFailed, EntryRejected, TemporaryError
from .log import printable
from .plan import EXISTS, PRESENT, DirPlan, FilePlan, Plan, State, spool_files

CHUNK = 1 << 20
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
# How many names a failure reason lists before it says "and N more".
LIST_MAX = 20


def user_name(uid: int) -> str:
    """The user's name, or the numeric uid when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


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


def new_plan(study: StudyConfig, claim_id: str) -> Plan:
    """An empty plan for processing/<id>, owned by the entry's uploader."""
    uid = os.lstat(study.processing / claim_id).st_uid
    return Plan(claim_id=claim_id, uploader_uid=uid, uploader=user_name(uid),
                path=spool_files(study.processing, claim_id)[0])


def plan_entry(study: StudyConfig, plan: Plan, entry: str, service_uid: int) -> None:
    """Walk processing/<id> into `plan`, run every check, or raise why not."""
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
            bad.add(_kind(st.st_mode), entry)
    finally:
        plan.close_writing()
        os.close(proc_fd)
    if bad:
        raise EntryFailed("; ".join(f"{kind} not delivered: {bad.text(kind)}"
                                    for kind in sorted(bad.kinds))
                          + ". The entry was not delivered at all.")
    check_destination(study, plan)


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


def _kind(mode: int) -> str:
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
            bad.add(_kind(est.st_mode), path)
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


# --- the destination side ---------------------------------------------------

def open_destination(study: StudyConfig) -> int:
    """An fd on the destination; a missing one is a temporary problem (not mounted?)."""
    try:
        return os.open(study.destination, DIR_FLAGS)
    except OSError as e:
        raise TemporaryError(f"destination {study.destination} is not available "
                             f"({e.strerror}); is it mounted?") from None


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
    """The entry's directories (a plain-file entry's one file sits in processing/)."""

    def __init__(self, study: StudyConfig, plan: Plan) -> None:
        self.proc_fd = os.open(study.processing, DIR_FLAGS)
        super().__init__(self.proc_fd, None if plan.plain_file else plan.claim_id)

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self.proc_fd >= 0:
            os.close(self.proc_fd)
            self.proc_fd = -1


def check_destination(study: StudyConfig, plan: Plan) -> None:
    """Mark files already delivered; fail on conflicts; retry later if space is short."""
    dest_fd = open_destination(study)
    conflicts = Findings()
    need = 0
    new_inodes = 0
    try:
        with plan.state() as state, Source(study, plan) as src, DirCache(dest_fd) as dest:
            d: DirPlan | None = None
            dfd = -1  # the destination directory of d; -1: it does not exist yet
            for r in plan.records():
                if isinstance(r, FilePlan):
                    if d is None:
                        continue
                    if dfd < 0:  # a new directory: every file in it is new
                        need += r.size
                        new_inodes += 1
                        continue
                    conflict = _compare(plan, src, state, d, r, dfd)
                    if conflict is not None:
                        conflicts.add("c", join(d.rel, r.name) + conflict)
                    elif not state.flags(r.index) & PRESENT:
                        need += r.size
                        new_inodes += 1
                elif isinstance(r, DirPlan):
                    d = r
                    try:
                        dfd = dest.dir_fd(r.rel)
                        state.set(r.index, EXISTS)
                    except FileNotFoundError:
                        dfd = -1
                        new_inodes += 1
                    except OSError as e:
                        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                            raise
                        conflicts.add("c", r.rel + "/ (not a directory in the destination)")
                        d = None  # its files are covered by that conflict
        if conflicts:
            raise EntryFailed(f"conflicts with files already in {study.destination} "
                              f"(different content, never overwritten): {conflicts.text('c')}."
                              " Nothing of this entry was delivered.")
        _check_space(study, dest_fd, need, new_inodes)
    finally:
        os.close(dest_fd)


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
        return f" (one of the {_kind(st.st_mode)} in the destination)"
    if st.st_size != f.size:
        return ""
    try:
        existing = hash_at(dfd, f.name, f.size)
    except OSError as e:
        return f" (cannot read the destination copy: {e.strerror})"
    digest = hash_at(src.dir_fd(d.rel), f.src_name(plan), f.size)
    if existing != digest:
        return ""
    state.set(f.index, PRESENT, digest)
    return None


def _check_space(study: StudyConfig, dest_fd: int, need: int, inodes: int) -> None:
    st = os.fstatvfs(dest_fd)
    block = st.f_frsize or 4096
    # Round each file up to whole blocks; add a block per new inode for metadata.
    wanted = need + inodes * 2 * block
    free = st.f_bavail * st.f_frsize
    if wanted > free:
        raise TemporaryError(f"not enough space in {study.destination}: the entry needs "
                             f"{wanted} bytes, {free} are free")
    if st.f_files and inodes > st.f_favail:
        raise TemporaryError(f"not enough free inodes in {study.destination}: the entry "
                             f"needs {inodes}, {st.f_favail} are free")
