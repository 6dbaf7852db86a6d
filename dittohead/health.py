"""Admin commands that look at a study: `check`, `status` and `retry`."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

from . import layout, purge
from .config import Config, StudyConfig
from .conflicts import symlinked_destination
from .errors import DittoheadError, NotPermitted, TemporaryError
from .examine import MAX_DEPTH
from .fsops import rename_noreplace, used_percent
from .log import printable
from .notify import failed_send
from .outcomes import outcomes_dir
from .readiness import Watch, drop_folders
from .record import ReceiptError, read_receipt
from .stage import STAGING_PREFIX


def _systemd_booted() -> bool:
    return os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None


def unit_states(study: str) -> dict[str, str]:
    """`systemctl is-active` of the study's units, or {} without a booted systemd."""
    if not _systemd_booted():
        return {}
    out = {}
    for kind in ("path", "timer", "service"):
        unit = f"dittohead@{study}.{kind}"
        r = subprocess.run(["systemctl", "is-active", unit], capture_output=True, text=True,
                           check=False)
        out[unit] = r.stdout.strip() or "unknown"
    return out


def disk_use(path: Path) -> dict[str, Any] | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return {"used_bytes": (st.f_blocks - st.f_bfree) * st.f_frsize,
            "available_bytes": st.f_bavail * st.f_frsize,
            "percent": round(used_percent(st), 1)}


def _names(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def status(cfg: Config, study: StudyConfig) -> dict[str, Any]:
    """Counts, the last delivery, disk use and unit states of one study."""
    inbox = _names(study.inbox)  # (and the drop folders, by readiness)
    processing = [n for n in _names(study.processing)
                  if not n.startswith(".") and not n.endswith(".json")]
    failed = [n for n in _names(study.failed) if n.endswith(".json") and ".retried" not in n]
    last = None
    done = sorted((n for n in _names(study.done) if n.endswith(".json")), reverse=True)
    if done:
        try:
            last = read_receipt(study.done / done[0]).to_dict()
        except (OSError, ReceiptError):
            last = None
    ready, waiting = _ready_and_waiting(study, inbox)
    data = {
        "study": study.name,
        "pending": ready,
        "waiting": waiting,
        "uploading": sum(len([n for n in _names(d) if n.startswith(".")])
                         for d in [study.inbox, *(study.root / f for f in drop_folders(study))]),
        "processing": len(processing),
        "failed": len(failed),
        "delivered": len(done),
        "last_delivery": last,
        "destination": str(study.destination),
        "disk": disk_use(study.destination),
        "units": unit_states(study.name),
        "uploading_entries": purge.uploading_entries(study),
        # Only root and the service user can list the shared inbox (1733): for the
        # group's admins the counts above leave its entries out.
        "inbox_readable": os.access(study.inbox, os.R_OK | os.X_OK),
    }
    from .glance import more  # the table's keys (oldest pending, forecast, ...)
    return data | more(cfg, study, data)


def _ready_and_waiting(study: StudyConfig, inbox: list[str]) -> tuple[int, int]:
    """How many inbox entries are ready, and how many wait to be quiet (readiness.py)."""
    try:
        seen = Watch(study).scan()
    except (TemporaryError, OSError):  # an inbox we cannot read: count names only
        return len([n for n in inbox if not n.startswith(".")]), 0
    return len(seen.ready), len(seen.waiting)


STALE_MAIL = 24 * 3600  # seconds a queued mail may wait before `check` says so


def leftovers(study: StudyConfig) -> list[str]:
    """Staging directories no claim will clean up, and mail that is not going out."""
    found = []
    for name in _names(study.destination):
        if name.startswith(STAGING_PREFIX) and \
                not (study.processing / f"{name[len(STAGING_PREFIX):]}.json").exists():
            # A claim removes its own staging directory when it resumes; without
            # one (removed by hand?) nothing ever will. Nothing in it is delivered.
            shown = printable(str(study.destination / name))
            found.append(f"{shown} belongs to no claim in processing/: "
                         "an abandoned staging directory, nothing in it was delivered; "
                         f"remove it (rm -r {shown})")
    queued = list((study.processing / ".mail").glob("*.eml"))
    now = time.time()
    stale = [p for p in queued if now - _mtime(p) > STALE_MAIL]
    failed = failed_send(study, len(queued)) if queued else None
    if failed:
        found.append(failed)
    elif stale:
        found.append(f"{len(stale)} of {len(queued)} queued mails are more than a day old: "
                     "is the SMTP server reachable? (journalctl -u "
                     f"dittohead-mail@{study.name}.service; dittohead mail {study.name})")
    return found


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except FileNotFoundError:
        return time.time()  # sent meanwhile


def check(cfg: Config, studies: list[StudyConfig]) -> list[str]:
    """Every problem found with the config's users, groups, layout, destination and units."""
    found: list[str] = []
    try:
        svc = pwd.getpwnam(cfg.service_user)
    except KeyError:
        return [f"service_user {cfg.service_user!r} does not exist (run systemd-sysusers)"]
    for study in studies:
        p = f"{study.name}: "
        found += [p + x for x in layout.problems(cfg, study)]
        for g in ([study.group] if study.group else []) + list(study.uploaders or []):
            try:
                grp.getgrnam(g)
            except KeyError:
                found.append(p + f"group {g!r} does not exist")
        if os.path.islink(study.destination):
            found.append(p + symlinked_destination(study))
            continue
        from . import fstype
        if (why := fstype.refused(study)) is not None:  # a stat of a dead one: ENOTCONN
            found.append(p + why)
            continue
        try:
            st = os.stat(study.destination)
        except OSError as e:
            found.append(p + f"destination {study.destination}: {e.strerror}")
            continue
        if study.dir_mode & stat.S_ISGID and not st.st_mode & stat.S_ISGID:
            found.append(p + f"destination {study.destination} is not setgid: directories "
                         "the service creates may lose dir_mode's setgid bit and need "
                         f"CAP_CHOWN for the study's group (chmod g+s {study.destination})")
        if not may_add(st, svc.pw_uid, set(os.getgrouplist(svc.pw_name, svc.pw_gid))):
            found.append(p + f"destination {study.destination} is not writable by "
                         f"{cfg.service_user} (by owner, group or others): deliveries will "
                         f"fail (`dittohead setup {study.name}` makes it the service's)")
        found += [p + x for x in closed_dirs(study.destination, svc)]
        disk = disk_use(study.destination)
        if disk and study.disk_warn_percent and disk["percent"] >= study.disk_warn_percent[0]:
            found.append(p + f"destination is {disk['percent']}% full")
        from . import capacity  # the dropbox's fill and the forecast
        found += [p + x for x in capacity.findings(cfg, study)]
        found += [p + x for x in leftovers(study)]
        found += [p + x for x in purge.retention_problems(study)]
        found += [p + x for x in shared_filesystem(study)]
        if _systemd_booted():
            found += [p + x for x in _unit_problems(study)]
    if _systemd_booted():
        from . import generator
        found += generator.problems(cfg) + generator.drift(cfg) + stray_units(cfg)
        found += purge.timer_problems(cfg)
    from . import textfile  # metrics
    found += textfile.findings(cfg)
    return found


def _unit_problems(study: StudyConfig) -> list[str]:
    """The study's path unit and timer not enabled, or failed."""
    found = []
    for unit in (f"dittohead@{study.name}.path", f"dittohead@{study.name}.timer"):
        r = subprocess.run(["systemctl", "is-enabled", unit], capture_output=True,
                           text=True, check=False)
        if r.stdout.strip() != "enabled":
            found.append(f"{unit} is {r.stdout.strip() or 'not enabled'} "
                         f"(systemctl enable --now {unit})")
        r = subprocess.run(["systemctl", "is-failed", unit], capture_output=True,
                           text=True, check=False)
        if r.stdout.strip() == "failed":
            found.append(f"{unit} has failed (systemctl reset-failed {unit})")
    return found


_UNIT = re.compile(r"(dittohead(?:-mail|-notify)?)@(.+)\.(path|timer|service)")


def stray_units(cfg: Config) -> list[str]:
    """Units of studies the config no longer has (their uploads would sit unseen), and
    failed notifier units (a failure nobody was told of)."""
    r = subprocess.run(["systemctl", "list-units", "--all", "--plain", "--no-legend", "--full",
                        "dittohead@*", "dittohead-mail@*", "dittohead-notify@*"],
                       capture_output=True, text=True, check=False)
    found = []
    for line in r.stdout.splitlines():
        fields = line.split()
        m = _UNIT.fullmatch(fields[0]) if len(fields) >= 3 else None
        if m is None:
            continue
        unit, active, (kind, study, suffix) = printable(fields[0]), fields[2], m.groups()
        if kind == "dittohead-notify":
            if active == "failed":
                found.append(f"{unit} has failed: a unit's failure was not told (journalctl "
                             f"-u {unit}; then systemctl reset-failed {unit})")
        elif study not in cfg.studies and (suffix != "service" or active == "failed"):
            s = printable(study)
            found.append(f"{unit} is {active} ({fields[1]}), but the config has no study {s}: "
                         f"its uploads are never delivered (add the study back, or "
                         f"systemctl disable --now dittohead@{s}.path dittohead@{s}.timer)")
    return found


# How many directories of a destination `check` looks at (about a second's walk).
CLOSED_DIRS_MAX = 100_000


def may_add(st: os.stat_result, uid: int, groups: set[int]) -> bool:
    """Whether a user may add names to a directory by its mode bits (what the service,
    without CAP_DAC_OVERRIDE, needs): the owner's, else the group's, else others' wx."""
    bits = (st.st_mode >> 6 if st.st_uid == uid
            else st.st_mode >> 3 if st.st_gid in groups else st.st_mode) & 0o3
    return bits == 0o3


def closed_dirs(dest: Path, svc: pwd.struct_passwd, most: int = CLOSED_DIRS_MAX) -> list[str]:
    """Directories below dest the service user may not add to, by their modes (not ACLs).

    The service has no CAP_DAC_OVERRIDE: an entry that adds to one fails.
    """
    groups = set(os.getgrouplist(svc.pw_name, svc.pw_gid))
    closed: list[str] = []
    seen = 0
    for path, dirs, _, fd in os.fwalk(dest, follow_symlinks=False):
        for name in dirs:
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue  # gone meanwhile
            if not stat.S_ISDIR(st.st_mode):
                continue  # a symlink: never followed
            if not may_add(st, svc.pw_uid, groups):
                closed.append(os.path.join(path, name))
        seen += 1
        if seen >= most:
            dirs.clear()
    problems = [f"{printable(d)} is not writable by {svc.pw_name}: entries adding to it fail "
                f"(chown {svc.pw_name} it)" for d in closed[:10]]
    if len(closed) > 10:
        problems.append(f"... and {len(closed) - 10} more directories in {dest} like these")
    if seen >= most:
        problems.append(f"{dest}: only {most} directories were checked for the service's "
                        "write access")
    return problems


# Places on a typical host where users may write, outside any inbox.
USER_WRITABLE = ("/tmp", "/var/tmp", "/home", "/dev/shm", "/srv", "/var/mail")


def shared_filesystem(study: StudyConfig) -> list[str]:
    """The inbox on one filesystem with a place users write: a rename could feign an uploader.

    Linux records no one's name on a rename: a user who may write a
    directory holding another user's file or directory can move it into the
    inbox (same filesystem), and it is delivered as its owner's. With the
    dropbox on a filesystem of its own, everything in an inbox was made
    there by its owner (the inboxes are sticky).
    """
    try:
        dev = os.stat(study.inbox).st_dev
    except OSError:
        return []  # layout.problems() names it
    shared = []
    for place in USER_WRITABLE:
        try:
            if os.stat(place).st_dev == dev:
                shared.append(place)
        except OSError:
            continue
    if not shared:
        return []
    return [f"{study.inbox} is on the same filesystem as {', '.join(shared)}: a user could "
            "rename another user's file from there into the inbox, delivered as that user's. "
            "Put dropbox_root on a filesystem of its own (docs/contract.md, Installing)"]


def give_back(top: Path, uid: int, service_uid: int) -> None:
    """Give what the lockdown took of an entry back to its uploader (owner, primary group).

    Only inodes the service owns: another user's file, which failed the
    entry, stays that user's.
    """
    try:
        gid = pwd.getpwuid(uid).pw_gid
    except KeyError:
        gid = -1

    def back(name: str, dir_fd: int | None) -> None:
        if os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_uid == service_uid:
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)

    if os.path.isdir(top) and not os.path.islink(top):
        base = str(top).count("/")
        for path, dirs, files, fd in os.fwalk(top, follow_symlinks=False):
            for name in (*dirs, *files):
                back(name, fd)
            if path.count("/") - base >= MAX_DEPTH:
                dirs.clear()  # deeper, the lockdown took nothing (examine.MAX_DEPTH)
    back(str(top), None)


# What `retry` accepts as a delivery id: every id new_id() makes (time, slug,
# hex), with room for other forms, and never a path (no "/", no leading ".").
DELIVERY_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def retry(cfg: Config, study: StudyConfig, delivery: str) -> str:
    """Move failed/<id> back into the inbox under its original name."""
    if not DELIVERY_ID_RE.fullmatch(delivery):
        raise DittoheadError(f"{printable(delivery)}: not a delivery id (like "
                             "20261127T204655Z-s01-session1-9f3a0c; see `dittohead status`)")
    receipt = study.failed / f"{delivery}.json"
    try:
        r = read_receipt(receipt)
        name = r.entry
    except FileNotFoundError:
        raise DittoheadError(f"no failed delivery {delivery} in {study.failed}") from None
    except (OSError, ReceiptError) as e:
        raise DittoheadError(f"{receipt}: cannot read the receipt ({e}); nothing was "
                             "changed") from None
    if not os.path.lexists(study.failed / delivery):
        raise DittoheadError(f"{study.failed / delivery} is gone; nothing to retry")
    # Back where it was dropped: an uploader's own inbox when it still is there, and is
    # the uploader's (another user may have hard-linked their file into their own).
    own = study.root / r.inbox
    inbox = own if os.path.isdir(own) and r.uploader_uid >= 0 and \
        own == outcomes_dir(study, r.uploader_uid).parent / "inbox" else study.inbox
    # Checked before anything is given back, and again by the rename itself.
    waiting = DittoheadError(f"{printable(str(inbox / name))} exists: another upload of "
                             "that name is waiting; retry after it is delivered")
    if os.path.lexists(inbox / name):
        raise waiting
    if r.uploader_uid >= 0:
        try:
            give_back(study.failed / delivery, r.uploader_uid,
                      pwd.getpwnam(cfg.service_user).pw_uid)
        except PermissionError:
            raise NotPermitted("retry gives the upload back to its uploader, which needs "
                               "root: run it with sudo; nothing was changed") from None
    try:
        rename_noreplace(study.failed / delivery, inbox / name)
    except FileExistsError:
        raise waiting from None
    os.rename(receipt, study.failed / f"{delivery}.retried.json")
    return f"{delivery} is back in {inbox} as {printable(name)}"
