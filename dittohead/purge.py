"""Retention: `dittohead purge` removes old done/ copies and abandoned `.name` uploads.

done/<id>/ is a second copy of a delivery, kept keep_done_days after its
receipt's `finished`; the receipt and the manifest stay for ever (the audit
trail), failed/ and the destination are never touched. An abandoned upload
is a `.name` in an inbox whose newest ctime is older than abandoned_days.

Entries filed before the lockdown, and uploads, are trees of their
uploaders' directories. Without CAP_DAC_OVERRIDE the service can remove
names only from directories it owns: each directory is taken over (lchown
by name with CAP_CHOWN, then opened O_NOFOLLOW relative to its parent, which
is already the service's) before its names are removed, parents first.
docs/design.md, "Retention".
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import log
from .claim import now_iso
from .config import Config, StudyConfig
from .errors import ConfigError
from .fsops import DIR_FLAGS, user_name, write_atomic
from .readiness import drop_folders

DAY = 86400.0
PURGING = ".purge-"  # done/.purge-<id>: a done/ copy being removed (a rerun finishes it)
MAX_DEPTH = 1024  # directory levels taken apart; deeper is left, named, for an admin


@dataclass(frozen=True)
class Tally:
    """What a tree holds (or held): regular files and their bytes."""

    files: int = 0
    nbytes: int = 0

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.files + other.files, self.nbytes + other.nbytes)


@dataclass(frozen=True)
class Upload:
    """A `.name` in an inbox: where, whose, and how long unchanged."""

    folder: str  # relative to the study's root: inbox or users/<user>/inbox
    name: str
    uploader: str
    age: float  # seconds since its newest ctime
    seen_all: bool  # False: a directory of it could not be read (its age is a guess)
    held: Tally

    @property
    def shown(self) -> str:
        return f"{self.folder}/{log.printable(self.name)}"


def _lstat(fd: int, name: str) -> os.stat_result:
    return os.stat(name, dir_fd=fd, follow_symlinks=False)


def measure(parent: int, name: str) -> tuple[int, bool, Tally]:
    """Newest ctime (ns) in parent/name, whether every directory was read, and its tally.

    Reads only (no takeover): the same walk as readiness, to the end, one
    open directory per level.
    """
    st = _lstat(parent, name)
    w = _Measure(st.st_ctime_ns)
    if not stat.S_ISDIR(st.st_mode):
        return w.newest, True, Tally(1, st.st_size) if stat.S_ISREG(st.st_mode) else Tally()
    stack: list[tuple[int, list[str]]] = []
    try:
        w.descend(stack, parent, name)
        while stack:
            fd, subdirs = stack[-1]
            if not subdirs:
                os.close(stack.pop()[0])
            elif len(stack) <= MAX_DEPTH:
                w.descend(stack, fd, subdirs.pop())
            else:
                subdirs.clear()
                w.complete = False
    finally:
        for fd, _ in stack:
            os.close(fd)
    return w.newest, w.complete, w.tally


class _Measure:
    """The state of one measuring walk."""

    def __init__(self, newest: int) -> None:
        self.newest, self.complete, self.tally = newest, True, Tally()

    def descend(self, stack: list[tuple[int, list[str]]], parent: int, name: str) -> None:
        """List one directory: note its names' ctimes and files, push it with its subdirs."""
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent)
        except OSError:
            self.complete = False
            return
        subdirs: list[str] = []
        stack.append((fd, subdirs))
        with os.scandir(fd) as it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:  # removed while we look: changed now
                    self.newest = max(self.newest, time.time_ns())
                    continue
                self.newest = max(self.newest, st.st_ctime_ns)
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append(e.name)
                elif stat.S_ISREG(st.st_mode):
                    self.tally += Tally(1, st.st_size)


def remove_tree(parent: int, name: str, uid: int, gid: int) -> Tally:
    """Remove parent/name (parent: the service's), taking each directory over first.

    Never follows a symlink: a directory is lchown'ed by name, then opened
    O_NOFOLLOW and checked to be the service's before anything in it goes.
    One open directory per level; each directory is listed once.
    """
    st = _lstat(parent, name)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent)
        return Tally(1, st.st_size) if stat.S_ISREG(st.st_mode) else Tally()
    tally = Tally()
    # Per level: the directory (fd), its name in its parent, the parent, subdirs left.
    stack: list[tuple[int, str, int, list[tuple[str, os.stat_result]]]] = []
    try:
        fd = _take(parent, name, st, uid, gid)
        stack.append((fd, name, parent, []))
        tally += _clear_files(fd, stack[-1][3])
        while stack:
            fd, sub_name, at, subdirs = stack[-1]
            if subdirs:
                if len(stack) >= MAX_DEPTH:
                    raise OSError(errno.ELOOP, "deeper than dittohead takes apart; remove by "
                                  "hand", subdirs[-1][0])
                child, cst = subdirs.pop()
                stack.append((_take(fd, child, cst, uid, gid), child, fd, []))
                tally += _clear_files(stack[-1][0], stack[-1][3])
                continue
            stack.pop()
            os.close(fd)
            os.rmdir(sub_name, dir_fd=at)
    finally:
        for fd, _, _, _ in stack:
            os.close(fd)
    return tally


def _clear_files(fd: int, subdirs: list[tuple[str, os.stat_result]]) -> Tally:
    """Unlink every non-directory in fd; note its subdirectories in subdirs."""
    tally = Tally()
    with os.scandir(fd) as it:
        entries = list(it)
    for e in entries:
        est = e.stat(follow_symlinks=False)
        if stat.S_ISDIR(est.st_mode):
            subdirs.append((e.name, est))
            continue
        os.unlink(e.name, dir_fd=fd)
        if stat.S_ISREG(est.st_mode):
            tally += Tally(1, est.st_size)
    return tally


def _take(parent: int, name: str, st: os.stat_result, uid: int, gid: int) -> int:
    """Make directory parent/name the service's (owner rwx) and return it opened."""
    if (st.st_uid, st.st_gid) != (uid, gid):
        try:
            os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)
        except PermissionError:
            raise ConfigError(f"cannot take {log.printable(name)} over from its owner to "
                              "remove it: purge needs CAP_CHOWN (see "
                              "dittohead-purge.service), or root") from None
    fd = os.open(name, DIR_FLAGS, dir_fd=parent)
    try:
        now = os.fstat(fd)
        if not stat.S_ISDIR(now.st_mode) or now.st_uid != uid:
            raise OSError(errno.EAGAIN, "replaced while being taken over", name)
        if stat.S_IMODE(now.st_mode) != 0o700:
            # Owner rwx to empty it; nobody else may add, rename or swap a name
            # in it meanwhile (a 0777 directory stays writable after a chown).
            os.fchmod(fd, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


def iso_age(text: object, now: float) -> float | None:
    """Seconds since an ISO 8601 UTC time of a receipt, or None if it is none."""
    try:
        when = dt.datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except (TypeError, ValueError):
        return None
    return now - when.timestamp()


def read_json(path: Path) -> dict[str, Any] | None:
    """A receipt as raw JSON (every key kept, also those of newer versions), or None."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def mark_purged(path: Path, data: dict[str, Any]) -> None:
    """Add `purged` to a receipt, atomically, keeping every other key as it was."""
    data = {**data, "purged": now_iso()}
    mode = stat.S_IMODE(os.stat(path).st_mode)
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False).encode() + b"\n", mode)


def uploads(study: StudyConfig, now_ns: int | None = None) -> Iterator[Upload]:
    """Every `.name` in the study's inboxes, with its uploader and age."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    for folder in ["inbox", *drop_folders(study)]:
        try:
            fd = os.open(study.root / folder, DIR_FLAGS)
        except OSError:
            continue
        try:
            for name in sorted(n for n in os.listdir(fd) if n.startswith(".")):
                try:
                    owner = _lstat(fd, name).st_uid
                    newest, complete, held = measure(fd, name)
                except FileNotFoundError:
                    continue  # renamed (ready) or removed meanwhile
                yield Upload(folder, name, user_name(owner), (now_ns - newest) / 1e9,
                             complete, held)
        finally:
            os.close(fd)


def abandoned(study: StudyConfig) -> list[Upload]:
    """The study's `.name` uploads unchanged for longer than abandoned_days."""
    return [u for u in uploads(study) if u.age > study.abandoned_days * DAY]


def old_failed(study: StudyConfig, now: float | None = None) -> list[tuple[str, str, float]]:
    """Failed entries older than failed_warn_days: (id, first line of reason, age s)."""
    now = time.time() if now is None else now
    found = []
    try:
        names = sorted(os.listdir(study.failed))
    except OSError:
        return []
    for n in names:
        if not n.endswith(".json") or n.endswith(".retried.json") or n.startswith("."):
            continue
        data = read_json(study.failed / n)
        age = iso_age(data.get("finished"), now) if data else None
        if data is None or age is None or age <= study.failed_warn_days * DAY:
            continue
        reason = str(data.get("reason") or "").splitlines() or [""]
        found.append((n[:-len(".json")], log.clean(reason[0]), age))
    return found


def days(seconds: float) -> str:
    """An age for people: `9.2 days`, `5 hours`, `12 minutes`."""
    if seconds >= DAY:
        return f"{seconds / DAY:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.0f} hours"
    return f"{seconds / 60:.0f} minutes"


# What `status` and `check` show (dittohead/health.py).
def uploading_entries(study: StudyConfig) -> list[dict[str, Any]]:
    """The `.name` uploads in the study's inboxes: name (with its inbox), uploader, age."""
    return [{"name": u.shown, "uploader": u.uploader, "age_seconds": round(u.age)}
            for u in uploads(study)]


def uploading_detail(s: dict[str, Any]) -> list[str]:
    """`status STUDY`: each upload still under a .name, with its uploader and age."""
    return [f"  uploading: {u['name']} by {log.printable(u['uploader'])}, unchanged for "
            f"{days(u['age_seconds'])}" for u in s.get("uploading_entries", [])]


def retention_problems(study: StudyConfig) -> list[str]:
    """Abandoned uploads and failed entries older than failed_warn_days, each with the fix."""
    found = [f"{u.shown} of {log.printable(u.uploader)} is an abandoned upload (unchanged for "
             f"{days(u.age)}, abandoned_days is {study.abandoned_days:g}): `dittohead purge "
             f"--abandoned {study.name}` removes it, or its uploader finishes it"
             for u in abandoned(study)]
    found += [f"failed/{log.printable(d)} failed {days(age)} ago: {why} (fix the cause, then "
              f"`dittohead retry {study.name} {log.printable(d)}`; or remove it: rm -r "
              f"{log.printable(str(study.failed / d))}*)" for d, why, age in old_failed(study)]
    return found


def timer_problems(cfg: Config) -> list[str]:
    """dittohead-purge.timer not enabled while a study keeps done/ copies for a time only."""
    if all(s.keep_done_days is None for s in cfg.studies.values()):
        return []
    unit = "dittohead-purge.timer"
    r = subprocess.run(["systemctl", "is-enabled", unit], capture_output=True, text=True,
                       check=False)
    found = []
    if r.stdout.strip() != "enabled":
        found.append(f"{unit} is {r.stdout.strip() or 'not enabled'}: done/ copies older than "
                     f"keep_done_days stay (systemctl enable --now {unit})")
    r = subprocess.run(["systemctl", "is-failed", "dittohead-purge.service"],
                       capture_output=True, text=True, check=False)
    if r.stdout.strip() == "failed":
        found.append("dittohead-purge.service has failed (journalctl -u dittohead-purge; "
                     "then systemctl reset-failed dittohead-purge.service)")
    return found
