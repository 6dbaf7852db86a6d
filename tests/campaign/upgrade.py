"""The upgrade campaign: the Debian package upgraded and downgraded under a running delivery.

One booted box (tests/sysbox.py) with the package installed by `dpkg -i`, as an admin
would: study s1 delivering (path unit and timer enabled), study s2 paused (its path unit and
timer stopped) with an entry waiting in its inbox. Each trial holds s1's run at a fault point
(`DITTOHEAD_TEST_FAULT=<point>=wait:<file>` in a drop-in, removed once the run is held),
uploads entries that wait behind it, then installs the other version with `dpkg -i` (up, or
down again) and checks what the package's scripts did, the run still held; then lets the run
go and checks that everything was delivered exactly once, each waiting entry by the new
version. The `stream` trial holds nothing: an uploader drops entries every 0.1 s while dpkg
runs, so runs start and end around the moment the files are replaced.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from ..boxes import ROOT, UPLOADER, Box
from ..conftest import wait_for
from . import DELIVERED, CampaignFailure, Observed, trial_rng
from .kills import CHECK_PY, UPLOAD_PY, concrete, entry_files, held, main_pid


@dataclass(frozen=True)
class Release:
    """A package to install: its Debian version, what `dittohead --version` says, the
    DITTOHEAD_VERSION its events carry (None: before the field), and whether its runs end
    once the program is replaced (before that, a run went on with the old code)."""

    package: str
    program: str
    logs: str | None
    ends_on_upgrade: bool = True


UNIT = "dittohead@s1.service"
BOX = f"{ROOT}/dropbox/s1"
DEST = f"{ROOT}/study/s1"
GO = f"{BOX}/.test-go"
PAUSED_INBOX = f"{ROOT}/dropbox/s2/inbox"
CONFIG = f"""\
dropbox_root: {ROOT}/dropbox
defaults: {{quiet_period: 0}}
studies:
  s1:
    destination: {DEST}
    group: sbxs1
  s2:
    destination: {ROOT}/study/s2
"""
# Where each fault point holds the run (tests/campaign/kills.py has them all), and `stream`.
REDUCED_POINTS = ("claimed", "staged:1", "published:1", "receipt", "stream")
FULL_POINTS = ("chowned", "taking:shared", "claimed", "checked", "staged:1", "staged:N",
               "synced", "published:1", "published:N", "verified", "receipt", "filed",
               "stream")
DELIVERED_ID = "38a8638a6c0e47ae85e1afdd33a44e53"
UNIT_FAILED_ID = "d49d0a088dd54a0286ba26b8f857ba0b"

# As root, with the INSTALLED program: every receipt of the study parsed by its reader.
READ_RECEIPTS_PY = r"""
import json, os, sys
sys.path.insert(0, "/usr/lib/dittohead")
from pathlib import Path
from dittohead import __version__
from dittohead.record import read_receipt
done = Path(sys.argv[1]) / "done"
ids = [read_receipt(done / n).to_dict()["id"] for n in sorted(os.listdir(done))
       if n.endswith(".json") and not n.startswith(".")]
print(json.dumps({"version": __version__, "ids": ids}))
"""

# As the uploader, in the background: entries of 3 small files every 0.1 s, until
# STREAM_STOP exists, then 5 more (runs of the new version take those); their names
# go to STREAM_DONE at the end.
STREAM_STOP, STREAM_DONE = "/tmp/stream-stop", "/tmp/stream-done"
STREAM_PY = r"""
import json, os, sys, time
inbox, prefix, stop, done = sys.argv[1:5]
names, extra = [], 0
while extra < 5:
    name = f"{prefix}s{len(names):03d}"
    tmp = os.path.join(inbox, "." + name)
    os.makedirs(os.path.join(tmp, name))  # the entry's files go to DEST/name/
    for j, size in enumerate((1024, 2048, 65536)):
        with open(os.path.join(tmp, name, f"f{j}.bin"), "wb") as f:
            f.write(os.urandom(size))
    os.rename(tmp, os.path.join(inbox, name))
    names.append(name)
    extra += os.path.exists(stop)
    time.sleep(0.1)
with open(done + ".tmp", "w") as f:
    json.dump(names, f)
os.rename(done + ".tmp", done)
"""


def prepare(b: Box, deb: str) -> None:
    """Install `deb`, set up s1 (delivering) and s2 (paused, an entry waiting), deliver one."""
    r = b.box.run("dpkg", "-i", deb, check=False, timeout=300)
    assert r.returncode == 0, f"dpkg -i {deb}:\n{r.stdout}\n{r.stderr}"
    b.box.write_file("/etc/dittohead/config.yaml", CONFIG)
    b.sh(f"""set -e
groupadd sbxs1
useradd --no-create-home --shell /bin/sh {UPLOADER}
mkdir -p {ROOT}/study
for s in s1 s2; do dittohead setup $s >/dev/null; done
systemctl daemon-reload
systemctl enable --now dittohead@s1.path dittohead@s1.timer dittohead@s2.path dittohead@s2.timer
# s2 paused as docs/admin.md says: path and timer stopped, no run going
systemctl stop dittohead@s2.path dittohead@s2.timer
""")
    b.wait_inactive("dittohead@s2.service")
    b.sh("systemctl stop dittohead@s2.path")
    b.upload("s2", [("paused1", {"a.bin": 1000})])
    b.upload("s1", [("first", {"shared/first.bin": 4096, "first/x.bin": 100})])
    got = b.wait_delivered("s1", ["first"])
    assert got == {"first": 1}, got
    b.wait_inactive(UNIT)


def _installed(b: Box) -> str:
    return b.box.run("dpkg-query", "-W", "-f=${Version}", "dittohead").stdout.strip()


def _state(b: Box) -> dict[str, str]:
    """What an upgrade must keep: the admin's config, the claims in processing/ (with
    their records), s2's waiting entry, and the units' states."""
    units = ("dittohead@s1.path", "dittohead@s1.timer", "dittohead@s2.path",
             "dittohead@s2.timer")
    return {
        "config": b.sh("sha256sum /etc/dittohead/config.yaml").stdout.split()[0],
        "processing": b.sh(f"ls -A {BOX}/processing").stdout,
        "paused inbox": b.sh(f"ls -A {PAUSED_INBOX}").stdout,
        **{u: b.prop(u, "ActiveState") + "/" + b.sh(f"systemctl is-enabled {u} || true"
                                                     ).stdout.strip() for u in units},
    }


def _upload(b: Box, name: str, files: dict[str, int], seed: float) -> dict[str, str]:
    spec = {"inbox": f"{BOX}/inbox", "name": name, "files": files, "seed": seed}
    r = b.box.run("/usr/bin/python3", "-c", UPLOAD_PY, user=UPLOADER,
                  input=json.dumps(spec).encode(), timeout=300)
    digests: dict[str, str] = json.loads(r.stdout)
    return digests


def _hold(b: Box, at: str, name: str, files: dict[str, int], seed: float) -> dict[str, str]:
    """Upload `name` and hold s1's run at `at` on it."""
    b.dropin(UNIT, "90-campaign", f"[Service]\nEnvironment=DITTOHEAD_TEST_FAULT={at}=wait:{GO}\n")
    try:
        digests = _upload(b, name, files, seed)
        wait_for(lambda: held(b), 60, f"the run to stop at {at}")
    finally:
        b.dropin(UNIT, "90-campaign", None)  # the runs after this one run clean
    return digests


def _start_stream(b: Box, prefix: str) -> None:
    b.sh(f"rm -f {STREAM_STOP} {STREAM_DONE}")
    b.box.write_file("/tmp/stream.py", STREAM_PY)
    b.box.run("/bin/sh", "-c", f"/usr/bin/python3 /tmp/stream.py {BOX}/inbox {prefix} "
              f"{STREAM_STOP} {STREAM_DONE} >/dev/null 2>&1 &", user=UPLOADER)


def _end_stream(b: Box) -> list[str]:
    b.sh(f"touch {STREAM_STOP}")
    wait_for(lambda: b.box.run("test", "-e", STREAM_DONE, check=False).returncode == 0,
             120, "the uploads to end")
    names: list[str] = json.loads(b.sh(f"cat {STREAM_DONE}").stdout)
    return names


def _versions(b: Box, since: str) -> dict[str, str | None]:
    """The version each entry was delivered by, from its `delivered` event."""
    return {str(e.get("DITTOHEAD_ENTRY")): e.get("DITTOHEAD_VERSION")
            for e in b.journal(f"MESSAGE_ID={DELIVERED_ID}", "DITTOHEAD_STUDY=s1",
                               f"--since=@{since}")}


def upgrade_trial(b: Box, index: int, point: str, frm: Release, to: Release,
                  debs: dict[str, str]) -> tuple[Observed, str]:
    """One trial: dpkg -i of version `to` over `frm` at `point`; (observed, the point)."""
    rnd = trial_rng("upgrade", index)
    name = f"u{index:03d}"
    problems: list[str] = []
    since = b.now()
    digests: dict[str, dict[str, str]] = {}
    stream = point == "stream"
    waiting: list[str] = []
    if stream:
        at, pid = point, 0
        _start_stream(b, name)
        time.sleep(1)
    else:
        files = entry_files(rnd, name, point)
        at = concrete(point, rnd, files)
        digests[name] = _hold(b, at, name, files, rnd.random())
        pid = main_pid(b)
        waiting += [f"{name}w{j}" for j in range(3)]
        for w in waiting:
            digests[w] = _upload(b, w, {f"{w}/f{k}.bin": rnd.randint(1024, 65536)
                                        for k in range(3)}, rnd.random())
    before = _state(b)
    started = time.monotonic()
    r = b.box.run("dpkg", "-i", debs[to.package], check=False, timeout=600)
    took = time.monotonic() - started
    if r.returncode != 0:
        problems.append(f"dpkg -i exited {r.returncode}: {r.stdout[-800:]} {r.stderr[-800:]}")
    after = _state(b)
    if not stream:
        # Still held: never stopped, killed or restarted by the package's scripts.
        if not _still_held(b, pid):
            problems.append(f"the held run (pid {pid}) is gone: now {main_pid(b)}")
        if after != before:
            problems.append(f"the upgrade changed {before} into {after}")
    elif {k: v for k, v in after.items() if k != "processing"} != \
            {k: v for k, v in before.items() if k != "processing"}:
        problems.append(f"the upgrade changed {before} into {after}")
    problems += _installed_is(b, to)
    b.sh(f"touch {GO}")
    try:
        if stream:
            waiting = _end_stream(b)
        got = b.wait_delivered("s1", [name, *waiting] if not stream else waiting, 300)
        b.wait_inactive(UNIT, 120)
    finally:
        b.sh(f"rm -f {GO}")
    problems += _check_delivered(b, name, waiting, digests, got, stream)
    problems += _check_after(b, since, name, waiting, frm, to, stream)
    if problems:
        raise CampaignFailure(f"upgrade trial {index} ({at}, {frm.package} -> {to.package}): "
                              f"{problems}\n"
                              + b.debug("s1"))
    count = len(waiting) + (0 if stream else 1)
    return Observed(DELIVERED, seconds=took, files=count), at


def _still_held(b: Box, pid: int) -> bool:
    """The same run, still at its fault point (held() samples the syscall a process is in:
    the point's poll is mostly, not always, asleep)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and main_pid(b) == pid:
        if held(b):
            return True
        time.sleep(0.1)
    return False


def _installed_is(b: Box, release: Release) -> list[str]:
    problems = []
    if _installed(b) != release.package:
        problems.append(f"dpkg says {_installed(b)}, not {release.package}")
    shown = b.box.run("dittohead", "--version").stdout.strip()
    if shown != f"dittohead {release.program}":
        problems.append(f"dittohead --version says {shown!r}")
    left = b.sh("ls /run/dittohead/upgrade-* 2>/dev/null; "
                "find /run/systemd/system -maxdepth 1 -lname /dev/null -name 'dittohead*'",
                check=False).stdout.strip()
    if left:
        problems.append(f"left by the upgrade: {left}")
    return problems


def _check_delivered(b: Box, name: str, waiting: list[str], digests: dict[str, dict[str, str]],
                     got: dict[str, int], stream: bool) -> list[str]:
    """Each entry delivered exactly once, byte-identical, its manifest verifying."""
    problems = []
    names = waiting if stream else [name, *waiting]
    if any(got.get(n) != 1 for n in names):
        problems.append(f"delivered {[(n, got.get(n)) for n in names]}")
    for n in names if not stream else []:
        r = b.box.run("/usr/bin/python3", "-c", CHECK_PY, n, DEST, BOX,
                      input=json.dumps(digests[n]).encode(), check=False)
        seen: dict[str, Any] = json.loads(r.stdout or '{"problems": ["' + r.stderr[-300:]
                                          + '"]}')
        problems += [f"{n}: {p}" for p in seen["problems"]]
    if stream:  # random bytes: the manifests, checked in the destination
        ids = {r["entry"]: r["id"] for r in b.receipts("s1")["done"]}
        r = b.sh(f"cd {DEST} && for id in {' '.join(ids[n] for n in waiting if n in ids)}; "
                 f"do sha256sum --quiet --strict -c {BOX}/done/$id.sha256 || echo BAD $id; "
                 "done", check=False)
        if r.stdout.strip() or r.returncode:
            problems.append(f"manifests: {r.stdout} {r.stderr}")
        left = b.sh(f"ls {BOX}/inbox {BOX}/processing; ls -a {DEST} | grep '^.incoming-'",
                    check=False).stdout.split()
        if [n for n in left if not n.endswith(":")]:
            problems.append(f"left over: {left}")
    return problems


def _check_after(b: Box, since: str, name: str, waiting: list[str], frm: Release,
                 to: Release, stream: bool) -> list[str]:
    """The new version delivered what waited, reads every receipt, and nothing failed."""
    problems = []
    versions = _versions(b, since)
    wrong = {n: versions.get(n) for n in waiting if versions.get(n) not in (frm.logs, to.logs)}
    if not stream:  # the held run finished its entry with the code it had loaded
        if frm.ends_on_upgrade:
            wrong |= {n: versions.get(n) for n in waiting if versions.get(n) != to.logs}
        if versions.get(name) != frm.logs:
            wrong[name] = versions.get(name)
    if wrong:
        problems.append(f"delivered by versions {wrong} ({frm.package} -> {to.package})")
    if stream and frm.ends_on_upgrade and versions.get(waiting[-1]) != to.logs:
        problems.append(f"the last entry was delivered by {versions.get(waiting[-1])}")
    r = b.box.run("/usr/bin/python3", "-I", "-c", READ_RECEIPTS_PY, BOX, check=False)
    receipts = json.loads(r.stdout) if r.returncode == 0 else {"ids": [], "version": r.stderr}
    status = b.box.run("dittohead", "status", "--json", "s1", check=False)
    try:
        shown = json.loads(status.stdout)
        shown = shown[0] if isinstance(shown, list) else shown
    except ValueError:
        shown = {}
    if receipts["version"] != to.program or len(receipts["ids"]) != shown.get("delivered"):
        problems.append(f"receipts read by {receipts['version']}: {len(receipts['ids'])}; "
                        f"status --json (exit {status.returncode}) says "
                        f"{shown.get('delivered')} delivered: {status.stderr[-300:]}")
    failed = b.sh("systemctl list-units --failed --no-legend --plain 'dittohead*'").stdout
    told = b.journal(f"MESSAGE_ID={UNIT_FAILED_ID}", f"--since=@{since}")
    if failed.strip() or told:
        problems.append(f"failed units: {failed} {[e.get('MESSAGE') for e in told]}")
    for unit in ("dittohead@s1.path", "dittohead@s1.timer"):
        if b.prop(unit, "ActiveState") != "active" or \
                b.prop(unit, "UnitFileState") != "enabled":
            problems.append(f"{unit}: {b.prop(unit, 'ActiveState')}, "
                            f"{b.prop(unit, 'UnitFileState')}")
    for unit in ("dittohead@s2.path", "dittohead@s2.timer", "dittohead@s2.service"):
        if b.prop(unit, "ActiveState") != "inactive":
            problems.append(f"paused {unit} is {b.prop(unit, 'ActiveState')}")
    if "paused1" not in b.sh(f"ls {PAUSED_INBOX}").stdout:
        problems.append("the paused study's entry left its inbox")
    return problems


def resume_paused(b: Box) -> None:
    """At the end: the paused study, resumed, delivers its waiting entry."""
    b.sh("systemctl start dittohead@s2.path dittohead@s2.timer")
    got = b.wait_delivered("s2", ["paused1"], 60)
    if got != {"paused1": 1}:
        raise CampaignFailure(f"the paused study, resumed, delivered {got}\n" + b.debug("s2"))
