"""Check a claimed entry before anything is copied, and plan its delivery.

Every check that can fail an entry runs here, before a byte reaches the
destination: the uploader's right to deliver, file types (symlinks, FIFOs,
sockets and devices are named and never opened), ownership, readability,
conflicts with the destination (same content counts as already delivered,
other content fails the whole entry) and free space.

The entry is walked with directory file descriptors opened O_NOFOLLOW, so a
symlink swapped in by the uploader after the walk still cannot be followed.
Names are Python `str` with surrogate escapes: exact bytes round-trip.
"""

from __future__ import annotations

import errno
import fnmatch
import grp
import hashlib
import os
import pwd
import stat
from dataclasses import dataclass, field

from .config import StudyConfig
from .errors import EntryFailed, EntryRejected, TemporaryError
from .log import printable

CHUNK = 1 << 20
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
# How many names a failure reason lists before it says "and N more".
LIST_MAX = 20


@dataclass
class FilePlan:
    name: str  # name in the destination directory
    src_name: str  # name in the source directory (differs for a plain-file entry)
    size: int
    atime_ns: int
    mtime_ns: int
    executable: bool
    present: bool = False  # already in the destination with the same content
    sha256: str = ""  # filled by the check (present) or the copy


@dataclass
class DirPlan:
    rel: str  # relative to the destination and to the entry's top, "" for the top
    atime_ns: int
    mtime_ns: int
    exists: bool = False  # already a directory in the destination
    files: list[FilePlan] = field(default_factory=list)


@dataclass
class Plan:
    """What a delivery will do: directories parents first, each with its files."""

    uploader_uid: int
    uploader: str
    dirs: list[DirPlan]
    skipped: list[str]
    plain_file: bool = False  # the entry is one file, its source directly in processing/

    def files(self) -> list[tuple[DirPlan, FilePlan]]:
        return [(d, f) for d in self.dirs for f in d.files]

    @property
    def bytes(self) -> int:
        return sum(f.size for _, f in self.files())


def user_name(uid: int) -> str:
    """The user's name, or the numeric uid when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def plan_entry(study: StudyConfig, claim_id: str, entry: str, service_uid: int) -> Plan:
    """Walk processing/<id>, run every check, and return the plan (or raise)."""
    proc_fd = os.open(study.processing, DIR_FLAGS)
    try:
        st = os.stat(claim_id, dir_fd=proc_fd, follow_symlinks=False)
        uid = st.st_uid
        plan = Plan(uploader_uid=uid, uploader=user_name(uid), dirs=[], skipped=[])
        _authorize(study, uid, service_uid)
        bad: dict[str, list[str]] = {}
        if stat.S_ISDIR(st.st_mode):
            _walk(study, proc_fd, claim_id, "", st, plan, bad)
        elif stat.S_ISREG(st.st_mode) and _ignored(study, entry):
            plan.dirs.append(DirPlan("", 0, 0))
            plan.skipped.append(entry)
            plan.plain_file = True
        elif stat.S_ISREG(st.st_mode):
            top = DirPlan("", 0, 0)
            plan.plain_file = True
            top.files.append(_file_plan(entry, claim_id, st))
            plan.dirs.append(top)
            _check_file(proc_fd, claim_id, entry, st, uid, bad)
        else:
            bad.setdefault(_kind(st.st_mode), []).append(entry)
        _raise_bad(bad)
    finally:
        os.close(proc_fd)
    check_destination(study, claim_id, plan)
    return plan


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
    return any(fnmatch.fnmatchcase(name, pat) for pat in study.ignore)


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


def _file_plan(name: str, src_name: str, st: os.stat_result) -> FilePlan:
    return FilePlan(name=name, src_name=src_name, size=st.st_size, atime_ns=st.st_atime_ns,
                    mtime_ns=st.st_mtime_ns, executable=bool(st.st_mode & stat.S_IXUSR))


def _check_file(dir_fd: int, src_name: str, rel: str, st: os.stat_result, uid: int,
                bad: dict[str, list[str]]) -> None:
    if uid != 0 and st.st_uid != uid:
        # The service can read any file; without this rule an uploader could
        # deliver another user's file that they could not read themselves.
        bad.setdefault("files owned by another user than the uploader", []).append(rel)
        return
    try:
        os.close(os.open(src_name, FILE_FLAGS, dir_fd=dir_fd))
    except OSError as e:
        bad.setdefault(f"unreadable files ({e.strerror})", []).append(rel)


def _walk(study: StudyConfig, parent_fd: int, src_name: str, rel: str, st: os.stat_result,
          plan: Plan, bad: dict[str, list[str]]) -> None:
    if plan.uploader_uid != 0 and st.st_uid != plan.uploader_uid:
        bad.setdefault("files owned by another user than the uploader", []).append(rel + "/")
        return
    try:
        fd = os.open(src_name, DIR_FLAGS, dir_fd=parent_fd)
    except OSError as e:
        bad.setdefault(f"unreadable directories ({e.strerror})", []).append(rel + "/")
        return
    try:
        d = DirPlan(rel=rel, atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns)
        plan.dirs.append(d)
        subdirs = []
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for de in entries:
            path = join(rel, de.name)
            if _ignored(study, de.name):
                plan.skipped.append(path)
                continue
            est = de.stat(follow_symlinks=False)
            if stat.S_ISDIR(est.st_mode):
                subdirs.append((de.name, path, est))
            elif stat.S_ISREG(est.st_mode):
                d.files.append(_file_plan(de.name, de.name, est))
                _check_file(fd, de.name, path, est, plan.uploader_uid, bad)
            else:
                bad.setdefault(_kind(est.st_mode), []).append(path)
        for name, path, est in subdirs:
            _walk(study, fd, name, path, est, plan, bad)
    finally:
        os.close(fd)


def _raise_bad(bad: dict[str, list[str]]) -> None:
    if not bad:
        return
    parts = []
    for what, names in sorted(bad.items()):
        shown = ", ".join(printable(n) for n in names[:LIST_MAX])
        more = f" and {len(names) - LIST_MAX} more" if len(names) > LIST_MAX else ""
        parts.append(f"{what} not delivered: {shown}{more}")
    raise EntryFailed("; ".join(parts) + ". The entry was not delivered at all.")


# --- the destination side ---------------------------------------------------

def open_dest_dir(dest_fd: int, rel: str) -> int:
    """Open a directory below the destination, refusing symlinks on the way."""
    fd = os.dup(dest_fd)
    if not rel:
        return fd
    try:
        for part in rel.split("/"):
            nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_destination(study: StudyConfig) -> int:
    """An fd on the destination; a missing one is a temporary problem (not mounted?)."""
    try:
        return os.open(study.destination, DIR_FLAGS)
    except OSError as e:
        raise TemporaryError(f"destination {study.destination} is not available "
                             f"({e.strerror}); is it mounted?") from None


def hash_fd(fd: int) -> str:
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while n := os.readv(fd, [buf]):
        h.update(view[:n])
    return h.hexdigest()


def hash_at(dir_fd: int, name: str) -> str:
    fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
    try:
        return hash_fd(fd)
    finally:
        os.close(fd)


class Source:
    """Opens the entry's directories by walking from its top with O_NOFOLLOW.

    Keeps one directory open at a time: plans are walked parents first, so a
    cache of one avoids re-opening while never risking the fd limit.
    """

    def __init__(self, study: StudyConfig, claim_id: str, plan: Plan) -> None:
        self.study = study
        self.claim_id = claim_id
        # A plain-file entry has its one file directly in processing/.
        self.plain_file = plan.plain_file
        self.rel: str | None = None
        self.fd = -1

    def dir_fd(self, d: DirPlan) -> int:
        if self.rel == d.rel:
            return self.fd
        self.close()
        fd = os.open(self.study.processing, DIR_FLAGS)
        try:
            if not self.plain_file:
                fd = _descend(fd, self.claim_id)
                for part in d.rel.split("/") if d.rel else ():
                    fd = _descend(fd, part)
        except BaseException:
            os.close(fd)
            raise
        self.rel, self.fd = d.rel, fd
        return fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.rel, self.fd = None, -1

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _descend(fd: int, name: str) -> int:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=fd)
    finally:
        os.close(fd)


def check_destination(study: StudyConfig, claim_id: str, plan: Plan) -> None:
    """Mark files already delivered; fail on conflicts; retry later if space is short."""
    dest_fd = open_destination(study)
    conflicts: list[str] = []
    need = 0
    new_inodes = 0
    try:
        with Source(study, claim_id, plan) as src:
            for d in plan.dirs:
                try:
                    dfd = open_dest_dir(dest_fd, d.rel)
                except FileNotFoundError:
                    dfd = -1
                    new_inodes += 1
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        conflicts.append(d.rel + "/ (not a directory in the destination)")
                        continue
                    raise
                d.exists = dfd >= 0
                try:
                    for f in d.files:
                        conflict = _compare(src, d, f, dfd) if dfd >= 0 else None
                        if conflict is not None:
                            conflicts.append(join(d.rel, f.name) + conflict)
                        elif not f.present:
                            need += f.size
                            new_inodes += 1
                finally:
                    if dfd >= 0:
                        os.close(dfd)
        if conflicts:
            shown = ", ".join(printable(c) for c in conflicts[:LIST_MAX])
            more = f" and {len(conflicts) - LIST_MAX} more" if len(conflicts) > LIST_MAX else ""
            raise EntryFailed(f"conflicts with files already in {study.destination} "
                              f"(different content, never overwritten): {shown}{more}. "
                              "Nothing of this entry was delivered.")
        _check_space(study, dest_fd, need, new_inodes)
    finally:
        os.close(dest_fd)


def _compare(src: Source, d: DirPlan, f: FilePlan, dfd: int) -> str | None:
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
        existing = hash_at(dfd, f.name)
    except OSError as e:
        return f" (cannot read the destination copy: {e.strerror})"
    f.sha256 = hash_at(src.dir_fd(d), f.src_name)
    if existing != f.sha256:
        return ""
    f.present = True
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
