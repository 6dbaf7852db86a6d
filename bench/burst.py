"""A burst of uploads on a booted systemd: drained, with no unit failure.

Boots a throwaway systemd (tests/sysbox.py, needs root), `make install`s this
checkout in it (tests/boxes.py), and adds two studies: `burst0` with
quiet_period 0 and `burst2` with a small one (--quiet, 2 s). For each, one
non-root uploader drops --entries entries (default 1,000) of --files small
files each, as fast as one process can, the way users must: build `.name`,
rename it to `name` (--interval: a pause after each rename, for uploads
arriving one after another). Then it measures and checks:

- drain time: from the first rename until every entry has its receipt in
  done/ and nothing is left in inbox/ or processing/ (polled every POLL s),
  and each entry's latency from its rename to its `delivered` journal event;
- service starts (PID 1's "starting" journal entries) and delivery runs;
- no unit failed: `systemctl --failed` is empty, the path unit's Result is
  `success` (it never hit its trigger limit or the service's start limit),
  no `dittohead-notify@` report, no retry-later or failed entry;
- every entry delivered exactly once, and every manifest verifies with
  `sha256sum -c` in the destination and in done/<id>/, with the digests the
  uploader computed of what it wrote.

The box's dropbox and destinations are on a tmpfs, where syncs cost nothing:
the drain times are a floor; the point is how the units behave under a burst.

Usage: sudo .venv/bin/python bench/burst.py [--entries N] [--files N] [--quiet S]
       [--interval S] [--json PATH]      (or `make burst`; exits 77 where no box can boot)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dittohead.log import MESSAGE_IDS  # noqa: E402
from tests import sysbox  # noqa: E402
from tests.boxes import CONFIG, ROOT, UPLOADER, Box, boot_installed  # noqa: E402

POLL = 0.5  # seconds between looks at done/ while the burst drains
DRAIN_TIMEOUT = 900.0
UNIT_STARTING = "7d4958e842da4a758f6c1cdc7b36dcc5"  # PID 1: a unit's job started
NOTIFY_ID = "d49d0a088dd54a0286ba26b8f857ba0b"  # units/dittohead-notify-failure

# Runs in the box as the uploader: build .NAME (files in NAME/ and NAME/sub/ inside it,
# so that entries never collide in the destination), rename it, next.
UPLOAD_PY = r"""
import hashlib, json, os, sys, time
inbox, prefix, n, files = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
interval = float(sys.argv[5])
os.umask(0o022)
digests, renamed = {}, {}
for i in range(n):
    name = f"{prefix}-{i:04d}"
    tmp = os.path.join(inbox, "." + name)
    os.makedirs(os.path.join(tmp, name, "sub"))
    for k in range(files):
        rel = f"{name}/f{k}.dat" if k % 2 == 0 else f"{name}/sub/f{k}.dat"
        data = os.urandom(1000 + 37 * i % 3000 + k)
        with open(os.path.join(tmp, rel), "wb") as f:
            f.write(data)
        digests[rel] = hashlib.sha256(data).hexdigest()
    renamed[name] = time.time()
    os.rename(tmp, os.path.join(inbox, name))
    if interval:
        time.sleep(interval)
print(json.dumps({"renamed": renamed, "digests": digests}))
"""

# Runs in the box as root: non-dot names in each directory of a study.
STATE_PY = r"""
import json, os, sys
out = {}
for d in ("inbox", "processing", "done", "failed"):
    names = [n for n in os.listdir(os.path.join(sys.argv[1], d)) if not n.startswith(".")]
    out[d] = sum(n.endswith(".json") for n in names) if d in ("done", "failed") else len(names)
print(json.dumps(out))
"""

# Runs in the box as root: each receipt in done/ and failed/, with its manifest's text.
RECEIPTS_PY = r"""
import json, os, sys
out = []
for kind in ("done", "failed"):
    d = os.path.join(sys.argv[1], kind)
    for n in sorted(os.listdir(d)):
        if n.endswith(".json") and not n.startswith("."):
            r = json.load(open(os.path.join(d, n)))
            m = os.path.join(d, r["id"] + ".sha256")
            r["manifest"] = open(m).read() if os.path.exists(m) else None
            out.append(r)
print(json.dumps(out))
"""

# Runs in the box as root: sha256sum -c of every manifest, in the destination and in
# done/<id>/ (the entry as its uploader left it); prints what did not verify.
VERIFY_SH = r"""
study=$1 dest=$2 n=0
for m in "$study"/done/*.sha256; do
    id=$(basename "$m" .sha256)
    (cd "$dest" && sha256sum --quiet --strict -c "$m") >/dev/null 2>&1 || echo "DEST $id"
    (cd "$study/done/$id" && sha256sum --quiet --strict -c "$m") >/dev/null 2>&1 \
        || echo "DONE $id"
    n=$((n + 1))
done
echo "CHECKED $n"
"""


@dataclass(frozen=True)
class Result:
    """What one study's burst did and whether it held."""

    study: str
    quiet_period: float
    entries: int
    files_per_entry: int
    interval_s: float  # the uploader's pause after each rename
    upload_s: float  # first rename to last
    drain_s: float  # first rename until all filed, inbox and processing empty
    idle_s: float  # first rename until the service was inactive again
    latency_median_s: float
    latency_p90_s: float
    latency_max_s: float
    service_starts: int
    delivery_runs: int
    journal_lines: int  # what the delivery service logged (journald limits it per unit)
    problems: tuple[str, ...]


def setup(box: Box, quiet: dict[str, float]) -> None:
    """Add the burst studies to the box's config, set them up, start watching."""
    extra = "".join(f"  {s}:\n    destination: {ROOT}/study/{s}\n    quiet_period: {q:g}\n"
                    for s, q in quiet.items())
    box.box.write_file("/etc/dittohead/config.yaml", CONFIG + extra)
    for s in quiet:
        box.sh(f"dittohead setup {s} >/dev/null")
    box.sh("systemctl daemon-reload && systemctl enable --now "
           + " ".join(f"dittohead@{s}.path dittohead@{s}.timer" for s in quiet))
    for s in quiet:  # the timer's first sweep runs at once: let it end
        box.wait_inactive(f"dittohead@{s}.service")
        box.wait_path_waiting(s)


def state(box: Box, study: str) -> dict[str, int]:
    r = box.box.run("/usr/bin/python3", "-c", STATE_PY, f"{ROOT}/dropbox/{study}")
    got: dict[str, int] = json.loads(r.stdout)
    return got


def drain_time(box: Box, study: str, entries: int, t0: float) -> float:
    """Seconds from t0 until every entry is filed and inbox and processing are empty."""
    while True:
        s = state(box, study)
        now = time.time()
        if s["done"] + s["failed"] >= entries and s["inbox"] == s["processing"] == 0:
            return now - t0
        if now - t0 > DRAIN_TIMEOUT:
            raise SystemExit(f"{study}: not drained after {DRAIN_TIMEOUT:.0f} s: {s}\n"
                             + debug(box, study))
        time.sleep(POLL)


def debug(box: Box, study: str) -> str:
    return box.sh(f"systemctl --failed --no-pager; systemctl status --no-pager "
                  f"'dittohead@{study}.*'; journalctl -n 60 --no-pager -o short-precise",
                  check=False, timeout=60).stdout


def events_since(box: Box, since: float, *matches: str) -> list[dict[str, Any]]:
    return box.journal(f"--since=@{since:.6f}", *matches)


def burst(box: Box, study: str, quiet: float, entries: int, files: int,
          interval: float) -> Result:
    """Upload the burst, wait for it to drain, and check what the units and files say."""
    since = time.time()
    r = box.box.run("/usr/bin/python3", "-c", UPLOAD_PY, f"{ROOT}/dropbox/{study}/inbox",
                    "e", str(entries), str(files), str(interval), user=UPLOADER,
                    timeout=DRAIN_TIMEOUT)
    up = json.loads(r.stdout)
    renamed: dict[str, float] = up["renamed"]
    t0 = min(renamed.values())
    drain = drain_time(box, study, entries, t0)
    box.wait_inactive(f"dittohead@{study}.service", timeout=120)
    idle = time.time() - t0
    delivered = events_since(box, since, f"MESSAGE_ID={MESSAGE_IDS['delivered']}",
                              f"DITTOHEAD_STUDY={study}")
    latencies = sorted(int(e["__REALTIME_TIMESTAMP"]) / 1e6 - renamed[e["DITTOHEAD_ENTRY"]]
                       for e in delivered if e.get("DITTOHEAD_ENTRY") in renamed)
    if not latencies:
        latencies = [float("nan")]
    starts = events_since(box, since, f"MESSAGE_ID={UNIT_STARTING}",
                          f"UNIT=dittohead@{study}.service")
    lines = box.sh(f"journalctl _SYSTEMD_UNIT=dittohead@{study}.service --since=@{since:.6f} "
                   "-o cat --no-pager | wc -l").stdout
    problems = check_units(box, study, since) + check_files(box, study, renamed, up["digests"])
    if len(delivered) != entries:  # the journal is the audit log: one event per delivery
        problems.append(f"the journal holds {len(delivered)} delivered events "
                        f"for {entries} entries")
    return Result(study=study, quiet_period=quiet, entries=entries, files_per_entry=files,
                  interval_s=interval,
                  upload_s=round(max(renamed.values()) - t0, 3), drain_s=round(drain, 3),
                  idle_s=round(idle, 3),
                  latency_median_s=round(statistics.median(latencies), 3),
                  latency_p90_s=round(latencies[int(0.9 * (len(latencies) - 1))], 3),
                  latency_max_s=round(latencies[-1], 3), service_starts=len(starts),
                  delivery_runs=len({e["_SYSTEMD_INVOCATION_ID"] for e in delivered}),
                  journal_lines=int(lines),
                  problems=tuple(problems))


def check_units(box: Box, study: str, since: float) -> list[str]:
    """Every way a unit can have failed during the burst, as problems."""
    problems = []
    failed = box.box.run("systemctl", "--failed", "--plain", "--no-legend").stdout.strip()
    if failed:
        problems.append(f"failed units: {failed}")
    for unit in (f"dittohead@{study}.path", f"dittohead@{study}.service"):
        if (res := box.prop(unit, "Result")) != "success":
            problems.append(f"{unit}: Result={res}")
    if (sub := box.prop(f"dittohead@{study}.path", "SubState")) != "waiting":
        problems.append(f"dittohead@{study}.path is {sub}, not waiting")
    path_log = box.sh(f"journalctl -u dittohead@{study}.path -u dittohead@{study}.service "
                      f"--since=@{since:.6f} -o cat --no-pager").stdout
    limits = [ln for ln in path_log.splitlines() if "limit" in ln.lower()]
    if limits:
        problems.append(f"start/trigger limit in the journal: {limits[:3]}")
    dropped = box.sh(f"journalctl -u systemd-journald --since=@{since:.6f} -o cat --no-pager "
                     "| grep -i suppressed", check=False).stdout.strip()
    if dropped:
        problems.append(f"journald dropped messages: {dropped.splitlines()[:2]}")
    for what, mid in (("notify-failure", NOTIFY_ID), ("retry-later", MESSAGE_IDS["retry-later"]),
                      ("failed", MESSAGE_IDS["failed"]), ("rejected", MESSAGE_IDS["rejected"])):
        events = events_since(box, since, f"MESSAGE_ID={mid}")
        if events:
            problems.append(f"{len(events)} {what} event(s), first: {events[0].get('MESSAGE')}")
    return problems


def check_files(box: Box, study: str, renamed: dict[str, float],
                digests: dict[str, str]) -> list[str]:
    """Each entry delivered once, manifests verify and hold the uploader's digests."""
    problems = []
    s = state(box, study)
    if s["inbox"] or s["processing"] or s["failed"]:
        problems.append(f"left behind: {s}")
    receipts = json.loads(box.box.run("/usr/bin/python3", "-c", RECEIPTS_PY,
                                      f"{ROOT}/dropbox/{study}").stdout)
    by_entry: dict[str, list[dict[str, Any]]] = {}
    for rc in receipts:
        by_entry.setdefault(rc["entry"], []).append(rc)
    wrong = [n for n in renamed if [rc["outcome"] for rc in by_entry.get(n, [])] != ["delivered"]]
    if wrong or len(receipts) != len(renamed):
        problems.append(f"{len(wrong)} entries not delivered exactly once (e.g. {wrong[:3]}); "
                        f"{len(receipts)} receipts for {len(renamed)} entries")
    listed: dict[str, str] = {}
    for rc in receipts:
        for line in (rc["manifest"] or "").splitlines():
            digest, path = line.split("  ", 1)
            listed[path] = digest
    if listed != digests:
        differ = sorted(set(listed.items()) ^ set(digests.items()))
        problems.append(f"manifests differ from what was uploaded in {len(differ)} line(s), "
                        f"e.g. {differ[:2]}")
    out = box.sh(VERIFY_SH, f"{ROOT}/dropbox/{study}", f"{ROOT}/study/{study}",
                 timeout=600).stdout.split("\n")
    bad = [ln for ln in out if ln and not ln.startswith("CHECKED ")]
    if bad or f"CHECKED {len(renamed)}" not in out:
        problems.append(f"sha256sum -c failed: {bad[:5]} ({out[-2:]})")
    return problems


def report(results: list[Result]) -> None:
    for r in results:
        print(f"{r.study} (quiet_period {r.quiet_period:g} s): {r.entries} entries x "
              f"{r.files_per_entry} files, renamed in {r.upload_s:.1f} s by one uploader")
        print(f"  drained in {r.drain_s:.1f} s ({r.entries / r.drain_s:.0f} entries/s; service "
              f"inactive after {r.idle_s:.1f} s); rename -> delivered: median "
              f"{r.latency_median_s:.2f} s, p90 {r.latency_p90_s:.2f} s, "
              f"max {r.latency_max_s:.2f} s")
        print(f"  {r.service_starts} service start(s), {r.delivery_runs} delivering run(s); "
              f"the service logged {r.journal_lines} journal lines")
        if r.problems:
            for p in r.problems:
                print(f"  PROBLEM: {p}")
        else:
            print("  no unit failed, no limit hit, nothing left in inbox/ or processing/, "
                  "each entry delivered once, every manifest verifies (destination, done/)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--entries", type=int, default=1000)
    p.add_argument("--files", type=int, default=3, help="small files per entry")
    p.add_argument("--quiet", type=float, default=2.0, help="quiet_period of the 2nd study")
    p.add_argument("--interval", type=float, default=0.0,
                   help="seconds between two renames (default: none, as fast as possible)")
    p.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "burst.json")
    args = p.parse_args()
    reason = sysbox.available()
    if reason is not None:
        print(f"bench/burst.py: cannot boot a throwaway systemd here: {reason}", file=sys.stderr)
        return 77
    quiet = {"burst0": 0.0, "burst2": args.quiet}
    with tempfile.TemporaryDirectory(prefix="dittohead-burst-", dir="/var/tmp") as d:
        box = boot_installed(Path(d) / "box")
        try:
            setup(box, quiet)
            results = [burst(box, s, q, args.entries, args.files, args.interval)
                       for s, q in quiet.items()]
        finally:
            box.box.poweroff()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    report(results)
    print(f"(written to {args.json})")
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
