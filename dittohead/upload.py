"""`dittohead upload`: the user's side, done right.

Copies each PATH into the inbox as `.<name>` (a dot name never triggers a
delivery), makes it readable to its owner, fsyncs every file, then renames
it to `<name>` without replacing anything already waiting there. Symlinks,
FIFOs, sockets and devices are refused before anything is copied: the
service would fail the entry for them anyway.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .config import StudyConfig
from .entrycheck import entry_name, refuse_special
from .errors import DittoheadError, TemporaryError, UsageError
from .fsops import rename_noreplace
from .log import clean, printable
from .outcomes import PENDING, outcomes_dir, read_notes


def _copy(src: str, dst: str) -> None:
    shutil.copy2(src, dst, follow_symlinks=False)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | stat.S_IRUSR)
        os.fsync(fd)
    finally:
        os.close(fd)


def upload(study: StudyConfig, path: Path) -> str:
    """Copy one file or directory into the inbox and make it ready; return its name."""
    name = entry_name(path)
    refuse_special(path)
    final = study.inbox / name
    if os.path.lexists(final):
        raise DittoheadError(f"{printable(str(final))} already waits in the inbox; try again "
                             "when it has been delivered")
    tmp = study.inbox / f".{name}.{os.getpid()}"
    try:
        if path.is_dir():
            shutil.copytree(path, tmp, symlinks=True, copy_function=_copy)
            for top, dirs, _ in os.walk(tmp):
                for d in [top, *[os.path.join(top, x) for x in dirs]]:
                    os.chmod(d, stat.S_IMODE(os.lstat(d).st_mode) | 0o700)
            # Private until claimed: it may wait in the inbox a quiet period,
            # and a group-writable directory copied from a shared project
            # folder would let others move files out of it or into it.
            os.chmod(tmp, 0o700)
        else:
            _copy(str(path), str(tmp))
        rename_noreplace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    return name


WAIT_POLL = 0.5  # seconds between looks while waiting for an outcome


@dataclass(frozen=True)
class Before:
    """What there was before an upload: a note of an earlier upload of the same name,
    claimed in the same second, must not pass for this one's."""

    since: float
    known: frozenset[str]


def before(study: StudyConfig) -> Before:
    """Take note of the outcomes there are now, before uploading."""
    since = time.time() - 1
    return Before(since, frozenset(str(n.get("id")) for place in _places(study)
                                   for n in _notes(place, since)))


def wait(study: StudyConfig, name: str, then: Before, timeout: float) -> dict[str, Any]:
    """The outcome of one upload once it has one: the uploader's note, or (for an admin)
    the receipt; TemporaryError when `timeout` passes first."""
    deadline = time.monotonic() + timeout
    pending: dict[str, Any] | None = None
    while True:
        if not os.path.lexists(study.inbox / name):
            note = _outcome(study, name, then)
            if note is not None and note["outcome"] != PENDING:
                return note
            pending = note or pending
        if time.monotonic() > deadline:
            break
        time.sleep(WAIT_POLL)
    shown = printable(name)
    if pending is not None:
        why = (f"not delivered yet: {clean(str(pending.get('reason')))}; the service "
               "tries again by itself")
    elif os.path.lexists(study.inbox / name):
        why = (f"still in the inbox: it is taken once nothing in it has changed for "
               f"{study.quiet_period:g} s (is dittohead@{study.name}.path running?)")
    else:
        why = (f"taken by the service, but no outcome in {outcomes_dir(study, os.getuid())} "
               "yet (if that folder cannot be read, ask the admin: the dropbox needs POSIX "
               "ACLs)")
    raise TemporaryError(f"{shown}: no outcome after {timeout:g} s: {why}")


def _places(study: StudyConfig) -> list[Path]:
    """The caller's outcomes folder, and the receipts when the caller may read them."""
    return [outcomes_dir(study, os.getuid())] + [
        d for d in (study.done, study.failed) if os.access(d, os.R_OK | os.X_OK)]


def _notes(place: Path, since: float) -> list[dict[str, Any]]:
    try:
        return read_notes(place, since)
    except OSError:
        return []


def _outcome(study: StudyConfig, name: str, then: Before) -> dict[str, Any] | None:
    """The newest note or receipt about `name` that was not there before the upload.

    Only of an entry from the shared inbox, where `upload` puts it: the same
    name may be dropped into the uploader's own inbox meanwhile (over SMB)."""
    hexname = os.fsencode(name).hex()
    for place in _places(study):
        for note in _notes(place, then.since):
            if note.get("entry_hex") == hexname and str(note.get("id")) not in then.known \
                    and note.get("inbox", "inbox") == "inbox":
                return note
    return None


def _entry_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        raise UsageError(f"{printable(name)}: not an entry name")


def waiting(study: StudyConfig, names: list[str]) -> list[str]:
    """Those of names already waiting in the inbox (`where STUDY NAME...`): a client
    refuses them before sending anything. The inbox cannot be listed, but looked into."""
    for n in names:
        _entry_name(n)
    return [n for n in names if os.path.lexists(study.inbox / n)]


def serve_ready(study: StudyConfig, requests: TextIO, answers: TextIO) -> None:
    """`where --then-ready`: for each line `go HEX` (an entry name's bytes), rename `.NAME`
    to `NAME` as `ready` does and answer one JSON line, until the end of input."""
    for line in requests:
        word, _, arg = line.strip().partition(" ")
        if word == "hello":  # what the client sends first (see remotesession.py)
            continue
        try:
            if word != "go":
                raise DittoheadError(f"not a request: {printable(line.strip())}")
            ready(study, os.fsdecode(bytes.fromhex(arg)))
            answer: dict[str, object] = {"ok": True}
        except ValueError:
            answer = {"ok": False, "waits": False, "error": "not a hex name"}
        except DittoheadError as e:
            answer = {"ok": False, "waits": "already waits" in str(e), "error": str(e)}
        except OSError as e:
            answer = {"ok": False, "waits": False, "error": printable(str(e))}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


def ready(study: StudyConfig, name: str, check: bool = False) -> None:
    """Rename the caller's `.NAME` in the inbox to NAME, never replacing (`upload --host`).

    check: only say whether NAME is free. The inbox (1733) cannot be listed,
    but a name in it can be looked up.
    """
    _entry_name(name)
    final = study.inbox / name
    if os.path.lexists(final):
        raise DittoheadError(f"{printable(name)} already waits in the inbox; try again "
                             "when it has been delivered")
    if check:
        return
    tmp = study.inbox / f".{name}"
    try:
        st = os.lstat(tmp)
    except FileNotFoundError:
        raise DittoheadError(f".{printable(name)} is not in the inbox: nothing to "
                             "rename") from None
    if st.st_uid != os.geteuid():
        raise DittoheadError(f".{printable(name)} in the inbox is not yours")
    try:
        rename_noreplace(tmp, final)
    except FileExistsError:
        raise DittoheadError(f"{printable(name)} already waits in the inbox; try again "
                             "when it has been delivered") from None
