"""A booted throwaway systemd with this checkout installed: what the systemd tests share.

`boot_installed()` boots a sysbox (tests/sysbox.py), runs `make install` of this
checkout inside it, mounts a tmpfs at ROOT and sets up studies s1..s4 of CONFIG
for a non-root UPLOADER; `Box` uploads, reads receipts and the journal, and
adds drop-ins. Used by tests/test_units.py, tests/test_clients.py and bench/.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from . import sysbox
from .conftest import wait_for

REPO = Path(__file__).resolve().parent.parent
UPLOADER = "sbxup"
ROOT = "/srv/dh"  # a tmpfs of its own inside the box: room for large entries
SMTP_PORT = 2525  # a debugging SMTP server inside the box (its own network namespace)
CONFIG = f"""\
dropbox_root: {ROOT}/dropbox
# These tests upload by rename: ready at once (tests/test_clients.py waits for quiet).
defaults:
  quiet_period: 0
notify:
  from: dittohead@example.edu
  smtp: {{host: 127.0.0.1, port: {SMTP_PORT}}}
studies:
  s1:
    destination: {ROOT}/study/s1
    group: sbxs1
  s2:
    destination: {ROOT}/study/s2
  s3:
    # group differs from the destination's: needs CAP_CHOWN
    destination: {ROOT}/study/s3
    group: sbxs1
  s4:
    # the only study that sends mail
    destination: {ROOT}/study/s4
    notify:
      to: [pi@example.edu]
"""

# Runs inside the box as the uploader: build .NAME in the inbox, then rename.
UPLOAD_PY = r"""
import json, os, sys
spec = json.load(sys.stdin)
os.umask(spec["umask"])
inbox = spec["inbox"]
for name, files in spec["entries"]:
    tmp = os.path.join(inbox, "." + name)
    if files is None:
        with open(tmp, "wb") as f:
            f.write(name.encode() + b"\n")
    else:
        os.mkdir(tmp)
        for rel, size in files.items():
            p = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                left = size
                while left > 0:
                    n = min(left, 1 << 20)
                    f.write(os.urandom(n))
                    left -= n
for name, _ in spec["entries"]:
    os.rename(os.path.join(inbox, "." + name), os.path.join(inbox, name))
    if spec.get("interval"):
        import time
        time.sleep(spec["interval"])
"""

# Runs inside the box as root: the receipts of a study's done/ and failed/.
RECEIPTS_PY = r"""
import json, os, sys
out = {}
for kind in ("done", "failed"):
    d = os.path.join(sys.argv[1], kind)
    out[kind] = [json.load(open(os.path.join(d, n))) for n in sorted(os.listdir(d))
                 if n.endswith(".json") and not n.startswith(".")]
print(json.dumps(out))
"""


class Box:
    """A booted sysbox with dittohead installed and studies s1..s4 set up."""

    def __init__(self, box: sysbox.Sysbox) -> None:
        self.box = box

    def sh(self, script: str, *args: str, check: bool = True,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.box.run("/bin/sh", "-c", script, "sh", *args, check=check, timeout=timeout)

    def upload(self, study: str, entries: list[tuple[str, dict[str, int] | None]],
               umask: int = 0o022, interval: float = 0.0, timeout: float = 120) -> None:
        spec = {"inbox": f"{ROOT}/dropbox/{study}/inbox", "entries": entries,
                "umask": umask, "interval": interval}
        self.box.run("/usr/bin/python3", "-c", UPLOAD_PY, user=UPLOADER,
                     input=json.dumps(spec).encode(), timeout=timeout)

    def receipts(self, study: str) -> dict[str, list[dict[str, Any]]]:
        r = self.box.run("/usr/bin/python3", "-c", RECEIPTS_PY, f"{ROOT}/dropbox/{study}")
        data: dict[str, list[dict[str, Any]]] = json.loads(r.stdout)
        return data

    def delivered(self, study: str) -> dict[str, int]:
        """How many times each entry name was delivered."""
        counts: dict[str, int] = {}
        for r in self.receipts(study)["done"]:
            counts[r["entry"]] = counts.get(r["entry"], 0) + 1
        return counts

    def wait_delivered(self, study: str, names: list[str], timeout: float = 60) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.delivered(study)
            if all(n in got for n in names) or time.monotonic() > deadline:
                return got
            time.sleep(0.25)

    def now(self) -> str:
        """The box's clock, for journalctl --since=@..."""
        return self.box.run("date", "+%s.%N").stdout.strip()

    def prop(self, unit: str, name: str) -> str:
        return self.box.run("systemctl", "show", "-p", name, "--value", unit).stdout.strip()

    def wait_inactive(self, unit: str, timeout: float = 60) -> None:
        wait_for(lambda: self.prop(unit, "ActiveState") in ("inactive", "failed"), timeout,
                 f"{unit} to stop")

    def journal(self, *matches: str) -> list[dict[str, Any]]:
        r = self.box.run("journalctl", "--no-pager", "-o", "json", *matches, check=False)
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]

    def dropin(self, unit: str, name: str, text: str | None) -> None:
        """Add (or with None remove) a runtime drop-in for unit, then daemon-reload."""
        path = f"/run/systemd/system/{unit}.d/{name}.conf"
        if text is None:
            self.box.run("rm", "-f", path)
        else:
            self.box.write_file(path, text)
        self.box.run("systemctl", "daemon-reload")

    def debug(self, study: str) -> str:
        """What an admin would look at first, for an assertion message."""
        return self.sh(f"ls -lA {ROOT}/dropbox/{study}/*; systemctl status --no-pager "
                       f"'dittohead@{study}.*'; journalctl -n 40 --no-pager -o short-precise",
                       check=False, timeout=30).stdout

    def wait_path_waiting(self, study: str, timeout: float = 60) -> None:
        unit = f"dittohead@{study}.path"
        wait_for(lambda: self.prop(unit, "SubState") == "waiting", timeout,
                 f"{unit} to be waiting")


SINK = "sbx-smtp"  # the SMTP sink's unit in a box: it prints every message it gets


def start_smtp_sink(box: Box) -> None:
    """A debugging SMTP server on the box's 127.0.0.1:SMTP_PORT (Python 3.11's smtpd)."""
    box.sh(f"systemctl is-active -q {SINK} || systemd-run -q --unit={SINK} "
           f"-p Environment=PYTHONWARNINGS=ignore /usr/bin/python3 -u -m smtpd -n -c "
           f"DebuggingServer 127.0.0.1:{SMTP_PORT}")
    probe = f"import socket; socket.create_connection(('127.0.0.1', {SMTP_PORT}))"
    wait_for(lambda: box.box.run("/usr/bin/python3", "-c", probe,
                                 check=False).returncode == 0, 30, "the SMTP sink")


def boot_installed(workdir: Path) -> Box:
    """Boot a sysbox, `make install` this checkout in it, set up the studies."""
    b = Box(sysbox.Sysbox.boot(workdir, binds=[REPO]))
    try:
        r = b.sh('cd "$1" && make install', str(REPO), check=False, timeout=300)
        assert r.returncode == 0, f"make install failed:\n{r.stdout}\n{r.stderr}"
        b.box.write_file("/etc/dittohead/config.yaml", CONFIG)
        b.sh(f"""set -e
mkdir -p {ROOT} && mount -t tmpfs -o size=3g,mode=0755 dittohead-test {ROOT}
mkdir -p {ROOT}/study
groupadd sbxs1
useradd --no-create-home --shell /bin/sh {UPLOADER}
for s in s1 s2 s3 s4; do dittohead setup $s >/dev/null; done
# s3: a destination whose group is not the study's and that is not setgid
chgrp dittohead {ROOT}/study/s3 && chmod 0750 {ROOT}/study/s3 && chmod g-s {ROOT}/study/s3
systemctl daemon-reload
systemctl enable --now dittohead@s1.path dittohead@s1.timer
""")
    except BaseException:
        b.box.poweroff()
        raise
    return b
