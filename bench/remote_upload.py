"""Time `dittohead upload --host` against plain `rsync -a` over ssh to the same server.

    python3 bench/remote_upload.py --host USER@HOST [--ssh-config FILE] --study S \\
        --inbox /abs/server/path/of/S/inbox --scratch /abs/server/dir/for/rsync \\
        [--data DIR] [--runs 3]

DIR (default: a fresh directory in /dev/shm, a tmpfs) gets the cases: `big` (one
1 GiB file) and `small` (20,000 files of 4 KiB in 100 directories). The account
must have a shell (the rsync way; without --wait, so no service is needed). Each
run is followed by `ssh HOST rm -rf` of what it made, inside the timing for both
tools alike; runs alternate dittohead, rsync, dittohead... Put the inbox and
the scratch directory on a filesystem of limited size (a tmpfs) on the server.
Prints each run and the median ratio; the target is at most 1.1.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_cases(data: Path) -> dict[str, Path]:
    big, small = data / "big", data / "small"
    if not big.exists():
        with open(big, "wb") as f:
            for _ in range(1024):
                f.write(os.urandom(1 << 20))
    if not small.exists():
        for d in range(100):
            (small / f"d{d:03}").mkdir(parents=True)
            for i in range(200):
                (small / f"d{d:03}" / f"f{i:03}").write_bytes(os.urandom(4096))
    return {"big": big, "small": small}


def timed(argv: list[str]) -> float:
    t = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", required=True)
    p.add_argument("--ssh-config")
    p.add_argument("--study", required=True)
    p.add_argument("--inbox", required=True)
    p.add_argument("--scratch", required=True)
    p.add_argument("--data", type=Path)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    data = a.data or Path(tempfile.mkdtemp(prefix="dh-bench-", dir="/dev/shm"))
    ssh = ["ssh", *(["-F", a.ssh_config] if a.ssh_config else [])]
    cfg = ["--ssh-config", a.ssh_config] if a.ssh_config else []
    for case, src in make_cases(data).items():
        ratios = []
        for _ in range(a.runs):
            t_dh = timed([sys.executable, "-m", "dittohead", "upload", "--host", a.host, *cfg,
                          a.study, str(src)])
            t_dh += timed([*ssh, a.host, "rm -rf " + shlex.quote(f"{a.inbox}/{src.name}")])
            t_rs = timed(["rsync", "-a", "-e", shlex.join(ssh), str(src),
                          f"{a.host}:{a.scratch}/"])
            t_rs += timed([*ssh, a.host, "rm -rf " + shlex.quote(f"{a.scratch}/{src.name}")])
            ratios.append(t_dh / t_rs)
            print(f"{case}: dittohead {t_dh:.2f} s, rsync {t_rs:.2f} s, ratio {ratios[-1]:.2f}",
                  flush=True)
        print(f"{case}: median ratio {statistics.median(ratios):.2f} (target <= 1.1)")
    return 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
