"""`status` at a glance: one table of every study, and the details of one.

health.status() gathers a study's numbers (the JSON of `status --json`);
more() adds what the table needs (oldest pending, ages, the dropbox's fill,
the forecast); status_text() lays them out. Colour only on a terminal, and
never with NO_COLOR set (https://no-color.org).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import capacity, purge
from .config import Config, StudyConfig
from .log import clean, printable
from .readiness import drop_folders

# Pending this long is worth a look (yellow): longer than the timer's retries
# and a quiet period many times over.
OLD_PENDING = 3600
RED, YELLOW, RESET = "\033[31m", "\033[33m", "\033[0m"
COLUMNS = ("STUDY", "PENDING", "OLDEST", "FAILED", "LAST DELIVERY", "FILL", "FULL IN", "UNITS")


@dataclass(frozen=True)
class Pending:
    """Entries not filed yet."""

    inbox: int  # names in the inbox and the own inboxes, not dot names
    processing: int  # claimed, in processing/
    uploading: int  # dot names in the inboxes
    oldest: float | None  # when the oldest pending entry arrived (see pending)


def pending(study: StudyConfig, unreadable_ok: bool = False) -> Pending:
    """Entries in the inboxes and claims in processing/, and since when the oldest waits.

    An inbox entry's time is its ctime (a rename into the inbox sets it, and
    so does every change to its top directory: an upload still being written
    is not old); a claim's is its record's `started`. unreadable_ok: a folder
    the caller may not list counts as empty (`status` by an admin of the
    group, who cannot list a 1733 inbox), else its error is raised.
    """
    inbox = uploading = processing = 0
    times: list[float] = []
    for folder in [study.inbox, *(study.root / f for f in drop_folders(study))]:
        for name in _names(folder, unreadable_ok):
            if name.startswith("."):
                uploading += 1
                continue
            inbox += 1
            try:
                times.append(os.lstat(folder / name).st_ctime)
            except OSError:
                continue  # claimed meanwhile
    for name in _names(study.processing, unreadable_ok):
        if name.startswith("."):
            continue
        if not name.endswith(".json"):
            processing += 1
            continue
        try:
            started = capacity.iso_seconds(
                json.loads((study.processing / name).read_bytes())["started"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if started is not None:
            times.append(started)
    return Pending(inbox + processing, processing, uploading, min(times, default=None))


def _names(path: Path, unreadable_ok: bool) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []
    except PermissionError:
        if unreadable_ok:
            return []
        raise


def unit_state(units: dict[str, str]) -> str:
    """One word for a study's units: failed if any is, else the path unit's state."""
    if not units:
        return "-"  # no booted systemd here
    if "failed" in units.values():
        return "failed"
    service = next((v for k, v in units.items() if k.endswith(".service")), "")
    if service in ("active", "activating", "reloading"):
        return "running"
    return next((v for k, v in units.items() if k.endswith(".path")), "unknown")


def more(cfg: Config, study: StudyConfig, data: dict[str, Any]) -> dict[str, Any]:
    """The keys `status` adds for the table (never replacing one): ages, the dropbox's
    fill, the forecast and one word for the units."""
    from .health import disk_use
    now = time.time()
    oldest = pending(study, unreadable_ok=True).oldest
    last = data.get("last_delivery") or {}
    finished = capacity.iso_seconds(last.get("finished")) if last else None
    fc = capacity.study_forecast(study, now)
    return {
        "oldest_pending": (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(oldest))
                           if oldest is not None else None),
        "oldest_pending_age_seconds": round(now - oldest) if oldest is not None else None,
        "last_delivery_age_seconds": round(now - finished) if finished is not None else None,
        "dropbox": {"path": str(study.root), "disk": disk_use(study.root)},
        "forecast": fc.to_dict() if fc else None,
        "forecast_warn_days": study.forecast_warn_days,
        "disk_warn_percent": list(study.disk_warn_percent),
        "unit_state": unit_state(data.get("units") or {}),
    }


def age(seconds: float | None) -> str:
    """An age in the largest unit that fits: 45s, 12m, 5h, 3d."""
    if seconds is None:
        return "-"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit}"
    return f"{max(0, seconds):.0f}s"


def _row(s: dict[str, Any]) -> list[tuple[str, bool, bool]]:
    """The table's cells of one study: (text, red, yellow)."""
    disk = s.get("disk")
    fill = disk["percent"] if disk else None
    warn = s.get("disk_warn_percent") or []
    fc = s.get("forecast")
    horizon = s.get("forecast_warn_days")
    oldest = s.get("oldest_pending_age_seconds")
    pending = s["pending"] + s["waiting"] + s["processing"]
    return [
        (s["study"], False, False),
        (str(pending), False, False),
        (age(oldest), False, oldest is not None and oldest >= OLD_PENDING),
        (str(s["failed"]), s["failed"] > 0, False),
        (age(s.get("last_delivery_age_seconds")), False, False),
        ("n/a" if fill is None else f"{fill:.0f}%",
         fill is None or bool(warn and fill >= warn[0]), False),
        ("-" if not fc else f"{fc['days_to_full']:.0f}d",
         bool(fc and horizon is not None and fc["days_to_full"] < horizon), False),
        (s.get("unit_state", "-"), s.get("unit_state") == "failed", False),
    ]


def table(data: list[dict[str, Any]], colour: bool) -> list[str]:
    """The studies as an aligned table, a header first."""
    rows = [[(clean(c), red, yellow) for c, red, yellow in _row(s)] for s in data]
    widths = [max([len(h)] + [len(r[i][0]) for r in rows]) for i, h in enumerate(COLUMNS)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(COLUMNS, widths, strict=True)).rstrip()]
    for r in rows:
        cells = []
        for (text, red, yellow), w in zip(r, widths, strict=True):
            cell = text.ljust(w)
            if colour and (red or yellow):  # padded first: escapes take no columns
                cell = (RED if red else YELLOW) + text + RESET + " " * (w - len(text))
            cells.append(cell)
        lines.append("  ".join(cells).rstrip())
    return lines


def study_details(s: dict[str, Any]) -> list[str]:
    """The lines under the table for one study (`status STUDY`); names escaped already."""
    lines = [f"{s['study']}: {s['pending']} pending, {s['waiting']} waiting to be "
             f"quiet, {s['uploading']} uploading, {s['processing']} processing, "
             f"{s['failed']} failed, {s['delivered']} delivered"]
    if s.get("oldest_pending"):
        lines.append(f"  oldest pending since: {s['oldest_pending']}")
    last = s["last_delivery"]
    if last:  # its entry is printable() already (Receipt.to_dict)
        lines.append(f"  last delivery: {printable(str(last.get('id')))} "
                     f"({last.get('entry')}, {last.get('files')} files, "
                     f"{last.get('finished')})")
    disk = s["disk"]
    lines.append(f"  destination: {s['destination']} "
                 + (f"{disk['percent']}% used, {capacity.size(disk['available_bytes'])} free"
                    if disk else "NOT AVAILABLE"))
    fc = s.get("forecast")
    if fc:
        lines.append(f"  forecast: {capacity.Forecast(**fc).text()}")
    elif disk:
        lines.append(f"  forecast: none (no delivery in the last {capacity.WINDOW_DAYS} days)")
    box = s.get("dropbox")
    if box:
        bd = box["disk"]
        lines.append(f"  dropbox: {box['path']} "
                     + (f"{bd['percent']}% used, {capacity.size(bd['available_bytes'])} free"
                        if bd else "NOT AVAILABLE"))
    for unit, state in s["units"].items():
        lines.append(f"  {unit}: {state}")
    return lines + purge.uploading_detail(s)


def use_colour(stream: Any = None) -> bool:
    """Colour only on a terminal, and never with NO_COLOR set (to anything)."""
    stream = stream or sys.stdout
    return "NO_COLOR" not in os.environ and bool(getattr(stream, "isatty", lambda: False)())


def status_text(data: list[dict[str, Any]], colour: bool = False, details: bool = False) -> str:
    """The table of the studies, and with details (one study asked for) their lines;
    every piece is escaped here, so the result may go to a terminal as it is."""
    lines = table(data, colour)
    if data:
        box = data[0].get("dropbox")
        if box and not details and box.get("disk"):
            root = os.path.dirname(box["path"])  # <dropbox_root>/<study>: one for all
            lines.append(clean(f"dropbox {root}: {box['disk']['percent']}% used"))
    if details:
        for s in data:
            lines += [""] + [clean(x) for x in study_details(s)]
    if not all(s.get("inbox_readable", True) for s in data):
        lines.append("(pending counts leave out the shared inbox, which only root and the "
                     "service user can list: run status with sudo for them)")
    return "\n".join(lines)
