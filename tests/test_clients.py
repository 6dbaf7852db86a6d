"""Everyday clients on a booted systemd: rsync straight into the inbox, a writer pausing
between files, the path unit while an entry waits to become quiet, a writer holding a
descriptor of a claimed file, and a shell whose cwd is inside a claimed entry.

Boots one box (tests/boxes.py: tests/sysbox.py with `make install` done in it) and adds
study q1 with a quiet_period of QUIET seconds; s1 (quiet_period 0) takes dot-rule
uploads. Uploads run as a non-root user, the way users run them at a terminal.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from dittohead.log import MESSAGE_IDS

from .boxes import CONFIG, ROOT, UPLOADER, Box, boot_installed

pytestmark = [pytest.mark.systemd, pytest.mark.slow]

QUIET = 3
STUDY = "q1"
INBOX = f"{ROOT}/dropbox/{STUDY}/inbox"
DEST = f"{ROOT}/study/{STUDY}"
# Unit "starting" messages of PID 1 (systemd's catalog: a job was started).
UNIT_STARTING = "7d4958e842da4a758f6c1cdc7b36dcc5"
DELIVERED = MESSAGE_IDS["delivered"]

# Runs in the box as the uploader: write files straight into inbox/NAME, pausing between.
PAUSING_WRITER_PY = r"""
import os, sys, time
root, count, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
os.mkdir(root)
for i in range(count):
    os.makedirs(os.path.join(root, f"part{i}"), exist_ok=True)
    with open(os.path.join(root, f"part{i}", "data.bin"), "wb") as f:
        f.write(os.urandom(100_000))
    if i < count - 1:
        time.sleep(pause)
"""


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    b = boot_installed(tmp_path_factory.mktemp("clients-box", numbered=True))
    try:
        b.box.write_file("/etc/dittohead/config.yaml", CONFIG + f"""\
  {STUDY}:
    destination: {DEST}
    quiet_period: {QUIET}
""")
        b.sh(f"dittohead setup {STUDY} >/dev/null && systemctl daemon-reload && "
             f"systemctl enable --now dittohead@{STUDY}.path")
        yield b
    finally:
        b.box.poweroff()


def service_starts(box: Box, since: str) -> int:
    return len(box.journal(f"--since=@{since}", f"MESSAGE_ID={UNIT_STARTING}",
                           f"UNIT=dittohead@{STUDY}.service"))


def receipt_of(box: Box, name: str) -> dict[str, object]:
    got = box.wait_delivered(STUDY, [name], timeout=90)
    assert got.get(name) == 1, (got, box.debug(STUDY))
    [r] = [r for r in box.receipts(STUDY)["done"] if r["entry"] == name]
    return r


def manifest(box: Box, delivery: object) -> list[str]:
    text = box.sh(f"cat {ROOT}/dropbox/{STUDY}/done/{delivery}.sha256").stdout
    return sorted(line.split("  ", 1)[1] for line in text.splitlines())


def test_rsync_straight_into_the_inbox_is_delivered_whole_and_once(box: Box) -> None:
    src = f"/srv/src-{UPLOADER}"
    box.sh(f"""set -e
mkdir -p {src}/eprime {src}/biopac
head -c 600000 /dev/urandom > {src}/biopac/ecg.acq
head -c 300000 /dev/urandom > {src}/eprime/run1.txt
echo small > {src}/notes.txt
chown -R {UPLOADER} {src}""")
    since = box.now()
    # About 5 s at 200 KiB/s, no dot rule: rsync's own temporary files appear in the entry.
    r = box.box.run("rsync", "-a", "--bwlimit=200", f"{src}/", f"{INBOX}/rsynced/",
                    user=UPLOADER, timeout=120)
    assert r.returncode == 0, r.stderr
    receipt = receipt_of(box, "rsynced")
    assert receipt["files"] == 3
    assert manifest(box, receipt["id"]) == ["biopac/ecg.acq", "eprime/run1.txt", "notes.txt"]
    box.sh(f"cd {DEST} && sha256sum --quiet -c {ROOT}/dropbox/{STUDY}/done/{receipt['id']}.sha256"
           f" && diff -r {src} {DEST}")
    assert box.sh(f"find {DEST} -name '.*'").stdout == ""  # no rsync temporary file
    # The path unit started a run at once (the entry matched its glob), and that run waited.
    said = " ".join(str(e.get("MESSAGE")) for e in box.journal(
        f"--since=@{since}", "DITTOHEAD_ENTRY=rsynced", f"DITTOHEAD_STUDY={STUDY}"))
    assert "rsynced is still changing" in said, said
    assert box.receipts(STUDY)["failed"] == []


def test_a_writer_pausing_between_files_is_delivered_whole(box: Box) -> None:
    r = box.box.run("/usr/bin/python3", "-c", PAUSING_WRITER_PY, f"{INBOX}/paused", "5",
                    str(QUIET - 1.5), user=UPLOADER, timeout=120)
    assert r.returncode == 0, r.stderr
    receipt = receipt_of(box, "paused")
    assert manifest(box, receipt["id"]) == [f"part{i}/data.bin" for i in range(5)]
    assert [f for f in box.receipts(STUDY)["failed"] if f["entry"] == "paused"] == []


def test_a_waiting_entry_does_not_retrigger_the_path_unit_in_a_loop(box: Box) -> None:
    box.wait_inactive(f"dittohead@{STUDY}.service")
    since = box.now()
    # Changed every second for 20 s: a slow copy. Not quiet until it stops.
    writer = threading.Thread(target=box.box.run, args=(
        "/bin/sh", "-c", f"mkdir {INBOX}/slowcopy && for i in $(seq 20); do "
        f"echo $i >> {INBOX}/slowcopy/growing.txt; sleep 1; done"),
        kwargs={"user": UPLOADER, "timeout": 60})
    writer.start()
    try:
        time.sleep(12)
        mid = service_starts(box, since)
        assert box.prop(f"dittohead@{STUDY}.service", "ActiveState") == "activating"
        assert "slowcopy" in box.sh(f"ls {INBOX}").stdout
    finally:
        writer.join()
    receipt = receipt_of(box, "slowcopy")
    assert manifest(box, receipt["id"]) == ["growing.txt"]
    assert box.sh(f"cat {DEST}/growing.txt").stdout.split() == [str(i) for i in range(1, 21)]
    box.wait_inactive(f"dittohead@{STUDY}.service")
    total = service_starts(box, since)
    print(f"\nan entry changing for 20 s (quiet_period {QUIET} s): {mid} service start(s) "
          f"in its first 12 s, {total} in all")
    assert mid == 1 and total <= 2, box.debug(STUDY)
    assert box.prop(f"dittohead@{STUDY}.path", "Result") == "success"
    assert box.prop(f"dittohead@{STUDY}.path", "SubState") == "waiting"
    runs = {e["_SYSTEMD_INVOCATION_ID"] for e in box.journal(
        f"MESSAGE_ID={DELIVERED}", "DITTOHEAD_ENTRY=slowcopy")}
    assert len(runs) == 1

