"""What one delivery created in its destination, and removing exactly that (`undo`).

The published record (`<id>.published`, `<id>.dirs`, written with the
manifest) names the files and directories a delivery created; deliveries
filed before it existed are told apart by each file's birth time, owner and
content (the fallback). A file is removed only while it is still the
delivery's: a regular file, the service's, with the manifest's sha256, and
listed by no other delivery's manifest; a directory only when empty.
Everything is reached below the destination's fd, component by component,
never through a symlink. docs/design.md, "Undo".
"""

from __future__ import annotations

import ctypes
import datetime as dt
import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import faults
from .errors import DittoheadError
from .faults import point
from .fsops import FILE_FLAGS, DirCache, hash_fd
from .log import printable
from .manifest import parse_dir_line, parse_line

LISTED = 20  # kept paths a receipt lists before the count

# statx(2): the birth time, and not following a final symlink.
_STATX_BTIME = 0x800
_AT_SYMLINK_NOFOLLOW = 0x100
_STATX_SIZE = 256
_BTIME_AT = 80  # offset of stx_btime (tv_sec s64, tv_nsec u32) in struct statx
_libc = ctypes.CDLL(None, use_errno=True)

REMOVED, GONE = "removed", "gone"


@dataclass(frozen=True)
class Published:
    """What a delivery created: files with their digests and directories (parents first)."""

    files: tuple[tuple[str, bytes], ...]
    dirs: tuple[str, ...]
    fallback: bool  # told by birth time, not read from the published record


@dataclass
class Result:
    """How undoing went (or would go, with --dry-run), path by path."""

    removed: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)  # not there any more when undo looked
    kept: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    dirs_removed: list[str] = field(default_factory=list)


def birth_time(dir_fd: int, name: str) -> float | None:
    """The birth time of name below dir_fd (no symlink followed); None if the filesystem
    does not keep one."""
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if _libc.statx(dir_fd, os.fsencode(name), _AT_SYMLINK_NOFOLLOW, _STATX_BTIME, buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), name)
    mask = int.from_bytes(buf.raw[0:4], "little")
    if not mask & _STATX_BTIME:
        return None
    sec = int.from_bytes(buf.raw[_BTIME_AT:_BTIME_AT + 8], "little", signed=True)
    nsec = int.from_bytes(buf.raw[_BTIME_AT + 8:_BTIME_AT + 12], "little")
    return sec + nsec / 1e9


def read_published(folder: Path, delivery: str) -> Published | None:
    """The published record filed with the manifest; None for deliveries filed before it."""
    try:
        with open(folder / f"{delivery}.published", "rb") as f:
            files = tuple(parse_line(line) for line in f)
        with open(folder / f"{delivery}.dirs", "rb") as f:
            dirs = tuple(parse_dir_line(line) for line in f)
    except FileNotFoundError:
        return None
    return Published(files, dirs, fallback=False)


def manifest(folder: Path, delivery: str) -> Iterator[tuple[str, bytes]]:
    """The manifest's files and digests."""
    with open(folder / f"{delivery}.sha256", "rb") as f:
        for line in f:
            yield parse_line(line)


def _epoch(iso: str) -> float:
    return dt.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()


def by_birth_time(folder: Path, delivery: str, dest_fd: int, started: str, finished: str,
                  service_uid: int) -> Published:
    """The fallback: the manifest's files (and their directories) born while the delivery
    ran and owned by the service. DittoheadError (exit 1) without birth times."""
    lo, hi = _epoch(started), _epoch(finished) + 1  # receipts keep whole seconds
    files: list[tuple[str, bytes]] = []
    dirs: set[str] = set()
    seen: set[str] = set()
    with DirCache(dest_fd) as dest:
        for path, digest in manifest(folder, delivery):
            parent, _, name = path.rpartition("/")
            if _born_in(dest, parent, name, lo, hi, service_uid):
                files.append((path, digest))
            while parent and parent not in seen:  # each ancestor once
                seen.add(parent)
                up, _, base = parent.rpartition("/")
                if _born_in(dest, up, base, lo, hi, service_uid):
                    dirs.add(parent)
                parent = up
    return Published(tuple(files), tuple(sorted(dirs)), fallback=True)


def _born_in(dest: DirCache, parent: str, name: str, lo: float, hi: float,
             service_uid: int) -> bool:
    try:
        dfd = dest.dir_fd(parent)
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        born = birth_time(dfd, name)
    except OSError:
        return False  # gone, or behind a symlink: nothing to remove there
    if born is None:
        raise DittoheadError(
            "this delivery was filed before dittohead recorded what a delivery creates, and "
            "the destination's filesystem keeps no birth times, so what it created cannot be "
            "told from what was there before; nothing was removed")
    return st.st_uid == service_uid and lo <= born < hi


def listed_elsewhere(done: Path, delivery: str, paths: set[str]) -> dict[str, str]:
    """Which of paths another delivery's manifest in done/ lists too (path -> its id).

    Such a file counts as that delivery's as well (it found it already there):
    undo keeps it, whatever its digest (conservative: never remove another's file).
    """
    wanted = {os.fsencode(p) for p in paths}
    found: dict[str, str] = {}
    with os.scandir(done) as it:
        others = [e.name for e in it if e.name.endswith(".sha256")
                  and e.name != f"{delivery}.sha256" and not e.name.startswith(".")]
    for name in others:
        with open(done / name, "rb") as f:
            for line in f:
                # Escaped lines (a leading backslash) are parsed; the rest sliced.
                raw = os.fsencode(parse_line(line)[0]) if line[:1] == b"\\" else line[66:-1]
                if raw in wanted:
                    found.setdefault(os.fsdecode(raw), name[:-len(".sha256")])
    return found


def unpublish(dest_fd: int, pub: Published, service_uid: int, others: dict[str, str],
              dry_run: bool) -> Result:
    """Remove (or with dry_run only judge) each file and then each empty directory."""
    res = Result()
    with DirCache(dest_fd) as dest:
        for path, digest in pub.files:
            if path in others:
                res.kept.append((path, f"delivered by {others[path]} too"))
                continue
            verdict = _remove_file(dest, path, digest, service_uid, dry_run)
            if verdict == REMOVED:
                res.removed.append(path)
                if faults.enabled():
                    point(f"unpublished:{len(res.removed)}")
            elif verdict == GONE:
                res.gone.append(path)
            else:
                res.kept.append((path, verdict))
        for rel in reversed(pub.dirs):  # children first
            verdict = _remove_dir(dest, rel, service_uid, dry_run, res)
            if verdict == REMOVED:
                res.dirs_removed.append(rel)
            elif verdict != GONE:
                res.kept.append((rel + "/", verdict))
    return res


def _look(dest: DirCache, path: str, is_kind: Callable[[int], bool], kind: str,
          service_uid: int) -> tuple[int, str, os.stat_result] | str:
    """(parent fd, name, lstat) of a path that is still of its kind and the service's;
    else GONE or why it is kept."""
    parent, _, name = path.rpartition("/")
    try:
        dfd = dest.dir_fd(parent)
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return GONE
    except OSError as e:
        return _why(e)
    if not is_kind(st.st_mode):
        return f"changed since delivery: not a {kind} now"
    if st.st_uid != service_uid:
        return "changed since delivery: owned by another user now"
    return dfd, name, st


def _remove_file(dest: DirCache, path: str, digest: bytes, service_uid: int,
                 dry_run: bool) -> str:
    """REMOVED, GONE or why the file is kept."""
    found = _look(dest, path, stat.S_ISREG, "regular file", service_uid)
    if isinstance(found, str):
        return found
    dfd, name, st = found
    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=dfd)
    except FileNotFoundError:
        return GONE
    try:
        if os.fstat(fd).st_ino != st.st_ino:
            return "changed since delivery: replaced while undo looked"
        if hash_fd(fd, st.st_size) != digest:
            return "changed since delivery: other content"
    finally:
        os.close(fd)
    if dry_run:
        return REMOVED
    # The name must still be the inode just hashed (only root and the service
    # write here, but a rerun of a delivery might).
    try:
        if os.stat(name, dir_fd=dfd, follow_symlinks=False).st_ino != st.st_ino:
            return "changed since delivery: replaced while undo looked"
        os.unlink(name, dir_fd=dfd)
    except FileNotFoundError:
        return GONE
    return REMOVED


def _remove_dir(dest: DirCache, rel: str, service_uid: int, dry_run: bool,
                res: Result) -> str:
    found = _look(dest, rel, stat.S_ISDIR, "directory", service_uid)
    if isinstance(found, str):
        return found
    dfd, name, _ = found
    if dry_run:
        return _empty_after(dest, rel, res)
    try:
        os.rmdir(name, dir_fd=dfd)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return "not empty: holds files this delivery did not create (or kept ones)"
        return _why(e)
    return REMOVED


def _empty_after(dest: DirCache, rel: str, res: Result) -> str:
    """--dry-run: whether the directory would be empty once the removals were done."""
    going = {p for p in res.removed if p.rpartition("/")[0] == rel}
    going |= {d for d in res.dirs_removed if d.rpartition("/")[0] == rel}
    names = os.listdir(dest.dir_fd(rel))
    prefix = rel + "/"
    if all(prefix + n in going for n in names):
        return REMOVED
    return "not empty: holds files this delivery did not create (or kept ones)"


def _why(e: OSError) -> str:
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        return "changed since delivery: a directory on its path is a symlink or a file now"
    return f"could not be checked: {e.strerror}"


def shown(path: str) -> str:
    """A path as undo prints and records it."""
    return printable(path)
