"""`dittohead process STUDY`: drain one study's inbox, entry by entry.

Claims an earlier run left (a crash, a temporary problem) are resumed first.
Each entry then goes through the pipeline's steps, in `deliver()`:
claim (claim.py) -> examine (examine.py) -> compare with the destination
(conflicts.py) -> stage (stage.py, copier.py) -> publish (publish.py) ->
file in done/ or failed/ (record.py) -> journal event and mail (report.py).

With `--linger N` the run keeps watching the inbox until it has held no ready entry
for N seconds: a systemd .path unit does not see entries that arrive while its service
runs (docs/field-notes.md), so the service picks them up itself. It also waits for
entries that are not quiet yet (readiness.py), which the path unit's glob matches too:
ending would only have the path unit start the next run at once, again and again.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import signal
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from . import bound, fsops, fstype, log, notify, report
from .claim import (
    Claim,
    ClaimRefused,
    adopt_claimed,
    busy_seconds,
    claim,
    note_busy,
    pending_claims,
    release,
    resume_claim,
    sweep_stale,
)
from .config import Config, StudyConfig
from .conflicts import check_destination, open_destination
from .copier import still_written
from .errors import (
    EXIT_IOERR,
    EXIT_OK,
    EXIT_TEMPFAIL,
    EXIT_UNEXPECTED,
    ConfigError,
    EntryBusy,
    EntryFailed,
    NoSpace,
    Outcome,
    TemporaryError,
)
from .examine import examine, new_plan, uploader_uid
from .faults import point
from .findings import LIST_MAX
from .ownership import Ownership
from .plan import Plan, keep_killed, remove_killed, remove_spool
from .publish import publish, undo_killed
from .readiness import Watch
from .record import file_entry, filed_receipt
from .stage import Staging, remove_staging, stage
from .studylock import StudyLock

POLL = 0.2  # seconds between looks at the inbox while lingering
WAIT_POLL = 1.0  # ... while waiting for entries to become quiet
DUE_SLACK = 0.05  # seconds after an entry is due (ctimes are stamped by a coarse clock)
MAX_WAIT = 30 * 60  # the longest a run waits for entries to become quiet
# A full dropbox: how long before a run tries to claim the entry again.
CLAIM_RETRY = 30.0
# How long a claimed entry whose files a program still writes to is kept for
# later runs before it fails (docs/contract.md, "Delivery guarantees").
BUSY_LIMIT = 3600
# Entries at least this big are checked for files still being written before
# anything is copied: an open, a lease and a close a file (about 5 us) against
# copying 64 MiB or more (tens of ms at least) and rolling it all back.
PRECHECK_BYTES = 64 << 20


@dataclass(frozen=True)
class RunResult:
    """What one run did, counted by outcome."""

    delivered: int
    failed: int
    retry_later: int
    errors: int = 0
    io_errors: int = 0

    @property
    def exit_code(self) -> int:
        if self.errors:
            return EXIT_UNEXPECTED
        if self.io_errors:
            return EXIT_IOERR
        return EXIT_TEMPFAIL if self.retry_later else EXIT_OK


@dataclass(frozen=True)
class Attempt:
    """How delivering one entry ended, before it is filed."""

    outcome: Outcome
    plan: Plan | None  # None when the entry was not examined
    reason: str | None = None
    busy: tuple[str, ...] = ()  # files still written to (RETRY_LATER only)
    space_needed: int = -1  # kept for want of room: the entry's bytes (RETRY_LATER only)


def process(config: Config, study_name: str, linger: float = 0.0) -> RunResult:
    """Resume pending claims, then claim and deliver every ready entry."""
    study = config.study(study_name)
    bound.check(study)  # a config edited without daemon-reload: say so, touch nothing
    fstype.check(study)  # a destination deliveries refuse (sshfs): claim nothing
    owner = _ownership(config, study)
    # The copy holds a read lease on each file it reads (copier.py); should a
    # writer (root: nobody else may) open one meanwhile, the kernel signals
    # SIGIO, whose default is to end the process.
    signal.signal(signal.SIGIO, signal.SIG_IGN)
    counts: Counter[Outcome] = Counter()
    with StudyLock(study) as lock:
        sweep_stale(study)
        for c in list(pending_claims(study)):
            # (resume_claim: a run killed between taking a directory over and
            # renaming it left it in the inbox; it finishes the claim.)
            if os.path.lexists(study.processing / c.id) or resume_claim(study, c, owner.uid):
                adopt_claimed(study, c, owner)
                counts[handle(config, study, c, owner)] += 1
            else:
                _report_filed(config, study, c)
        refused = _drain(config, study, owner, linger, counts, lock)
        report.dropbox_fill(config, study)
    if os.environ.get("DITTOHEAD_MAIL") != "queue":
        notify.send_queued(config, study)
    if refused:
        # Not a temporary problem (75 would let the path unit re-trigger for
        # ever): the service lacks a privilege. Fail, so the admin is told.
        raise ClaimRefused(f"{refused} entries could not be claimed and are still "
                           f"in {study.inbox}: see the messages above")
    return RunResult(delivered=counts[Outcome.DELIVERED],
                     failed=counts[Outcome.FAILED] + counts[Outcome.REJECTED],
                     retry_later=counts[Outcome.RETRY_LATER], errors=counts[Outcome.ERROR],
                     io_errors=counts[Outcome.IO_ERROR])


def _drain(config: Config, study: StudyConfig, owner: Ownership, linger: float,
           counts: Counter[Outcome], lock: StudyLock) -> int:
    """Claim and deliver ready entries until the inbox was empty `linger` seconds.

    With `linger`, a run also waits for entries that are not quiet yet
    (readiness.py), looking again when the first is due, for at most MAX_WAIT;
    once it has filed something it ends instead, so that its mail goes out
    (the path unit starts the next run at once: the glob matches a waiting
    entry). An entry that cannot be claimed for want of space in the dropbox
    waits the same way, tried again every CLAIM_RETRY seconds. Returns how
    many entries may not be claimed at all (they are left alone).
    """
    refused: set[str] = set()  # entries we may not claim: don't spin on them
    later: dict[str, float] = {}  # entries we cannot claim now, and when to try again
    watch = Watch(study)
    started = quiet_since = time.monotonic()
    while True:
        if why := fsops.outdated_run():
            # Entries wait in the inbox: the path unit starts the next run at
            # once, in a sandbox with the current users and groups, or the new program.
            log.send(f"{why} since this run started: this run ends, and the next one "
                     "takes the entries left", priority=6, DITTOHEAD_STUDY=study.name)
            counts[Outcome.RETRY_LATER] += len(later)
            return len(refused)
        scanned = time.monotonic()  # a verdict is as old as the scan's start
        seen = watch.scan()
        _tell_waiting(study, watch, linger)
        names = [n for n in seen.ready
                 if n not in refused and later.get(n, 0.0) <= time.monotonic()]
        for name in names:
            if fsops.outdated_run():
                break  # said at the top of the loop
            if time.monotonic() - scanned > POLL and not watch.still_ready(name):
                continue  # changed since the scan: waiting again
            _claim_and_handle(config, study, owner, name, counts, refused, later)
        now = time.monotonic()
        if names:
            quiet_since = now
            continue
        filed = sum(counts[o] for o in (Outcome.DELIVERED, Outcome.FAILED, Outcome.REJECTED))
        waits = (bool(seen.waiting) or bool(later)) and linger > 0 and not filed \
            and now - started < MAX_WAIT
        lingering = now - quiet_since < linger
        if not waits and not lingering:
            counts[Outcome.RETRY_LATER] += len(later)  # still in the inbox: exit 75
            return len(refused)
        delay = POLL if lingering else WAIT_POLL
        for due in [seen.next_due, *(t - now for t in later.values())]:
            if due is not None:
                delay = max(0.0, min(delay, due + DUE_SLACK))
        if lingering:
            time.sleep(delay)
        else:
            with lock.released():  # an admin's run need not wait for ours
                time.sleep(delay)


def _claim_and_handle(config: Config, study: StudyConfig, owner: Ownership, name: str,
                      counts: Counter[Outcome], refused: set[str],
                      later: dict[str, float]) -> None:
    """Claim one ready entry and deliver it; one that cannot be claimed stays untouched."""
    try:
        new = claim(study, name, owner)
    except ClaimRefused as e:
        refused.add(name)
        log.send(str(e), priority=3, DITTOHEAD_STUDY=study.name,
                 DITTOHEAD_ENTRY=log.printable(name))
        return
    except TemporaryError as e:
        if name not in later:  # said once per run, not every CLAIM_RETRY
            log.send(str(e), priority=4, DITTOHEAD_STUDY=study.name,
                     DITTOHEAD_ENTRY=log.printable(name))
            if isinstance(e, NoSpace):
                report.dropbox_full(config, study, str(e))
        later[name] = time.monotonic() + CLAIM_RETRY
        return
    later.pop(name, None)
    if new is not None:
        counts[handle(config, study, new, owner)] += 1


def _tell_waiting(study: StudyConfig, watch: Watch, linger: float) -> None:
    """Say once per run why an entry is not taken yet (an uploader may ask)."""
    for name in watch.new_waiting:
        what = ("holds temporary files of an upload that did not finish" if watch.held(name)
                else "is still changing")
        then = ("waiting" if linger > 0
                else "left in the inbox (the service waits for it)")
        log.send(f"{log.printable(name)} {what}: it is taken once nothing in it has changed "
                 f"for {study.quiet_period:g} s; {then}", priority=6,
                 DITTOHEAD_STUDY=study.name, DITTOHEAD_ENTRY=log.printable(name))


def handle(config: Config, study: StudyConfig, c: Claim, owner: Ownership) -> Outcome:
    """Deliver one claimed entry, file it and tell of it; return how it ended.

    An error (a bug, the storage) keeps only this entry back, claimed for the next run;
    the others are still drained, so no ready entry is left to re-trigger the path unit."""
    uploader = _uploader(study, c)
    try:
        # Each attempt spools its plan and manifest anew; a killed one's plan
        # is kept to undo what it published, first thing in deliver().
        keep_killed(study.processing, c.id)
        remove_spool(study.processing, c.id)
        attempt = deliver(study, c, owner)
        if attempt.busy:
            c, attempt = _still_busy(study, c, attempt)
        if attempt.outcome is Outcome.RETRY_LATER:
            report.kept(config, study, c, uploader, attempt.reason or "", attempt.space_needed)
            return attempt.outcome
        receipt = file_entry(study, c, attempt.plan, attempt.outcome, uploader, attempt.reason)
    except ConfigError:
        raise
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            # What the writability check could not foresee (NFS root squash,
            # an ACL): the unit's setup, not the entry, is wrong.
            where = log.printable(str(e.filename)) if e.filename else "the destination"
            raise ConfigError(f"{e.strerror}: {where}: the service user must be able to "
                              f"write every directory of {study.destination}; "
                              f"{log.printable(c.entry)} stays claimed") from None
        if fsops.is_enospc(e):  # the dropbox filled up while the entry was filed
            report.filing_no_space(config, study, c, uploader, e)
            return Outcome.RETRY_LATER
        if e.errno not in fsops.STORAGE_ERRNOS:
            report.unexpected(study, c, uploader, e)
            return Outcome.ERROR
        report.storage_failed(study, c, uploader, e)  # the run exits 74
        return Outcome.IO_ERROR
    except Exception as e:  # reported; the run exits 1
        report.unexpected(study, c, uploader, e)
        return Outcome.ERROR
    finally:  # after a storage error, a later attempt keeps what is left (keep_killed)
        with fsops.storage_errors_ignored():
            remove_spool(study.processing, c.id)
    report.filed_and_released(config, study, receipt, c)
    return receipt.outcome


def deliver(study: StudyConfig, c: Claim, owner: Ownership) -> Attempt:
    """The pipeline for one claimed entry: examine, compare, stage, publish."""
    plan: Plan | None = None
    try:
        with _destination(study) as dest_fd:
            # A killed attempt's staging directory goes before the space check,
            # which it would otherwise fail; what it published goes too, before
            # any other entry can count it as delivered: all or nothing across
            # a kill (docs/design.md, "Crash safety").
            remove_staging(dest_fd, c.id)
            undo_killed(study.processing, c.id, dest_fd)
            remove_killed(study.processing, c.id)
            owner = owner.for_destination(dest_fd)
            point("claimed")
            plan = new_plan(study, c)
            examine(study, plan, c.entry, owner)
            _not_written_still(study, c, plan)
            check_destination(study, plan, dest_fd)
            point("checked")
            with Staging(dest_fd, c.id, study.destination) as staging:
                stage(plan, staging, owner)
                publish(plan, staging)
            point("verified")
    except EntryBusy as e:
        return Attempt(Outcome.RETRY_LATER, plan, str(e), tuple(e.files))
    except NoSpace as e:
        return Attempt(Outcome.RETRY_LATER, plan, str(e), space_needed=plan.nbytes if plan else 0)
    except TemporaryError as e:
        return Attempt(Outcome.RETRY_LATER, plan, str(e))
    except EntryFailed as e:
        return Attempt(e.outcome, plan, e.reason)
    except OSError as e:
        if not fsops.is_enospc(e):
            raise
        return Attempt(Outcome.RETRY_LATER, plan,
                       f"the destination is full ({e.strerror}); rolled back, will retry",
                       space_needed=plan.nbytes if plan else 0)
    return Attempt(Outcome.DELIVERED, plan)


def _not_written_still(study: StudyConfig, c: Claim, plan: Plan) -> None:
    """Before any copying: raise EntryBusy if a file found busy last time still is, or,
    in a big entry, any file is (cheap next to copying it, only to roll it back)."""
    names: Iterable[str] = c.busy_files
    if not names and plan.nbytes >= PRECHECK_BYTES:
        names = plan.file_paths()
    if not names:
        return
    busy = still_written(study.processing, c.id, plan.plain_file, names)
    if busy:
        names = ", ".join(log.printable(f) for f in busy[:LIST_MAX])
        raise EntryBusy(busy, f"{names} still open for writing by a program; nothing "
                        "was copied, the entry is kept for a later run")


def _still_busy(study: StudyConfig, c: Claim, attempt: Attempt) -> tuple[Claim, Attempt]:
    """Note busy files in the claim; fail the entry once it has been busy too long."""
    c = note_busy(study, c, list(attempt.busy), LIST_MAX)
    if busy_seconds(c) < BUSY_LIMIT:
        return c, attempt
    names = ", ".join(log.printable(f) for f in c.busy_files)
    return c, Attempt(Outcome.FAILED, attempt.plan,
                      f"files were still written to, or open for writing, more than "
                      f"{BUSY_LIMIT // 60} minutes after the entry was claimed: {names}. "
                      "Nothing of this entry was delivered; upload it again once the "
                      "programs writing them have finished.")


@contextmanager
def _destination(study: StudyConfig) -> Iterator[int]:
    fd = open_destination(study)
    try:
        yield fd
    finally:
        os.close(fd)


def _report_filed(config: Config, study: StudyConfig, c: Claim) -> None:
    """A killed run filed the entry but did not tell of it: tell now, then drop the claim."""
    if (r := filed_receipt(study, c)) is None:
        release(study, c)
    else:
        report.filed_and_released(config, study, r, c)


def _uploader(study: StudyConfig, c: Claim) -> str:
    try:
        return fsops.user_name(uploader_uid(study, c))
    except FileNotFoundError:
        return "unknown"


def _ownership(config: Config, study: StudyConfig) -> Ownership:
    problems = []
    try:
        svc = pwd.getpwnam(config.service_user)
        uid, service_gid = svc.pw_uid, svc.pw_gid
    except KeyError:
        problems.append(f"service_user: no such user {config.service_user!r} "
                        "(create it, or run systemd-sysusers)")
        uid = service_gid = -1
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
    return Ownership(uid=uid, gid=gid, file_mode=study.file_mode, dir_mode=study.dir_mode,
                     service_gid=service_gid)
