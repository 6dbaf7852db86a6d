"""Which inbox entries are ready: not a dot name, and quiet for the study's quiet_period.

An entry is quiet once no inode in it (the entry itself included) has had
its ctime changed for `quiet_period` seconds. ctime, because no client can
set it: `rsync -a` and `cp -p` set mtimes to the source's. Clients that
cannot rename into place (rsync or scp straight into the inbox, a folder
dropped onto an SMB share) are thereby taken only once they have stopped
writing. A regular file named like a client's temporary file (TEMP_RE) means
an upload is still going: the entry is held back, and once it has been quiet
for STALE_FACTOR quiet periods it is ready all the same, so that examine
fails it naming the file. docs/design.md, "Readiness".

The walk reads the uploader's directories before any takeover: it opens
each directory O_NOFOLLOW relative to its parent's fd, lstats names, never
opens a file, stops at the first recent change, and is bounded in depth.
It has no bound on names: an entry it stopped looking into could be taken
while still being written. Its cost, a walk of the entry at most once per
quiet period while it waits, is the uploader's own entry's size. What it
cannot see (too deep, unreadable) does not hold the entry: examine judges
the whole entry once it is claimed (and fails what is too deep).
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import StudyConfig
from .errors import TemporaryError
from .fsops import DIR_FLAGS

# Temporary names of common clients: rsync's `.name.XXXXXX` (mkstemp), WinSCP's
# and FileZilla's `name.filepart`, Microsoft Office's owner file `~$name`,
# LibreOffice's lock `.~lock.name#`. Matched against regular files only.
TEMP_RE = re.compile(r"\..+\.[A-Za-z0-9]{6}|.+\.filepart|~\$.*|\.~lock\..+#", re.S)
TEMP_KIND = ("temporary files of an upload that did not finish (rsync's .name.XXXXXX, "
             "*.filepart, ~$*, .~lock.*#; finish the upload, or remove them and upload again)")
# An entry holding a temporary name is given up on once it has been quiet this
# many quiet periods (20 minutes at the default 120 s).
STALE_FACTOR = 10
MAX_DEPTH = 256  # directory levels below the entry that the walk descends
NS = 1_000_000_000


def drop_folders(study: StudyConfig) -> list[str]:
    """The uploaders' own inboxes (`users/<user>/inbox`, outcomes.py) there are, as paths
    relative to the study's root."""
    try:
        names = sorted(os.listdir(study.users))
    except OSError:
        return []
    return [f"users/{n}/inbox" for n in names
            if not n.startswith(".") and os.path.isdir(study.users / n / "inbox")]


def is_inbox(folder: str) -> bool:
    """Whether a recorded place (relative to the study's root) is one entries come from."""
    parts = folder.split("/")
    return folder == "inbox" or (len(parts) == 3 and parts[0] == "users"
                                 and parts[2] == "inbox" and parts[1] not in ("", ".", ".."))


def entry_key(folder: str, name: str) -> str:
    """How an entry is known to a run: its name in the shared inbox; elsewhere its path
    relative to the study's root (a name never holds a '/')."""
    return f"{folder}/{name}" if folder else name


def split_key(key: str) -> tuple[str, str]:
    """The inbox (relative to the study's root) and the name of an entry key."""
    folder, _, name = key.rpartition("/")
    return folder or "inbox", name


def is_temp(name: str) -> bool:
    """Whether a regular file of this name is a client's partial upload."""
    return TEMP_RE.fullmatch(name) is not None


@dataclass(frozen=True)
class Scan:
    """One look at the inbox."""

    ready: list[str]  # oldest (by mtime) first
    waiting: list[str]  # not dot names, not ready yet
    next_due: float | None  # seconds until the earliest waiting entry may be ready


class Watch:
    """Looks at a study's inbox again and again, walking a waiting entry only when due.

    Whatever changes in an entry can only postpone its readiness, so the time
    it may first be ready, once computed, is a safe time to look again.
    """

    def __init__(self, study: StudyConfig) -> None:
        self.study = study
        self.quiet_ns = round(study.quiet_period * NS)
        self.ignored = ignore_matcher(study.ignore)
        self.due: dict[str, int] = {}  # name -> not worth walking before (filesystem ns)
        self.offset = 0  # the filesystem's clock minus ours, ns
        self.new_waiting: list[str] = []  # entries the last scan found waiting for the first time
        self.holding: set[str] = set()  # waiting only for their temporary names

    def scan(self) -> Scan:
        """Ready and waiting entries, and when to look again."""
        listed = _listing(self.study)
        self.due = {n: d for n, d in self.due.items() if n in listed}
        ready: list[tuple[int, str]] = []
        waiting: list[str] = []
        self.new_waiting = []
        clocked = False
        now = time.time_ns() + self.offset
        for name, mtime in listed.items():
            if self.quiet_ns and self.due.get(name, 0) > now:
                waiting.append(name)
                continue
            if self.quiet_ns and not clocked:
                self.offset, clocked = fs_clock(self.study) - time.time_ns(), True
                now = time.time_ns() + self.offset
            due = self.judge(name, now) if self.quiet_ns else None
            if due is None:
                ready.append((mtime, name))
            else:
                if name not in self.due:
                    self.new_waiting.append(name)
                self.due[name] = due
                waiting.append(name)
        next_due = min((self.due[n] for n in waiting), default=None)
        return Scan(ready=[n for _, n in sorted(ready)], waiting=waiting,
                    next_due=None if next_due is None else max(0, next_due - now) / NS)

    def still_ready(self, name: str) -> bool:
        """Judge a ready entry again, right before it is claimed.

        A scan's verdict ages while the run delivers the entries before this
        one (minutes, for a big one): a client may have started writing into
        it meanwhile. Not ready any more, it is waiting again.
        """
        if not self.quiet_ns:
            return True
        now = time.time_ns() + self.offset
        due = self.judge(name, now)
        if due is None:
            return True
        self.due[name] = due
        return False

    def held(self, name: str) -> bool:
        """Whether a waiting entry is quiet but holds temporary names."""
        return name in self.holding

    def judge(self, name: str, now: int) -> int | None:
        """None when the entry is ready; else when to look at it again (filesystem ns)."""
        self.holding.discard(name)
        folder, entry = split_key(name)
        newest, temp = walk(self.study.root / folder, entry, now - self.quiet_ns, now,
                            self.ignored)
        if newest > now - self.quiet_ns:
            return newest + self.quiet_ns
        if not temp:
            return None
        self.holding.add(name)
        stale = newest + STALE_FACTOR * self.quiet_ns
        return None if stale <= now else min(stale, now + self.quiet_ns)


def _listing(study: StudyConfig) -> dict[str, int]:
    """Entries in the inbox and the drop folders, by key, with their mtimes."""
    try:
        found = _names(study.inbox, "")
    except FileNotFoundError:
        raise TemporaryError(f"{study.inbox} does not exist: run `dittohead setup "
                             f"{study.name}` (or is it not mounted?)") from None
    for folder in drop_folders(study):
        try:
            found.update(_names(study.root / folder, folder))
        except OSError:
            continue  # removed meanwhile, or not ours to read: `check` says so
    return found


def _names(inbox: Path, folder: str) -> dict[str, int]:
    """Names in one inbox not starting with '.', as keys, with their mtimes."""
    found = {}
    with os.scandir(inbox) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            try:
                found[entry_key(folder, e.name)] = e.stat(follow_symlinks=False).st_mtime_ns
            except FileNotFoundError:
                continue
    return found


def fs_clock(study: StudyConfig) -> int:
    """The current time by the clock that stamps the inbox's ctimes (an NFS server's).

    Touching processing/ (same filesystem as the inbox) has the filesystem
    stamp it; without the right to (a run by another user), our own clock.
    """
    try:
        os.utime(study.processing)
        return os.stat(study.processing).st_ctime_ns
    except OSError:
        return time.time_ns()


def walk(inbox: os.PathLike[str] | str, name: str, since: int, now: int,
         ignored: Callable[[str], object]) -> tuple[int, bool]:
    """The newest ctime in inbox/name, and whether it holds a temporary name.

    Stops at the first ctime after `since` (the entry is not quiet: the rest
    does not matter). A name that vanishes meanwhile counts as changed `now`.
    """
    top = os.open(inbox, DIR_FLAGS)
    try:
        st = os.stat(name, dir_fd=top, follow_symlinks=False)
    except FileNotFoundError:
        os.close(top)
        return now, False
    newest = st.st_ctime_ns
    if not stat.S_ISDIR(st.st_mode) or newest > since:
        os.close(top)
        return newest, stat.S_ISREG(st.st_mode) and _temp(name, ignored)
    w = _Walk(since, now, ignored, newest)
    try:
        w.descend(top, name, False)  # (an entry's own directory name is never ignored)
        while w.stack and w.newest <= since:
            fd, subdirs = w.stack[-1]
            if not subdirs:
                os.close(w.stack.pop()[0])
            elif len(w.stack) <= MAX_DEPTH:
                w.descend(fd, *subdirs.pop())
            else:
                subdirs.clear()
    finally:
        os.close(top)
        for fd, _ in w.stack:
            os.close(fd)
    return w.newest, w.temp


def _temp(name: str, ignored: Callable[[str], object]) -> bool:
    return is_temp(name) and ignored(name) is None


class _Walk:
    """The state of one iterative walk: open directories, each with its subdirectories left."""

    def __init__(self, since: int, now: int, ignored: Callable[[str], object],
                 newest: int) -> None:
        self.since, self.now, self.ignored = since, now, ignored
        self.newest = newest
        self.temp = False
        self.stack: list[tuple[int, list[tuple[str, bool]]]] = []

    def descend(self, parent: int, name: str, skip: bool) -> None:
        """List one directory: note its names' ctimes and temporary names, push it."""
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            self.newest = max(self.newest, self.now)
            return
        except OSError:
            return  # unreadable, or out of fds: examine will judge it
        subdirs: list[tuple[str, bool]] = []
        self.stack.append((fd, subdirs))
        try:
            with os.scandir(fd) as it:
                for e in it:
                    st = e.stat(follow_symlinks=False)
                    self.newest = max(self.newest, st.st_ctime_ns)
                    if stat.S_ISDIR(st.st_mode):
                        subdirs.append((e.name, skip or self.ignored(e.name) is not None))
                    elif stat.S_ISREG(st.st_mode) and not skip and _temp(e.name, self.ignored):
                        self.temp = True
                    if self.newest > self.since:
                        return
        except FileNotFoundError:
            self.newest = max(self.newest, self.now)


@functools.cache
def ignore_matcher(patterns: tuple[str, ...]) -> Callable[[str], object]:
    """A study's ignore patterns as one compiled regex (fnmatchcase's own translation).

    Runs once per name, in the readiness walk and in examine's; cached per
    pattern tuple.
    """
    if not patterns:
        return lambda name: None
    return re.compile("|".join(fnmatch.translate(p) for p in patterns)).match
