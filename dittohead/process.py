"""`dittohead process STUDY`: drain one study's inbox, entry by entry.

For each entry: claim (claim.py) -> check and plan (check.py) -> stage
(stage.py) -> publish, sync, verify (publish.py) -> file in done/ or failed/
(record.py) -> journal event (log.py). Claims left by an earlier run (a
crash, or a temporary problem) are resumed first.

With `--linger N` the run keeps watching the inbox until it has been empty
for N seconds: a systemd .path unit does not see entries that arrive while
its service runs, so the service itself picks them up (FIELD-NOTES.md).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import time
from dataclasses import dataclass, replace

from . import log, notify
from .check import new_plan, open_destination, plan_entry, user_name
from .claim import (
    Claim,
    StudyLock,
    claim,
    pending_claims,
    ready_entries,
    release,
    sweep_stale,
)
from .config import Config, StudyConfig
from .errors import (
    EXIT_OK,
    EXIT_TEMPFAIL,
    EXIT_UNEXPECTED,
    ConfigError,
    DittoheadError,
    EntryFailed,
    TemporaryError,
)
from .faults import point
from .fsops import is_enospc, used_percent, write_atomic
from .plan import Plan, remove_spool
from .publish import finish, publish, rollback
from .record import Outcome, file_entry
from .stage import Ownership, remove_staging, stage

POLL = 0.2  # seconds between looks at the inbox while lingering


@dataclass(frozen=True)
class RunResult:
    delivered: int
    failed: int
    retry_later: int
    errors: int = 0

    @property
    def exit_code(self) -> int:
        if self.errors:
            return EXIT_UNEXPECTED
        return EXIT_TEMPFAIL if self.retry_later else EXIT_OK


def process(config: Config, study_name: str, linger: float = 0.0) -> RunResult:
    """Resume pending claims, then claim and deliver every ready entry."""
    study = config.study(study_name)
    owner = _ownership(config, study)
    counts = {"delivered": 0, "failed": 0, "rejected": 0, "retry-later": 0, "error": 0}
    with StudyLock(study):
        sweep_stale(study)
        for c in list(pending_claims(study)):
            if os.path.lexists(study.processing / c.id):
                counts[_deliver_guarded(config, study, c, owner)] += 1
            else:
                _report_filed(config, study, c)
        refused: set[str] = set()  # entries we could not claim: don't spin on them
        quiet_since = time.monotonic()
        while True:
            names = [n for n in ready_entries(study) if n not in refused]
            for name in names:
                try:
                    new = claim(study, name)
                except OSError as e:
                    refused.add(name)
                    log.send(f"cannot claim {log.printable(name)} in {study.inbox}: "
                             f"{e.strerror} (does the service have CAP_DAC_OVERRIDE?)",
                             priority=3, DITTOHEAD_STUDY=study.name,
                             DITTOHEAD_ENTRY=log.printable(name))
                    continue
                if new is not None:
                    counts[_deliver_guarded(config, study, new, owner)] += 1
            if names:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= linger:
                break
            else:
                time.sleep(POLL)
    if os.environ.get("DITTOHEAD_MAIL") != "queue":
        notify.send_queued(config, study)
    if refused:
        # Not a temporary problem (75 would let the path unit re-trigger for
        # ever): the service lacks a privilege. Fail, so the admin is told.
        raise DittoheadError(f"{len(refused)} entries could not be claimed and are still "
                             f"in {study.inbox}: see the messages above")
    return RunResult(delivered=counts["delivered"],
                     failed=counts["failed"] + counts["rejected"],
                     retry_later=counts["retry-later"], errors=counts["error"])


def _deliver_guarded(config: Config, study: StudyConfig, c: Claim, owner: Ownership) -> str:
    """deliver(), but an unexpected error (EIO, a bug) keeps only this entry back.

    The entry stays claimed in processing/ for the next run; the others are
    still drained, so no ready entry is left to re-trigger the path unit.
    """
    try:
        return deliver(config, study, c, owner)
    except (ConfigError, TemporaryError):
        raise
    except Exception as e:  # reported; the run exits 1
        reason = f"unexpected error, kept in processing/ for the next run: {e!r}"
        log.event("retry-later", f"{study.name}: {log.printable(c.entry)}: {reason}",
                  study=study.name, entry=c.entry, delivery=c.id, reason=reason)
        return "error"


def _ownership(config: Config, study: StudyConfig) -> Ownership:
    problems = []
    try:
        uid = pwd.getpwnam(config.service_user).pw_uid
    except KeyError:
        problems.append(f"service_user: no such user {config.service_user!r} "
                        "(create it, or run systemd-sysusers)")
        uid = -1
    gid = -1
    if study.group is not None:
        try:
            gid = grp.getgrnam(study.group).gr_gid
        except KeyError:
            problems.append(f"studies.{study.name}.group: no such group {study.group!r}")
    if problems:
        raise ConfigError(problems, str(config.path))
    # gid -1: the destination's group, looked up per delivery (it may not be
    # mounted now; entries are claimed all the same and kept for later).
    return Ownership(uid=uid, gid=gid, file_mode=study.file_mode, dir_mode=study.dir_mode)


def deliver(config: Config, study: StudyConfig, c: Claim, owner: Ownership) -> str:
    """Deliver one claimed entry; return its outcome (delivered, failed, rejected, retry-later)."""
    # The spooled plan (and manifest) is rebuilt by every attempt: never reuse
    # what a killed one left; filing removes it already.
    remove_spool(study.processing, c.id)
    try:
        return _deliver(config, study, c, owner)
    finally:
        remove_spool(study.processing, c.id)


def _deliver(config: Config, study: StudyConfig, c: Claim, owner: Ownership) -> str:
    uploader = _uploader(study, c)
    fields = _fields(study, c, uploader)
    plan: Plan | None = None
    try:
        dest_fd = open_destination(study)
        try:
            # A killed attempt may have left this claim's staging directory:
            # removed before the space check, which it would otherwise fail.
            remove_staging(dest_fd, c.id)
            if owner.gid < 0:
                owner = replace(owner, gid=os.fstat(dest_fd).st_gid)
            point("claimed")
            plan = new_plan(study, c.id)
            plan_entry(study, plan, c.entry, owner.uid)
            point("checked")
            staging = stage(study, plan, dest_fd, owner)
            try:
                publish(plan, staging)
                try:
                    finish(plan, staging)
                    point("verified")
                except BaseException:
                    rollback(plan, staging)
                    raise
            finally:
                os.close(staging.fd)
                remove_staging(dest_fd, c.id)
        finally:
            os.close(dest_fd)
    except TemporaryError as e:
        log.event("retry-later", f"{study.name}: {log.printable(c.entry)} kept for a later "
                  f"run: {e}", reason=str(e), **fields)
        return "retry-later"
    except EntryFailed as e:
        r = file_entry(study, c, plan, e.outcome, uploader, e.reason)
        _report(config, study, r)
        return e.outcome
    except OSError as e:
        if is_enospc(e):
            reason = f"the destination is full ({e.strerror}); rolled back, will retry"
            log.event("retry-later", f"{study.name}: {log.printable(c.entry)} kept for a "
                      f"later run: {reason}", reason=reason, **fields)
            return "retry-later"
        raise
    r = file_entry(study, c, plan, "delivered", uploader)
    _report(config, study, r)
    check_disk(config, study)
    return "delivered"


def _report_filed(config: Config, study: StudyConfig, c: Claim) -> None:
    """A crash came after the entry was filed but before its journal event: log it now."""
    for d in (study.done, study.failed):
        try:
            data = json.loads((d / f"{c.id}.json").read_text())
        except (OSError, ValueError):
            continue
        if os.path.lexists(d / c.id) and isinstance(data, dict):
            r = Outcome(outcome=data["outcome"], claim=c, uploader=data["uploader"],
                        files=data["files"], bytes=data["bytes"],
                        skipped=tuple(data["skipped"]), finished=data["finished"],
                        reason=data["reason"])
            _report(config, study, r)
            break
    release(study, c)


def _uploader(study: StudyConfig, c: Claim) -> str:
    try:
        return user_name(os.lstat(study.processing / c.id).st_uid)
    except FileNotFoundError:
        return "unknown"


def _fields(study: StudyConfig, c: Claim, uploader: str) -> dict[str, str]:
    """The journal fields every event about one delivery carries."""
    return {"study": study.name, "entry": c.entry, "delivery": c.id,
            "destination": str(study.destination), "uploader": uploader}


def _report(config: Config, study: StudyConfig, r: Outcome) -> None:
    """The journal event of a filed entry, then the mail about it."""
    name = log.printable(r.claim.entry)
    if r.outcome == "delivered":
        msg = (f"{study.name}: delivered {name} from {r.uploader}: {r.files} files, "
               f"{r.bytes} bytes into {study.destination}")
    else:
        msg = f"{study.name}: {r.outcome} {name} from {r.uploader}: {r.reason}"
    log.event(r.outcome, msg, files=r.files, bytes=r.bytes, reason=r.reason,
              **_fields(study, r.claim, r.uploader))
    where = study.done if r.outcome == "delivered" else study.failed
    lines = [f"Study:       {study.name}", f"Entry:       {name}",
             f"Uploaded by: {r.uploader}", f"Delivery:    {r.claim.id}",
             f"Outcome:     {r.outcome}"]
    if r.outcome == "delivered":
        subject = f"delivered {name} ({r.files} files)"
        lines += [f"Files:       {r.files} ({r.bytes} bytes)",
                  f"Into:        {study.destination}",
                  f"Manifest:    {where / (r.claim.id + '.sha256')}"]
        if r.skipped:
            lines.append("Not delivered (ignored names): " + ", ".join(
                log.printable(s) for s in r.skipped[:20])
                + (f" and {len(r.skipped) - 20} more" if len(r.skipped) > 20 else ""))
    else:
        subject = f"{r.outcome}: {name} was NOT delivered"
        lines += ["", f"Why: {r.reason}", "",
                  f"The upload is kept, untouched, in {where / r.claim.id}.",
                  "Once the cause is fixed, an admin can put it back in line with:",
                  f"  dittohead retry {study.name} {r.claim.id}"]
    notify.send(config, study, r.outcome, subject, "\n".join(lines) + "\n", r.uploader)


def check_disk(config: Config, study: StudyConfig) -> None:
    """Warn once each time the destination's usage crosses a threshold upward."""
    if not study.disk_warn_percent:
        return
    percent = used_percent(os.statvfs(study.destination))
    state = study.processing / ".disk-usage.json"
    try:
        before = float(json.loads(state.read_text())["percent"])
    except (OSError, ValueError, KeyError, TypeError):
        before = 0.0
    crossed = [t for t in study.disk_warn_percent if before < t <= percent]
    if crossed:
        text = (f"{study.destination} is {percent:.0f}% full (crossed {crossed[-1]}%)")
        log.event("disk-warning", f"{study.name}: {text}", study=study.name,
                  destination=str(study.destination), reason=f"{percent:.1f}% used")
        notify.send(config, study, "disk", text,
                    f"The storage of study {study.name}, {study.destination}, is "
                    f"{percent:.1f}% full.\nDeliveries stop (and wait) when it is full; "
                    "please make room or grow it.\n")
    if abs(percent - before) >= 0.05 or crossed:
        write_atomic(state, json.dumps({"percent": round(percent, 2)}).encode())
