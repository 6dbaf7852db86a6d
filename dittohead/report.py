"""Tell of an entry's attempt: its journal event and mail, and the destination's fill.

Reporting never fails an entry: it runs once the entry is filed (or kept),
and a problem here (a mail that cannot be queued, a destination that cannot
be measured) is logged as a warning and nothing else.
"""

from __future__ import annotations

import datetime as dt
import os
import resource
import sys
import syslog
from collections.abc import Iterator
from contextlib import contextmanager

from . import capacity, log, notify, outcomes
from .claim import Claim, release
from .config import Config, StudyConfig
from .errors import Outcome
from .record import Receipt, receipt_dir

SKIPPED_LISTED = 20  # ignored names a mail lists before "and N more"


def fields(study: StudyConfig, c: Claim, uploader: str) -> dict[str, str]:
    """The journal fields every event about one delivery carries."""
    return {"study": study.name, "entry": c.entry, "delivery": c.id,
            "destination": str(study.destination), "uploader": uploader}


def peak_rss_kib() -> int:
    """The run's peak resident memory so far, in KiB: the larger of its own and that of
    the largest worker it has waited for (Linux ru_maxrss)."""
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def kept(config: Config, study: StudyConfig, c: Claim, uploader: str, why: str,
         space_needed: int = -1) -> None:
    """The entry stays claimed in processing/ for a later run (retry-later); with
    space_needed (its bytes, >= 0), for want of room in its destination: told once."""
    if space_needed >= 0:
        c, why = out_of_space(config, study, c, uploader, space_needed, why)
    log.event(Outcome.RETRY_LATER, f"{study.name}: {log.printable(c.entry)} kept for a later "
              f"run: {why}", reason=why, **fields(study, c, uploader))
    r = Receipt(study=study.name, id=c.id, entry=c.entry, uploader=uploader,
                outcome=Outcome.RETRY_LATER, files=0, nbytes=0, skipped=(),
                destination=str(study.destination), started=c.started, finished="",
                reason=why, uploader_uid=c.uploader_uid)
    with _warned(study, f"{log.printable(c.entry)} is kept for a later run, but its "
                 "uploader's note could not be written"):
        outcomes.tell(study, outcomes.pending_note(r), _service())


def _service() -> tuple[int, int]:
    """Who owns the uploaders' notes: the service, which is who runs this."""
    return os.geteuid(), os.getegid()


def unexpected(study: StudyConfig, c: Claim, uploader: str, error: Exception) -> None:
    """An unexpected error (a bug, EIO) stopped the entry; the next run takes it up again."""
    why = (f"unexpected error, the entry stays claimed and the next run takes it up "
           f"again: {error!r}")
    log.event(Outcome.RETRY_LATER, f"{study.name}: {log.printable(c.entry)}: {why}",
              reason=why, **fields(study, c, uploader))


def filing_no_space(config: Config, study: StudyConfig, c: Claim, uploader: str,
                    error: OSError) -> None:
    """The dropbox filled up while the entry was filed: kept for a later run (exit 75)."""
    where = log.printable(str(error.filename)) if error.filename else study.processing
    kept(config, study, c, uploader, f"the dropbox is full ({error.strerror}: {where}); "
         "the entry stays claimed and the next run files it")


def storage_failed(study: StudyConfig, c: Claim, uploader: str, error: OSError) -> None:
    """The storage failed under the entry (EIO, read-only); it stays claimed, the run exits 74."""
    # Without a name (a write, a statfs on a descriptor) it is one of the two filesystems.
    where = (log.printable(str(error.filename)) if error.filename else
             f"under {study.destination} or {study.root}")
    why = (f"the storage failed ({error.strerror}: {where}); "
           "the entry stays claimed and the next run takes it up again; see the kernel log")
    log.event(Outcome.RETRY_LATER, f"{study.name}: {log.printable(c.entry)}: {why}",
              reason=why, **fields(study, c, uploader))


def filed_and_released(config: Config, study: StudyConfig, r: Receipt, c: Claim) -> None:
    """Tell of a filed entry, then drop its claim: until then the next run of a killed
    one tells of it again (docs/contract.md, "Mail": at least once). Never raises."""
    filed(config, study, r, c)
    try:
        release(study, c)
    except OSError as e:  # the claim stays: the next run tells of the entry once more
        _warn(study, f"{log.printable(r.entry)} is filed, but its claim record could not "
                     f"be removed: {e}")
    after_filed(config, study, r)


def filed(config: Config, study: StudyConfig, r: Receipt, c: Claim) -> None:
    """The uploader's note, the mail and the journal event of a filed entry.

    Run again by the next run when a run is killed before its claim is released, so each
    step may repeat: the note and the queued mail (named for the filing) replace
    themselves; the event comes last, so that only a kill in the instant between it and
    the release repeats it. Never raises: the entry is filed whatever happens here, so a
    failure to tell of it is a warning that says so, never "kept" or "unexpected".
    """
    name = log.printable(r.entry)
    if r.outcome is Outcome.DELIVERED:
        msg = (f"{study.name}: delivered {name} from {log.printable(r.uploader)}: {r.files} "
               f"files, {r.nbytes} bytes into {study.destination}")
    else:
        msg = f"{study.name}: {r.outcome} {name} from {log.printable(r.uploader)}: {r.reason}"
    filed = f"{name} is filed in {receipt_dir(study, r.outcome) / r.id}, but"
    with _warned(study, f"{filed} its uploader's note could not be written"):
        outcomes.tell(study, outcomes.filed_note(r), _service())
    with _warned(study, f"{filed} its mail could not be made"):
        subject, body = mail_text(study, r, c.space_told)
        # Contacts told it waited for space hear it is resolved, whatever `on` says.
        notify.send(config, study, r.outcome, subject, body, r.uploader,
                    contacts=bool(c.space_told) and r.outcome is Outcome.DELIVERED
                    and "disk" in study.notify.on, name=mail_name(r))
    with _warned(study, f"{filed} its journal event could not be written"):
        log.event(r.outcome, msg, files=r.files, bytes=r.nbytes, reason=r.reason,
                  maxrss_kib=peak_rss_kib(), **fields(study, c, r.uploader))


def mail_name(r: Receipt) -> str:
    """The queue name of a filed entry's mail: the filing's time (oldest first, as the
    others) and its id, the same each time the entry is told of."""
    at = dt.datetime.strptime(r.finished, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    return f"{int(at.timestamp()) * 10**9}-{r.id}"


def after_filed(config: Config, study: StudyConfig, r: Receipt) -> None:
    """After a delivery, the destination's fill (a warning if it cannot be measured)."""
    if r.outcome is not Outcome.DELIVERED:
        return
    filed = f"{log.printable(r.entry)} is filed in {receipt_dir(study, r.outcome) / r.id}, but"
    with _warned(study, f"{filed} the destination's fill could not be measured"):
        try:
            check_disk(config, study)
        except OSError as e:
            _warn(study, f"could not measure the fill of {study.destination}: {e}")


@contextmanager
def _warned(study: StudyConfig, text: str) -> Iterator[None]:
    """Turn any exception into a warning: the entry stays filed and the run goes on."""
    try:
        yield
    except Exception as e:
        _warn(study, f"{text}: {e!r}")


def _warn(study: StudyConfig, text: str) -> None:
    try:
        log.send(f"{study.name}: {text}", priority=syslog.LOG_WARNING,
                 DITTOHEAD_STUDY=study.name, DITTOHEAD_REASON=text)
    except Exception:  # not even a warning could be written: stderr is all that is left
        print(f"dittohead: {log.clean(study.name + ': ' + text)}", file=sys.stderr)


def mail_text(study: StudyConfig, r: Receipt, space_told: str = "") -> tuple[str, str]:
    """The subject and body of the mail about a filed entry (every name escaped);
    space_told: when it was told the entry waits for space in the destination."""
    name = log.printable(r.entry)
    where = receipt_dir(study, r.outcome)
    lines = [f"Study:       {study.name}", f"Entry:       {name}",
             f"Uploaded by: {log.printable(r.uploader)}", f"Delivery:    {log.printable(r.id)}",
             f"Outcome:     {r.outcome}"]
    if r.outcome is Outcome.DELIVERED:
        subject = f"delivered {name} ({r.files} files)"
        if space_told:
            subject += " after waiting for space"
            lines.append(f"Waited:      for space in {study.destination}, from {space_told} "
                         f"(told then) to {r.finished}")
        lines += [f"Files:       {r.files} ({r.nbytes} bytes)",
                  f"Into:        {study.destination}",
                  f"Manifest:    {where / (r.id + '.sha256')}"]
        if r.skipped:
            more = len(r.skipped) - SKIPPED_LISTED
            lines.append("Not delivered (ignored names): "
                         + ", ".join(log.printable(s) for s in r.skipped[:SKIPPED_LISTED])
                         + (f" and {more} more" if more > 0 else ""))
    else:
        subject = f"{r.outcome}: {name} was NOT delivered"
        lines += ["", f"Why: {log.clean(r.reason or '')}", "",
                  f"The upload is kept, untouched, in {where / r.id}.",
                  "Once the cause is fixed, an admin can put it back in line with:",
                  f"  dittohead retry {study.name} {r.id}"]
    return subject, "\n".join(lines) + "\n"


def check_disk(config: Config, study: StudyConfig) -> None:
    """Warn once each time the destination's fill crosses a threshold upward, or its
    forecast drops below forecast_warn_days (capacity.py)."""
    capacity.check_destination(config, study)


def dropbox_fill(config: Config, study: StudyConfig) -> None:
    """At the end of a run: the dropbox's own fill against dropbox_warn_percent. Never raises."""
    with _warned(study, f"the fill of the dropbox {study.root} could not be checked"):
        capacity.check_dropbox(config, study)


def dropbox_full(config: Config, study: StudyConfig, why: str) -> None:
    """An entry could not be claimed for want of room in the dropbox. Never raises."""
    with _warned(study, "the admins could not be told that the dropbox is full"):
        capacity.dropbox_full(config, study, why)


def out_of_space(config: Config, study: StudyConfig, c: Claim, uploader: str, nbytes: int,
                 why: str) -> tuple[Claim, str]:
    """An entry kept for want of room in its destination: told once (capacity.py)."""
    with _warned(study, f"{log.printable(c.entry)} waits for space, but that could not "
                 "be told"):
        return capacity.out_of_space(config, study, c, uploader, nbytes, why)
    return c, why
