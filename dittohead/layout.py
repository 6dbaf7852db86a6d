"""The per-study tree in the dropbox, its owners and modes (`dittohead setup`).

  <dropbox_root>/<study>            0755 root:root
  <dropbox_root>/<study>/inbox      1733 <service>:<service>
  <dropbox_root>/<study>/processing 0750 <service>:<service>
  <dropbox_root>/<study>/done       0750 <service>:<service>
  <dropbox_root>/<study>/failed     0750 <service>:<service>
  <dropbox_root>/<study>/users      0751 <service>:<service>  (outcomes.py)

The inbox is write-and-search for everyone but listable only by the service:
users create and rename their own entries (the sticky bit stops them renaming
or deleting other users' ones) but cannot see what colleagues or other
studies' users have dropped. Members of the service group (admins) can read
receipts in done/ and failed/. The destination itself is the study's storage:
setup creates it when missing but never changes an existing one; `check`
reports what the service cannot write.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .config import Config, StudyConfig
from .errors import ConfigError
from .fsops import write_atomic
from .outcomes import (
    INBOX_MODE,
    USERS_MODE,
    acl_problem,
    folder_problems,
    open_outcomes,
    outcomes_dir,
)


@dataclass(frozen=True)
class Want:
    path: Path
    mode: int
    uid: int
    gid: int


def wanted(config: Config, study: StudyConfig) -> list[Want]:
    """Every directory of the study's tree with the owner and mode it must have."""
    try:
        pw = pwd.getpwnam(config.service_user)
    except KeyError:
        raise ConfigError(f"service_user: no such user {config.service_user!r} (run "
                          "systemd-sysusers, or create it)", str(config.path)) from None
    svc = (pw.pw_uid, pw.pw_gid)
    return [
        Want(config.dropbox_root, 0o755, 0, 0),
        Want(study.root, 0o755, 0, 0),
        Want(study.inbox, 0o1733, *svc),
        Want(study.processing, 0o750, *svc),
        Want(study.done, 0o750, *svc),
        Want(study.failed, 0o750, *svc),
        Want(study.users, USERS_MODE, *svc),
    ]


def problems(config: Config, study: StudyConfig) -> list[str]:
    """What differs from the wanted layout (empty when all is right)."""
    out = []
    for w in wanted(config, study):
        try:
            st = os.lstat(w.path)
        except FileNotFoundError:
            out.append(f"{w.path}: missing (run `dittohead setup {study.name}`)")
            continue
        if not stat.S_ISDIR(st.st_mode):
            out.append(f"{w.path}: not a directory")
            continue
        mode = stat.S_IMODE(st.st_mode)
        if mode != w.mode or (st.st_uid, st.st_gid) != (w.uid, w.gid):
            out.append(f"{w.path}: is {mode:04o} {_owner(st.st_uid, st.st_gid)}, should be "
                       f"{w.mode:04o} {_owner(w.uid, w.gid)}")
    if os.path.isdir(study.users):
        out += filter(None, [acl_problem(study)])
        out += folder_problems(study)
    return out


def setup(config: Config, study: StudyConfig) -> list[str]:
    """Create or repair the study's tree; return what was changed. Idempotent."""
    if study.group is not None:  # before anything is changed, not halfway
        try:
            grp.getgrnam(study.group)
        except KeyError:
            raise ConfigError(f"studies.{study.name}.group: no such group {study.group!r}: "
                              f"create it first (groupadd {study.group}), then run setup "
                              "again; nothing was changed", str(config.path)) from None
    changed = []
    for w in wanted(config, study):
        if not os.path.lexists(w.path):
            os.mkdir(w.path, 0o700)
            changed.append(f"created {w.path}")
        st = os.lstat(w.path)
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{w.path} exists and is not a directory; move it away first")
        if (st.st_uid, st.st_gid) != (w.uid, w.gid):
            os.chown(w.path, w.uid, w.gid, follow_symlinks=False)
            changed.append(f"owner of {w.path} -> {_owner(w.uid, w.gid)}")
        if stat.S_IMODE(st.st_mode) != w.mode:
            os.chmod(w.path, w.mode)
            changed.append(f"mode of {w.path} -> {w.mode:04o}")
    changed += _marker(config)
    pw = pwd.getpwnam(config.service_user)
    gid = grp.getgrnam(study.group).gr_gid if study.group else pw.pw_gid
    if not os.path.lexists(study.destination):
        os.makedirs(study.destination.parent, exist_ok=True)
        os.mkdir(study.destination, 0o700)
        os.chown(study.destination, pw.pw_uid, gid)
        os.chmod(study.destination, study.dir_mode)
        changed.append(f"created {study.destination} {study.dir_mode:04o} "
                       f"{_owner(pw.pw_uid, gid)}")
    elif os.lstat(study.destination).st_uid != pw.pw_uid:
        # The service has no CAP_DAC_OVERRIDE: it writes where it owns. Only
        # the top is taken; what is below keeps its owners (`check` lists the
        # directories the service cannot write).
        st = os.lstat(study.destination)
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{study.destination} exists and is not a directory")
        os.chown(study.destination, pw.pw_uid, gid if study.group else st.st_gid,
                 follow_symlinks=False)
        changed.append(f"owner of {study.destination} -> "
                       f"{_owner(pw.pw_uid, gid if study.group else st.st_gid)}")
    # Last: a folder it must refuse (another uid's) stops nothing else.
    return changed + user_folders(config, study, _members(study.uploaders or ()))


# What an SFTP-only client reads in its start directory (the dropbox root):
# where a study's inbox and an uploader's outcomes are, relative to it.
MARKER = "dittohead.json"
MARKER_DATA = (json.dumps({"format": 1, "inbox": "{study}/inbox",
                           "outcomes": "{study}/users/{user}/outcomes"}, indent=2) + "\n").encode()


def _marker(config: Config) -> list[str]:
    path = config.dropbox_root / MARKER
    try:
        if path.read_bytes() == MARKER_DATA:
            return []
    except FileNotFoundError:
        pass
    write_atomic(path, MARKER_DATA, mode=0o644)
    return [f"wrote {path}"]


def user_folders(config: Config, study: StudyConfig, uids: set[int]) -> list[str]:
    """Make the uploaders' own folders (inbox and outcomes) that are missing.

    A new one is watched by the path unit only from the next daemon-reload
    (generator.py), which this does when systemd runs; the timer sweeps it
    meanwhile.
    """
    if not os.path.isdir(study.users):
        raise ConfigError(f"{study.users} is missing: run `dittohead setup {study.name}` first")
    pw = pwd.getpwnam(config.service_user)
    made, problems = [], []
    for uid in sorted(uids):
        folder = outcomes_dir(study, uid).parent
        inbox = _mode(folder / "inbox")
        missing = inbox is None or not (folder / "outcomes").is_dir()
        try:  # (repairs modes, refuses a folder another uid may read)
            os.close(open_outcomes(study, uid, (pw.pw_uid, pw.pw_gid)))
        except PermissionError as e:
            problems.append(f"{e.strerror}" + (f": {e.filename}" if e.filename else ""))
            continue
        if missing:
            made.append(f"created {folder} (inbox/ and outcomes/)")
        elif inbox != INBOX_MODE:
            made.append(f"mode of {folder / 'inbox'} -> {INBOX_MODE:04o}")
    if any(m.startswith("created") for m in made) and os.path.isdir("/run/systemd/system"):
        subprocess.run(["systemctl", "daemon-reload"], check=False)
        made.append("reloaded systemd: the path unit watches the new inboxes")
    if problems:
        raise ConfigError(problems)
    return made


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(os.lstat(path).st_mode)
    except FileNotFoundError:
        return None


def _members(groups: tuple[str, ...]) -> set[int]:
    """The uids of the groups' members, primary or supplementary."""
    gids, names = set(), set()
    for name in groups:
        try:
            g = grp.getgrnam(name)
        except KeyError:
            continue  # `check` names a missing group
        gids.add(g.gr_gid)
        names.update(g.gr_mem)
    if not gids:
        return set()
    # One pass over the user database (a directory service may be slow), not one a group.
    return {p.pw_uid for p in pwd.getpwall() if p.pw_gid in gids or p.pw_name in names}


def _owner(uid: int, gid: int) -> str:
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return f"{user}:{group}"
