"""Scan the inbox and claim ready entries, exactly once.

A claim writes the claim record `processing/<id>.json`, then renames
`inbox/<name>` to `processing/<id>`. The record comes first, so a crash in
between leaves a record whose entry is still in the inbox: `pending_claims`
yields it, and the caller, finding no entry under its id, drops the record;
the entry is then claimed again under a new id. A per-study flock on
processing/ keeps two runs from claiming one entry twice.

A directory is taken over (lockdown.py) between the record and the rename:
the kernel lets a directory move to another parent only if the mover may
write to it (its ".." changes), and the service has no CAP_DAC_OVERRIDE.
Its uploader can then no longer rename it in the sticky inbox (but for a
swap already under way: `_claimed_other`); a run killed in between finds it
there, the service's, and `resume_claim` finishes the rename under the same id.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import StudyConfig
from .errors import ConfigError, DittoheadError, NoSpace, StorageError
from .faults import point
from .fsops import is_enospc, write_atomic
from .lockdown import Lockdown
from .log import printable
from .ownership import Ownership
from .plan import remove_killed, remove_spool
from .readiness import Watch, is_inbox, split_key

# The claim record's "format" (see RECEIPT_FORMAT in record.py for the rules).
CLAIM_FORMAT = 1


@dataclass(frozen=True)
class Claim:
    """One entry taken from the inbox, now at processing/<id>."""

    id: str
    entry: str  # the name as dropped (may hold any bytes but '/' and NUL)
    started: str  # ISO 8601 UTC
    # Who dropped it: the owner of the entry when it was claimed (a lockdown
    # gives the entry to the service, so ownership later says nothing). -1 in
    # a record written before the field existed: the entry's owner then.
    uploader_uid: int = -1
    # When an attempt first found a file still open for writing or changed
    # after the claim (ISO 8601 UTC; "" never), and the files found so far.
    busy_since: str = ""
    busy_files: tuple[str, ...] = ()
    # A directory entry as it was before the claim took it over: dev, ino,
    # uid, gid, mode. A run killed between the takeover and the rename, after
    # its uploader renamed it, finds it by inode and gives it back.
    top: tuple[int, ...] = ()
    # Where it was dropped, relative to the study's root: the shared inbox, or
    # an uploader's own (users/<user>/inbox); where `retry` puts it back.
    inbox: str = "inbox"
    space_told: str = ""  # when its wait for space was told, once (ISO 8601 UTC; "": not)


def now_iso() -> str:
    """The current time, UTC, second precision, ISO 8601 with Z."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_id(study: StudyConfig, entry: str) -> str:
    """A delivery id unique for ever: UTC time, a slug of the name, random hex."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", entry).strip("._-")[:40] or "entry"
    while True:
        candidate = f"{stamp}-{slug}-{os.urandom(3).hex()}"
        if not any(os.path.lexists(d / n) for d in (study.processing, study.done, study.failed)
                   for n in (candidate, candidate + ".json")):
            return candidate


def ready_entries(study: StudyConfig) -> list[str]:
    """Names in the inbox that are ready (readiness.py), oldest first."""
    return Watch(study).scan().ready


def claim(study: StudyConfig, key: str, owner: Ownership) -> Claim | None:
    """Move one ready entry (by its readiness key) to processing/<id>; None if it
    vanished or changed meanwhile. The uploader owns what was moved."""
    folder, entry = split_key(key)
    try:
        pfd = os.open(study.root / folder / entry, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _claim_error(study, folder, entry, e) from None
    fd = -1
    try:
        st = os.fstat(pfd)
        if stat.S_ISDIR(st.st_mode):
            try:  # "." of the inode opened: no name to race on
                fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pfd)
            except OSError as e:
                raise _claim_error(study, folder, entry, e, "CAP_DAC_READ_SEARCH") from None
        c = Claim(id=new_id(study, entry), entry=entry, started=now_iso(),
                  uploader_uid=st.st_uid, inbox=folder,
                  top=(st.st_dev, st.st_ino, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
                  if fd >= 0 else ())
        return _claim_inode(study, c, owner, st, fd)
    finally:
        os.close(pfd)
        if fd >= 0:
            os.close(fd)


def _claim_inode(study: StudyConfig, c: Claim, owner: Ownership, st: os.stat_result,
                 fd: int) -> Claim | None:
    """Record, take over (a directory: fd >= 0), rename; see claim()."""
    entry = c.entry
    record = study.processing / f"{c.id}.json"
    try:
        _write_record(record, c)
    except OSError as e:
        raise _claim_error(study, c.inbox, entry, e) from None
    src, dst = study.root / c.inbox / entry, study.processing / c.id
    taken = False
    try:
        if fd >= 0:
            taken = _take_top(study, c, owner, fd, st)
            if not taken:
                record.unlink()
                return None
        os.rename(src, dst)
    except BaseException as e:
        record.unlink(missing_ok=True)
        # Moving what was opened (a directory taken over, or not a directory) needs no
        # right to it: refused, the name led elsewhere then (_claimed_other).
        swapped = isinstance(e, PermissionError) and os.access(src.parent, os.W_OK | os.X_OK)
        if taken:
            _give_top_back(fd, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
        if isinstance(e, FileNotFoundError) or swapped:
            return None  # the next scan
        if isinstance(e, OSError):
            raise _claim_error(study, c.inbox, entry, e) from None
        raise
    moved = os.lstat(dst)
    if (moved.st_dev, moved.st_ino) == (st.st_dev, st.st_ino):
        return c
    return _claimed_other(study, c, owner, moved, fd if taken else -1, st)


def _claimed_other(study: StudyConfig, c: Claim, owner: Ownership, moved: os.stat_result,
                   taken_fd: int, st: os.stat_result) -> Claim:
    """The rename moved another inode than the one opened (docs/design.md, "Claim"):
    the taken one goes back, what was moved is the claim, credited to its owner."""
    if taken_fd >= 0:
        _give_top_back(taken_fd, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
    c = replace(c, uploader_uid=moved.st_uid, top=())
    _write_record(study.processing / f"{c.id}.json", c)
    if stat.S_ISDIR(moved.st_mode):
        adopt_claimed(study, c, owner)
    return c


def _leads_to(path: Path, st: os.stat_result) -> bool:
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _take_top(study: StudyConfig, c: Claim, owner: Ownership, fd: int,
              st: os.stat_result) -> bool:
    """Take the entry's directory (fd) over; False if the name no longer leads to it."""
    try:
        Lockdown(st.st_uid, owner.uid, owner.service_gid).take_dir(fd, st)
    except ConfigError:
        raise ClaimRefused(f"cannot claim {printable(c.entry)} in {study.root / c.inbox}: "
                           "it cannot be "
                           "taken over from its uploader (does the service have "
                           "CAP_CHOWN?). The entry waits in the inbox.") from None
    point("chowned")
    if _leads_to(study.root / c.inbox / c.entry, st):
        return True
    # Its uploader renamed it before it was taken over: give it back untouched.
    _give_top_back(fd, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
    return False


def _give_top_back(fd: int, uid: int, gid: int, mode: int) -> None:
    """Undo _take_top: the mode while it is still ours, then the owner."""
    os.fchmod(fd, mode)
    os.fchown(fd, uid, gid)


def resume_claim(study: StudyConfig, c: Claim, service_uid: int) -> bool:
    """Finish a claim killed between the takeover and the rename; True if it was.

    Such an entry is still in the inbox under its name, a directory the
    service owns although the record names another uploader: nothing but a
    claim makes one (`retry` gives an entry back before putting it there).
    """
    if c.uploader_uid in (-1, service_uid) or any(
            os.path.lexists(d / n) for d in (study.done, study.failed)
            for n in (c.id, f"{c.id}.json")):
        return False
    try:
        st = os.lstat(study.root / c.inbox / c.entry)
    except FileNotFoundError:
        st = None
    if st is None or not stat.S_ISDIR(st.st_mode) or st.st_uid != service_uid or (
            c.top and (st.st_dev, st.st_ino) != tuple(c.top[:2])):
        _give_back_renamed(study, c, service_uid)
        return False
    try:
        os.rename(study.root / c.inbox / c.entry, study.processing / c.id)
    except OSError as e:
        raise _claim_error(study, c.inbox, c.entry, e) from None
    return True


def _give_back_renamed(study: StudyConfig, c: Claim, service_uid: int) -> None:
    """The taken directory under another name (its uploader renamed it just before
    the takeover, and the run was killed before it could tell): give it back."""
    if len(c.top) != 5:
        return
    dev, ino, uid, gid, mode = c.top
    try:
        names = os.listdir(study.root / c.inbox)
    except OSError:
        return
    for name in names:
        try:
            fd = os.open(study.root / c.inbox / name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (dev, ino) and st.st_uid == service_uid:
                _give_top_back(fd, uid, gid, mode)
                return
        finally:
            os.close(fd)


def adopt_claimed(study: StudyConfig, c: Claim, owner: Ownership) -> None:
    """Take over the directory of a claim made before claims did (an older version).

    Else an entry rejected before its walk could not be moved on to failed/.
    """
    try:
        fd = os.open(study.processing / c.id, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                     | os.O_CLOEXEC)
    except OSError:
        return  # a plain file, or unreadable: examine says why
    try:
        st = os.fstat(fd)
        if st.st_uid != owner.uid and c.uploader_uid in (-1, st.st_uid):
            Lockdown(st.st_uid, owner.uid, owner.service_gid).take_dir(fd, st)
    finally:
        os.close(fd)


def pending_claims(study: StudyConfig) -> Iterator[Claim]:
    """Claim records a previous run left in processing/ (a crash, or retry later). The
    caller decides by where the entry is: still in processing/ (deliver again), in done/
    or failed/ (a crash while filing: report it), or nowhere (still in the inbox)."""
    for record in sorted(study.processing.glob("*.json")):
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
            c = Claim(id=data["id"], entry=os.fsdecode(bytes.fromhex(data["entry_hex"])),
                      started=data["started"], uploader_uid=int(data.get("uploader_uid", -1)),
                      busy_since=str(data.get("busy_since", "")),
                      busy_files=tuple(str(f) for f in data.get("busy_files", ())),
                      top=tuple(int(x) for x in data.get("top", ())),
                      inbox=_inbox(data.get("inbox", "inbox")),
                      space_told=str(data.get("space_told", "")))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a claim record of ours; `check` reports strays
        yield c


_KILLED = re.compile(r"\.killed-[0-9]+$")


def sweep_stale(study: StudyConfig) -> None:
    """Remove temporary files a killed run left in processing/ (call with the lock held):
    `.<id>.json.tmp` (its entry is still in the inbox), plans of claims that are gone,
    and workers' part files (`.<id>.<k>.plan`, `.sha256`, `.published`: no claim is `<id>.<k>`)."""
    for p in study.processing.glob(".*"):
        name = p.name
        if name.endswith(".tmp"):
            p.unlink(missing_ok=True)
        elif name.endswith((".plan", ".state", ".sha256", ".published", ".dirs")):
            # A killed attempt's kept plan (`.<id>.killed-<k>.plan`) lives as
            # long as its claim: it says what to undo should the entry fail.
            claim_id = _KILLED.sub("", name[1:].rsplit(".", 1)[0])
            if not (study.processing / f"{claim_id}.json").exists():
                p.unlink(missing_ok=True)


def release(study: StudyConfig, c: Claim) -> None:
    """Forget the claim record once the entry has been filed in done/ or failed/."""
    (study.processing / f"{c.id}.json").unlink(missing_ok=True)
    remove_spool(study.processing, c.id)
    remove_killed(study.processing, c.id)


def note_busy(study: StudyConfig, c: Claim, files: list[str], keep: int) -> Claim:
    """Record in the claim that an attempt found `files` busy; keep at most `keep` names."""
    names = tuple(dict.fromkeys([*c.busy_files, *files]))[:keep]
    return note(study, c, busy_since=c.busy_since or now_iso(), busy_files=names)


def note(study: StudyConfig, c: Claim, **changes: Any) -> Claim:
    """The claim with `changes` (Claim's fields), written to its record."""
    c = replace(c, **changes)
    _write_record(study.processing / f"{c.id}.json", c)
    return c


def busy_seconds(c: Claim) -> float:
    """How long ago an attempt first found the entry busy (0 if never)."""
    if not c.busy_since:
        return 0.0
    since = dt.datetime.strptime(c.busy_since, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    return (dt.datetime.now(dt.UTC) - since).total_seconds()


class ClaimRefused(ConfigError):
    """The service may not move an entry out of the inbox: its privileges or setup are wrong."""


def _claim_error(study: StudyConfig, folder: str, entry: str, e: OSError,
                 cap: str = "CAP_DAC_READ_SEARCH and CAP_CHOWN") -> DittoheadError:
    """What a failed claim means for the run, with the true reason (the entry stays put)."""
    what = f"cannot claim {printable(entry)} in {study.root / folder}: {e.strerror}"
    if is_enospc(e):
        return NoSpace(f"{what}: free space or inodes on the dropbox's filesystem "
                              "(the entry waits in the inbox)")
    if e.errno in (errno.EROFS, errno.EIO, errno.EUCLEAN):
        return StorageError(f"{what}: the dropbox's storage failed or went read-only; "
                            "see the kernel log (the entry waits in the inbox)")
    if e.errno in (errno.EACCES, errno.EPERM):
        return ClaimRefused(f"{what} (does the service have {cap}? is the "
                            f"study set up: `dittohead setup {study.name}`?)")
    if e.errno == errno.EXDEV:
        return ClaimRefused(f"{what}: the inbox and processing/ must be on one filesystem")
    raise e


def _inbox(value: object) -> str:
    """A claim record's inbox, trusted only when it is one of the places entries come from."""
    if is_inbox(str(value)):
        return str(value)
    raise ValueError(f"not an inbox: {value!r}")


def _write_record(path: Path, c: Claim) -> None:
    data = {"format": CLAIM_FORMAT, "id": c.id,
            "entry": os.fsencode(c.entry).decode("utf-8", "backslashreplace"),
            "entry_hex": os.fsencode(c.entry).hex(), "started": c.started,
            "uploader_uid": c.uploader_uid}
    optional = {"top": list(c.top), "inbox": "" if c.inbox == "inbox" else c.inbox,
                "busy_since": c.busy_since, "space_told": c.space_told}
    data |= {k: v for k, v in optional.items() if v}
    if c.busy_since:
        data["busy_files"] = list(c.busy_files)
    write_atomic(path, json.dumps(data).encode() + b"\n")
