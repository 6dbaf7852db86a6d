"""`make demo`: one study, one lab's upload, a real delivery, a conflict refused.

Everything happens under .demo/ in the checkout (removed and made anew each
run): no system file is touched and no service is needed. `dittohead
process` runs exactly as the systemd service would run it.
"""

from __future__ import annotations

import getpass
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / ".demo"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def run(*args: str, cwd: Path | None = None) -> int:
    print("$ " + " ".join(args), flush=True)
    return subprocess.run(args, cwd=cwd, check=False).returncode


def dittohead(*args: str) -> int:
    return run(sys.executable, "-m", "dittohead", "--config", str(DEMO / "config.yaml"), *args)


def make_session(root: Path, subject: str) -> Path:
    """Data as a lab machine leaves it: E-Prime logs, BIOPAC physiology, a Mac's litter."""
    rnd = random.Random(subject)
    d = root / f"{subject}-session1"
    (d / "eprime").mkdir(parents=True)
    (d / "biopac").mkdir()
    for run_no in (1, 2):
        lines = [f"*** Header Start ***\nSubject: {subject}\nSession: 1\nRun: {run_no}\n"
                 "*** Header End ***"]
        lines += [f"Trial: {t}\tStim: {rnd.choice('ABCD')}\tRT: {rnd.randint(250, 900)}"
                  for t in range(1, 41)]
        (d / "eprime" / f"{subject}_run{run_no}.txt").write_text("\n".join(lines) + "\n")
    (d / "biopac" / f"{subject}_ecg.acq").write_bytes(rnd.randbytes(2 << 20))
    (d / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return d


def main() -> int:
    shutil.rmtree(DEMO, ignore_errors=True)
    DEMO.mkdir()
    env_user = getpass.getuser()
    (DEMO / "config.yaml").write_text(f"""\
dropbox_root: {DEMO}/dropbox
service_user: {env_user}
studies:
  nccam3:
    destination: {DEMO}/study/nccam3/raw-data
    # Taken once nothing in an entry changed for 2 s (default 120 s: see config.yaml).
    quiet_period: 2
""")
    os.environ["DITTOHEAD_LOG"] = "stderr"  # the journal's fields, printed

    say("An admin sets up the study (root would also set owners; here: you)")
    study = DEMO / "dropbox" / "nccam3"
    for sub, mode in (("inbox", 0o1733), ("processing", 0o750), ("done", 0o750),
                      ("failed", 0o750), ("users", 0o751)):
        (study / sub).mkdir(parents=True)
        os.chmod(study / sub, mode)
    (DEMO / "study" / "nccam3" / "raw-data").mkdir(parents=True)
    if dittohead("check", "nccam3") not in (0, 1):
        return 1

    say("A research assistant uploads two sessions")
    lab = DEMO / "lab-pc"
    s01, s02 = make_session(lab, "s01"), make_session(lab, "s02")
    if dittohead("upload", "nccam3", str(s01), str(s02)) != 0:
        return 1
    run("ls", "-la", str(study / "inbox"))

    say("The service drains the inbox (what dittohead@nccam3.service runs; it waits until "
        "nothing in an entry changed for quiet_period, 2 s here)")
    rc = dittohead("process", "nccam3", "--linger", "1")
    print(f"exit code {rc}")

    say("Delivered: merged into the destination (.DS_Store skipped)")
    run("find", ".", "-printf", "%M %u:%g %6s %TY-%Tm-%Td %p\n", cwd=DEMO / "study")
    receipt = sorted((study / "done").glob("*s01*.json"))[0]
    say(f"Receipt {receipt.name}")
    print(json.dumps(json.loads(receipt.read_text()), indent=2))
    say("Manifest, checked by sha256sum itself")
    run("sha256sum", "-c", str(receipt.with_suffix(".sha256")),
        cwd=DEMO / "study" / "nccam3" / "raw-data")

    say("Someone re-uploads s01 with one file changed: never overwritten")
    (s01 / "eprime" / "s01_run1.txt").write_text("edited by hand\n")
    dittohead("upload", "nccam3", str(s01))
    dittohead("process", "nccam3", "--linger", "1")
    failed = sorted((study / "failed").glob("*.json"))[0]
    print(json.dumps(json.loads(failed.read_text()), indent=2))
    dittohead("status", "nccam3")
    say("What the uploader sees of their own uploads (any user can ask)")
    dittohead("status", "--mine", "nccam3")
    say("Done. Everything is under .demo/; `make test` runs every test.")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
