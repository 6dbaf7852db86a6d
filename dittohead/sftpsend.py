"""Uploading over SFTP for `dittohead upload --host`: the way for SFTP-only accounts.

sftp's batch mode does the transfer, one `put -p` per file into `.<name>` in
the inbox, so its progress can be followed from the commands it echoes. A
rerun resumes: the client keeps, per upload, each file's fingerprint (size,
mtime, ctime, inode) and which files the server has whole. A file unchanged
since is skipped; the one cut off is appended to (`reput`) only when it too is
unchanged (else its old bytes could not be trusted to be its start) and the
server's copy is shorter; every other file is sent whole. Files sent by an
earlier attempt and gone from the local tree since are removed. The final
rename is sftp's legacy SSH2_FXP_RENAME (`rename -l`), which never replaces:
plain `rename` uses posix-rename@openssh.com, which does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DittoheadError, UsageError
from .log import printable
from .sshrun import DiskFull, RemoteError, Ssh, Waiting

# An sftp batch line cannot hold a newline; a backslash before a glob
# character means something else to sftp's own parser and glob.
_UNSAYABLE = re.compile(rb"[\x00-\x1f\x7f\\]")
STATE_SAVE_EVERY = 2.0  # seconds
BIG_FILE = 1 << 20  # bytes: the state is saved as such a file starts


def quote(path: bytes) -> bytes:
    """A path as one word of an sftp batch line (quoted: glob characters are literal)."""
    if _UNSAYABLE.search(path):
        raise UsageError(f"{printable(os.fsdecode(path))}: sftp cannot send a name holding "
                         "a control character or a backslash; rename it, or upload from "
                         "an account with a shell (rsync)")
    return b'"' + path.replace(b'"', b'\\"') + b'"'


@dataclass(frozen=True)
class LocalFile:
    rel: bytes  # path below the entry; b"" when the entry is this one file
    size: int
    stamp: tuple[int, int, int, int, int]  # size, mtime_ns, ctime_ns, ino, dev


@dataclass(frozen=True)
class Tree:
    """An entry on the client: directories parents first, then files, both sorted."""

    root: bytes
    is_dir: bool
    dirs: tuple[bytes, ...]
    files: tuple[LocalFile, ...]

    def total(self) -> int:
        return sum(f.size for f in self.files)


def _local_file(path: bytes, rel: bytes) -> LocalFile:
    st = os.lstat(path)
    return LocalFile(rel, st.st_size, (st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                       st.st_ino, st.st_dev))


def walk(path: Path) -> Tree:
    """The entry's files and directories (already checked: no symlinks or specials)."""
    root = os.fsencode(os.path.abspath(path))
    if not stat.S_ISDIR(os.lstat(root).st_mode):
        return Tree(root, False, (), (_local_file(root, b""),))
    dirs: list[bytes] = []
    files: list[LocalFile] = []
    for top, dnames, fnames in os.walk(root):
        dnames.sort()
        rel = os.path.relpath(top, root) if top != root else b""
        dirs += [os.path.join(rel, d) for d in dnames]
        files += [_local_file(os.path.join(top, f), os.path.join(rel, f))
                  for f in sorted(fnames)]
    dirs.sort(key=lambda d: (d.count(b"/"), d))
    return Tree(root, True, tuple(dirs), tuple(files))


class State:
    """What earlier attempts of this upload sent, kept on the client between runs."""

    def __init__(self, key: str) -> None:
        base = os.environ.get("XDG_STATE_HOME") or os.path.join(
            os.path.expanduser("~"), ".local", "state")
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        self.path = Path(base) / "dittohead" / "uploads" / f"{digest}.json"
        self.files: dict[str, list[int]] = {}
        self.dirs: list[str] = []
        self.done: set[str] = set()
        self.current: str | None = None
        self.found = False
        try:
            data: dict[str, Any] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        self.found = True
        self.files = data.get("files", {})
        self.dirs = data.get("dirs", [])
        self.done = set(data.get("done", []))
        self.current = data.get("current")

    def reset(self) -> None:
        self.files, self.dirs, self.done, self.current = {}, [], set(), None
        self.found = False

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = {"files": self.files, "dirs": self.dirs, "done": sorted(self.done),
                "current": self.current}
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)

    def forget(self) -> None:
        self.path.unlink(missing_ok=True)


def run_batch(ssh: Ssh, lines: list[bytes]) -> tuple[int, list[list[bytes]]]:
    """Run an sftp batch; return its exit code and, per command echoed, what followed it."""
    r = ssh.sftp(b"".join(line + b"\n" for line in lines))
    return r.returncode, _split(r.stdout)


def _split(out: bytes) -> list[list[bytes]]:
    parts: list[list[bytes]] = []
    for line in out.splitlines():
        if line.startswith(b"sftp> "):
            parts.append([])
        elif parts:
            parts[-1].append(line)
    return parts


def _not_found(line: bytes) -> bool:
    return line.startswith(b"Can't ls: ") and line.endswith(b" not found")


def remote_size(lines: list[bytes]) -> int | None:
    """The size in one `ls -ln FILE` answer; None when the file is not there."""
    if not lines or _not_found(lines[0]):
        return None
    fields = lines[0].split()
    try:
        return int(fields[4])
    except (IndexError, ValueError):
        return None


def exists(lines: list[bytes]) -> bool:
    """Whether an `ls -ln PATH` answer says PATH is there (listed, or even unreadable)."""
    return not any(_not_found(line) for line in lines)


def remote_path(dot: bytes, rel: bytes) -> bytes:
    return dot + b"/" + rel if rel else dot


class Progress:
    """Bytes and files sent so far, on stderr when it is a terminal."""

    def __init__(self, tree: Tree) -> None:
        self.on = sys.stderr.isatty()
        self.total, self.count = tree.total(), len(tree.files)
        self.bytes = self.files = 0
        self.shown = 0.0

    def add(self, f: LocalFile) -> None:
        self.bytes += f.size
        self.files += 1
        now = time.monotonic()
        if self.on and (now - self.shown > 0.5 or self.files == self.count):
            self.shown = now
            pct = 100 * self.bytes // self.total if self.total else 100
            sys.stderr.write(f"\r  {self.bytes / 2**20:,.1f} of {self.total / 2**20:,.1f} MiB "
                             f"({pct}%), {self.files} of {self.count} files ")
            sys.stderr.flush()

    def end(self) -> None:
        if self.on and self.shown:
            sys.stderr.write("\n")


class Upload:
    """One entry going to INBOX/.NAME over sftp, then renamed to INBOX/NAME."""

    def __init__(self, ssh: Ssh, inbox: bytes, name: bytes, tree: Tree, key: str) -> None:
        self.ssh, self.tree, self.name = ssh, tree, name
        self.dot = inbox + b"/." + name
        self.final = inbox + b"/" + name
        self.inbox = inbox
        self.state = State(key)
        quote(name)  # refuse an unsayable name before connecting further

    def _resumable(self) -> LocalFile | None:
        """The file an earlier attempt was sending when it stopped, if unchanged since."""
        for f in self.tree.files:
            k = f.rel.hex()
            if k == self.state.current and self.state.files.get(k) == list(f.stamp):
                return f
        return None

    def probe(self) -> int | None:
        """Refuse a NAME already waiting; forget a state the server no longer matches."""
        cur = self._resumable()
        probe = [b"-ls -ln " + quote(self.final), b"-ls -ln " + quote(self.dot)]
        if cur is not None:
            probe.append(b"-ls -ln " + quote(remote_path(self.dot, cur.rel)))
        rc, parts = run_batch(self.ssh, probe)
        if rc != 0 or len(parts) != len(probe):
            raise RemoteError(f"sftp could not look into the inbox on {self.ssh.dest}")
        if exists(parts[0]):
            raise Waiting(f"{printable(os.fsdecode(self.name))} already waits in the inbox on "
                          f"{self.ssh.dest}; try again when it has been delivered")
        if not exists(parts[1]):
            self.state.reset()  # nothing of it is on the server: start afresh
            return None
        if not self.state.found and self.tree.is_dir:
            raise DittoheadError(
                f".{printable(os.fsdecode(self.name))} in the inbox on {self.ssh.dest} is an "
                "unfinished upload that was not started from here; upload under another name, "
                "or delete it with an sftp client and rerun")
        return remote_size(parts[2]) if cur is not None else None

    def commands(self, cur_size: int | None) -> tuple[list[bytes], list[LocalFile | None]]:
        """The batch, and for each of its lines the file it sends (None: not a file)."""
        lines: list[bytes] = []
        owners: list[LocalFile | None] = []
        st, tree, dot = self.state, self.tree, self.dot
        files = {f.rel.hex(): list(f.stamp) for f in tree.files}
        dirs = [d.hex() for d in tree.dirs]
        if tree.is_dir:
            # Private at once: it may wait a while, and others could guess its name.
            lines += [b"-mkdir " + quote(dot), b"chmod 700 " + quote(dot)]
            lines += [b"-rm " + quote(remote_path(dot, bytes.fromhex(k)))
                      for k in sorted(set(st.files) - set(files))]
            gone = sorted(set(st.dirs) - set(dirs), key=lambda k: -len(bytes.fromhex(k)))
            lines += [b"-rmdir " + quote(remote_path(dot, bytes.fromhex(k))) for k in gone]
            lines += [b"-mkdir " + quote(remote_path(dot, d)) for d in tree.dirs]
        owners += [None] * len(lines)
        cur = self._resumable()
        done = set()
        for f in tree.files:
            k = f.rel.hex()
            same = st.files.get(k) == list(f.stamp)
            if same and k in st.done:
                done.add(k)
                continue
            resume = same and f is cur and cur_size is not None and cur_size < f.size
            local = quote(remote_path(tree.root, f.rel))
            lines.append((b"reput -p " if resume else b"put -p ") + local + b" "
                         + quote(remote_path(dot, f.rel)))
            owners.append(f)
        st.files, st.dirs, st.done, st.current = files, dirs, done, None
        return lines, owners

    def transfer(self, cur_size: int | None) -> None:
        """Send what the server lacks, following sftp's echo to know what it has whole."""
        lines, owners = self.commands(cur_size)
        progress = Progress(self.tree)
        for f in self.tree.files:
            if f.rel.hex() in self.state.done:
                progress.add(f)
        self.state.save()
        with tempfile.NamedTemporaryFile(prefix="dh-sftp-", suffix=".batch") as batch:
            batch.write(b"".join(line + b"\n" for line in lines))
            batch.flush()
            argv = ["sftp", *self.ssh.options(), "-b", batch.name, self.ssh.dest]
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
            said = self._follow(p, owners, progress)
        progress.end()
        if p.returncode != 0:
            self._failed(said)

    def _follow(self, p: subprocess.Popen[bytes], owners: list[LocalFile | None],
                progress: Progress) -> list[bytes]:
        st, saved, said = self.state, time.monotonic(), []
        sending: LocalFile | None = None
        queue = iter(owners)
        assert p.stdout is not None
        try:
            for line in p.stdout:
                if not line.startswith(b"sftp> "):
                    said.append(line.rstrip(b"\n"))
                    continue
                if sending is not None:  # the next command started: it is whole
                    st.done.add(sending.rel.hex())
                    progress.add(sending)
                sending = next(queue, None)
                st.current = sending.rel.hex() if sending else None
                if time.monotonic() - saved > STATE_SAVE_EVERY or self._big(sending):
                    st.save()
                    saved = time.monotonic()
            if p.wait() == 0 and sending is not None:
                st.done.add(sending.rel.hex())
                progress.add(sending)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            st.save()
        return said

    def _big(self, f: LocalFile | None) -> bool:
        """Whether f is worth saving the state for before it is sent: a kill (no chance to
        save at exit) could then resume it. A save writes about 100 bytes per file."""
        return f is not None and f.size >= max(BIG_FILE, 1000 * len(self.state.files))

    def _failed(self, said: list[bytes]) -> None:
        text = printable(b"\n".join(said[-3:]).decode(errors="replace")).replace("\\n", "\n  ")
        if self._disk_full():
            raise DiskFull(f"the server's disk is full (the inbox on {self.ssh.dest}); "
                           "rerun the same command later: it continues where it stopped\n"
                           f"  sftp said: {text}")
        raise RemoteError(f"the upload to {self.ssh.dest} stopped; rerun the same command to "
                          f"continue it\n  sftp said: {text}")

    def _disk_full(self) -> bool:
        """Whether the inbox's filesystem has (almost) no room, from sftp's `df`."""
        rc, parts = run_batch(self.ssh, [b"df " + quote(self.inbox)])
        if rc != 0 or not parts or len(parts[0]) < 2:
            return False
        try:
            avail_kib = int(parts[0][1].split()[2])
        except (IndexError, ValueError):
            return False
        return avail_kib < 1024

    def rename(self) -> None:
        """`.NAME` to `NAME` with the legacy rename, which fails rather than replace."""
        rc, parts = run_batch(self.ssh, [b"rename -l " + quote(self.dot) + b" "
                                         + quote(self.final)])
        if rc == 0:
            self.state.forget()
            return
        rc2, probe = run_batch(self.ssh, [b"-ls -ln " + quote(self.final)])
        if rc2 == 0 and probe and exists(probe[0]):
            raise Waiting(f"{printable(os.fsdecode(self.name))} appeared in the inbox on "
                          f"{self.ssh.dest} meanwhile and was left as it is; your upload stays "
                          f"there as .{printable(os.fsdecode(self.name))}: rerun the same "
                          "command once the other has been delivered")
        said = b" ".join(parts[0] if parts else []).decode(errors="replace")
        raise RemoteError(f"could not rename .{printable(os.fsdecode(self.name))} in the "
                          f"inbox on {self.ssh.dest}: {printable(said)}")
