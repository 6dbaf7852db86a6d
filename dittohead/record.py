"""Receipts, and filing a finished entry in done/ or failed/.

Order of filing: manifest and receipt first (each written to a temporary
name, fsynced and renamed), then the entry itself, then the claim record is
dropped. A crash anywhere in between leaves the claim in processing/, and the
next run either redoes the delivery (which finds every file already there and
files the entry again under the same id) or, when the entry is already filed,
reports it from its receipt.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .claim import Claim, now_iso
from .config import StudyConfig
from .errors import Outcome
from .faults import point
from .fsops import write_atomic
from .log import printable
from .manifest import install, published_paths
from .plan import Plan
from .readiness import is_inbox

# The receipt's "format": raised when a key every reader needs is added or one
# is dropped; a key never changes meaning (a new meaning gets a new key).
# Readers take receipts without one as format 1, ignore keys they do not
# know, and read the keys they know from a newer format.
RECEIPT_FORMAT = 1


class ReceiptError(ValueError):
    """A receipt file that is not one (not JSON, or missing what every receipt has)."""


@dataclass(frozen=True)
class Receipt:
    """The record of one filed entry: `done/<id>.json` or `failed/<id>.json`."""

    study: str
    id: str
    entry: str  # the name as dropped, exact (surrogate escapes for undecodable bytes)
    uploader: str
    outcome: Outcome
    files: int
    nbytes: int  # "bytes" in the JSON
    skipped: tuple[str, ...]  # ignored names, not delivered
    destination: str
    started: str
    finished: str
    reason: str | None = None
    uploader_uid: int = -1  # from the claim; -1 in receipts written before it was kept
    inbox: str = "inbox"  # where it was dropped, relative to the study's root (claim.py)
    format: int = RECEIPT_FORMAT

    def to_json(self) -> bytes:
        """The receipt file's content."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False).encode() + b"\n"

    def to_dict(self) -> dict[str, Any]:
        """The receipt as JSON-ready data (names printable; the exact one as entry_hex)."""
        return {
            "format": self.format,
            "study": self.study,
            "entry": printable(self.entry),
            "entry_hex": os.fsencode(self.entry).hex(),  # exact bytes, for retry
            "id": self.id,
            "uploader": self.uploader,
            "uploader_uid": self.uploader_uid,
            "inbox": self.inbox,
            "outcome": str(self.outcome),
            "reason": self.reason,
            "files": self.files,
            "bytes": self.nbytes,
            "skipped": [printable(s) for s in self.skipped],
            "destination": self.destination,
            "started": self.started,
            "finished": self.finished,
        }

    @classmethod
    def from_json(cls, raw: bytes | str) -> Receipt:
        """Parse a receipt written by this or any earlier version; ReceiptError if it is none."""
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            return cls(study=str(data["study"]), id=str(data["id"]), entry=_entry(data),
                       uploader=str(data["uploader"]), outcome=Outcome(data["outcome"]),
                       files=int(data["files"]), nbytes=int(data["bytes"]),
                       skipped=tuple(str(s) for s in data.get("skipped") or ()),
                       destination=str(data.get("destination", "")),
                       started=str(data.get("started", "")),
                       finished=str(data["finished"]), reason=data.get("reason"),
                       uploader_uid=int(data.get("uploader_uid", -1)),
                       inbox=_inbox(data.get("inbox")),
                       format=int(data.get("format", 1)))
        except (ValueError, KeyError, TypeError) as e:
            raise ReceiptError(f"not a dittohead receipt: {e}") from None


def _entry(data: dict[str, Any]) -> str:
    entry_hex = data.get("entry_hex")
    return os.fsdecode(bytes.fromhex(entry_hex)) if entry_hex else str(data["entry"])


def _inbox(value: object) -> str:
    """Where a receipt says its entry was dropped: only a place entries come from."""
    return str(value) if is_inbox(str(value)) else "inbox"


def read_receipt(path: Path) -> Receipt:
    """The receipt at path; OSError if unreadable, ReceiptError if it is not a receipt."""
    return Receipt.from_json(path.read_bytes())


def receipt_dir(study: StudyConfig, outcome: Outcome) -> Path:
    """Where an entry with this outcome is filed."""
    return study.done if outcome is Outcome.DELIVERED else study.failed


def file_entry(study: StudyConfig, claim: Claim, plan: Plan | None, outcome: Outcome,
               uploader: str, reason: str | None = None) -> Receipt:
    """Write the receipt (and manifest), move the entry to done/ or failed/. The claim
    stays until the entry has been told of (process.py), so a killed run's is told."""
    target = receipt_dir(study, outcome)
    skipped: tuple[str, ...] = ()
    if plan is not None and plan.path.exists():
        skipped = tuple(plan.iter_skipped())
    r = Receipt(study=study.name, id=claim.id, entry=claim.entry, uploader=uploader,
                outcome=outcome, files=plan.files if plan else 0,
                nbytes=plan.nbytes if plan else 0, skipped=skipped,
                destination=str(study.destination), started=claim.started,
                finished=now_iso(), reason=reason, uploader_uid=claim.uploader_uid,
                inbox=claim.inbox)
    if outcome is Outcome.DELIVERED:
        assert plan is not None
        install(plan.manifest_path, target / f"{claim.id}.sha256")
        # What `undo` may remove: the files and directories this delivery made.
        files, dirs = published_paths(plan.path)
        install(files, target / f"{claim.id}.published")
        install(dirs, target / f"{claim.id}.dirs")
    write_atomic(target / f"{claim.id}.json", r.to_json())
    point("receipt")
    try:
        os.rename(study.processing / claim.id, target / claim.id)
    except FileNotFoundError:
        pass  # a crash after this rename and before the claim was released
    dfd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    point("filed")
    return r


def filed_receipt(study: StudyConfig, claim: Claim) -> Receipt | None:
    """The receipt of a claim whose entry a killed run already filed, if it did."""
    for d in (study.done, study.failed):
        try:
            r = read_receipt(d / f"{claim.id}.json")
        except (OSError, ReceiptError):
            continue
        if os.path.lexists(d / claim.id):
            return r
    return None
