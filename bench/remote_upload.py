"""Time `dittohead upload --host` against plain `rsync -a` over ssh to the same server.

    python3 bench/remote_upload.py --host USER@HOST [--ssh-config FILE] --study S \\
        --inbox /abs/server/path/of/S/inbox --scratch /abs/server/dir/for/rsync \\
        [--wait-study W] [--data DIR] [--runs 5] [--cases big,small]
    sudo .venv/bin/python bench/remote_upload.py --box [--runs 5] [--cases big,small]

Cases, made in DIR (default: a fresh directory in /dev/shm, a tmpfs): `big` (one
1 GiB file) and `small` (20,000 files of 4 KiB in 100 directories). The account
must have a shell (the rsync way). Runs alternate dittohead, rsync, dittohead...;
each times the command alone (`upload --host`, without --wait, to study S, whose
service should not run: the entry stays in the inbox), then removes what it made
with `ssh HOST rm -rf`, untimed. Prints each run, the median of each tool and the
median of the runs' ratios (the target: at most 1.1). With --wait-study W (a study
whose service runs): one `upload --host --wait` per case, and the time from the end
of its transfer (the line `PATH -> HOST:...`) to the outcome it prints.

--box: everything on this machine, as root: boots a throwaway systemd
(tests/sysbox.py) with this checkout installed, sshd on 127.0.0.1 (tests/servers.py)
and an uploader with a shell; the data on a 1.5 GiB tmpfs, the dropbox and the
rsync scratch directory on the box's 3 GiB tmpfs; then runs the above as the
uploader inside it, with S=s2 and W=s1.
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


def make_cases(data: Path, wanted: list[str]) -> dict[str, Path]:
    big, small = data / "big", data / "small"
    if "big" in wanted and not big.exists():
        with open(big, "wb") as f:
            for _ in range(1024):
                f.write(os.urandom(1 << 20))
    if "small" in wanted and not small.exists():
        for d in range(100):
            (small / f"d{d:03}").mkdir(parents=True)
            for i in range(200):
                (small / f"d{d:03}" / f"f{i:03}").write_bytes(os.urandom(4096))
    return {c: {"big": big, "small": small}[c] for c in wanted}


def timed(argv: list[str]) -> float:
    t = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t


def wait_latency(a: argparse.Namespace, src: Path) -> float:
    """Seconds from the end of the transfer to the outcome `upload --host --wait` prints."""
    argv = [sys.executable, "-m", "dittohead", "upload", "--host", a.host, *config(a),
            "--wait", "--timeout", "300", a.wait_study, str(src)]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    sent = 0.0
    for line in p.stdout:
        if " -> " in line:
            sent = time.monotonic()
        elif sent:
            took = time.monotonic() - sent
            print(f"    {line.strip()}")
            break
    if p.wait() != 0 or not sent:
        raise SystemExit(f"upload --wait of {src} ended with {p.returncode}")
    return took


def config(a: argparse.Namespace) -> list[str]:
    return ["--ssh-config", a.ssh_config] if a.ssh_config else []


def measure(a: argparse.Namespace) -> int:
    data = a.data or Path(tempfile.mkdtemp(prefix="dh-bench-", dir="/dev/shm"))
    ssh = ["ssh", *(["-F", a.ssh_config] if a.ssh_config else [])]
    for case, src in make_cases(data, a.cases.split(",")).items():
        dh, rs, ratios = [], [], []
        for _ in range(a.runs):
            dh.append(timed([sys.executable, "-m", "dittohead", "upload", "--host", a.host,
                             *config(a), a.study, str(src)]))
            timed([*ssh, a.host, "rm -rf " + shlex.quote(f"{a.inbox}/{src.name}")])
            rs.append(timed(["rsync", "-a", "-e", shlex.join(ssh), str(src),
                             f"{a.host}:{a.scratch}/"]))
            timed([*ssh, a.host, "rm -rf " + shlex.quote(f"{a.scratch}/{src.name}")])
            ratios.append(dh[-1] / rs[-1])
            print(f"{case}: dittohead {dh[-1]:.2f} s, rsync -a {rs[-1]:.2f} s, "
                  f"ratio {ratios[-1]:.2f}", flush=True)
        print(f"{case}: median dittohead {statistics.median(dh):.2f} s, rsync -a "
              f"{statistics.median(rs):.2f} s; median ratio {statistics.median(ratios):.2f} "
              "(target <= 1.1)", flush=True)
        if a.wait_study:
            took = wait_latency(a, src)
            print(f"{case}: --wait: {took:.2f} s from the end of the transfer to the outcome",
                  flush=True)
    return 0


def in_box(a: argparse.Namespace) -> int:
    """Boot a throwaway systemd with sshd and run measure() in it as an uploader."""
    sys.path.insert(0, str(REPO))
    from tests.boxes import ROOT, boot_installed
    from tests.servers import SSH_ALIAS, add_uploader, as_user, install_and_start
    # The client runs from this checkout as an uploader, who cannot write its
    # __pycache__: byte-compile it first, as `pip install` does for a real client
    # (stale byte-code would be compiled again on every run, ~0.1 s, and timed).
    subprocess.run(["/usr/bin/python3", "-m", "compileall", "-q", str(REPO / "dittohead")],
                   check=True)
    b = boot_installed(Path(tempfile.mkdtemp(prefix="dh-bench-box-")))
    try:
        install_and_start(b, f"{ROOT}/dropbox", "s1", "sbxs1")
        u = add_uploader(b, "bench", ["sbxs1"], sftp_only=False)
        b.sh(f"""set -e
mkdir -p /bench && mount -t tmpfs -o size=1536m,mode=0755 dh-bench-data /bench
install -d -o {u.name} /bench/data {ROOT}/scratch""")
        r = as_user(b, u, 'exec /usr/bin/python3 "$@"', str(REPO / "bench/remote_upload.py"),
                    "--host", SSH_ALIAS, "--study", "s2", "--inbox",
                    f"{ROOT}/dropbox/s2/inbox", "--scratch", f"{ROOT}/scratch",
                    "--wait-study", "s1", "--data", "/bench/data", "--runs", str(a.runs),
                    "--cases", a.cases, check=False, timeout=3600)
        print(r.stdout + r.stderr, end="")
        return r.returncode
    finally:
        b.box.poweroff()


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--box", action="store_true", help="all in a throwaway systemd (root)")
    p.add_argument("--host")
    p.add_argument("--ssh-config")
    p.add_argument("--study")
    p.add_argument("--inbox")
    p.add_argument("--scratch")
    p.add_argument("--wait-study")
    p.add_argument("--data", type=Path)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--cases", default="big,small")
    a = p.parse_args()
    if a.box:
        return in_box(a)
    if not (a.host and a.study and a.inbox and a.scratch):
        p.error("--host, --study, --inbox and --scratch are needed (or --box)")
    return measure(a)


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
