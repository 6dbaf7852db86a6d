"""Each uploader's outcomes: a folder in the dropbox that only they can read.

    <study>/users/                   0751 svc:svc  only the service group lists who uploads
    <study>/users/<user>/            0750 svc:svc  plus the POSIX ACL entry user:<uid>:r-x
    <study>/users/<user>/inbox/      1770 svc:svc  plus user:<uid>:rwx: their own inbox, which
                                   they can list (a 1733 shared inbox cannot be: Windows
                                   Explorer must list a folder to open it); sticky, as the
                                   shared one, for the claim (claim.py)
    <study>/users/<user>/outcomes/   0755 svc:svc  (reached only through the folder above)
        <id>.txt   for people: what became of the upload and what to do next (CRLF lines,
                   so that Notepad on an old lab PC shows them as lines)
        <id>.json  for programs (`upload --wait`, `status --mine`): the receipt's keys plus
                   "advice"; "outcome" is "pending" while the entry is kept for a later run

An ACL rather than ownership: the service keeps owning every name it writes
(it has no CAP_DAC_OVERRIDE and must never write into a directory an
uploader controls), and the uploader needs no group. These files are
copies for the uploader's convenience: done/ and failed/ hold the records
of authority, so they are written without fsync, and a problem writing
them never fails nor delays a delivery (report.py warns).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import re
import stat
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config, StudyConfig
from .errors import EXIT_DATAERR, EXIT_NOPERM, EXIT_OK, EXIT_TEMPFAIL
from .fsops import user_name
from .log import clean, printable

if TYPE_CHECKING:  # not imported: `where` and `ready` start faster without it
    from .record import Receipt

USERS_MODE = 0o751
FOLDER_MODE = 0o750
OUTCOMES_MODE = 0o755
# Plus user:<uid>:rwx: the uploader's own, listable inbox. Sticky like the shared
# one: a directory the claim took over must stay where it is until the claim's
# rename, which else moved whatever its uploader swapped in (claim.py).
INBOX_MODE = 0o1770
NOTE_MODE = 0o644
PENDING = "pending"
# A user name used as it is for the folder: what useradd, sssd and winbind
# give; anything else (a '/', a leading '.', a '$', control characters) gets the uid,
# so that the folder's path can be written into a unit file (generator.py).
_FOLDER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,63}")

# The kernel's POSIX ACL xattr (include/uapi/linux/posix_acl_xattr.h).
_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_NO_ID = 0xFFFFFFFF

ADVICE = {
    "delivered": "Nothing to do: every file arrived and was verified.",
    "failed": ("Nothing of this upload was delivered. Fix what the reason names, then upload "
               "it again; the server keeps this upload as it was, so nothing is lost. Ask the "
               "study's data manager if the reason is unclear."),
    "rejected": ("Nothing of this upload was delivered: you may not deliver to this study. "
                 "Ask the study's data manager to give you access; the server keeps the "
                 "upload as it was."),
    "undone": ("This upload was delivered, then an admin removed its files from the study's "
               "storage again (a partial or misplaced upload). Ask the study's data manager "
               "whether to upload it again, complete, or to the right study; the server keeps "
               "this upload unless it was purged already."),
    PENDING: ("Nothing to do: the upload is safe on the server and is delivered by itself "
              "once the reason has passed."),
}


def folder_name(uid: int) -> str:
    """The name of an uploader's folder: their user name, or the uid when it is unsafe.

    A name of digits only is the uid form: else a login like a student number
    could be another uploader's uid, whose folder is named by it."""
    name = user_name(uid)
    if _FOLDER_NAME.fullmatch(name) and name not in (".", "..") and not name.isdigit():
        return name
    return str(uid)


def outcomes_dir(study: StudyConfig, uid: int) -> Path:
    """Where the uploader with this uid reads their outcomes."""
    return study.users / folder_name(uid) / "outcomes"


def acl_for_user(uid: int, perm: int) -> bytes:
    """An access ACL: the owner rwx, `uid` and the owning group `perm`, others nothing."""
    entries = [(_USER_OBJ, 7, _NO_ID), (_USER, perm, uid), (_GROUP_OBJ, perm, _NO_ID),
               (_MASK, perm, _NO_ID), (_OTHER, 0, _NO_ID)]
    return struct.pack("<I", _ACL_VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)


def acl_problem(study: StudyConfig) -> str | None:
    """Why uploaders could not read their folders here (no POSIX ACLs), or None."""
    try:
        os.getxattr(study.users, _ACL_XATTR, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
            return (f"{study.users}: the filesystem has no POSIX ACLs (mount it with acl): "
                    "uploaders cannot read their outcomes")
    return None


def folder_problems(study: StudyConfig) -> list[str]:
    """Uploaders' folders whose ACL lets in another uid than their name's (a reused login),
    or that are not the service's: `dittohead check`."""
    found = []
    try:
        names = sorted(os.listdir(study.users))
    except OSError:
        return []
    for name in names:
        path = study.users / name
        try:
            uid = int(name) if name.isdigit() else pwd.getpwnam(name).pw_uid
        except KeyError:
            found.append(f"{path}: no user {name} any more (move the folder away)")
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            found.append(f"{path}: {e.strerror}")
            continue
        try:
            if not _lets_in(fd, uid):
                found.append(f"{path}: its ACL does not let exactly uid {uid} ({name}) in: "
                             "a reused login? Move it away, then `dittohead setup "
                             f"{study.name} --user {name}`")
        finally:
            os.close(fd)
    return found


def _subdir(parent_fd: int, name: str, mode: int, service: tuple[int, int]) -> tuple[int, bool]:
    """Open (making it if missing) a directory the service owns; refuse anything else."""
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
        made = True
    except FileExistsError:
        made = False
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 dir_fd=parent_fd)
    try:
        st = os.fstat(fd)
        if made and (st.st_uid, st.st_gid) != service:
            os.fchown(fd, *service)  # setup runs as root; the service writes here later
        elif not made and st.st_uid != service[0]:
            raise PermissionError(errno.EPERM, "not the service's directory", name)
        if made or stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, made


def open_outcomes(study: StudyConfig, uid: int, service: tuple[int, int]) -> int:
    """The uploader's outcomes directory, opened; their folder (with its own inbox) made
    with its ACLs when missing."""
    users = os.open(study.users, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                    | os.O_CLOEXEC)
    try:
        folder, made = _subdir(users, folder_name(uid), FOLDER_MODE, service)
    finally:
        os.close(users)
    try:
        if made:
            os.setxattr(folder, _ACL_XATTR, acl_for_user(uid, 5))
        elif not _lets_in(folder, uid):
            raise PermissionError(errno.EPERM, f"{study.users / folder_name(uid)} is another "
                                  f"user's (its ACL names another uid than {uid}: a reused "
                                  "login?); move it away, then run `dittohead setup "
                                  f"{study.name} --user NAME`")
        inbox, made = _subdir(folder, "inbox", INBOX_MODE, service)
        try:
            if made:
                os.setxattr(inbox, _ACL_XATTR, acl_for_user(uid, 7))
        finally:
            os.close(inbox)
        return _subdir(folder, "outcomes", OUTCOMES_MODE, service)[0]
    finally:
        os.close(folder)


def _lets_in(fd: int, uid: int) -> bool:
    """Whether a folder's ACL names this uid: a folder found by name may be one an
    earlier account of that name had (its ACL then lets another uid in)."""
    try:
        acl = os.getxattr(fd, _ACL_XATTR)
    except OSError:
        return False
    entries = [struct.unpack_from("<HHI", acl, at) for at in range(4, len(acl) - 7, 8)]
    return {e[2] for e in entries if e[0] == _USER} == {uid}


def _write(dir_fd: int, name: str, data: bytes) -> None:
    tmp = f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 NOTE_MODE, dir_fd=dir_fd)
    try:
        os.fchmod(fd, NOTE_MODE)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def tell(study: StudyConfig, note: dict[str, Any], service: tuple[int, int]) -> None:
    """Write (or replace) the uploader's note about one delivery."""
    uid = int(note.get("uploader_uid", -1))
    if uid < 0:
        return
    fd = open_outcomes(study, uid, service)
    try:
        _write(fd, f"{note['id']}.json",
               json.dumps(note, indent=2, ensure_ascii=False).encode() + b"\n")
        _write(fd, f"{note['id']}.txt", note_text(note).replace("\n", "\r\n").encode())
    finally:
        os.close(fd)


def filed_note(r: Receipt) -> dict[str, Any]:
    """The note about a filed entry: its receipt, with advice."""
    return {**r.to_dict(), "advice": ADVICE[str(r.outcome)]}


def pending_note(r: Receipt) -> dict[str, Any]:
    """The note about an entry kept for a later run (`r` as if filed now, with the reason)."""
    return {**r.to_dict(), "outcome": PENDING, "finished": None, "advice": ADVICE[PENDING]}


def note_text(note: dict[str, Any]) -> str:
    """The note as a person reads it (every name in it is shown escaped already)."""
    outcome = str(note.get("outcome"))
    head = {"delivered": "DELIVERED", "failed": "FAILED, not delivered",
            "rejected": "REJECTED, not delivered",
            "undone": "UNDONE, removed from the study's storage again",
            PENDING: "NOT DELIVERED YET"}
    lines = [f"{note.get('entry')}: {head.get(outcome, outcome)}", "",
             f"Study:     {note.get('study')}",
             f"Upload:    {note.get('entry')}",
             f"Delivery:  {note.get('id')}",
             f"Taken:     {note.get('started')}"]
    if outcome == "delivered":
        lines += [f"Finished:  {note.get('finished')}",
                  f"Files:     {note.get('files')} ({note.get('bytes')} bytes)",
                  f"Into:      {note.get('destination')}"]
        if note.get("skipped"):
            lines.append("Not delivered (ignored names): " + ", ".join(note["skipped"][:20]))
    else:
        lines += ["", f"Why: {clean(str(note.get('reason') or ''))}"]
    lines += ["", str(note.get("advice", ""))]
    return "\n".join(lines) + "\n"


def read_notes(folder: Path, since: float = 0.0) -> list[dict[str, Any]]:
    """The notes (or receipts) in a folder, newest first, of claims made at or after
    `since` (judged by the id's time, so that a big done/ is cheap); unreadable ones
    are skipped."""
    first = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(since))
    notes = []
    with os.scandir(folder) as it:
        names = [e.name for e in it if e.name.endswith(".json") and not e.name.startswith(".")
                 and e.name[:16] >= first]
    for name in names:
        with contextlib.suppress(OSError, ValueError):
            note = json.loads((folder / name).read_bytes())
            if isinstance(note, dict) and "id" in note and "outcome" in note:
                notes.append(note)
    notes.sort(key=lambda n: str(n.get("id")), reverse=True)
    return notes


# How `upload --wait` (local or --host) ends when uploads ended differently:
# each later code wins over the ones before it.
_WAIT_SEVERITY = (EXIT_OK, EXIT_TEMPFAIL, EXIT_DATAERR, EXIT_NOPERM)


def wait_code(note: dict[str, Any] | None) -> int:
    """What `upload --wait` says of one upload: 0 delivered, 77 rejected, 65 failed, 75 no
    outcome yet (no note, or a pending one)."""
    if note is None or note.get("outcome") == PENDING:
        return EXIT_TEMPFAIL
    return {"delivered": EXIT_OK, "rejected": EXIT_NOPERM}.get(str(note.get("outcome")),
                                                               EXIT_DATAERR)


def worst(codes: list[int]) -> int:
    """The exit code of `upload --wait` for all its uploads."""
    return max(codes, key=_WAIT_SEVERITY.index)


def shown(note: dict[str, Any]) -> str:
    """One line about a note, as `upload --wait` and `status --mine` print it."""
    outcome = str(note.get("outcome"))
    what = printable(str(note.get("entry")))
    if outcome == "delivered":
        return (f"{what}: delivered: {note.get('files')} files, {note.get('bytes')} bytes "
                f"to {note.get('destination')} ({note.get('id')})")
    label = "not delivered yet" if outcome == PENDING else outcome
    return f"{what}: {label}: {clean(str(note.get('reason') or ''))} ({note.get('id')})"


def where(config: Config, study: StudyConfig) -> dict[str, Any]:
    """What a client needs to upload to the study as the calling user (`dittohead where`)."""
    uid = os.getuid()
    return {"study": study.name, "user": user_name(uid), "uid": uid,
            "dropbox_root": str(config.dropbox_root), "inbox": str(study.inbox),
            "outcomes": str(outcomes_dir(study, uid)), "quiet_period": study.quiet_period}


def mine(study: StudyConfig, last: int) -> dict[str, Any]:
    """The caller's notes for one study, newest first (`status --mine`)."""
    folder = outcomes_dir(study, os.getuid())
    try:
        notes = read_notes(folder)
        problem = None
    except FileNotFoundError:
        notes, problem = [], None  # nothing uploaded yet
    except OSError as e:
        notes, problem = [], (f"cannot read {folder}: {e.strerror} (ask the admin to run "
                              f"`dittohead setup {study.name}`; the dropbox needs POSIX ACLs)")
    try:  # not taken yet: what is in the caller's own inbox (the shared one cannot be listed)
        waiting = sorted(n for n in os.listdir(folder.parent / "inbox") if not n.startswith("."))
    except OSError:
        waiting = []
    return {"study": study.name, "outcomes": str(folder), "problem": problem,
            "waiting": waiting, "quiet_period": study.quiet_period,
            "uploads": notes[:last] if last else notes}


def mine_text(found: list[dict[str, Any]]) -> str:
    """`status --mine` for people: per study, one line per upload."""
    lines = []
    for s in found:
        lines.append(f"{s['study']}: " + (s["problem"] or f"{len(s['uploads'])} recent "
                                          f"uploads (in {s['outcomes']})"))
        lines += [f"  waiting in your inbox: {printable(n)} (taken once nothing in it has "
                  f"changed for {s['quiet_period']:g} s)" for n in s["waiting"]]
        lines += [f"  {note.get('started')}  {shown(note)}" for note in s["uploads"]]
    return "\n".join(lines)
