"""`dittohead upload --host`: uploading from a machine that has only ssh to the server.

Learns the study's inbox from the server (`dittohead where --json` over ssh,
or `dittohead.json` in the SFTP start directory of an SFTP-only account),
sends each PATH as `.<name>` (rsync when the account has a shell and both
ends have rsync 3, else sftp: sftpsend.py), resumable by rerunning the same
command, then renames it to `<name>` without ever replacing anything. Standard
library and the system's OpenSSH and rsync only: no server packages needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .entrycheck import entry_name, refuse_special
from .errors import DittoheadError, UsageError
from .log import printable
from .remotesession import Session
from .rsyncver import RsyncProbe, is_rsync3
from .sshrun import Connection, DiskFull, RemoteError, Ssh, Waiting, ssh_failure

EXIT_CONFIG = 78
# What `dittohead.json` in an SFTP account's start directory may hold (docs/contract.md).
LAYOUT_FORMAT = 1


class UnknownStudy(DittoheadError):
    """The server has no such study (what `dittohead where` says with exit 78)."""

    exit_code = EXIT_CONFIG


@dataclass(frozen=True)
class Server:
    """What the server told about the study, in its own path names."""

    shell: bool  # dittohead runs there for this account: where, ready, status over ssh
    inbox: str  # absolute with a shell; relative to the SFTP start directory without
    outcomes: str
    rsync: bool  # rsync 3 here and rsync there: send with it
    waiting: tuple[str, ...]  # of the names to upload, those already in the inbox there


def discover(ssh: Ssh, study: str, names: list[str], session: Session,
             rsync_here: RsyncProbe) -> Server:
    """What the server's `where` told (the session's first answer; an older dittohead's
    `where` without --then-ready or NAME...), or what an SFTP-only account's
    dittohead.json says."""
    r = session.first(timeout=600)  # the login: a password may be typed meanwhile
    said = printable(r.stderr.decode(errors="replace").strip())
    for older in (["dittohead", "where", "--json", study, *names],
                  ["dittohead", "where", "--json", study]):
        if not (r.returncode == 2 and "unrecognized arguments" in said):
            break
        r = ssh.run(older, timeout=60)
        said = printable(r.stderr.decode(errors="replace").strip())
    if r.returncode == EXIT_CONFIG:
        raise UnknownStudy(f"{ssh.dest}: {said}" if said else
                           f"{ssh.dest} has no study {study!r}")
    if r.returncode == 0:
        try:
            info = json.loads(r.stdout)
            inbox, outcomes = str(info["inbox"]), str(info["outcomes"])
        except (ValueError, KeyError, TypeError):
            pass  # something else answered (a ForceCommand): try SFTP
        else:
            if "rsync" not in info:  # a server before NAME...: ask the old way
                v = ssh.run(["rsync", "--version"])
                info["rsync"] = v.stdout.decode(errors="replace") if v.returncode == 0 else None
                info["waiting"] = [n for n in names if _waits(ssh, study, n)]
            rsync = is_rsync3(rsync_here.version()) and is_rsync3(info.get("rsync"))
            return Server(True, inbox, outcomes, rsync, tuple(info.get("waiting") or ()))
    # No JSON: an SFTP-only account (sshd's ForceCommand internal-sftp refuses
    # the command: "This service allows sftp connections only.", or takes our
    # first line for an SFTP packet too long and ends), or no dittohead there.
    return _discover_sftp(ssh, study, no_command=r.returncode == 127, said=said)


def _waits(ssh: Ssh, study: str, name: str) -> bool:
    try:
        _ready(ssh, study, name, check=True)
    except Waiting:
        return True
    return False


def _discover_sftp(ssh: Ssh, study: str, no_command: bool, said: str) -> Server:
    from .sftpsend import quote, run_batch
    with tempfile.TemporaryDirectory(prefix="dh-layout-") as tmp:
        local = os.path.join(tmp, "dittohead.json")
        rc, _ = run_batch(ssh, [b"get dittohead.json " + quote(os.fsencode(local))])
        try:
            layout: dict[str, Any] = json.loads(Path(local).read_text()) if rc == 0 else {}
        except (OSError, ValueError):
            layout = {}
    if layout.get("format") != LAYOUT_FORMAT or not isinstance(layout.get("inbox"), str):
        why = ("`dittohead` is not on the account's PATH there" if no_command else
               f"`dittohead where` answered: {said}" if said else
               "`dittohead where` gave no answer")
        raise RemoteError(f"{ssh.dest} does not run dittohead for this account ({why}), and "
                          "its SFTP start directory has no dittohead.json: ask the admin "
                          "which host and account to upload to")
    user = ssh.user()
    inbox = layout["inbox"].replace("{study}", study)
    outcomes = str(layout.get("outcomes", "")).replace("{study}", study).replace("{user}", user)
    rc, _ = run_batch(ssh, [b"cd " + quote(inbox.encode())])
    if rc != 0:
        raise UnknownStudy(f"{ssh.dest} has no study {study!r} (no {inbox} in its SFTP view)")
    return Server(False, inbox, outcomes, False, ())


def check_paths(paths: list[Path]) -> list[str]:
    """Refuse before connecting what the local upload refuses; return the entry names."""
    names = []
    for p in paths:
        if not os.path.lexists(p):
            raise UsageError(f"{printable(str(p))}: no such file or directory")
        names.append(entry_name(p))
        refuse_special(p)
    return names


def _rsync(ssh: Ssh, server: Server, path: Path, name: str) -> None:
    src = os.path.abspath(path)
    slash = "/" if os.path.isdir(src) else ""
    argv = ["rsync", "-a", "--partial", "--delete", "--protect-args",
            # Private at once (rwx------ directories): it may wait a while in the
            # inbox. Files keep their modes, readable by their owner at least.
            "--chmod=D700,Fu+r", "-e", ssh.rsh()]
    tty = sys.stderr.isatty()
    if tty:
        argv.append("--info=progress2")
    argv += ["--", src + slash, f"{ssh.dest}:{server.inbox}/.{name}{slash}"]
    r = subprocess.run(argv, stdout=None if tty else subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
    if r.returncode == 0:
        return
    err = r.stderr.decode(errors="replace")
    text = printable("\n".join(err.strip().splitlines()[-3:])).replace("\\n", "\n  ")
    if "No space left on device" in err or "Disk quota exceeded" in err:
        raise DiskFull(f"the server's disk is full (the inbox on {ssh.dest}); rerun the same "
                       f"command later: it continues where it stopped\n  rsync said: {text}")
    raise RemoteError(f"the upload to {ssh.dest} stopped (rsync exit {r.returncode}); rerun "
                      f"the same command to continue it\n  rsync said: {text}")


def _ready(ssh: Ssh, study: str, name: str, check: bool) -> None:
    """`dittohead ready` on the server: a rename that never replaces (renameat2)."""
    r = ssh.run(["dittohead", "ready", *(["--check"] if check else []), study, name])
    _ready_said(ssh, r.returncode, r.stderr)


def _ready_said(ssh: Ssh, code: int, stderr: bytes) -> None:
    said = printable(stderr.decode(errors="replace").strip())
    if code == 1 and "already waits" in said:
        raise Waiting(f"{ssh.dest}: {said.removeprefix('dittohead: ')}")
    if code == 255:
        raise ssh_failure(ssh.dest, stderr.decode(errors="replace"))
    if code != 0:
        raise RemoteError(f"{ssh.dest}: `dittohead ready` failed: {said}")


class ReadyLater:
    """`dittohead ready --on-go` started as the transfer starts: the server's Python
    start-up happens meanwhile, and the rename follows the transfer at once."""

    def __init__(self, ssh: Ssh, study: str, name: str) -> None:
        self.ssh, self.study, self.name = ssh, study, name
        self.p = ssh.start(["dittohead", "ready", "--on-go", study, name])

    def go(self) -> None:
        """Tell it to rename; raise as `_ready` does."""
        try:
            _, err = self.p.communicate(b"go\n", timeout=120)
        except subprocess.TimeoutExpired as e:
            self.p.kill()
            raise RemoteError(f"{self.ssh.dest} did not answer `dittohead ready`") from e
        if self.p.returncode == 2 and b"unrecognized arguments" in err:  # before --on-go
            return _ready(self.ssh, self.study, self.name, check=False)
        _ready_said(self.ssh, self.p.returncode, err)

    def cancel(self) -> None:
        """The transfer failed: end it without a rename (it reads EOF, not `go`)."""
        self.p.communicate(b"", timeout=120)


def send(ssh: Ssh, server: Server, study: str, path: Path, name: str,
         session: Session) -> Callable[[], None]:
    """Upload one PATH as `.<name>` in the inbox, resuming; return the rename to `<name>`."""
    key = "\0".join([ssh.dest, ssh.config or "", study, server.inbox, os.path.abspath(path)])
    if server.rsync:
        if session.live:
            _rsync(ssh, server, path, name)
            return lambda: session.ready(name)
        later = ReadyLater(ssh, study, name)  # an older dittohead there
        try:
            _rsync(ssh, server, path, name)
        except BaseException:
            later.cancel()
            raise
        return later.go
    from .sftpsend import Upload, walk
    up = Upload(ssh, os.fsencode(server.inbox), os.fsencode(name), walk(path), key)
    up.transfer(up.probe())
    if not server.shell:
        return up.rename

    def ready() -> None:
        if session.live:
            session.ready(name)
        else:
            _ready(ssh, study, name, check=False)
        up.state.forget()
    return ready


def upload_remote(dest: str, study: str, paths: list[Path], ssh_config: str | None,
                  wait: bool, timeout: float) -> int:
    """The whole `upload --host` command; returns its exit code."""
    names = check_paths(paths)
    with Connection(dest, ssh_config) as ssh:
        session = Session(ssh, study, names)
        try:
            return _upload(ssh, session, study, paths, names, wait, timeout)
        finally:
            session.end()


def _upload(ssh: Ssh, session: Session, study: str, paths: list[Path], names: list[str],
            wait: bool, timeout: float) -> int:
    rsync_here = RsyncProbe()  # while it logs in and asks
    server = discover(ssh, study, names, session, rsync_here)
    if server.waiting:
        raise Waiting(f"{ssh.dest}: {printable(', '.join(server.waiting))} already waits "
                      "in the inbox; try again when it has been delivered (nothing sent)")
    if not wait:
        for p, n in zip(paths, names, strict=True):
            _one(ssh, server, study, p, n, session, lambda: None)
        return 0
    from concurrent.futures import ThreadPoolExecutor

    from .remotewait import Watcher, report
    watcher = Watcher(ssh, server.shell, study, server.outcomes)
    with ThreadPoolExecutor(1) as pool:
        # The outcomes there before: read while the first transfer runs, before its rename.
        before = pool.submit(watcher.snapshot)
        for p, n in zip(paths, names, strict=True):
            _one(ssh, server, study, p, n, session, before.result)
    return report(names, watcher.wait(names, timeout), timeout)


def _one(ssh: Ssh, server: Server, study: str, path: Path, name: str, session: Session,
         before_rename: Callable[[], object]) -> None:
    rename = send(ssh, server, study, path, name, session)
    before_rename()
    rename()
    print(printable(f"{path} -> {ssh.dest}:{server.inbox}/{name}"), flush=True)
