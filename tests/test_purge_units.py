"""dittohead-purge.service and .timer on a booted throwaway systemd (tests/boxes.py).

The purge removes done/ copies (the service's, and an uploader's filed before
the lockdown) and abandoned uploads of every study from its sandbox, which
holds every study's dropbox directory and no destination; each capability is
proven needed by removing it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from dittohead.log import MESSAGE_IDS

from .boxes import CONFIG, ROOT, UPLOADER, Box, boot_installed
from .test_units import caps_dropin, plant_secrets, sees_in_unit

pytestmark = [pytest.mark.systemd, pytest.mark.slow]

UNIT = "dittohead-purge.service"
# keep_done_days 0: every copy goes at the next purge; abandoned after 1.7 s.
PURGE_CONFIG = CONFIG.replace("  quiet_period: 0\n", "  quiet_period: 0\n  keep_done_days: 0\n"
                              "  abandoned_days: 0.00002\n  purge_abandoned: true\n")
OLD = "20200101T000000Z-old-abcdef"  # a copy filed before the lockdown: its uploader's


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    b = boot_installed(tmp_path_factory.mktemp("purge-box", numbered=True))
    try:
        assert PURGE_CONFIG != CONFIG
        b.box.write_file("/etc/dittohead/config.yaml", PURGE_CONFIG)
        b.box.run("systemctl", "daemon-reload")
        yield b
    finally:
        b.box.poweroff()


def plant_old_copy(box: Box, study: str = "s2") -> str:
    """done/OLD as filed before the lockdown: the uploader's 0755 directories, and a
    0500 one."""
    done = f"{ROOT}/dropbox/{study}/done"
    receipt = json.dumps({"study": study, "id": OLD, "entry": "old", "uploader": UPLOADER,
                          "outcome": "delivered", "files": 2, "bytes": 10,
                          "finished": "2020-01-01T00:00:00Z"})
    box.sh(f"""set -e
mkdir -p {done}/{OLD}/sub/ro
echo data1 > {done}/{OLD}/a; echo data2 > {done}/{OLD}/sub/ro/b
chown -R {UPLOADER}:{UPLOADER} {done}/{OLD}; chmod 0500 {done}/{OLD}/sub/ro
printf '%s' '{receipt}' > {done}/{OLD}.json
chown dittohead:dittohead {done}/{OLD}.json; chmod 0640 {done}/{OLD}.json
""")
    return done


def plant_abandoned(box: Box, name: str) -> str:
    """A private (umask 077) .name upload of the uploader in s1's inbox."""
    path = f"{ROOT}/dropbox/s1/inbox/.{name}"
    box.box.run("/bin/sh", "-c", f"umask 077; mkdir -p {path}/d && echo 12345 > {path}/d/f",
                user=UPLOADER)
    box.sh("sleep 2")  # older than abandoned_days
    return path


def start(box: Box) -> tuple[str, str]:
    """Start the purge and wait for it; its Result and journal messages."""
    since = box.now()
    box.box.run("systemctl", "start", UNIT, check=False, timeout=120)
    msgs = " ".join(str(e.get("MESSAGE")) for e in box.journal("-u", UNIT, f"--since=@{since}"))
    return box.prop(UNIT, "Result"), msgs


def test_purge_removes_copies_and_abandoned_uploads_of_every_study(box: Box) -> None:
    box.upload("s1", [("kept-in-dest", {"x/f.txt": 10})])
    assert box.wait_delivered("s1", ["kept-in-dest"]).get("kept-in-dest") == 1, box.debug("s1")
    [delivery] = [r["id"] for r in box.receipts("s1")["done"] if r["entry"] == "kept-in-dest"]
    done2 = plant_old_copy(box)
    upload = plant_abandoned(box, "gone")
    since = box.now()
    result, msgs = start(box)
    assert result == "success", msgs + box.debug("s1")
    assert box.sh(f"ls -A {ROOT}/dropbox/s1/done {done2}").stdout.split() == [
        f"{ROOT}/dropbox/s1/done:", f"{delivery}.dirs", f"{delivery}.json",
        f"{delivery}.published", f"{delivery}.sha256",
        f"{done2}:", f"{OLD}.json"]
    assert all("purged" in r for r in box.receipts("s1")["done"] + box.receipts("s2")["done"])
    assert box.sh(f"cat {ROOT}/study/s1/x/f.txt | wc -c").stdout.strip() == "10"
    assert box.sh(f"test -e {upload}", check=False).returncode == 1
    purged = box.journal(f"MESSAGE_ID={MESSAGE_IDS['purged']}", f"--since=@{since}")
    assert {(e["DITTOHEAD_STUDY"], e["DITTOHEAD_DELIVERY"]) for e in purged} == {
        ("s1", delivery), ("s2", OLD)}
    [gone] = box.journal(f"MESSAGE_ID={MESSAGE_IDS['abandoned-removed']}", f"--since=@{since}")
    assert (gone["DITTOHEAD_ENTRY"], gone["DITTOHEAD_UPLOADER"], gone["DITTOHEAD_BYTES"]) == (
        ".gone", UPLOADER, "6")


@pytest.mark.parametrize(("kept", "missing"), [("CAP_DAC_READ_SEARCH", "CAP_CHOWN"),
                                               ("CAP_CHOWN", "CAP_DAC_READ_SEARCH")])
def test_each_capability_of_the_purge_is_needed(box: Box, kept: str, missing: str) -> None:
    if missing == "CAP_CHOWN":
        where = f"{plant_old_copy(box)}/.purge-{OLD}/sub/ro/b"  # renamed, then stopped
        said = "purge needs CAP_CHOWN"
    else:
        where = f"{plant_abandoned(box, 'private')}/d/f"
        said = "cannot be read"
    box.dropin(UNIT, "90-caps", caps_dropin(kept))
    try:
        result, msgs = start(box)
        assert result == "exit-code" and said in msgs, msgs
        assert box.sh(f"cat {where}").stdout == ("data2\n" if missing == "CAP_CHOWN"
                                                 else "12345\n")
    finally:
        box.dropin(UNIT, "90-caps", None)
        box.box.run("systemctl", "reset-failed", UNIT)
    result, msgs = start(box)
    assert result == "success", msgs
    assert box.sh(f"test -e {where}", check=False).returncode == 1


def test_the_purge_sees_every_dropbox_directory_and_no_destination(box: Box) -> None:
    plant_secrets(box)
    dropbox = [f"{ROOT}/dropbox/s{i}/done" for i in range(1, 5)]
    hidden = ["/etc/shadow", "/etc/gshadow", "/home", "/root", "/var/lib",
              *(f"{ROOT}/study/s{i}" for i in range(1, 5)), f"{ROOT}/study/s2/secret.txt"]
    seen = sees_in_unit(box, UNIT, dropbox + hidden)
    assert seen == {**{p: True for p in dropbox}, **{p: False for p in hidden}}
    r = box.box.run("systemd-analyze", "security", "--no-pager", UNIT)
    print("\n" + r.stdout.splitlines()[-1])


def test_timer_is_daily_and_check_asks_for_it(box: Box) -> None:
    r = box.box.run("systemd-analyze", "verify", "--generators=yes", UNIT,
                    "dittohead-purge.timer", check=False)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")
    before = box.sh("dittohead check", check=False).stdout
    assert "dittohead-purge.timer is disabled" in before
    box.box.run("systemctl", "enable", "--now", "dittohead-purge.timer")
    assert box.prop("dittohead-purge.timer", "ActiveState") == "active"
    assert box.prop("dittohead-purge.timer", "NextElapseUSecRealtime")
    assert "dittohead-purge.timer" not in box.sh("dittohead check", check=False).stdout


def test_without_the_generated_settings_the_purge_refuses_to_start(box: Box) -> None:
    box.box.write_file("/etc/dittohead/config.yaml", PURGE_CONFIG + "  bad: [\n")
    try:
        box.box.run("systemctl", "daemon-reload")
        r = box.box.run("systemctl", "start", UNIT, check=False)
        assert r.returncode != 0
        assert box.prop(UNIT, "AssertResult") == "no"
    finally:
        box.box.write_file("/etc/dittohead/config.yaml", PURGE_CONFIG)
        box.box.run("systemctl", "daemon-reload")
        box.box.run("systemctl", "reset-failed", UNIT, check=False)
    assert start(box)[0] == "success"
