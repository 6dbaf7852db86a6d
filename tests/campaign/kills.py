"""The kill campaign: SIGKILL of dittohead@STUDY.service at seeded moments on a booted systemd.

Each trial uploads one entry (files into a directory the destination has, each its own
rename, and a new directory; or a single file), stops the run at a fault point (or waits
a random delay), kills it with `systemctl kill -s KILL`, lets the next run finish and
checks the result: in s1 (destination on the box's tmpfs), in s4 (which sends mail: the
mail must go out exactly once) or in a study whose destination is an ext4 on a loop
device (tests/test_campaign_sandbox.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from random import Random

from ..boxes import ROOT, SINK, UPLOADER, Box
from ..conftest import wait_for
from . import DELIVERED, CampaignFailure, Observed, trial_rng

UNIT = "dittohead@s1.service"
# Every stage of a delivery (dittohead/faults.py), and plain delays between them.
POINTS = ("chowned", "taking:shared", "claimed", "checked", "staged:1", "staged:N", "synced",
          "published:1", "published:N", "verified", "receipt", "filed", "random")


# What each fault point (dittohead/faults.py) stops a run after: the kill and upgrade
# campaigns' row texts.
STAGES = {
    "chowned": "claim: entry taken over, claim record written, not yet renamed",
    "taking": "lockdown: the walk holds a directory between its fstat and its takeover",
    "claimed": "claimed: destination open, a killed attempt's staging removed",
    "checked": "check: examined and planned, nothing staged",
    "staged": "stage: after the N-th file copied into the staging directory",
    "synced": "sync: staged files synced, no final name yet",
    "published": "publish: after the N-th rename into the destination",
    "verified": "verify: published, checked and synced, nothing filed",
    "receipt": "record: manifest and receipt written, entry still in processing",
    "filed": "record: entry filed, claim record and journal event not yet",
    "random": "a random delay (0-1.5 s) after the run started, entry of 8-40 MiB more",
}

# As the uploader: write the entry's files with seeded bytes, rename it; print digests.
UPLOAD_PY = r"""
import hashlib, json, os, random, sys
spec = json.load(sys.stdin)
rnd = random.Random(spec["seed"])
tmp = os.path.join(spec["inbox"], "." + spec["name"])
digests = {}
for rel, size in spec["files"].items():
    # A single-file entry: its one file is named as the entry, and is the entry.
    p = tmp if rel == spec["name"] else os.path.join(tmp, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    data = rnd.randbytes(size)
    with open(p, "wb") as f:
        f.write(data)
    digests[rel] = hashlib.sha256(data).hexdigest()
os.rename(tmp, os.path.join(spec["inbox"], spec["name"]))
print(json.dumps(digests))
"""

# As root: what the destination, the dropbox and the receipts hold for one entry.
CHECK_PY = r"""
import hashlib, json, os, subprocess, sys
name, dest, box = sys.argv[1:4]
digests = json.loads(sys.stdin.read())
out = {"problems": []}
def bad(why): out["problems"].append(why)
done = []
for kind in ("done", "failed"):
    d = os.path.join(box, kind)
    for n in sorted(os.listdir(d)):
        if n.endswith(".json") and not n.startswith("."):
            r = json.load(open(os.path.join(d, n)))
            if r["entry"] == name:
                done.append((kind, r))
if [k for k, _ in done] != ["done"]:
    bad(f"receipts {[(k, r.get('reason')) for k, r in done]}")
else:
    r = done[0][1]
    out["id"], out["bytes"] = r["id"], r["bytes"]
    if r["files"] != len(digests):
        bad(f"receipt says {r['files']} files, uploaded {len(digests)}")
    c = subprocess.run(["sha256sum", "--quiet", "--strict", "-c",
                        os.path.join(box, "done", r["id"] + ".sha256")], cwd=dest,
                       capture_output=True, text=True)
    if c.returncode:
        bad("manifest: " + c.stdout + c.stderr)
for rel, want in digests.items():
    try:
        got = hashlib.sha256(open(os.path.join(dest, rel), "rb").read()).hexdigest()
    except OSError as e:
        got = str(e)
    if got != want:
        bad(f"{rel}: {got} is not what was uploaded")
left = [n for n in os.listdir(dest) if n.startswith(".incoming-")]
left += [n for n in os.listdir(os.path.join(box, "processing")) if not n.startswith(".")]
left += [n for n in os.listdir(os.path.join(box, "inbox")) if not n.startswith(".")]
if left:
    bad(f"left over: {left}")
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Where:
    """The study a trial runs in, where its destination is, and the kind of entry."""

    study: str = "s1"
    dest: str = f"{ROOT}/study/s1"
    single: bool = False  # the entry is one file, not a directory
    mail: bool = False  # the study mails its contacts: count what the SMTP sink got

    @property
    def unit(self) -> str:
        return f"dittohead@{self.study}.service"

    @property
    def box(self) -> str:
        return f"{ROOT}/dropbox/{self.study}"

    @property
    def go(self) -> str:  # never made: a held run waits until killed
        return f"{self.box}/.test-go"


S1 = Where()


def entry_files(rnd: Random, name: str, point: str, single: bool = False) -> dict[str, int]:
    """Files in the existing shared/ (one rename each) and in a new directory d1/; or, for a
    single-file entry, the one file."""
    if single:
        big = point == "random"  # long enough that delays land in every stage
        return {name: rnd.randint(8 << 20, 40 << 20) if big else rnd.randint(0, 4 << 20)}
    files = {f"shared/{name}-{j:02d}.bin": rnd.randint(0, 256 << 10)
             for j in range(rnd.randint(3, 12))}
    files.update({f"{name}/d1/f{j}.bin": rnd.randint(1, 64 << 10) for j in range(3)})
    if point == "random":
        files[f"{name}/big.bin"] = rnd.randint(8 << 20, 40 << 20)
    return files


def concrete(point: str, rnd: Random, files: dict[str, int]) -> str:
    """The fault point with its N drawn."""
    shared = sum(1 for rel in files if rel.startswith("shared/"))
    if point == "staged:N":
        return f"staged:{rnd.randint(2, len(files))}"
    if point == "published:N":
        return f"published:{rnd.randint(2, shared)}"
    return point


def main_pid(box: Box, unit: str = UNIT) -> int:
    return int(box.prop(unit, "MainPID") or 0)


def held(box: Box, unit: str = UNIT) -> bool:
    """A process of the run sleeps in faults.point's poll (clock_nanosleep, x86-64 syscall
    230): the run itself, or a walker it forked (the lockdown walks top directories in
    parallel, faults or not)."""
    if not main_pid(box, unit):
        return False
    group = box.prop(unit, "ControlGroup")
    r = box.sh(f'for p in $(cat "/sys/fs/cgroup{group}/cgroup.procs"); do '
               'cut -d" " -f1 /proc/$p/syscall; done', check=False)
    return "230" in r.stdout.split()


def kill_trial(box: Box, index: int, point: str,
               where: Where = S1) -> tuple[Observed, str, bool]:
    """One trial; (what it observed, the concrete point, whether the kill hit a run)."""
    rnd = trial_rng("kills", index)
    name = f"k{index:04d}"
    files = entry_files(rnd, name, point, where.single)
    at = concrete(point, rnd, files)
    unit = where.unit
    if at != "random":
        box.dropin(unit, "90-campaign",
                   f"[Service]\nEnvironment=DITTOHEAD_TEST_FAULT={at}=wait:{where.go}\n")
    started = time.monotonic()
    try:
        spec = {"inbox": f"{where.box}/inbox", "name": name, "files": files,
                "seed": rnd.random()}
        up = box.box.run("/usr/bin/python3", "-c", UPLOAD_PY, user=UPLOADER,
                         input=json.dumps(spec).encode(), timeout=300)
        digests = up.stdout
        if at == "random":
            wait_for(lambda: main_pid(box, unit) > 0, 60, "the service to start")
            time.sleep(rnd.uniform(0.0, 1.5))
        else:
            wait_for(lambda: held(box, unit), 60, f"the run to stop at {at}")
    finally:
        box.dropin(unit, "90-campaign", None)  # before the kill: the next run runs clean
    since = box.now()
    box.box.run("systemctl", "kill", "-s", "KILL", unit, check=False)
    box.wait_inactive(unit)
    # From the journal: the path unit may have started the next run already.
    hit = any("status=9/KILL" in str(e.get("MESSAGE"))
              for e in box.journal("-u", unit, f"--since=@{since}"))
    box.box.run("systemctl", "start", unit, check=False, timeout=600)
    box.wait_inactive(unit, timeout=600)
    r = box.box.run("/usr/bin/python3", "-c", CHECK_PY, name, where.dest, where.box,
                    input=digests.encode(), check=False)
    seen = json.loads(r.stdout or '{"problems": ["' + r.stderr[-300:] + '"]}')
    if where.mail and not seen["problems"]:
        seen["problems"] = mails_once(box, where.study, name)
    if seen["problems"]:
        raise CampaignFailure(f"kills trial {index} ({at}, {where}): {seen['problems']}\n"
                              + box.debug(where.study))
    box.sh(f'rm -rf "{where.dest}/{name}" "{where.dest}"/shared/{name}-* '
           f'"{where.box}/done/{seen["id"]}"')
    return (Observed(DELIVERED, seconds=time.monotonic() - started, bytes=int(seen["bytes"]),
                     files=len(files)), at, hit)


def prepare(box: Box, where: Where = S1) -> None:
    """The destination's shared/ directory, as the service would have made it."""
    box.sh(f'install -d -o dittohead -g "$(stat -c %G {where.dest})" -m 2750 '
           f"{where.dest}/shared && rm -f {where.go}")


def mails_once(box: Box, study: str, name: str) -> list[str]:
    """Problems, if the sink did not get the entry's mail exactly once (waiting for the
    mailer that the successful run started)."""
    subject = f"Subject: [dittohead {study}] delivered {name} ("

    def count() -> int:
        return box.sh(f"journalctl -u {SINK} -o cat --no-pager", check=False).stdout.count(
            subject)
    mailer = f"dittohead-mail@{study}.service"
    try:
        wait_for(lambda: count() >= 1, 60, f"the mail about {name}")
    except AssertionError:
        return [f"no mail about {name}: {box.prop(mailer, 'Result')}"]
    box.wait_inactive(mailer)
    got = count()
    return [] if got == 1 else [f"the mail about {name} went out {got} times"]
