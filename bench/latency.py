"""Latency from the rename into the inbox to the `delivered` journal entry.

Boots a throwaway systemd (tests/sysbox.py, needs root), `make install`s this
checkout in it, sets up the test studies of tests/boxes.py, and uploads
one small file at a time as a non-root user, the way users must (write
`.name`, rename to `name`). Each latency is the journal's receive time of the
entry's `delivered` event minus the time just before the rename, both read
from the same clock.

Two cases, 20 samples each (--samples):
- cold: the service is stopped, so the path unit has to start it (sandbox
  set-up, Python start-up, config load): what a user uploading now and then
  sees (target: under 0.5 s, ideally 0.3 s).
- warm: the entry arrives while a run is still lingering (`--linger 3`), so
  the running service picks it up on its next look at the inbox.

Usage: sudo .venv/bin/python bench/latency.py [--samples N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dittohead.log import MESSAGE_IDS  # noqa: E402
from tests import sysbox  # noqa: E402
from tests.boxes import ROOT, UPLOADER, Box, boot_installed  # noqa: E402

DELIVERED = MESSAGE_IDS["delivered"]

# Runs in the box as the uploader: print the time, rename at once.
RENAME_PY = r"""
import os, sys, time
inbox, name = sys.argv[1], sys.argv[2]
with open(os.path.join(inbox, "." + name), "wb") as f:
    f.write(b"one small file\n")
    f.flush()
    os.fsync(f.fileno())
t = time.time()
os.rename(os.path.join(inbox, "." + name), os.path.join(inbox, name))
print(repr(t))
"""


def delivered_at(box: Box, name: str, timeout: float = 30) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = box.journal(f"MESSAGE_ID={DELIVERED}", f"DITTOHEAD_ENTRY={name}")
        if events:
            return int(events[0]["__REALTIME_TIMESTAMP"]) / 1e6
        time.sleep(0.02)
    raise SystemExit(f"{name} was not delivered within {timeout:.0f}s:\n{box.debug('s1')}")


def upload_one(box: Box, name: str) -> float:
    r = box.box.run("/usr/bin/python3", "-c", RENAME_PY, f"{ROOT}/dropbox/s1/inbox", name,
                    user=UPLOADER)
    return float(r.stdout)


def cold(box: Box, n: int) -> list[float]:
    out = []
    for i in range(n):
        box.wait_inactive("dittohead@s1.service")
        box.wait_path_waiting("s1")
        time.sleep(0.2)
        name = f"cold-{i:02d}-{time.time_ns()}"
        t0 = upload_one(box, name)
        out.append(delivered_at(box, name) - t0)
    return out


def warm(box: Box, n: int) -> list[float]:
    out = []
    for i in range(n):
        name = f"warm-{i:02d}-{time.time_ns()}"
        t0 = upload_one(box, name)
        out.append(delivered_at(box, name) - t0)
        time.sleep(0.5)  # within the 3 s linger: the same run stays up
    return out


def summary(samples: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(samples), 3),
            "min": round(min(samples), 3), "max": round(max(samples), 3),
            "p90": round(sorted(samples)[int(0.9 * (len(samples) - 1))], 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "latency.json")
    args = p.parse_args()
    reason = sysbox.available()
    if reason is not None:
        print(f"bench/latency.py: cannot boot a throwaway systemd here: {reason}",
              file=sys.stderr)
        return 77
    with tempfile.TemporaryDirectory(prefix="dittohead-latency-", dir="/var/tmp") as d:
        box = boot_installed(Path(d) / "box")
        try:
            result = {"cold": cold(box, args.samples), "warm": warm(box, args.samples)}
        finally:
            box.box.poweroff()
    report = {case: {**summary(s), "n": len(s), "samples": [round(x, 3) for x in s]}
              for case, s in result.items()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    for case, r in report.items():
        print(f"{case}: median {r['median']:.3f} s (min {r['min']:.3f}, p90 {r['p90']:.3f}, "
              f"max {r['max']:.3f}) over {r['n']} uploads, rename -> delivered")
    print(f"(written to {args.json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
