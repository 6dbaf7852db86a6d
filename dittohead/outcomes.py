"""`dittohead upload --host --wait`: each upload's outcome, read from the server.

The uploader's outcomes folder holds one `<id>.json` per upload of theirs
(docs/contract.md); it is read with `dittohead status --mine --json STUDY` over
ssh when the account has a shell, else listed and fetched over SFTP. Outcomes
already there before the upload are not taken for its own.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .log import printable
from .sftpsend import quote, run_batch
from .sshrun import Ssh

POLL = 1.0  # seconds between looks
FINAL = ("delivered", "failed", "rejected")
# --wait's exit codes (docs/contract.md): the worst outcome wins, 77 > 65 > 75.
EXIT_DATAERR, EXIT_NOPERM, EXIT_TEMPFAIL = 65, 77, 75


class Watcher:
    """The caller's outcomes for one study on one server."""

    def __init__(self, ssh: Ssh, shell: bool, study: str, folder: str) -> None:
        self.ssh, self.shell, self.study, self.folder = ssh, shell, study, folder
        self.before: set[str] = set()  # ids there before the upload
        self.final: dict[str, dict[str, Any]] = {}  # id: outcome, once final

    def _over_ssh(self) -> list[dict[str, Any]]:
        r = self.ssh.run(["dittohead", "status", "--mine", "--json", self.study], timeout=60)
        if r.returncode != 0:
            return []
        try:
            data = json.loads(r.stdout)
        except ValueError:
            return []
        return [o for o in data if isinstance(o, dict)] if isinstance(data, list) else []

    def _over_sftp(self, bodies: bool = True) -> list[dict[str, Any]]:
        if not self.folder:
            return []
        folder = self.folder.encode()
        _, parts = run_batch(self.ssh, [b"-ls -1 " + quote(folder)])
        names = {os.path.basename(line.strip()) for part in parts for line in part}
        ids = sorted(n[:-5].decode() for n in names if n.endswith(b".json")
                     and n[:-5].decode(errors="replace") not in self.before | set(self.final))
        if not ids or not bodies:
            return [{"id": i} for i in ids]
        found = []
        with tempfile.TemporaryDirectory(prefix="dh-outcomes-") as tmp:
            run_batch(self.ssh, [b"-get " + quote(folder + b"/" + i.encode() + b".json") + b" "
                                 + quote(os.fsencode(os.path.join(tmp, i + ".json")))
                                 for i in ids])
            for i in ids:
                try:
                    found.append(json.loads(Path(tmp, i + ".json").read_text()))
                except (OSError, ValueError):
                    continue
        return found

    def fetch(self) -> list[dict[str, Any]]:
        """Outcomes not seen before the upload and not final yet."""
        return self._over_ssh() if self.shell else self._over_sftp()

    def snapshot(self) -> None:
        """Remember the outcomes already there, before anything is renamed into the inbox."""
        found = self._over_ssh() if self.shell else self._over_sftp(bodies=False)
        self.before = {str(o.get("id")) for o in found}

    def wait(self, names: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        """Each name's newest outcome: final ones, or the last pending one at the deadline."""
        deadline = time.monotonic() + timeout
        got: dict[str, dict[str, Any]] = {}
        wanted = {os.fsencode(n).hex(): n for n in names}
        shown = {printable(n): n for n in names}
        while True:
            for o in self.fetch():
                if str(o.get("id")) in self.before:
                    continue
                n = wanted.get(str(o.get("entry_hex"))) or shown.get(str(o.get("entry")))
                if n is None:
                    continue
                if o.get("outcome") in FINAL:
                    self.final[str(o.get("id"))] = o
                if got.get(n, {}).get("outcome") not in FINAL:
                    got[n] = o
            if all(got.get(n, {}).get("outcome") in FINAL for n in names):
                return got
            if time.monotonic() > deadline:
                return got
            time.sleep(POLL)


def line(name: str, o: dict[str, Any] | None, timeout: float) -> tuple[str, int]:
    """What `--wait` prints for one upload, and the exit code it alone would give."""
    shown = printable(name)
    if o is None:
        return (f"{shown}: not delivered yet after {timeout:.0f}s (no outcome so far; "
                "`dittohead status --mine` shows it later)", EXIT_TEMPFAIL)
    oid, outcome = printable(str(o.get("id"))), str(o.get("outcome"))
    if outcome == "delivered":
        return (f"{shown}: delivered: {o.get('files')} files, {o.get('bytes')} bytes to "
                f"{printable(str(o.get('destination')))} ({oid})", 0)
    reason = printable(str(o.get("reason") or "")).replace("\\n", " ")
    code = {"failed": EXIT_DATAERR, "rejected": EXIT_NOPERM}.get(outcome, EXIT_TEMPFAIL)
    if code == EXIT_TEMPFAIL:
        return (f"{shown}: still waiting after {timeout:.0f}s: {reason} ({oid})", code)
    return f"{shown}: {outcome}: {reason} ({oid})", code


def report(names: list[str], got: dict[str, dict[str, Any]], timeout: float) -> int:
    """Print each upload's outcome; the exit code: 77 > 65 > 75 > 0."""
    codes = []
    for n in names:
        text, code = line(n, got.get(n), timeout)
        print(text, flush=True)
        codes.append(code)
    for c in (EXIT_NOPERM, EXIT_DATAERR, EXIT_TEMPFAIL):
        if c in codes:
            return c
    return 0
