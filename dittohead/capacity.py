"""Capacity: how fast a study's destination fills, and telling people before and when it is full.

Three things live here. The forecast: from the receipts in done/ of the last
WINDOW_DAYS, the rate a study delivers at and the days until its destination
is full at that rate. The warnings, each once per crossing, with their state
in processing/.disk-usage.json: the destination's fill and forecast (after
each delivery) and the dropbox's own filesystem (at the end of each run).
And "out of space": an entry kept because its destination has no room is
told of once, to the study's contacts and its uploader, remembered in its
claim record (`space_told`).
"""

from __future__ import annotations

import calendar
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import log, notify
from .claim import Claim, note, now_iso
from .config import Config, StudyConfig
from .fsops import used_percent, write_atomic

WINDOW_DAYS = 14  # the forecast's window: two weeks of a study's rhythm
MIN_WINDOW_DAYS = 1.0  # a study younger than a day is forecast as if a day old
DAY = 86400.0
# A receipt's name starts with the claim's time (claim.new_id); one claimed
# this long before the window may still have finished in it (an entry that
# waited for space). Older names are not read at all.
CLAIM_SLACK_DAYS = 7


@dataclass(frozen=True)
class Forecast:
    """When a destination is full at the recent rate of deliveries."""

    days_to_full: float
    rate_bytes_per_day: float
    window_days: float

    def to_dict(self) -> dict[str, Any]:
        return {"days_to_full": round(self.days_to_full, 1),
                "rate_bytes_per_day": round(self.rate_bytes_per_day),
                "window_days": round(self.window_days, 2)}

    def window(self) -> str:
        """The window as said: "the last 14 days'", "the last day's"."""
        days = round(self.window_days)
        return "the last day's" if days <= 1 else f"the last {days} days'"

    def text(self) -> str:
        """Like "at the last 14 days' rate (1.2 GB a day), full in about 23 days"."""
        return (f"at {self.window()} rate ({size(self.rate_bytes_per_day)} a day), "
                f"full in about {self.days_to_full:.0f} days")


def size(n: float) -> str:
    """Bytes as a person reads them, in decimal units (3.0 GB)."""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def iso_seconds(text: object) -> float | None:
    """Seconds since the epoch of "2026-11-30T18:17:16Z" (the receipts' form), else None;
    by hand, as strptime costs more than reading a receipt."""
    t = str(text)
    if len(t) != 20 or t[4] != "-" or t[10] != "T" or t[19] != "Z":
        return None
    try:
        return float(calendar.timegm((int(t[:4]), int(t[5:7]), int(t[8:10]), int(t[11:13]),
                                      int(t[14:16]), int(t[17:19]), 0, 0, 0)))
    except ValueError:
        return None


def _id_seconds(name: str) -> float | None:
    """When a delivery id (claim.new_id: 20261130T181716Z-...) was claimed."""
    t = name[:16]
    return iso_seconds(f"{t[:4]}-{t[4:6]}-{t[6:8]}T{t[9:11]}:{t[11:13]}:{t[13:15]}Z")


def recent_deliveries(done: Path, now: float) -> tuple[list[tuple[float, int]], float | None]:
    """(finished, bytes) of the receipts in done/ finished in the window before `now`, and
    when the study's first delivery was claimed (None: no receipt at all).

    Only receipts whose name (the claim's time) is recent enough are read, and
    of those only `finished` and `bytes` are used.
    """
    try:
        dir_fd = os.open(done, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return [], None
    try:
        return _read_recent(dir_fd, now)
    finally:
        os.close(dir_fd)


def _read_recent(dir_fd: int, now: float) -> tuple[list[tuple[float, int]], float | None]:
    names = [n for n in os.listdir(dir_fd) if n.endswith(".json") and n[:1] != "."]
    # Ids sort by time as text: the first is the smallest one that parses.
    first = next((t for t in map(_id_seconds, sorted(names)) if t is not None), None)
    start = now - WINDOW_DAYS * DAY
    cutoff = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(start - CLAIM_SLACK_DAYS * DAY))
    found = []
    for name in names:
        if name[:16] < cutoff:
            continue
        try:
            data = json.loads(_read_at(dir_fd, name))
            finished, nbytes = iso_seconds(data["finished"]), int(data["bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a receipt; `check` and `status` say so elsewhere
        if finished is not None and start <= finished <= now:
            found.append((finished, nbytes))
    return found, first


def _read_at(dir_fd: int, name: str) -> bytes:
    """A file's content by its name in an open directory: half the cost of a path's."""
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def forecast(deliveries: list[tuple[float, int]], first: float | None, available: int,
             now: float) -> Forecast | None:
    """Days until `available` bytes are used up at the rate of `deliveries`; None without
    a delivery in the window. The window is WINDOW_DAYS, or the time since the
    study's first delivery when that is shorter (at least MIN_WINDOW_DAYS): a new
    study's rate is not diluted by the days before it existed."""
    total = sum(b for _, b in deliveries)
    if not deliveries or total <= 0:
        return None
    window = WINDOW_DAYS * 1.0
    if first is not None:
        window = min(window, max(MIN_WINDOW_DAYS, (now - first) / DAY))
    rate = total / window
    return Forecast(days_to_full=max(0, available) / rate, rate_bytes_per_day=rate,
                    window_days=window)


def study_forecast(study: StudyConfig, now: float | None = None) -> Forecast | None:
    """The forecast for a study's destination, None without recent deliveries or when the
    destination cannot be measured."""
    now = time.time() if now is None else now
    deliveries, first = recent_deliveries(study.done, now)
    if not deliveries:
        return None
    try:
        st = os.statvfs(study.destination)
    except OSError:
        return None
    return forecast(deliveries, first, st.f_bavail * st.f_frsize, now)


def _state(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _before(state: dict[str, Any], key: str = "percent") -> float:
    try:
        return float(state.get(key, 0.0))
    except (TypeError, ValueError):
        return 0.0


def _state_path(study: StudyConfig) -> Path:
    return study.processing / ".disk-usage.json"


def _save(study: StudyConfig, state: dict[str, Any], **changes: Any) -> None:
    """Write the state with `changes` (the other keys as they were read)."""
    write_atomic(_state_path(study), json.dumps(state | changes).encode())


def check_destination(config: Config, study: StudyConfig) -> None:
    """Warn once each time the destination's fill crosses a threshold upward, and once
    each time its forecast drops below forecast_warn_days (after a delivery)."""
    if not study.disk_warn_percent and study.forecast_warn_days is None:
        return
    percent = used_percent(os.statvfs(study.destination))
    state = _state(_state_path(study))
    before = _before(state)
    crossed = [t for t in study.disk_warn_percent if before < t <= percent]
    fc = study_forecast(study) if crossed or study.forecast_warn_days is not None else None
    soon = (study.forecast_warn_days is not None and fc is not None
            and fc.days_to_full < study.forecast_warn_days)
    told_soon = bool(state.get("forecast_warned")) and soon
    ahead = f"; {fc.text()}" if fc else ""
    if crossed:
        text = f"{study.destination} is {percent:.0f}% full (crossed {crossed[-1]}%)"
        _warn_disk(config, study, text + ahead, study.destination,
                   f"{percent:.1f}% used{ahead}", destination=True)
    elif soon and not told_soon:
        assert fc is not None
        soon_text = f"full in about {fc.days_to_full:.0f} days at {fc.window()} rate"
        _warn_disk(config, study, f"{study.destination} fills: {soon_text}", study.destination,
                   f"{soon_text} ({percent:.1f}% used)", destination=True)
    if abs(percent - before) >= 0.05 or crossed or bool(state.get("forecast_warned")) != soon:
        _save(study, state, percent=round(percent, 2), forecast_warned=soon)


def _warn_disk(config: Config, study: StudyConfig, text: str, where: Path, reason: str,
               destination: bool) -> None:
    """One disk-warning event and one mail to the study's contacts (`disk` in notify.on)."""
    fields: dict[str, str] = {"study": study.name, "path": str(where), "reason": reason}
    if destination:
        fields["destination"] = str(where)
    log.event("disk-warning", f"{study.name}: {text}", **fields)
    if destination:
        body = (f"The storage of study {study.name}: {text}.\nDeliveries stop (and wait) "
                "when it is full; please make room or grow it.\n")
    else:
        body = (f"The dropbox's filesystem, where the uploads of study {study.name} arrive: "
                f"{text}.\nUploads stop when it is full; please make room (dittohead purge, "
                "old uploads in failed/) or grow it.\n")
    notify.send(config, study, "disk", text, body)


def check_dropbox(config: Config, study: StudyConfig) -> None:
    """Warn once each time the dropbox's filesystem (where this study's uploads arrive)
    crosses one of dropbox_warn_percent upward (at the end of each run). The state is
    written only when that changes, so a run that finds all as before writes nothing."""
    if not config.dropbox_warn_percent:
        return
    st = os.statvfs(study.root)
    percent = used_percent(st)
    state = _state(_state_path(study))
    before = _before(state, "dropbox_percent")
    marks = config.dropbox_warn_percent
    crossed = [t for t in marks if before < t <= percent]
    if crossed:
        text = f"the dropbox {study.root} is {percent:.0f}% full (crossed {crossed[-1]}%)"
        _warn_disk(config, study, text, study.root, f"{percent:.1f}% used of the dropbox",
                   destination=False)
    changes: dict[str, Any] = {}
    if sum(t <= percent for t in marks) != sum(t <= before for t in marks):
        changes["dropbox_percent"] = round(percent, 2)
    if state.get("dropbox_full") and percent < 100 and not (st.f_files and not st.f_favail):
        changes["dropbox_full"] = False  # room again: the next time it is full is told
    if changes:
        _save(study, state, **changes)


def dropbox_full(config: Config, study: StudyConfig, why: str) -> None:
    """An entry could not be claimed for want of space on the dropbox: warn and mail once
    until there is room again (the state and the mail need a little room themselves:
    when none is left, the journal event is all, once per run and entry)."""
    state = _state(_state_path(study))
    if state.get("dropbox_full"):
        return
    _warn_disk(config, study, f"the dropbox {study.root} is full: uploads wait in the inbox",
               study.root, why, destination=False)
    try:
        _save(study, state, dropbox_full=True)
    except OSError as e:
        log.send(f"{study.name}: could not record that the dropbox is full: {e}",
                 priority=4, DITTOHEAD_STUDY=study.name, DITTOHEAD_REASON=str(e))


def findings(config: Config, study: StudyConfig) -> list[str]:
    """What `check` says about capacity: a dropbox over its first threshold, and a
    destination forecast to fill within forecast_warn_days."""
    found = []
    try:
        percent = used_percent(os.statvfs(study.root))
    except OSError:
        percent = 0.0  # layout problems name a missing root
    if config.dropbox_warn_percent and percent >= config.dropbox_warn_percent[0]:
        found.append(f"the dropbox's filesystem ({study.root}) is {percent:.1f}% full: "
                     "when it is full no upload can be taken (df -h; dittohead status)")
    fc = study_forecast(study) if study.forecast_warn_days is not None else None
    if fc is not None and study.forecast_warn_days is not None \
            and fc.days_to_full < study.forecast_warn_days:
        found.append(f"destination {study.destination} is {fc.text()}: make room or grow "
                     "it")
    return found


def out_of_space(config: Config, study: StudyConfig, c: Claim, uploader: str, nbytes: int,
                 detail: str) -> tuple[Claim, str]:
    """An entry kept because its destination has no room: tell its contacts (`disk`) and
    uploader once, remembered in the claim; return the claim and the reason to keep."""
    try:
        st = os.statvfs(study.destination)
        free = f"{size(st.f_bavail * st.f_frsize)} free on {study.destination}"
    except OSError:
        free = f"{study.destination} cannot be measured"
    name = log.printable(c.entry)
    what = f"{name} ({size(nbytes)})" if nbytes else name
    fc = study_forecast(study)
    text = (f"study {study.name} is out of space: {what} waits, {free}; it will be "
            "delivered when space is freed")
    why = f"{text} ({detail})"
    if c.space_told:
        return c, why
    c = note(study, c, space_told=now_iso())
    log.event("out-of-space", f"{study.name}: {text}", reason=why, bytes=nbytes,
              study=study.name, entry=c.entry, delivery=c.id,
              destination=str(study.destination), uploader=uploader)
    body = (f"{text[0].upper()}{text[1:]}.\n\nStudy:       {study.name}\n"
            f"Entry:       {name}\nUploaded by: {log.printable(uploader)}\n"
            f"Delivery:    {c.id}\nWhy:         {detail}\n"
            + (f"Forecast:    {fc.text()}\n" if fc else "")
            + "\nNothing of it was delivered yet; it is kept and tried again every few "
              "minutes, and you will hear when it is delivered. Please make room in, or "
              "grow, the study's storage.\n")
    notify.send(config, study, "out-of-space", f"out of space: {name} waits", body, uploader)
    return c, why
