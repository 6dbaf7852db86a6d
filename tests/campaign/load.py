"""The load campaign: many studies at once, and one big burst, on a booted systemd.

One box with the checkout installed holds every study of the campaign, set up as an admin
would (a group and a destination each, one config, one `systemctl daemon-reload`, the path
and timer units enabled). A burst is built by one uploader as dot names in every inbox of
the case, then renamed as fast as one process can, the studies interleaved; the campaign
waits until every entry is filed and checks the units, the receipts, the manifests and
the files. Entries are 3 small files (1-64 KiB): the load is on the per-entry and
per-study machinery (path units, claim, lockdown, locks, generator, mail queue), not bytes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from dittohead.log import MESSAGE_IDS

from ..boxes import CONFIG, ROOT, SMTP_PORT, UPLOADER, Box
from ..conftest import wait_for
from . import DELIVERED, FAILED, KEPT, OTHER, CampaignFailure, Observed

MAIL_EVERY = 10  # every 10th study of a case mails its contact: the mail units run too
UNIT_STARTING = "7d4958e842da4a758f6c1cdc7b36dcc5"  # PID 1: a unit's job started
METRICS = "/var/lib/prometheus/node-exporter"  # every run's end refreshes the metrics
LATE = 60.0  # s: an entry of a trickle delivered later was swept up by its timer
POLL = 1.0  # seconds between looks at the studies while a burst drains


@dataclass(frozen=True)
class Load:
    """One case: `studies` studies named PREFIX00.., each given `entries` entries at once."""

    name: str
    does: str
    prefix: str
    studies: int
    entries: int
    gap: float = 0.0  # >0: each study's entries come one by one, 0 to `gap` s apart
    admin: str = ""  # a shell script run as root in the box as the burst starts to drain

    def entry(self, i: int) -> str:
        return f"{self.name}-{i:04d}"

    def names(self) -> list[str]:
        return [f"{self.prefix}{i:02d}" for i in range(self.studies)]

    def mailed(self) -> list[str]:
        return self.names()[::MAIL_EVERY]


@dataclass(frozen=True)
class Figures:
    """What one burst measured."""

    wall_s: float  # the first rename to the last `delivered` event
    upload_s: float  # the first rename to the last
    peak_rss_kib: int  # the largest DITTOHEAD_MAXRSS_KIB of the burst's events
    starts: dict[str, int]  # unit starts during the burst: delivery, mail, metrics
    entries: int

    def note(self) -> str:
        rate = self.entries / self.wall_s if self.wall_s else 0.0
        return (f"{self.wall_s:.1f} s from the first rename to the last delivery "
                f"({rate:.1f} entries/s; renames took {self.upload_s:.1f} s), "
                f"units started: {self.starts['delivery']} delivery runs, "
                f"{self.starts['mail']} mail, {self.starts['metrics']} metrics; "
                f"peak memory of a run "
                f"{self.peak_rss_kib / 1024:.0f} MiB (the largest DITTOHEAD_MAXRSS_KIB)")


def study_config(studies: list[str], mailed: set[str]) -> str:
    """The config lines of the studies (appended to the box's `studies:`)."""
    return "".join(
        f"  {s}:\n    destination: {ROOT}/study/{s}\n    group: {s}\n"
        + ("    notify:\n      to: [pi@example.edu]\n" if s in mailed else "")
        for s in studies)


def add_studies(box: Box, loads: list[Load]) -> None:
    """Set every case's studies up as an admin would, and start watching them."""
    studies = list(dict.fromkeys(s for ld in loads for s in ld.names()))  # cases may share
    mailed = {s for ld in loads for s in ld.mailed()}
    box.box.write_file("/etc/dittohead/config.yaml", f"metrics_dir: {METRICS}\n" + CONFIG
                       + study_config(studies, mailed))
    names = " ".join(studies)
    box.sh(f"""set -e
install -d -o dittohead -g dittohead -m 0755 {METRICS}
for s in {names}; do groupadd "$s"; dittohead setup "$s" >/dev/null; done
systemctl daemon-reload
for s in {names}; do echo "dittohead@$s.path dittohead@$s.timer"; done \
    | xargs systemctl enable --now
systemctl is-active -q sbx-smtp || systemd-run -q --unit=sbx-smtp \
    -p Environment=PYTHONWARNINGS=ignore /usr/bin/python3 -u -m smtpd -n -c \
    DebuggingServer 127.0.0.1:{SMTP_PORT}
""", timeout=600)
    for s in studies:
        box.wait_path_waiting(s)
    probe = f"import socket; socket.create_connection(('127.0.0.1', {SMTP_PORT}))"
    wait_for(lambda: box.box.run("/usr/bin/python3", "-c", probe,
                                 check=False).returncode == 0, 30, "the SMTP sink")


# As the uploader: build every entry as a dot name in every study's inbox, then rename
# them all, the studies interleaved (with a gap: each study's one by one, at seeded
# moments); print when each was renamed and the digests.
UPLOAD_PY = r"""
import hashlib, json, os, random, sys, time
spec = json.load(sys.stdin)
rnd = random.Random(spec["seed"])
os.umask(0o022)
digests = {s: {} for s in spec["studies"]}
schedule = []
for s in spec["studies"]:
    at = 0.0
    for i, name in enumerate(spec["entries"]):
        at += rnd.uniform(0, spec["gap"])
        schedule.append((at, i, s, name))
        tmp = os.path.join(spec["root"], s, "inbox", "." + name)
        os.makedirs(os.path.join(tmp, name, "sub"))
        for rel in (f"{name}/f0.dat", f"{name}/sub/f1.dat", f"{name}/f2.dat"):
            data = rnd.randbytes(rnd.randint(1 << 10, 64 << 10))
            with open(os.path.join(tmp, rel), "wb") as f:
                f.write(data)
            digests[s][rel] = hashlib.sha256(data).hexdigest()
renamed = {s: {} for s in spec["studies"]}
start = time.monotonic()
for at, _, s, name in sorted(schedule, key=lambda x: x[:2]):
    time.sleep(max(0.0, start + at - time.monotonic()))
    inbox = os.path.join(spec["root"], s, "inbox")
    os.rename(os.path.join(inbox, "." + name), os.path.join(inbox, name))
    renamed[s][name] = time.time()
print(json.dumps({"renamed": renamed, "digests": digests}))
"""

# As root: how many entries of the studies are filed, left, and mails still queued.
STATE_PY = r"""
import glob, json, os, sys
root, studies = sys.argv[1], sys.argv[2:]
out = {"filed": 0, "left": 0, "mails": 0}
for s in studies:
    for d in ("inbox", "processing", "done", "failed"):
        names = [n for n in os.listdir(os.path.join(root, s, d)) if not n.startswith(".")]
        if d in ("done", "failed"):
            out["filed"] += sum(n.endswith(".json") for n in names)
        else:
            out["left"] += len(names)
    out["mails"] += len(glob.glob(os.path.join(root, s, "processing", ".mail", "*.eml")))
print(json.dumps(out))
"""

# As root: the receipts of each entry of the case (entry names start with the case's
# name), their manifests against the uploader's digests and `sha256sum -c` in the
# destination, and anything left over, per study.
CHECK_PY = r"""
import glob, json, os, subprocess, sys
root, dest, case = sys.argv[1], sys.argv[2], sys.argv[3] + "-"
digests = json.load(sys.stdin)
out = {}
for s, want in digests.items():
    box, problems, kinds, listed, nbytes = os.path.join(root, s), [], {}, {}, 0
    manifests = []
    for kind in ("done", "failed"):
        for p in sorted(glob.glob(os.path.join(box, kind, "*.json"))):
            r = json.load(open(p))
            if not r["entry"].startswith(case):
                continue
            kinds.setdefault(r["entry"], []).append(kind)
            nbytes += r["bytes"]
            m = os.path.join(box, kind, r["id"] + ".sha256")
            manifests += [m] if kind == "done" else []
            for line in (open(m).read().splitlines() if os.path.exists(m) else []):
                digest, path = line.split("  ", 1)
                listed[path] = digest
    if listed != want:
        differ = sorted(set(listed.items()) ^ set(want.items()))
        problems.append(f"manifests differ from the upload in {len(differ)}: {differ[:2]}")
    c = subprocess.run(["sha256sum", "--quiet", "--strict", "-c", *manifests],
                       cwd=os.path.join(dest, s), capture_output=True, text=True)
    if c.returncode or not manifests:
        problems.append(f"sha256sum -c: {(c.stdout + c.stderr)[:300]}")
    left = [f"{d}/{n}" for d in ("inbox", "processing")
            for n in os.listdir(os.path.join(box, d)) if not n.startswith(".")]
    left += glob.glob(os.path.join(box, "processing", ".mail", "*.eml"))
    left += glob.glob(os.path.join(dest, s, ".incoming-*"))
    if left:
        problems.append(f"left over: {left[:5]}")
    out[s] = {"kinds": kinds, "problems": problems, "bytes": nbytes}
print(json.dumps(out))
"""


def state(box: Box, load: Load) -> dict[str, int]:
    r = box.box.run("/usr/bin/python3", "-c", STATE_PY, f"{ROOT}/dropbox", *load.names())
    got: dict[str, int] = json.loads(r.stdout)
    return got


def drain(box: Box, load: Load, t0: float, want: int, timeout: float) -> None:
    """Wait until `want` entries are filed, nothing is left and the mail is sent."""
    while True:
        s = state(box, load)
        if s["filed"] >= want and s["left"] == s["mails"] == 0:
            return
        if time.time() - t0 > timeout:
            raise CampaignFailure(f"{load.name}: not drained after {timeout:.0f} s: {s}\n"
                                  + box.debug(load.names()[0]))
        time.sleep(POLL)


def burst(box: Box, load: Load, seed: float, timeout: float) -> tuple[
        dict[str, dict[str, float]], dict[str, dict[str, str]], float]:
    """Upload the case's burst and wait until it drained and every run ended: when each
    entry was renamed, the digests and the first rename."""
    spec = {"root": f"{ROOT}/dropbox", "studies": load.names(), "seed": seed, "gap": load.gap,
            "entries": [load.entry(i) for i in range(load.entries)]}
    want = state(box, load)["filed"] + load.studies * load.entries  # earlier cases' too
    up = json.loads(box.box.run("/usr/bin/python3", "-c", UPLOAD_PY, user=UPLOADER,
                                input=json.dumps(spec).encode(), timeout=timeout).stdout)
    t0 = min(t for times in up["renamed"].values() for t in times.values())
    if load.admin:
        box.box.run("systemd-run", "-q", f"--unit=sbx-admin-{load.name}", "/bin/sh", "-c",
                    load.admin)
    drain(box, load, t0, want, timeout)
    if load.admin:
        box.wait_inactive(f"sbx-admin-{load.name}.service", timeout=timeout)
    for s in load.names():
        box.wait_inactive(f"dittohead@{s}.service", timeout=120)
    drain(box, load, t0, want, timeout)  # the last runs' mail was queued as they ended
    for s in load.mailed():
        box.wait_inactive(f"dittohead-mail@{s}.service", timeout=120)
    return up["renamed"], up["digests"], t0


def unit_problems(box: Box, load: Load, since: float) -> list[str]:
    """Every way a unit can have failed during the burst."""
    problems = []
    failed = box.box.run("systemctl", "--failed", "--plain", "--no-legend").stdout.strip()
    if failed:
        problems.append(f"failed units: {failed[:500]}")
    units = [f"dittohead@{s}.{k}" for s in load.names() for k in ("path", "service")]
    units += [f"dittohead-mail@{s}.service" for s in load.mailed()]
    shown = box.box.run("systemctl", "show", "-p", "Id,Result,SubState", *units).stdout
    for block in shown.strip().split("\n\n"):
        p = dict(line.split("=", 1) for line in block.splitlines())
        if p["Result"] != "success" or (p["Id"].endswith(".path") and p["SubState"]
                                        != "waiting"):
            problems.append(f"{p['Id']}: Result={p['Result']}, {p['SubState']}")
    log = box.sh(f"journalctl --since=@{since:.6f} -o cat --no-pager -u 'dittohead*' "
                 "| grep -i limit; journalctl -u systemd-journald -o cat --no-pager "
                 f"--since=@{since:.6f} | grep -i suppressed", check=False).stdout.strip()
    if log:
        problems.append(f"limits hit or messages dropped: {log.splitlines()[:3]}")
    for kind in ("unit-failed", "retry-later", "failed", "rejected"):
        if events := box.journal(f"--since=@{since:.6f}", f"MESSAGE_ID={MESSAGE_IDS[kind]}"):
            problems.append(f"{len(events)} {kind} event(s): {events[0].get('MESSAGE')}")
    return problems


def outcome(kinds: list[str], delivered_events: int) -> str:
    """One entry's outcome from its receipts and its `delivered` journal events."""
    if kinds == ["done"] and delivered_events == 1:
        return DELIVERED
    if not kinds:
        return KEPT
    return FAILED if kinds == ["failed"] else OTHER


@dataclass(frozen=True)
class Result:
    """A case's burst: each entry's observed outcome, the figures, what went wrong."""

    seen: tuple[Observed, ...]
    figures: Figures
    nbytes: int
    problems: tuple[str, ...]


def delivered_events(box: Box, load: Load, since: float) -> list[dict[str, Any]]:
    names = set(load.names())
    return [e for e in box.journal(
        f"--since=@{since:.6f}", f"MESSAGE_ID={MESSAGE_IDS['delivered']}",
        "--output-fields=DITTOHEAD_STUDY,DITTOHEAD_ENTRY,DITTOHEAD_MAXRSS_KIB")
        if e.get("DITTOHEAD_STUDY") in names
        and str(e.get("DITTOHEAD_ENTRY")).startswith(load.name + "-")]


def unit_starts(box: Box, load: Load, since: float) -> dict[str, int]:
    """How many times PID 1 started the case's units, by kind."""
    kinds = {f"dittohead@{s}.service": "delivery" for s in load.names()}
    kinds.update({f"dittohead-mail@{s}.service": "mail" for s in load.mailed()})
    kinds["dittohead-metrics.service"] = "metrics"
    counts = dict.fromkeys(("delivery", "mail", "metrics"), 0)
    for e in box.journal(f"--since=@{since:.6f}", f"MESSAGE_ID={UNIT_STARTING}",
                         "--output-fields=UNIT"):
        if (kind := kinds.get(str(e.get("UNIT")))) is not None:
            counts[kind] += 1
    return counts


def run_load(box: Box, load: Load, seed: float, timeout: float) -> Result:
    """One burst of the case, drained and checked."""
    since = time.time()
    renamed, digests, t0 = burst(box, load, seed, timeout)
    events = delivered_events(box, load, since)
    at: dict[tuple[str, str], list[float]] = {}
    for e in events:
        at.setdefault((e["DITTOHEAD_STUDY"], e["DITTOHEAD_ENTRY"]), []).append(
            int(e["__REALTIME_TIMESTAMP"]) / 1e6)
    r = box.box.run("/usr/bin/python3", "-c", CHECK_PY, f"{ROOT}/dropbox", f"{ROOT}/study",
                    load.name, input=json.dumps(digests).encode(), timeout=1800)
    checked: dict[str, Any] = json.loads(r.stdout)
    seen = []
    problems = [f"{s}: {p}" for s, c in checked.items() for p in c["problems"]]
    for s, names in renamed.items():
        for name, t in names.items():
            times = at.get((s, name), [])
            seen.append(Observed(outcome(checked[s]["kinds"].get(name, []), len(times)),
                                 seconds=min(times) - t if times else 0.0, files=3))
            if load.gap and seen[-1].seconds > LATE:
                problems.append(f"{s}: {name} delivered {seen[-1].seconds:.0f} s after its "
                                "rename: its path unit missed it (a timer's sweep took it)")
    problems += unit_problems(box, load, since)
    if len(events) != load.studies * load.entries:
        problems.append(f"{len(events)} delivered events for "
                        f"{load.studies * load.entries} entries")
    last = max((t for ts in at.values() for t in ts), default=t0)
    figures = Figures(wall_s=last - t0,
                      upload_s=max(t for n in renamed.values() for t in n.values()) - t0,
                      peak_rss_kib=max((int(e.get("DITTOHEAD_MAXRSS_KIB", 0)) for e in events),
                                       default=0),
                      starts=unit_starts(box, load, since),
                      entries=load.studies * load.entries)
    return Result(tuple(seen), figures, sum(c["bytes"] for c in checked.values()),
                  tuple(problems))
