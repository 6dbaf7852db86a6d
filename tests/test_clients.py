"""Everyday clients on a booted systemd: rsync straight into the inbox, a writer pausing
between files, the path unit while an entry waits to become quiet, a writer holding a
descriptor of a claimed file, and a shell whose cwd is inside a claimed entry.

Boots one box (tests/boxes.py: tests/sysbox.py with `make install` done in it) and adds
study q1 with a quiet_period of QUIET seconds; s1 (quiet_period 0) takes dot-rule
uploads. Uploads run as a non-root user, the way users run them at a terminal.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from dittohead.log import MESSAGE_IDS

from .boxes import CONFIG, ROOT, UPLOADER, Box, boot_installed
from .conftest import wait_for

pytestmark = [pytest.mark.systemd, pytest.mark.slow]

QUIET = 3
STUDY = "q1"
INBOX = f"{ROOT}/dropbox/{STUDY}/inbox"
DEST = f"{ROOT}/study/{STUDY}"
# Unit "starting" messages of PID 1 (systemd's catalog: a job was started).
UNIT_STARTING = "7d4958e842da4a758f6c1cdc7b36dcc5"
DELIVERED = MESSAGE_IDS["delivered"]
S1_INBOX = f"{ROOT}/dropbox/s1/inbox"
# A fault hook in dittohead@s1.service waits for this file: the unit's sandbox sees
# only s1's dropbox directory and destination (docs/hacking.md, "Fault points").
GO = f"{ROOT}/dropbox/s1/.test-go"

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

# Runs in the box as the uploader: an entry whose file it keeps open for writing after
# the rename into the inbox; once ARGV[3] exists it writes more and closes it.
HOLDING_WRITER_PY = r"""
import os, sys, time
inbox, name, go = sys.argv[1], sys.argv[2], sys.argv[3]
tmp = os.path.join(inbox, "." + name)
os.makedirs(os.path.join(tmp, name))
with open(os.path.join(tmp, name, "other.txt"), "wb") as f:
    f.write(b"not held\n")
fd = os.open(os.path.join(tmp, name, "log.txt"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, b"first\n")
os.rename(tmp, os.path.join(inbox, name))
while not os.path.exists(go):
    time.sleep(0.05)
os.write(fd, b"second\n")
os.close(fd)
"""

# Runs in the box as the uploader, like a shell left in a directory of its entry: build
# the entry, cd into it, rename it into the inbox; then, each time a go file appears,
# try to change the directory through the cwd and print each attempt's errno.
HELD_CWD_PY = r"""
import errno, json, os, sys, time
inbox, name, gos = sys.argv[1], sys.argv[2], sys.argv[3:]
os.umask(0o022)
tmp = os.path.join(inbox, "." + name)
os.makedirs(os.path.join(tmp, name, "sub"))
for rel, data in (("a.txt", b"alpha\n"), ("sub/b.txt", b"beta\n")):
    with open(os.path.join(tmp, name, rel), "wb") as f:
        f.write(data)
stray = os.path.join(inbox, ".stray-" + name)  # the uploader's own file, same filesystem
with open(stray, "wb") as f:
    f.write(b"not uploaded\n")
os.chdir(os.path.join(tmp, name))
os.rename(tmp, os.path.join(inbox, name))
attempts = {
    "create": lambda: os.close(os.open("new.txt", os.O_CREAT | os.O_EXCL | os.O_WRONLY)),
    "create in sub": lambda: os.close(os.open("sub/new.txt", os.O_CREAT | os.O_WRONLY)),
    "mkdir": lambda: os.mkdir("newdir"),
    "rename": lambda: os.rename("a.txt", "renamed.txt"),
    "rename out of sub": lambda: os.rename("sub/b.txt", "b.txt"),
    "remove": lambda: os.unlink("a.txt"),
    "remove in sub": lambda: os.unlink("sub/b.txt"),
    "move in": lambda: os.rename(stray, "stray.txt"),
    "hard link in": lambda: os.link(stray, "linked.txt"),
    "write": lambda: os.close(os.open("a.txt", os.O_WRONLY | os.O_APPEND)),
}
for go in gos:
    while not os.path.exists(go):
        time.sleep(0.05)
    out = {}
    for what, attempt in attempts.items():
        try:
            attempt()
            out[what] = "done"
        except OSError as e:
            out[what] = errno.errorcode[e.errno]
    print(json.dumps(out), flush=True)
    open(go + ".done", "w").close()
"""

# Runs in the box as the uploader: rename an entry into the inbox with a cwd inside it,
# then create files there (one a millisecond) until refused 50 times in a row.
RACING_SHELL_PY = r"""
import errno, json, os, sys, time
inbox, name = sys.argv[1], sys.argv[2]
tmp = os.path.join(inbox, "." + name)
os.makedirs(os.path.join(tmp, name))
with open(os.path.join(tmp, name, "data.txt"), "wb") as f:
    f.write(b"uploaded\n")
os.chdir(os.path.join(tmp, name))
os.rename(tmp, os.path.join(inbox, name))
made, refused, deadline = [], [], time.monotonic() + 60
while len(refused) < 50 and time.monotonic() < deadline:
    n = f"late-{len(made) + len(refused):05d}.txt"
    try:
        os.close(os.open(n, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        made.append(n)
    except OSError as e:
        refused.append((n, errno.errorcode[e.errno]))
    time.sleep(0.001)
print(json.dumps({"made": made, "refused": refused}))
"""


class InBackground:
    """A user's program in the box that keeps running while the test acts (box.run)."""

    def __init__(self, box: Box, *argv: str, timeout: float = 120) -> None:
        self.result: subprocess.CompletedProcess[str] | None = None
        self.thread = threading.Thread(target=self._run, args=(box, argv, timeout))
        self.thread.start()

    def _run(self, box: Box, argv: tuple[str, ...], timeout: float) -> None:
        self.result = box.box.run(*argv, user=UPLOADER, timeout=timeout, check=False)

    def wait(self) -> subprocess.CompletedProcess[str]:
        self.thread.join()
        assert self.result is not None
        assert self.result.returncode == 0, self.result.stderr
        return self.result


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


def receipt_of(box: Box, name: str, study: str = STUDY) -> dict[str, object]:
    got = box.wait_delivered(study, [name], timeout=90)
    assert got.get(name) == 1, (got, box.debug(study))
    [r] = [r for r in box.receipts(study)["done"] if r["entry"] == name]
    return r


def manifest(box: Box, delivery: object, study: str = STUDY) -> list[str]:
    text = box.sh(f"cat {ROOT}/dropbox/{study}/done/{delivery}.sha256").stdout
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



def test_a_file_held_open_for_writing_is_kept_then_delivered_with_its_final_bytes(
        box: Box) -> None:
    go = "/tmp/holding-writer-go"  # the writer's own signal, outside any unit's sandbox
    since = box.now()
    writer = InBackground(box, "/usr/bin/python3", "-c", HOLDING_WRITER_PY, S1_INBOX, "held", go)
    try:
        wait_for(lambda: bool(box.journal(f"--since=@{since}", "DITTOHEAD_ENTRY=held",
                                          f"MESSAGE_ID={MESSAGE_IDS['retry-later']}")),
                 60, "the run to keep the entry for later")
        [kept] = box.journal(f"--since=@{since}", "DITTOHEAD_ENTRY=held",
                             f"MESSAGE_ID={MESSAGE_IDS['retry-later']}")
        assert "held/log.txt is still open for writing by a program" in kept["MESSAGE"]
        box.wait_inactive("dittohead@s1.service")
        assert box.prop("dittohead@s1.service", "ExecMainStatus") == "75"
        assert box.prop("dittohead@s1.service", "Result") == "success"  # kept, not failed
        assert "held" not in box.delivered("s1")
        assert box.sh(f"ls -A {ROOT}/study/s1 | grep -c '^held$'", check=False).stdout == "0\n"
        claimed = box.sh(f"ls {ROOT}/dropbox/s1/processing").stdout.split()
        assert [n for n in claimed if "held" in n and not n.endswith(".json")], claimed
    finally:
        box.box.run("touch", go)
        writer.wait()
    box.box.run("systemctl", "start", "dittohead@s1.service", timeout=120)
    receipt = [r for r in box.receipts("s1")["done"] if r["entry"] == "held"]
    assert len(receipt) == 1, box.debug("s1")
    assert box.sh(f"cat {ROOT}/study/s1/held/log.txt").stdout == "first\nsecond\n"
    box.sh(f"cd {ROOT}/study/s1 && sha256sum --quiet --strict -c "
           f"{ROOT}/dropbox/s1/done/{receipt[0]['id']}.sha256")
    assert receipt[0]["files"] == 2
    assert box.receipts("s1")["failed"] == []


def test_a_shell_holding_a_cwd_in_a_claimed_entry_changes_nothing(box: Box) -> None:
    go1, go2 = "/tmp/held-cwd-go1", "/tmp/held-cwd-go2"
    box.dropin("dittohead@s1.service", "90-hold",
               f"[Service]\nEnvironment=DITTOHEAD_TEST_FAULT=checked=wait:{GO}\n")
    try:
        box.wait_inactive("dittohead@s1.service")
        shell = InBackground(box, "/usr/bin/python3", "-c", HELD_CWD_PY, S1_INBOX, "cwdheld",
                             go1, go2)
        # Examined, so locked down: every inode of the entry is the service's.
        owners = f"find {ROOT}/dropbox/s1/processing/*/cwdheld -printf '%u\\n' | sort | uniq -c"
        wait_for(lambda: box.sh(owners, check=False).stdout.split() == ["4", "dittohead"],
                 30, "the service to claim and lock down the entry")
        box.box.run("touch", go1)
        wait_for(lambda: box.box.run("test", "-e", f"{go1}.done", check=False).returncode == 0,
                 30, "the shell's attempts while the delivery is held")
        box.box.run("touch", GO)  # the delivery goes on
        box.wait_inactive("dittohead@s1.service")
        box.box.run("touch", go2)  # and once it is filed, in done/<id>/
        first, second = (json.loads(line) for line in shell.wait().stdout.splitlines())
    finally:
        box.box.run("touch", GO, go1, go2)
        box.wait_inactive("dittohead@s1.service")
        box.dropin("dittohead@s1.service", "90-hold", None)
        box.box.run("rm", "-f", GO)
    assert first == dict.fromkeys(first, "EACCES") and len(first) == 10, first
    assert second == first, second
    [receipt] = [r for r in box.receipts("s1")["done"] if r["entry"] == "cwdheld"]
    assert (receipt["files"], receipt["bytes"]) == (2, 11)
    delivered = box.sh(f"cd {ROOT}/study/s1/cwdheld && find . | sort && cat a.txt sub/b.txt")
    assert delivered.stdout.split() == [".", "./a.txt", "./sub", "./sub/b.txt", "alpha", "beta"]
    kept = box.sh(f"cd {ROOT}/dropbox/s1/done/{receipt['id']}/cwdheld && find . | sort")
    assert kept.stdout.split() == [".", "./a.txt", "./sub", "./sub/b.txt"]
    box.sh(f"cd {ROOT}/study/s1 && sha256sum --quiet --strict -c "
           f"{ROOT}/dropbox/s1/done/{receipt['id']}.sha256")


def test_a_shell_racing_the_claim_from_a_held_cwd_loses_nothing_and_adds_nothing(
        box: Box) -> None:
    """No hook: what the shell made before the lockdown is delivered; after it, nothing."""
    box.wait_inactive("dittohead@s1.service")
    r = box.box.run("/usr/bin/python3", "-c", RACING_SHELL_PY, S1_INBOX, "racing",
                    user=UPLOADER, timeout=120)
    got = json.loads(r.stdout)
    made, refused = got["made"], got["refused"]
    assert len(refused) == 50 and {e for _, e in refused} == {"EACCES"}, refused[:3]
    first_refused = refused[0][0]
    assert all(n < first_refused for n in made), "a create succeeded after a refusal"
    receipt = receipt_of(box, "racing", study="s1")
    listed = manifest(box, receipt["id"], study="s1")
    assert listed == sorted(["racing/data.txt", *(f"racing/{n}" for n in made)])
    kept = box.sh(f"cd {ROOT}/dropbox/s1/done/{receipt['id']} && find racing -type f | sort")
    assert kept.stdout.split() == listed
    box.sh(f"cd {ROOT}/study/s1 && sha256sum --quiet --strict -c "
           f"{ROOT}/dropbox/s1/done/{receipt['id']}.sha256")
    print(f"\na shell racing the claim: {len(made)} file(s) made before the lockdown, "
          "all delivered; every later attempt refused")


def test_a_user_added_while_a_run_works_is_known_by_name(box: Box) -> None:
    # The unit binds /etc/passwd and /etc/group into its sandbox: a run sees them as
    # they were when it started. Once useradd has replaced them the run ends, and the
    # next one credits the new user's upload by name and files its note in their folder.
    box.dropin("dittohead@s1.service", "90-hold",
               f"[Service]\nEnvironment=DITTOHEAD_TEST_FAULT=claimed=wait:{GO}\n")
    try:
        box.sh(f"rm -f {GO}")
        box.wait_inactive("dittohead@s1.service")
        box.upload("s1", [("before-useradd", None)])
        wait_for(lambda: box.sh(f"ls {ROOT}/dropbox/s1/processing/*.json 2>/dev/null",
                                check=False).stdout != "", 30, "the run to hold a claim")
        box.sh("useradd --no-create-home --shell /bin/sh sbxnew")
        box.box.run("/bin/sh", "-c", f"echo new > {S1_INBOX}/.by-new && "
                    f"mv {S1_INBOX}/.by-new {S1_INBOX}/by-new", user="sbxnew")
        box.sh(f"touch {GO}")
        got = box.wait_delivered("s1", ["before-useradd", "by-new"])
        assert (got.get("before-useradd"), got.get("by-new")) == (1, 1), box.debug("s1")
        (r,) = [r for r in box.receipts("s1")["done"] if r["entry"] == "by-new"]
        assert r["uploader"] == "sbxnew"
        seen = box.box.run("dittohead", "status", "--mine", "s1", user="sbxnew").stdout
        assert "by-new: delivered" in seen
    finally:
        box.dropin("dittohead@s1.service", "90-hold", None)
        box.sh(f"rm -f {GO}; userdel sbxnew", check=False)


def test_check_names_the_units_of_a_study_the_config_no_longer_has(box: Box) -> None:
    # As after a study was removed from the config: its path unit still enabled.
    box.sh("systemctl enable --now dittohead@gone.path", check=False)
    try:
        out = box.sh("dittohead check s1", check=False).stdout
        assert "dittohead@gone.path is " in out, out
        assert "but the config has no study gone" in out
        assert "systemctl disable --now dittohead@gone.path dittohead@gone.timer" in out
    finally:
        box.sh("systemctl disable --now dittohead@gone.path; "
               "systemctl reset-failed dittohead@gone.path", check=False)
