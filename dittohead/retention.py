"""The `dittohead purge` command: what purge.py removes, study by study, and what it says.

Order for one done/ copy, each step rerunnable: rename done/<id> to
done/.purge-<id> (from then on the copy is gone as a whole for every reader),
add `purged` to the receipt, remove that tree, log the event. A run killed
anywhere is finished by the next one: a `.purge-<id>` left over is removed
(and its receipt marked if it is not yet). Only receipts with a copy beside
them are read.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import syslog
import time
from dataclasses import dataclass

from . import log
from .config import Config, StudyConfig
from .errors import DittoheadError
from .fsops import DIR_FLAGS
from .purge import (
    DAY,
    PURGING,
    Tally,
    Upload,
    days,
    iso_age,
    mark_purged,
    measure,
    read_json,
    remove_tree,
    uploads,
)


@dataclass(frozen=True)
class Run:
    """One purge: whose files it takes over, and what it only reports."""

    uid: int
    gid: int
    dry_run: bool
    abandoned: bool  # --abandoned: also remove abandoned uploads


def start(cfg: Config, dry_run: bool, abandoned: bool) -> Run:
    """The service user's ids (who may run it at all: access.py)."""
    try:
        pw = pwd.getpwnam(cfg.service_user)
    except KeyError:
        raise DittoheadError(f"service_user {cfg.service_user!r} does not exist "
                             "(run systemd-sysusers)") from None
    return Run(pw.pw_uid, pw.pw_gid, dry_run, abandoned)


def purge_study(run: Run, study: StudyConfig) -> tuple[list[str], bool]:
    """Purge one study; the lines to show, and whether everything went as asked."""
    lines: list[str] = []
    ok = _purge_done(run, study, lines)
    ok = _abandoned(run, study, lines) and ok
    if not lines:
        keep = "null" if study.keep_done_days is None else f"{study.keep_done_days:g}"
        lines.append(f"{study.name}: nothing to purge (keep_done_days: {keep})")
    return lines, ok


def _purge_done(run: Run, study: StudyConfig, lines: list[str]) -> bool:
    try:
        done = os.open(study.done, DIR_FLAGS)
    except OSError as e:
        lines.append(f"{study.name}: cannot open {study.done}: {e.strerror}")
        return False
    # `undo` rewrites receipts and moves them out of done/ holding this lock too.
    fcntl.flock(done, fcntl.LOCK_EX)
    ok = True
    try:
        names = set(os.listdir(done))
        for n in sorted(names):
            if n.startswith(PURGING) and not run.dry_run:
                ok = _purge_one(run, study, done, n[len(PURGING):], lines) and ok
        if study.keep_done_days is None:
            return ok
        keep = study.keep_done_days * DAY
        now = time.time()
        for n in sorted(names):
            if n.startswith(".") or not n.endswith(".json") or n[:-5] not in names:
                continue  # only receipts with their copy beside them: a daily purge
                # reads keep_done_days' worth of receipts, not every one ever written
            data = read_json(study.done / n)
            age = iso_age(data.get("finished"), now) if data else None
            if data is None or age is None:
                lines.append(f"{study.name}: done/{log.printable(n)} is not a readable "
                             "receipt: its copy is kept")
                ok = False
            elif age >= keep:
                ok = _purge_one(run, study, done, n[:-5], lines) and ok
    finally:
        os.close(done)
    return ok


def _purge_one(run: Run, study: StudyConfig, done: int, delivery: str,
               lines: list[str]) -> bool:
    """Mark its receipt and remove done/<delivery> (or its .purge- leftover); log it."""
    receipt = study.done / f"{delivery}.json"
    data = read_json(receipt) or {}
    entry = _entry(data)
    what = f"{study.name}: done/{log.printable(delivery)} ({log.printable(entry)})"
    if run.dry_run:
        held = _held(done, delivery)
        lines.append(f"{what}: would be purged ({held.files} files, {held.nbytes} bytes)")
        return True
    gone = PURGING + delivery
    try:
        if os.path.lexists(study.done / delivery):
            os.rename(delivery, gone, src_dir_fd=done, dst_dir_fd=done)
        if data and "purged" not in data:
            mark_purged(receipt, data)
        freed = remove_tree(done, gone, run.uid, run.gid)
    except OSError as e:
        lines.append(f"{what}: could not be purged, kept (the next purge tries again): {e}")
        _warn(study, lines[-1])
        return False
    log.event("purged", f"{what}: purged, {freed.files} files, {freed.nbytes} bytes freed",
              study=study.name, entry=entry, uploader=str(data.get("uploader", "")),
              delivery=delivery, files=freed.files, bytes=freed.nbytes)
    lines.append(f"{what}: purged ({freed.files} files, {freed.nbytes} bytes freed)")
    return True


def _entry(data: dict[str, object]) -> str:
    raw = data.get("entry_hex")
    try:
        return os.fsdecode(bytes.fromhex(str(raw))) if raw else str(data.get("entry", ""))
    except ValueError:
        return str(data.get("entry", ""))


def _held(done: int, delivery: str) -> Tally:
    try:
        return measure(done, delivery)[2]
    except OSError:
        return Tally()


def _abandoned(run: Run, study: StudyConfig, lines: list[str]) -> bool:
    """Remove (with --abandoned or purge_abandoned) or only name the abandoned uploads."""
    remove = run.abandoned or study.purge_abandoned
    limit = study.abandoned_days * DAY
    found = [u for u in uploads(study) if u.age > limit]
    ok = True
    for u in found:
        if not remove:
            lines.append(f"{study.name}: {u.shown} of {log.printable(u.uploader)} is "
                         f"abandoned (unchanged for {days(u.age)}): kept; `dittohead purge "
                         f"--abandoned {study.name}` removes it")
        elif not u.seen_all:
            lines.append(f"{study.name}: {u.shown} of {log.printable(u.uploader)}: a directory "
                         "of it cannot be read, so its age is not known: kept")
            ok = False
        elif run.dry_run:
            lines.append(f"{study.name}: {u.shown} of {log.printable(u.uploader)} would be "
                         f"removed (abandoned: unchanged for {days(u.age)}; {u.held.files} "
                         f"files, {u.held.nbytes} bytes)")
        else:
            ok = _remove_upload(run, study, u, lines) and ok
    return ok


def _remove_upload(run: Run, study: StudyConfig, u: Upload, lines: list[str]) -> bool:
    what = f"{study.name}: {u.shown} of {log.printable(u.uploader)}"
    why = f"unchanged for {days(u.age)}, more than abandoned_days ({study.abandoned_days:g})"
    fd = os.open(study.root / u.folder, DIR_FLAGS)
    try:
        # Looked at again just before: an upload that moved on is not abandoned.
        newest, complete, _ = measure(fd, u.name)
        if not complete or time.time_ns() - newest <= study.abandoned_days * DAY * 1e9:
            lines.append(f"{what}: changed meanwhile, kept")
            return True
        freed = remove_tree(fd, u.name, run.uid, run.gid)
    except FileNotFoundError:
        lines.append(f"{what}: gone meanwhile")
        return True
    except OSError as e:
        lines.append(f"{what}: could not be removed ({e}); what is left is the service's "
                     "now, remove it by hand")
        _warn(study, lines[-1])
        return False
    finally:
        os.close(fd)
    log.event("abandoned-removed", f"{what}: abandoned upload removed ({why}); "
              f"{freed.nbytes} bytes freed", study=study.name, entry=u.name,
              uploader=u.uploader, files=freed.files, bytes=freed.nbytes, reason=why)
    lines.append(f"{what}: abandoned upload removed ({why}; {freed.files} files, "
                 f"{freed.nbytes} bytes freed)")
    return True


def _warn(study: StudyConfig, text: str) -> None:
    log.send(text, priority=syslog.LOG_WARNING, DITTOHEAD_STUDY=study.name,
             DITTOHEAD_REASON=text)
