"""File a finished entry in done/ or failed/ with its receipt and manifest.

Order: manifest and receipt first (each written to a temporary name, fsynced
and renamed), then the entry itself, then the claim record is dropped. A
crash anywhere in between leaves the claim in processing/, and the next run
redoes the delivery, which finds every file already delivered and files the
entry again under the same id, rewriting the same receipt.
"""

from __future__ import annotations

import json
import os
from binascii import hexlify
from dataclasses import dataclass
from pathlib import Path

from .claim import Claim, now_iso, release
from .config import StudyConfig
from .faults import point
from .fsops import write_atomic
from .log import printable
from .plan import Plan


@dataclass(frozen=True)
class Outcome:
    """The result of one delivery, as the receipt and the journal tell it."""

    outcome: str  # delivered, failed or rejected
    claim: Claim
    uploader: str
    files: int
    bytes: int
    skipped: tuple[str, ...]
    finished: str
    reason: str | None = None


def manifest_line(path: bytes, digest: bytes) -> bytes:
    """One line in `sha256sum` format, escaping names the way coreutils does."""
    if b"\\" in path or b"\n" in path or b"\r" in path:
        path = path.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
        return b"\\%s  %s\n" % (hexlify(digest), path)
    return b"%s  %s\n" % (hexlify(digest), path)


class Manifest:
    """Streams `<id>.sha256` (every file of the entry, delivered now or before) to a file."""

    def __init__(self, path: Path) -> None:
        self.out = open(path, "wb")  # noqa: SIM115 - closed by close()
        # One line per file, in plan order: the directory's part is encoded
        # once per directory.
        self.rel: str | None = None
        self.prefix = b""

    def add(self, rel: str, name: str, digest: bytes) -> None:
        if rel != self.rel:
            self.rel = rel
            self.prefix = os.fsencode(rel) + b"/" if rel else b""
        self.out.write(manifest_line(self.prefix + os.fsencode(name), digest))

    def close(self) -> None:
        self.out.close()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_manifest(path: Path, plan: Plan) -> None:
    """Put `<id>.sha256`, which stage() wrote in this attempt, in place durably."""
    fd = os.open(plan.manifest_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fchmod(fd, 0o640)
        os.fsync(fd)
    finally:
        os.close(fd)
    # processing/ and done/ share a filesystem: the entry itself is renamed too.
    os.rename(plan.manifest_path, path)


def file_entry(study: StudyConfig, claim: Claim, plan: Plan | None, outcome: str,
               uploader: str, reason: str | None = None) -> Outcome:
    """Write the receipt (and manifest), move the entry to done/ or failed/, drop the claim."""
    target = study.done if outcome == "delivered" else study.failed
    skipped: tuple[str, ...] = ()
    if plan is not None and plan.path.exists():
        skipped = tuple(plan.iter_skipped())
    result = Outcome(outcome=outcome, claim=claim, uploader=uploader,
                     files=plan.files if plan else 0, bytes=plan.nbytes if plan else 0,
                     skipped=skipped, finished=now_iso(), reason=reason)
    if outcome == "delivered":
        assert plan is not None
        write_manifest(target / f"{claim.id}.sha256", plan)
    write_atomic(target / f"{claim.id}.json", receipt(study, result))
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
    release(study, claim)
    return result


def receipt(study: StudyConfig, r: Outcome) -> bytes:
    """The <id>.json receipt: what an admin or a script needs to know of the delivery."""
    data = {
        "study": study.name,
        "entry": printable(r.claim.entry),
        "entry_hex": os.fsencode(r.claim.entry).hex(),  # exact bytes, for retry
        "id": r.claim.id,
        "uploader": r.uploader,
        "outcome": r.outcome,
        "reason": r.reason,
        "files": r.files,
        "bytes": r.bytes,
        "skipped": [printable(s) for s in r.skipped],
        "destination": str(study.destination),
        "started": r.claim.started,
        "finished": r.finished,
    }
    return json.dumps(data, indent=2, ensure_ascii=False).encode() + b"\n"
