"""The system's ssh, sftp and rsync for `dittohead upload --host`, over one connection.

Running the system's tools (not an SSH library) is what makes the user's ssh
config apply: host aliases, users, ports, keys, agents, jump hosts. One
ControlMaster connection carries every later ssh, sftp and rsync of the
command, so a password or passphrase is asked for once. Standard library only:
this runs on lab workstations that have none of the server's packages.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import DittoheadError
from .log import clean

# sysexits.h EX_UNAVAILABLE: the server could not be reached, logged into or used.
EXIT_UNAVAILABLE = 69

# What ssh says on stderr, mapped to what the user should hear.
_CONNECT = ("Could not resolve hostname", "Connection refused", "No route to host",
            "Connection timed out", "Network is unreachable", "Connection closed by",
            "Connection reset", "timed out during banner exchange", "kex_exchange_identification")
_AUTH = ("Permission denied", "Too many authentication failures", "Authentication failed")


class RemoteError(DittoheadError):
    """The server could not be reached or used; nothing was renamed into the inbox."""

    exit_code = EXIT_UNAVAILABLE


class Waiting(DittoheadError):
    """NAME already waits in the inbox: the server keeps it, nothing was replaced."""


class DiskFull(DittoheadError):
    """The server's filesystem has no room; rerunning later continues the upload."""

    exit_code = 75


def ssh_failure(dest: str, stderr: str) -> RemoteError:
    """A clear error for an ssh that ended with 255, keeping ssh's own last words."""
    said = " ".join(line.strip() for line in stderr.strip().splitlines()[-2:])
    if "Host key verification failed" in stderr:
        why = (f"{dest}'s host key is unknown or changed (see ssh's message); "
               f"connect once with `ssh {dest}` to check and accept it")
    elif any(s in stderr for s in _AUTH):
        why = (f"{dest} refused the login: check the user name, your key or password "
               f"(`ssh {dest}` must log in)")
    elif any(s in stderr for s in _CONNECT):
        why = f"cannot reach {dest}: is the name right, and the server up and reachable?"
    else:
        why = f"ssh to {dest} failed"
    return RemoteError(f"{why}\n  ssh said: {clean(said)}" if said else why)


@dataclass(frozen=True)
class Ssh:
    """Where to connect and how: the destination as given, an ssh config file, the master."""

    dest: str  # [USER@]HOST, as the user typed it: the ssh config resolves it
    config: str | None  # ssh -F FILE, else the user's own config
    control: str  # the ControlMaster socket

    def options(self) -> list[str]:
        """Options every ssh, sftp and rsync -e of this command gets."""
        opts = ["-F", self.config] if self.config else []
        return [*opts, "-o", f"ControlPath={self.control}", "-o", "ControlMaster=no"]

    def ssh_argv(self, remote: Sequence[str], stdin: bool = False) -> list[str]:
        """ssh running one remote command; each word quoted for the remote shell."""
        return ["ssh", *self.options(), *([] if stdin else ["-n"]), "--", self.dest,
                " ".join(shlex.quote(w) for w in remote)]

    def start(self, remote: Sequence[str], first: bool = False) -> subprocess.Popen[bytes]:
        """Start a remote command that reads what we write to its stdin (a pipe);
        first: it logs in and becomes the master, as in run(), or is the same login
        begun before start-up (early.py)."""
        argv = self.master_argv(remote) if first else self.ssh_argv(remote, stdin=True)
        if first:
            from .early import adopt
            if (started := adopt(argv)) is not None:
                return started.process
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)

    def master_argv(self, remote: Sequence[str]) -> list[str]:
        """ssh logging in as the master, running remote with its stdin a pipe."""
        argv = self.ssh_argv(remote, stdin=True)
        argv[1:1] = self.master_options()
        return argv

    @staticmethod
    def master_options() -> list[str]:
        """What makes an ssh the master: see run()."""
        return ["-o", "ControlMaster=yes", "-o", "ControlPersist=60",
                "-o", "ConnectTimeout=30"]

    def rsh(self) -> str:
        """The `rsync -e` string: this ssh, quoted the way rsync splits it."""
        return " ".join(shlex.quote(w) for w in ["ssh", *self.options()])

    def run(self, remote: Sequence[str], timeout: float = 120, check_connection: bool = True,
            first: bool = False) -> subprocess.CompletedProcess[bytes]:
        """Run a remote command; raise RemoteError when ssh itself failed (exit 255).

        first: this ssh logs in and becomes the master (ControlPersist: it goes to
        the background once logged in, and ends on its own 60 s after its last
        client, even if this command is killed), then runs the command through it,
        so the login and the first command cost one connection's set-up."""
        argv = self.ssh_argv(remote)
        if first:
            argv[1:1] = self.master_options()
        try:
            r = subprocess.run(argv, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise RemoteError(f"{self.dest} did not answer `{' '.join(remote[:2])}` "
                              f"within {timeout:.0f}s") from e
        if check_connection and r.returncode == 255:
            raise ssh_failure(self.dest, r.stderr.decode(errors="replace"))
        return r

    def sftp(self, batch: bytes, timeout: float | None = 120
             ) -> subprocess.CompletedProcess[bytes]:
        """Run an sftp batch (commands prefixed '-' may fail); output and errors merged."""
        argv = ["sftp", *self.options(), "-b", "-", self.dest]
        try:
            return subprocess.run(argv, input=batch, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise RemoteError(f"sftp to {self.dest} did not finish within {timeout}s") from e

    def user(self) -> str:
        """The user name ssh logs in as (`ssh -G`: the config resolved, nothing sent)."""
        opts = ["-F", self.config] if self.config else []
        r = subprocess.run(["ssh", *opts, "-G", "--", self.dest], capture_output=True,
                           text=True, timeout=30)
        for line in r.stdout.splitlines():
            key, _, value = line.partition(" ")
            if key == "user":
                return value
        raise RemoteError(f"ssh -G {self.dest} names no user: {clean(r.stderr.strip())}")


class Connection:
    """A ControlMaster connection for the lifetime of a `with` block."""

    def __init__(self, dest: str, config: str | None) -> None:
        if dest.startswith("-") or not dest or any(c.isspace() for c in dest):
            raise RemoteError(f"not a host: {clean(dest)!r} (expected [USER@]HOST)")
        for tool in ("ssh", "sftp"):
            if shutil.which(tool) is None:
                raise RemoteError(f"`{tool}` is not installed here (OpenSSH's client)")
        # A short path: a socket's path is limited to about 100 bytes (macOS's
        # TMPDIR alone is 50), and ssh expands '%' in ControlPath.
        from .early import control_dir
        base = "/tmp" if os.path.isdir("/tmp") else None
        # The directory of a login begun early (early.py) if it is this one's.
        self._dir = control_dir(dest, config) or tempfile.mkdtemp(prefix="dh-ssh-", dir=base)
        self.ssh = Ssh(dest, config, os.path.join(self._dir, "cm"))

    def __enter__(self) -> Ssh:
        return self.ssh  # the first Ssh.run(first=True) logs in

    def __exit__(self, *exc: object) -> None:
        # The master's end is not waited for (about 15 ms of every upload): the
        # command has returned its outcome when it goes, with its directory.
        subprocess.Popen(["sh", "-c", 'ssh "$@" 2>/dev/null; rm -rf -- "$0"', self._dir,
                          *self.ssh.options(), "-O", "exit", "--", self.ssh.dest],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
