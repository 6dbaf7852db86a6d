"""`dittohead metrics`: each study's numbers for Prometheus (textfile.py writes them).

The counters are derived from the receipts in done/ and failed/,
which are never removed (a purge keeps them), so they survive restarts and
need no state of their own. Timestamps rather than ages: the file is
rewritten every few minutes at most, and `time() - x` in a query is exact at
any moment, even when the writer has stopped (which
`dittohead_metrics_timestamp_seconds` shows).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import glance
from .capacity import iso_seconds
from .config import StudyConfig
from .errors import EXIT_NOPERM, DittoheadError
from .log import printable

OUTCOMES = ("delivered", "failed", "rejected")
class NotAllowed(DittoheadError):
    """The caller may not read the receipts."""

    exit_code = EXIT_NOPERM


@dataclass(frozen=True)
class Totals:
    """What a study's receipts add up to."""

    deliveries: dict[str, int]  # outcome -> receipts
    undone: int
    delivered_bytes: int
    last_delivery: str | None  # the newest delivered receipt's `finished`
    unreadable: int  # receipt files that could not be read or parsed
    failed_now: int  # entries in failed/ now (not retried)


def receipt_totals(study: StudyConfig, cache_dir: Path | None = None) -> Totals:
    """Count the receipts in done/ and failed/ (retried and undone ones included).

    With cache_dir, what each receipt file holds is remembered there by name
    and inode (a receipt is only ever replaced by a rename, which gives a new
    inode), so a run reads only the receipts that are new since the last.
    """
    cache_file = cache_dir / f"{study.name}.json" if cache_dir is not None else None
    old = _load_cache(cache_file)
    new: dict[str, list[Any]] = {}
    counts = dict.fromkeys(OUTCOMES, 0)
    undone = nbytes = unreadable = failed_now = 0
    last: str | None = None
    for key, path, inode in _receipts(study):
        if key.startswith("failed/") and not key.endswith(".retried.json"):
            failed_now += 1
        row = old.get(key)
        if not isinstance(row, list) or len(row) != 4 or row[0] != inode:
            row = _read(path, inode)
        new[key] = row
        _, outcome, size, finished = row
        if outcome is None:
            unreadable += 1
            continue
        if outcome == "undone":  # it was delivered, then taken back
            undone += 1
            outcome = "delivered"
        if outcome not in counts:
            continue  # an outcome this version does not know
        counts[outcome] += 1
        if outcome == "delivered":
            nbytes += size
            last = finished if last is None or finished > last else last
    if cache_file is not None and new != old:
        from .textfile import write_file  # (which imports this module)
        try:
            write_file(cache_file.parent, cache_file.name, json.dumps(new), 0o600)
        except OSError:
            pass  # only an optimisation: the next run reads the receipts again
    return Totals(counts, undone, nbytes, last, unreadable, failed_now)


def _read(path: str, inode: int) -> list[Any]:
    """[inode, outcome, bytes, finished] of one receipt; outcome None when unreadable."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
        return [inode, str(data["outcome"]), int(data["bytes"]), str(data["finished"])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [inode, None, 0, ""]


def _load_cache(path: Path | None) -> dict[str, list[Any]]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}  # none yet, or damaged: everything is read again
    return data if isinstance(data, dict) else {}


def _receipts(study: StudyConfig) -> Iterator[tuple[str, str, int]]:
    """(key, path, inode) of every receipt file in done/ and failed/."""
    for d in (study.done, study.failed):
        try:
            it = os.scandir(d)
        except FileNotFoundError:
            continue
        except PermissionError:
            raise NotAllowed(f"cannot read {printable(str(d))}: `dittohead metrics` is "
                             "run by root or the service user") from None
        with it:
            for e in it:
                # <id>.json and <id>.retried.json; not the receipts' temporary names.
                if e.name.endswith(".json") and not e.name.startswith("."):
                    # Strings, not Paths: 10,000 Path objects cost more than the rest.
                    yield f"{d.name}/{e.name}", e.path, e.inode()


def _fs(path: Path) -> tuple[int, int] | None:
    """Size and bytes available to ordinary users of the filesystem holding path."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


# name -> (type, help). HELP is the same in every study's file: node_exporter
# merges the files and refuses a metric whose help differs between them.
METRICS = {
    "dittohead_deliveries_total": (
        "counter", "Entries filed, by outcome (delivered, failed, rejected), from the receipts; "
        "an undone delivery counts as delivered."),
    "dittohead_undone_total": ("counter", "Deliveries taken back with dittohead undo."),
    "dittohead_delivered_bytes_total": (
        "counter", "Bytes of the delivered entries, as their receipts say."),
    "dittohead_last_delivery_timestamp_seconds": (
        "gauge", "When the newest delivery was filed (Unix time); absent before the first."),
    "dittohead_pending_entries": (
        "gauge", "Entries not filed yet: in an inbox (ready or not) or claimed."),
    "dittohead_processing_entries": (
        "gauge", "Of the pending entries, those claimed (being delivered, or kept for a "
        "later run)."),
    "dittohead_uploading_entries": ("gauge", "Dot names in the inboxes (uploads under way)."),
    "dittohead_oldest_pending_timestamp_seconds": (
        "gauge", "Since when the oldest pending entry waits (Unix time); absent when none "
        "waits."),
    "dittohead_failed_entries": (
        "gauge", "Entries in failed/ now (not retried)."),
    "dittohead_receipts_unreadable": (
        "gauge", "Receipt files that could not be read or parsed (not counted above)."),
    "dittohead_destination_available": (
        "gauge", "1 when the destination's filesystem could be looked at, else 0."),
    "dittohead_destination_size_bytes": ("gauge", "Size of the destination's filesystem."),
    "dittohead_destination_avail_bytes": (
        "gauge", "Bytes available to the service user on the destination's filesystem."),
    "dittohead_dropbox_size_bytes": (
        "gauge", "Size of the filesystem holding the study's dropbox directory."),
    "dittohead_dropbox_avail_bytes": (
        "gauge", "Bytes available on the filesystem holding the study's dropbox directory."),
    "dittohead_metrics_timestamp_seconds": (
        "gauge", "When this file was written (Unix time)."),
}


def samples(study: StudyConfig, now: float,
            cache_dir: Path | None = None) -> Iterator[tuple[str, dict[str, str], float]]:
    """Every sample of one study: (metric, labels, value)."""
    s = {"study": study.name}
    totals = receipt_totals(study, cache_dir)
    for outcome in OUTCOMES:
        yield "dittohead_deliveries_total", {**s, "outcome": outcome}, \
            totals.deliveries[outcome]
    yield "dittohead_undone_total", s, totals.undone
    yield "dittohead_delivered_bytes_total", s, totals.delivered_bytes
    last = iso_seconds(totals.last_delivery) if totals.last_delivery else None
    if last is not None:
        yield "dittohead_last_delivery_timestamp_seconds", s, last
    pending = glance.pending(study)
    yield "dittohead_pending_entries", s, pending.inbox
    yield "dittohead_processing_entries", s, pending.processing
    yield "dittohead_uploading_entries", s, pending.uploading
    if pending.oldest is not None:
        yield "dittohead_oldest_pending_timestamp_seconds", s, int(pending.oldest)
    yield "dittohead_failed_entries", s, totals.failed_now
    yield "dittohead_receipts_unreadable", s, totals.unreadable
    dest = _fs(study.destination) if os.path.isdir(study.destination) else None
    yield "dittohead_destination_available", s, 0 if dest is None else 1
    if dest is not None:
        yield "dittohead_destination_size_bytes", s, dest[0]
        yield "dittohead_destination_avail_bytes", s, dest[1]
    box = _fs(study.root)
    if box is not None:
        yield "dittohead_dropbox_size_bytes", s, box[0]
        yield "dittohead_dropbox_avail_bytes", s, box[1]
    yield "dittohead_metrics_timestamp_seconds", s, round(now, 3)
