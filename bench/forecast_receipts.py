#!/usr/bin/env python3
"""Time the forecast's read of done/ (capacity.recent_deliveries) for many receipts.

Writes N receipts like the service does (indented JSON, names starting with the
claim's time) into a scratch directory under --dir, spread over a year or all in
the forecast's window, then times the read cold (page cache dropped, as root)
and warm (median of --runs). Usage: forecast_receipts.py [--count N ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dittohead import capacity  # noqa: E402

DAY = 86400.0


def write(folder: Path, count: int, span_days: float, now: float) -> None:
    for n in range(count):
        finished = now - (n % max(1, int(span_days))) * DAY - 120
        rid = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(finished - 60)) + f"-e{n}-a1b2c3"
        receipt = {"format": 1, "study": "s1", "entry": f"e{n}", "id": rid, "uploader": "u",
                   "uploader_uid": 1000, "inbox": "inbox", "outcome": "delivered",
                   "reason": None, "files": 12, "bytes": 10**9, "skipped": [],
                   "destination": "/study/s1", "started": "", "finished":
                   time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished))}
        (folder / f"{rid}.json").write_text(json.dumps(receipt, indent=2))


def timed(folder: Path, now: float, runs: int) -> tuple[float | None, float, int]:
    cold = None
    if os.geteuid() == 0:
        os.system("sync")
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        t = time.perf_counter()
        capacity.recent_deliveries(folder, now)
        cold = time.perf_counter() - t
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        found, _ = capacity.recent_deliveries(folder, now)
        times.append(time.perf_counter() - t)
    return cold, statistics.median(times), len(found)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, action="append", default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    now = time.time()
    print("receipts  spread           read  cold s  warm s")
    for count in args.count or [10_000]:
        for label, span in (("over a year", 365.0), ("in 14 days", 14.0)):
            folder = Path(tempfile.mkdtemp(prefix="dittohead-bench-", dir=args.dir))
            try:
                write(folder, count, span, now)
                cold, warm, found = timed(folder, now, args.runs)
                shown = f"{cold:6.3f}" if cold is not None else "     -"
                print(f"{count:8}  {label:15} {found:5}  {shown}  {warm:6.3f}")
            finally:
                shutil.rmtree(folder)


if __name__ == "__main__":
    main()
