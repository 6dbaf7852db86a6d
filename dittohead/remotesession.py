"""The one dittohead process `upload --host` keeps on the server: `where --then-ready`.

Started as the ssh login (it becomes the ControlMaster), it answers `where` on
one line, then renames each entry once it is sent, on a `go HEX` line from us.
One Python start-up on the server for both: a second one (`ready`), started
during the transfer, was measured to cost a 2-CPU server about 0.1 s of a
20,000-file upload's CPU, which rsync needs.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import threading
import time

from .log import printable
from .sshrun import RemoteError, Ssh, Waiting, ssh_failure


class Session:
    """`dittohead where --json --then-ready STUDY NAME...` running on the server."""

    def __init__(self, ssh: Ssh, study: str, names: list[str]) -> None:
        self.ssh = ssh
        self.argv = ["dittohead", "where", "--json", "--then-ready", study, *names]
        self.p = ssh.start(self.argv, first=True)
        self.live = False  # it answered: it renames on request
        self._buf = b""
        self._err = b""
        self._drain = threading.Thread(target=self._read_errors, daemon=True)
        self._drain.start()
        assert self.p.stdin is not None
        try:
            # An account forced to run the external sftp-server (not internal-sftp,
            # which refuses an exec request) would wait for SFTP on this pipe for
            # ever: read as a packet length, "hell" is one it refuses, and it ends
            # at once (then dittohead.json is read). dittohead ignores the line.
            self.p.stdin.write(b"hello\n")
            self.p.stdin.flush()
        except OSError:
            pass  # ssh ended already: first() says why

    def _read_errors(self) -> None:
        assert self.p.stderr is not None
        self._err = self.p.stderr.read()

    def _line(self, timeout: float) -> bytes:
        """The next line of its output; b"" when it ended without one."""
        assert self.p.stdout is not None
        fd, deadline = self.p.stdout.fileno(), time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.p.kill()
                raise RemoteError(f"{self.ssh.dest} did not answer `dittohead where` "
                                  f"within {timeout:.0f}s")
            chunk = os.read(fd, 65536)
            if not chunk:
                return b""
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def first(self, timeout: float) -> subprocess.CompletedProcess[bytes]:
        """`where`'s answer as a finished command would give it; when the server ended
        instead (no dittohead there, an SFTP-only account, an older dittohead), how."""
        line = self._line(timeout)
        if line.startswith(b"{"):
            self.live = True
            return subprocess.CompletedProcess(self.argv, 0, line, b"")
        self.close()
        if self.p.returncode == 255:
            raise ssh_failure(self.ssh.dest, self._err.decode(errors="replace"))
        return subprocess.CompletedProcess(self.argv, self.p.returncode, line + self._buf,
                                           self._err)

    def ready(self, name: str) -> None:
        """Rename `.NAME` to `NAME` there, never replacing: as `dittohead ready`."""
        assert self.p.stdin is not None
        try:
            self.p.stdin.write(f"go {os.fsencode(name).hex()}\n".encode())
            self.p.stdin.flush()
            line = self._line(120)
        except OSError:
            line = b""
        if not line:
            self.close()
            said = printable(self._err.decode(errors="replace").strip())
            raise RemoteError(f"{self.ssh.dest}: the rename of .{printable(name)} got no "
                              f"answer{': ' + said if said else ''}; rerun the same command")
        answer = json.loads(line)
        if answer.get("waits"):
            raise Waiting(f"{self.ssh.dest}: {printable(str(answer.get('error')))}")
        if not answer.get("ok"):
            raise RemoteError(f"{self.ssh.dest}: the rename of .{printable(name)} failed: "
                              f"{printable(str(answer.get('error')))}")

    def end(self) -> None:
        """Tell it we are done: it reads the end of its input and ends (not waited for:
        the master's `-O exit` that follows ends its ssh)."""
        if self.p.stdin is not None and not self.p.stdin.closed:
            try:
                self.p.stdin.close()
            except OSError:
                pass

    def close(self) -> None:
        """End it and wait for it."""
        self.end()
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self._drain.join(timeout=5)
