"""`dittohead undo STUDY ID`: remove a delivery's files from the destination, file it in failed/.

Order, each step rerunnable, so a run killed anywhere is finished by the
next: (1) remove what the delivery created (unpublish.py; a file already
gone counts as gone); (2) rewrite the receipt in done/ with outcome
`undone` and what was removed and kept (from here on a rerun removes
nothing more); (3) move the entry, manifest and published record to
failed/; (4) the journal event and the uploader's note; (5) move the
receipt to failed/, last: while it is in done/, the undo is not finished.
All under the study's lock, so no delivery runs meanwhile, and done/'s flock,
which `purge` holds while it rewrites receipts and removes copies there.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import log, notify, outcomes
from .claim import now_iso
from .config import Config, StudyConfig
from .conflicts import open_destination
from .errors import DittoheadError, Outcome
from .faults import point
from .fsops import rename_noreplace, user_name, write_atomic
from .health import DELIVERY_ID_RE
from .log import printable
from .record import ReceiptError, read_receipt
from .studylock import StudyLock
from .unpublish import (
    LISTED,
    Published,
    Result,
    by_birth_time,
    listed_elsewhere,
    read_published,
    unpublish,
)

# What a delivery files besides its receipt, moved with it (the entry itself: "").
FILED = ("", ".sha256", ".published", ".dirs")


@dataclass(frozen=True)
class Service:
    uid: int
    gid: int


def undo(cfg: Config, study: StudyConfig, delivery: str, dry_run: bool) -> list[str]:
    """Undo one delivery (or say what undoing it would do); the lines to print."""
    svc = _service(cfg)
    if not DELIVERY_ID_RE.fullmatch(delivery):
        raise DittoheadError(f"{printable(delivery)}: not a delivery id (like "
                             "20261127T204655Z-s01-session1-9f3a0c; see `dittohead status`)")
    _say_if_busy(study)
    with StudyLock(study), _records_locked(study):
        data = _receipt(study, delivery)
        if data is None:
            return [f"{delivery} is undone already (at {_at(study, delivery)}); its upload "
                    f"is in {study.failed}"]
        if data.get("outcome") == str(Outcome.UNDONE):
            if dry_run:
                return [f"an undo of {delivery} was interrupted: running undo again files "
                        "it in failed/; nothing more would be removed"]
            lines = ["finishing an undo that was interrupted: nothing more is removed"]
            return lines + _file(cfg, study, delivery, data, svc)
        if str(data.get("destination")) != str(study.destination):
            raise DittoheadError(
                f"{delivery} was delivered into {data.get('destination')}, but the study's "
                f"destination is {study.destination} now: undo only removes from the "
                "study's destination; nothing was removed")
        pub, res = _unpublish(study, delivery, data, svc, dry_run)
        lines = _summary(study, delivery, pub, res, dry_run)
        if dry_run:
            return lines
        data.update(outcome=str(Outcome.UNDONE), undone=_record(res, pub),
                    reason=_reason(res))
        write_atomic(study.done / f"{delivery}.json", _json(data))
        point("undo-recorded")
        return lines + _file(cfg, study, delivery, data, svc)


@contextmanager
def _records_locked(study: StudyConfig) -> Iterator[None]:
    """Hold done/'s flock, which `purge` takes too: it rewrites receipts as well."""
    fd = os.open(study.done, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _say_if_busy(study: StudyConfig) -> None:
    """Tell the admin why undo waits: a run holds the study's lock (it may linger)."""
    try:
        fd = os.open(study.processing, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # StudyLock says what is wrong
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"dittohead: a run of {study.name} is delivering; undo waits until it ends",
              file=sys.stderr, flush=True)
    finally:
        os.close(fd)  # releases it, if taken


def _service(cfg: Config) -> Service:
    """The service user (who may run undo is checked before: access.py)."""
    try:
        pw = pwd.getpwnam(cfg.service_user)
    except KeyError:
        raise DittoheadError(f"no service user {cfg.service_user!r}") from None
    return Service(pw.pw_uid, pw.pw_gid)


def _receipt(study: StudyConfig, delivery: str) -> dict[str, Any] | None:
    """The receipt in done/ as JSON data; None when it is in failed/ as undone already."""
    for folder in (study.done, study.failed):
        path = folder / f"{delivery}.json"
        try:
            r = read_receipt(path)
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            continue
        except (OSError, ReceiptError) as e:
            raise DittoheadError(f"{path}: cannot read the receipt ({e}); nothing was "
                                 "changed") from None
        if folder == study.done:
            return data  # type: ignore[no-any-return]
        if r.outcome is Outcome.UNDONE:
            return None
        raise DittoheadError(f"{delivery} was not delivered (outcome {r.outcome}): nothing "
                             "to undo")
    raise DittoheadError(f"no delivery {delivery} in {study.done}")


def _at(study: StudyConfig, delivery: str) -> str:
    data = json.loads((study.failed / f"{delivery}.json").read_bytes())
    return str((data.get("undone") or {}).get("at"))


def _unpublish(study: StudyConfig, delivery: str, data: dict[str, Any], svc: Service,
               dry_run: bool) -> tuple[Published, Result]:
    fd = open_destination(study)
    try:
        try:
            pub = read_published(study.done, delivery) or by_birth_time(
                study.done, delivery, fd, str(data.get("started")),
                str(data.get("finished")), svc.uid)
            others = listed_elsewhere(study.done, delivery, {p for p, _ in pub.files})
        except (FileNotFoundError, ValueError) as e:
            # A record filed by a delivery is missing or damaged: nothing to go by.
            raise DittoheadError(f"{delivery}: its records in {study.done} cannot be read "
                                 f"({e}); nothing was removed") from None
        return pub, unpublish(fd, pub, svc.uid, others, dry_run)
    finally:
        os.close(fd)


def _summary(study: StudyConfig, delivery: str, pub: Published, res: Result,
             dry_run: bool) -> list[str]:
    lines = []
    if pub.fallback:
        lines.append(f"{delivery} was filed before dittohead recorded what a delivery "
                     "creates: its files were told by birth time (while it ran), owner (the "
                     "service) and content (the manifest's)")
    if dry_run:
        lines += [f"would remove {printable(p)}" for p in res.removed]
        lines += [f"would remove the directory {printable(d)}/" for d in res.dirs_removed]
        lines += [f"would keep {printable(p)}: {why}" for p, why in res.kept]
        lines.append(f"dry run: {len(res.removed)} files and {len(res.dirs_removed)} "
                     f"directories would be removed from {study.destination}, "
                     f"{len(res.kept)} kept, {len(res.gone)} gone already; nothing changed")
        return lines
    lines += [f"kept {printable(p)}: {why}" for p, why in res.kept]
    lines.append(f"{delivery}: removed {len(res.removed)} files and {len(res.dirs_removed)} "
                 f"directories from {study.destination}; {len(res.kept)} kept, "
                 f"{len(res.gone)} gone already")
    return lines


def _record(res: Result, pub: Published) -> dict[str, Any]:
    """The receipt's `undone` object."""
    return {"at": now_iso(), "by": _who(), "removed": len(res.removed),
            "gone": len(res.gone), "directories_removed": len(res.dirs_removed),
            "kept": [f"{printable(p)}: {why}" for p, why in res.kept[:LISTED]],
            "kept_count": len(res.kept), "fallback": pub.fallback}


def _who() -> str:
    """Who runs undo, for the record: root run through sudo names the admin too."""
    me = user_name(os.geteuid())
    sudo = os.environ.get("SUDO_USER")
    return f"{me} (sudo by {printable(sudo)})" if sudo and os.geteuid() == 0 else me


def _reason(res: Result) -> str:
    kept = (f"; {len(res.kept)} kept (changed since delivery, or delivered by another "
            "upload too)" if res.kept else "")
    return (f"delivered, then undone by {_who()}: {len(res.removed)} files "
            f"removed from the destination{kept}")


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=2, ensure_ascii=False).encode() + b"\n"


def _file(cfg: Config, study: StudyConfig, delivery: str, data: dict[str, Any],
          svc: Service) -> list[str]:
    """Steps 3 to 5: move everything to failed/, tell, move the receipt last; then mail."""
    entry_there = _move(study, delivery)
    point("undo-moved")
    _tell(study, delivery, data, svc)
    os.rename(study.done / f"{delivery}.json", study.failed / f"{delivery}.json")
    _sync(study.failed)
    _sync(study.done)
    again = (f"the upload is in {study.failed / delivery}: `dittohead retry {study.name} "
             f"{delivery}` delivers it again" if entry_there else
             f"the upload itself is no longer in {study.done} (purged): to deliver it again, "
             "its uploader uploads it again")
    return [again, *_mail(cfg, study, delivery, data, svc, again)]


def _mail(cfg: Config, study: StudyConfig, delivery: str, data: dict[str, Any],
          svc: Service, again: str) -> list[str]:
    """Tell the study's contacts and the uploader by mail (they heard of the delivery);
    the line to print. Sent by the mail unit, or at once where no systemd runs."""
    entry, undone = printable(_entry(data)), data["undone"]
    body = "\n".join([
        f"The delivery {delivery} of {entry} was undone: its files were removed from the "
        "destination again.", "",
        f"Study:       {study.name}", f"Entry:       {entry}", f"Delivery:    {delivery}",
        f"Destination: {data.get('destination')}", f"Undone by:   {undone['by']}",
        f"Removed:     {undone['removed']} files", f"Kept:        {undone['kept_count']} "
        "(changed since delivery, or delivered by another upload too)", "",
        again[0].upper() + again[1:] + "."])
    owner = (svc.uid, svc.gid) if os.geteuid() == 0 else None
    if not notify.send(cfg, study, "undone", f"undone: {entry} ({delivery})", body,
                       str(data.get("uploader") or "") or None, contacts=True, owner=owner):
        return []
    unit = f"dittohead-mail@{study.name}.service"
    if not os.path.isdir("/run/systemd/system"):
        left = notify.send_queued(cfg, study)
        return [f"mail about it {'queued: it goes with the next run' if left else 'sent'}"]
    r = subprocess.run(["systemctl", "start", "--no-block", unit], capture_output=True,
                       text=True, check=False)
    return [f"mail about it queued; {unit} sends it" if r.returncode == 0 else
            "mail about it queued: it goes with the study's next run"]


def _move(study: StudyConfig, delivery: str) -> bool:
    """Move the entry and its records from done/ to failed/; whether the entry is there."""
    for suffix in FILED:
        src, dst = study.done / (delivery + suffix), study.failed / (delivery + suffix)
        try:
            rename_noreplace(src, dst)
        except FileNotFoundError:
            pass  # moved by an interrupted undo, or never there (purged, older records)
    _sync(study.failed)
    return os.path.lexists(study.failed / delivery)


def _sync(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tell(study: StudyConfig, delivery: str, data: dict[str, Any], svc: Service) -> None:
    """The journal event and the uploader's note (a note that cannot be written is a warning)."""
    undone = data["undone"]
    log.event("undone", f"{study.name}: undid {printable(delivery)} "
              f"({printable(str(data.get('entry')))}): {data['reason']}",
              study=study.name, entry=_entry(data), uploader=str(data.get("uploader")),
              delivery=delivery, destination=str(data.get("destination")),
              files=undone["removed"], reason=data["reason"])
    note = {**data, "advice": outcomes.ADVICE[str(Outcome.UNDONE)]}
    try:
        outcomes.tell(study, note, (svc.uid, svc.gid))
        if os.geteuid() == 0 and int(data.get("uploader_uid", -1)) >= 0:
            # As the service's own notes are: it replaces them later.
            folder = outcomes.outcomes_dir(study, int(data["uploader_uid"]))
            for name in (f"{delivery}.json", f"{delivery}.txt"):
                os.chown(folder / name, svc.uid, svc.gid, follow_symlinks=False)
    except Exception as e:
        log.send(f"{study.name}: {delivery} is undone, but its uploader's note could not be "
                 f"written: {e!r}", priority=4, DITTOHEAD_STUDY=study.name)


def _entry(data: dict[str, Any]) -> str:
    entry_hex = data.get("entry_hex")
    return os.fsdecode(bytes.fromhex(entry_hex)) if entry_hex else str(data.get("entry"))
