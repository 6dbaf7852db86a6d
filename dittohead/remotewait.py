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

from .errors import EXIT_TEMPFAIL
from .log import clean, printable
from .outcomes import shown, wait_code, worst
from .sftpsend import quote, run_batch
from .sshrun import Ssh

POLL = 1.0  # seconds between looks, at most
# The first looks come sooner: a small upload is often delivered within half a second.
FIRST_POLL, POLL_GROWTH = 0.2, 1.5
FINAL = ("delivered", "failed", "rejected")


class Watcher:
    """The caller's outcomes for one study on one server."""

    def __init__(self, ssh: Ssh, shell: bool, study: str, folder: str) -> None:
        self.ssh, self.shell, self.study, self.folder = ssh, shell, study, folder
        self.before: set[str] = set()  # ids there before the upload
        self.final: dict[str, dict[str, Any]] = {}  # id: outcome, once final
        self.last = 50  # how many of the newest outcomes `status --mine` lists

    def _over_ssh(self) -> list[dict[str, Any]]:
        r = self.ssh.run(["dittohead", "status", "--mine", "--json", "--last", str(self.last),
                          self.study], timeout=60)
        try:
            data = json.loads(r.stdout) if r.returncode == 0 else []
        except ValueError:
            return []
        # A list with one object per study, each listing its "uploads".
        return [o for s in data if isinstance(s, dict) for o in s.get("uploads") or []
                if isinstance(o, dict)] if isinstance(data, list) else []

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
        self.last = max(self.last, 2 * len(names) + 10)
        got: dict[str, dict[str, Any]] = {}
        wanted = {os.fsencode(n).hex(): n for n in names}
        shown = {printable(n): n for n in names}
        pause = FIRST_POLL
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
            time.sleep(pause)
            pause = min(POLL, pause * POLL_GROWTH)


def report(names: list[str], got: dict[str, dict[str, Any]], timeout: float) -> int:
    """Print each upload's outcome as the local `upload --wait` does; its exit codes."""
    codes = []
    for n in names:
        note = got.get(n)
        outcome = str(note.get("outcome")) if note else ""
        if note is None or outcome not in FINAL:
            why = (f"not delivered yet: {clean(str(note.get('reason')))}; the service tries "
                   "again by itself" if note else "no outcome yet (`dittohead status "
                   "--mine` on the server shows it later)")
            print(clean(f"{printable(n)}: no outcome after {timeout:g} s: {why}"), flush=True)
            codes.append(EXIT_TEMPFAIL)
            continue
        print(clean(shown(note)), flush=True)
        codes.append(wait_code(note))
    return worst(codes)
