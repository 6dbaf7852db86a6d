"""The kill campaign: SIGKILL of dittohead@s1.service at seeded moments on a booted systemd.

Each trial uploads one entry (files into a directory the destination has, each its own
rename, and a new directory), stops the run at a fault point (or waits a random delay),
kills it with `systemctl kill -s KILL`, lets the next run finish and checks the result.
"""

from __future__ import annotations

import json
import time
from random import Random

from ..boxes import ROOT, UPLOADER, Box
from ..conftest import wait_for
from . import DELIVERED, CampaignFailure, Observed, trial_rng

UNIT = "dittohead@s1.service"
GO = f"{ROOT}/dropbox/s1/.test-go"  # never made: a held run waits until killed
DEST = f"{ROOT}/study/s1"
BOX = f"{ROOT}/dropbox/s1"
# Every stage of a delivery (dittohead/faults.py), and plain delays between them.
POINTS = ("chowned", "taking:shared", "claimed", "checked", "staged:1", "staged:N", "synced",
          "published:1", "published:N", "verified", "receipt", "filed", "random")

# As the uploader: write the entry's files with seeded bytes, rename it; print digests.
UPLOAD_PY = r"""
import hashlib, json, os, random, sys
spec = json.load(sys.stdin)
rnd = random.Random(spec["seed"])
tmp = os.path.join(spec["inbox"], "." + spec["name"])
digests = {}
for rel, size in spec["files"].items():
    p = os.path.join(tmp, rel)
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


def entry_files(rnd: Random, name: str, point: str) -> dict[str, int]:
    """Files in the existing shared/ (one rename each) and in a new directory d1/."""
    files = {f"shared/{name}-{j:02d}.bin": rnd.randint(0, 256 << 10)
             for j in range(rnd.randint(3, 12))}
    files.update({f"{name}/d1/f{j}.bin": rnd.randint(1, 64 << 10) for j in range(3)})
    if point == "random":  # long enough that delays land in every stage
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


def main_pid(box: Box) -> int:
    return int(box.prop(UNIT, "MainPID") or 0)


def held(box: Box) -> bool:
    """A process of the run sleeps in faults.point's poll (clock_nanosleep, x86-64 syscall
    230): the run itself, or a walker it forked (the lockdown walks top directories in
    parallel, faults or not)."""
    if not main_pid(box):
        return False
    group = box.prop(UNIT, "ControlGroup")
    r = box.sh(f'for p in $(cat "/sys/fs/cgroup{group}/cgroup.procs"); do '
               'cut -d" " -f1 /proc/$p/syscall; done', check=False)
    return "230" in r.stdout.split()


def kill_trial(box: Box, index: int, point: str) -> tuple[Observed, str, bool]:
    """One trial; (what it observed, the concrete point, whether the kill hit a run)."""
    rnd = trial_rng("kills", index)
    name = f"k{index:04d}"
    files = entry_files(rnd, name, point)
    at = concrete(point, rnd, files)
    if at != "random":
        box.dropin(UNIT, "90-campaign",
                   f"[Service]\nEnvironment=DITTOHEAD_TEST_FAULT={at}=wait:{GO}\n")
    started = time.monotonic()
    try:
        spec = {"inbox": f"{BOX}/inbox", "name": name, "files": files, "seed": rnd.random()}
        up = box.box.run("/usr/bin/python3", "-c", UPLOAD_PY, user=UPLOADER,
                         input=json.dumps(spec).encode(), timeout=300)
        digests = up.stdout
        if at == "random":
            wait_for(lambda: main_pid(box) > 0, 60, "the service to start")
            time.sleep(rnd.uniform(0.0, 1.5))
        else:
            wait_for(lambda: held(box), 60, f"the run to stop at {at}")
    finally:
        box.dropin(UNIT, "90-campaign", None)  # before the kill: the next run runs clean
    since = box.now()
    box.box.run("systemctl", "kill", "-s", "KILL", UNIT, check=False)
    box.wait_inactive(UNIT)
    # From the journal: the path unit may have started the next run already.
    hit = any("status=9/KILL" in str(e.get("MESSAGE"))
              for e in box.journal("-u", UNIT, f"--since=@{since}"))
    box.box.run("systemctl", "start", UNIT, check=False, timeout=600)
    box.wait_inactive(UNIT, timeout=600)
    r = box.box.run("/usr/bin/python3", "-c", CHECK_PY, name, DEST, BOX,
                    input=digests.encode(), check=False)
    seen = json.loads(r.stdout or '{"problems": ["' + r.stderr[-300:] + '"]}')
    if seen["problems"]:
        raise CampaignFailure(f"kills trial {index} ({at}): {seen['problems']}\n"
                              + box.debug("s1"))
    box.sh(f'rm -rf "{DEST}/{name}" "{DEST}"/shared/{name}-* "{BOX}/done/{seen["id"]}"')
    return (Observed(DELIVERED, seconds=time.monotonic() - started, bytes=int(seen["bytes"]),
                     files=len(files)), at, hit)


def prepare(box: Box) -> None:
    """The destination's shared/ directory, as the service would have made it."""
    box.sh(f"install -d -o dittohead -g sbxs1 -m 2750 {DEST}/shared && rm -f {GO}")
