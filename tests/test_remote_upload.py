"""`dittohead upload --host` end to end: the real sshd (the shipped sample stanza) and the
real service in a booted throwaway systemd; the client run by the uploader in the box,
through the `Host dropbox` alias of their ~/.ssh/config (port SSH_PORT, not 22).

Two accounts: one with a shell (rsync both ends, `dittohead ready` on the server) and
one SFTP-only (chrooted, ForceCommand internal-sftp: discovery from dittohead.json).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from .boxes import CONFIG, ROOT, Box, boot_installed
from .conftest import wait_for
from .servers import SSH_ALIAS, Uploader, add_uploader, as_user, install_and_start

pytestmark = [pytest.mark.systemd, pytest.mark.slow]

STUDY = "s1"
INBOX = f"{ROOT}/dropbox/{STUDY}/inbox"
DEST = f"{ROOT}/study/{STUDY}"
UPLOAD = f"dittohead upload --host {SSH_ALIAS} {STUDY}"

# Makes the entry DIR holding DIR/ with a few files (and BIG MiB of random data in
# big.bin when BIG > 0): an entry's contents are merged into the destination's top.
MAKE_TREE = r"""
set -e
mkdir -p "$1/$1/sub"
printf 'hello %s\n' "$1" > "$1/$1/a.txt"
printf 'deeper\n' > "$1/$1/sub/b.txt"
if [ "$2" -gt 0 ]; then head -c "$2"M /dev/urandom > "$1/$1/big.bin"; fi
"""


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    b = boot_installed(tmp_path_factory.mktemp("remote"))
    try:
        install_and_start(b, f"{ROOT}/dropbox", STUDY, "sbxs1")
        yield b
    finally:
        b.box.poweroff()


@pytest.fixture(scope="module")
def shell_user(box: Box) -> Uploader:
    return add_uploader(box, "rmsh", ["sbxs1"], sftp_only=False)


Account = tuple[str, Uploader]  # ("shell" or "sftp", that account)


@pytest.fixture(params=["shell", "sftp"])
def account(request: pytest.FixtureRequest) -> Account:
    """Each kind of account in turn: ("shell", shell_user), then ("sftp", sftp_user)."""
    user: Uploader = request.getfixturevalue(f"{request.param}_user")
    return request.param, user


@pytest.fixture(scope="module")
def sftp_user(box: Box) -> Uploader:
    u = add_uploader(box, "rmsftp", ["sbxs1"], sftp_only=True)
    box.sh(f"dittohead setup {STUDY} >/dev/null")  # makes its outcomes folder
    return u


def tree(box: Box, u: Uploader, name: str, big_mib: int = 0) -> None:
    as_user(box, u, MAKE_TREE, name, str(big_mib))


def sha(box: Box, path: str) -> str:
    return box.sh('cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum',
                  path).stdout


def delivered(box: Box, name: str) -> list[dict[str, object]]:
    return [r for r in box.receipts(STUDY)["done"] if r["entry"] == name]


def test_upload_wait_delivers_and_prints_outcome(box: Box, account: Account) -> None:
    who, u = account
    name = f"visit-{who}"
    tree(box, u, name)
    r = as_user(box, u, f"{UPLOAD} {name} --wait --timeout 60", check=False)
    assert r.returncode == 0, r.stdout + r.stderr + box.debug(STUDY)
    assert f"{name}: delivered: 2 files" in r.stdout, r.stdout
    assert sha(box, f"{DEST}/{name}") == sha(box, f"/home/{u.name}/{name}/{name}")
    assert len(delivered(box, name)) == 1


def test_shell_account_sends_with_rsync(box: Box, shell_user: Uploader) -> None:
    tree(box, shell_user, "via-rsync")
    r = as_user(box, shell_user, f"PATH=/tmp/spy:$PATH; mkdir -p /tmp/spy; "
                f"printf '#!/bin/sh\\necho rsync >> /tmp/spy/log\\nexec /usr/bin/rsync \"$@\"\\n'"
                f" > /tmp/spy/rsync; chmod +x /tmp/spy/rsync; {UPLOAD} via-rsync --wait "
                "--timeout 60; cat /tmp/spy/log", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rsync" in r.stdout.splitlines()[-1]


def test_one_login_begun_before_start_up_carries_the_whole_upload(
        box: Box, shell_user: Uploader) -> None:
    """early.py's login is adopted: one ssh logs in (the master), the rest go through it."""
    tree(box, shell_user, "one-login")
    r = as_user(box, shell_user, "mkdir -p /tmp/sshspy; printf '#!/bin/sh\\necho \"$*\" "
                ">> /tmp/sshspy/log\\nexec /usr/bin/ssh \"$@\"\\n' > /tmp/sshspy/ssh; "
                "chmod +x /tmp/sshspy/ssh; rm -f /tmp/sshspy/log; PATH=/tmp/sshspy:$PATH "
                f"{UPLOAD} one-login --wait --timeout 60; sleep 1; cat /tmp/sshspy/log",
                check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = [line for line in r.stdout.splitlines() if "ControlPath=" in line]
    masters = [c for c in calls if "ControlMaster=yes" in c]
    assert len(masters) == 1 and "where --json --then-ready s1 one-login" in masters[0], calls
    assert calls[0] == masters[0]  # the login came first
    assert any("-O exit" in c for c in calls)  # and the master was ended


def test_name_already_waiting_is_refused(box: Box, account: Account) -> None:
    who, u = account
    name = f"taken-{who}"
    tree(box, u, name)
    # Something of that name waits in the inbox (held back: the path unit is stopped).
    box.sh(f"systemctl stop dittohead@{STUDY}.path dittohead@{STUDY}.timer "
           f"dittohead@{STUDY}.service && mkdir -m 0700 {INBOX}/{name} && "
           f"echo theirs > {INBOX}/{name}/x")
    try:
        r = as_user(box, u, f"{UPLOAD} {name}", check=False)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "already waits in the inbox" in r.stderr
        assert box.sh(f"cat {INBOX}/{name}/x").stdout == "theirs\n"
        assert box.sh(f"ls -A {INBOX}/{name}").stdout == "x\n"
    finally:
        box.sh(f"rm -rf {INBOX}/{name} {INBOX}/.{name}; "
               f"systemctl start dittohead@{STUDY}.path dittohead@{STUDY}.timer")


def test_failed_outcome_exits_65(box: Box, account: Account) -> None:
    who, u = account
    name = f"clash-{who}"
    tree(box, u, name)
    box.sh(f"mkdir -p {DEST}/{name} && echo other > {DEST}/{name}/a.txt && "
           f"chown -R dittohead: {DEST}/{name}")
    r = as_user(box, u, f"{UPLOAD} {name} --wait --timeout 60", check=False)
    assert r.returncode == 65, r.stdout + r.stderr + box.debug(STUDY)
    assert f"{name}: failed: " in r.stdout
    assert box.sh(f"cat {DEST}/{name}/a.txt").stdout == "other\n"


def test_unknown_study_and_unreachable_host(box: Box, shell_user: Uploader,
                                            sftp_user: Uploader) -> None:
    for u in (shell_user, sftp_user):
        tree(box, u, "nowhere")
        r = as_user(box, u, f"dittohead upload --host {SSH_ALIAS} nosuch nowhere",
                    check=False)
        assert r.returncode == 78, r.stdout + r.stderr
        assert "nosuch" in r.stderr
    r = as_user(box, shell_user, f"dittohead upload --host {shell_user.name}@127.0.0.1 "
                f"{STUDY} nowhere", check=False)  # port 22: nothing listens
    assert r.returncode == 69, r.stdout + r.stderr
    assert "cannot reach" in r.stderr


BIG_MIB = 150


# Run by root in the box while the upload runs (the uploader cannot look into the inbox):
# waits until the server holds WANT bytes under DOT, then SIGKILLs the upload's session.
KILL_AT = r"""
pidfile="$1"; dot="$2"; want="$3"
while :; do
    n=$(du -sb "$dot" 2>/dev/null | cut -f1)
    [ "${n:-0}" -ge "$want" ] && break
    [ -e "$pidfile.done" ] && exit 3
    sleep 0.01
done
kill -s KILL -- -"$(cat "$pidfile")"  # dash: not -KILL before --
"""


def _kill_halfway(box: Box, u: Uploader, name: str, dot: str, want: int) -> None:
    """Start the upload in a session of its own and SIGKILL that whole session (the client,
    its ssh, rsync or sftp) once the server holds `want` bytes under .NAME."""
    pidfile = f"/tmp/{name}.pid"
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(as_user, box, u, "setsid sh -c 'echo $$ > \"$0\"; exec \"$@\"' "
                          f"{pidfile} {UPLOAD} {name}; rc=$?; touch {pidfile}.done; exit $rc",
                          check=False, timeout=300)
        killer = box.sh(KILL_AT, pidfile, dot, str(want), check=False, timeout=120)
        r = run.result()
    assert killer.returncode == 0 and r.returncode != 0, (
        "the upload finished before the kill: " + r.stdout + r.stderr + killer.stderr)


def _settled(box: Box, u: Uploader, dot: str) -> int:
    """The size under .NAME once the server's side of the killed transfer has ended."""
    sizes: list[str] = []

    def still() -> bool:
        busy = box.sh(f"pgrep -u {u.name} -x rsync", check=False).returncode == 0
        sizes.append(box.sh(f"du -sb {dot} | cut -f1").stdout)
        return not busy and len(sizes) > 3 and len(set(sizes[-3:])) == 1
    wait_for(still, 60, "the killed transfer to end on the server")
    return int(sizes[-1])


def _wire_bytes(box: Box) -> int:
    """Bytes sent over the box's loopback so far: the client and sshd talk only there."""
    return int(box.sh("cat /sys/class/net/lo/statistics/tx_bytes").stdout)


def test_rerun_after_a_killed_transfer_continues(box: Box, account: Account) -> None:
    who, u = account
    name = f"resume-{who}"
    tree(box, u, name, big_mib=BIG_MIB)
    dot = f"{INBOX}/.{name}"
    _kill_halfway(box, u, name, dot, want=40 << 20)
    partial = _settled(box, u, dot)
    # The server kept what it had at the kill (the rerun's bytes are then telling).
    assert (32 << 20) < partial < (BIG_MIB << 20), partial
    assert box.sh(f"test -e {INBOX}/{name} && echo yes || echo no").stdout == "no\n"
    before = _wire_bytes(box)
    r = as_user(box, u, f"{UPLOAD} {name} --wait --timeout 120", check=False, timeout=300)
    sent = _wire_bytes(box) - before
    assert r.returncode == 0, r.stdout + r.stderr + box.debug(STUDY)
    # What the rerun sent is what was missing (and some protocol), not all of it again.
    assert sent < (BIG_MIB << 20) - partial + (8 << 20), (sent, partial)
    assert sha(box, f"{DEST}/{name}") == sha(box, f"/home/{u.name}/{name}/{name}")
    assert len(delivered(box, name)) == 1
    assert box.sh(f"ls -A {INBOX}").stdout == ""


def test_rejected_outcome_exits_77(box: Box, shell_user: Uploader) -> None:
    """An account outside the study's `uploaders` groups: its upload arrives, and is
    rejected; --wait says so and exits 77."""
    outsider = add_uploader(box, "rmout", ["users"], sftp_only=False)
    tree(box, outsider, "not-mine")
    box.box.write_file("/etc/dittohead/config.yaml", CONFIG.replace(
        "    group: sbxs1\n", "    group: sbxs1\n    uploaders: [sbxs1]\n", 1))
    # A run still lingering has read the config, and the user list, before: let it end.
    box.wait_inactive(f"dittohead@{STUDY}.service")
    try:
        r = as_user(box, outsider, f"{UPLOAD} not-mine --wait --timeout 60", check=False)
    finally:
        box.box.write_file("/etc/dittohead/config.yaml", CONFIG)
    assert r.returncode == 77, r.stdout + r.stderr + box.debug(STUDY)
    assert "not-mine: rejected: " in r.stdout
    assert box.sh(f"test -e {DEST}/not-mine && echo yes || echo no").stdout == "no\n"


SMALL = f"{ROOT}/dropbox/s2"  # study s2's whole tree, on a tmpfs of its own in the test


def test_full_disk_exits_75_and_a_later_rerun_continues(box: Box, account: Account) -> None:
    who, u = account
    name = f"full-{who}"
    tree(box, u, name, big_mib=48)
    box.sh(f"mount -t tmpfs -o size=24m,mode=0755 dh-small {SMALL} && "
           "dittohead setup s2 >/dev/null")
    try:
        r = as_user(box, u, f"dittohead upload --host {SSH_ALIAS} s2 {name}", check=False)
        assert r.returncode == 75, r.stdout + r.stderr
        assert "disk is full" in r.stderr and "rerun the same command later" in r.stderr
        partial = int(box.sh(f"du -sb {SMALL}/inbox/.{name} | cut -f1").stdout)
        assert partial > (8 << 20)
        box.sh(f"mount -o remount,size=200m {SMALL}")  # the admin made room
        before = _wire_bytes(box)
        r = as_user(box, u, f"dittohead upload --host {SSH_ALIAS} s2 {name}", check=False)
        sent = _wire_bytes(box) - before
        assert r.returncode == 0, r.stdout + r.stderr
        assert sent < (48 << 20) - partial + (4 << 20), (sent, partial)
        assert sha(box, f"{SMALL}/inbox/{name}") == sha(box, f"/home/{u.name}/{name}")
        assert box.sh(f"ls -A {SMALL}/inbox").stdout == f"{name}\n"
    finally:
        box.sh(f"umount {SMALL}")


def test_sftp_legacy_rename_never_replaces(box: Box, sftp_user: Uploader) -> None:
    """What OpenSSH's sftp sends for `rename -l` (SSH2_FXP_RENAME, which fails when the
    target exists: what the client uses on any server); the sample server offers no
    posix-rename (which replaces), so a plain `rename` fails the same way there."""
    batch = ("put /etc/hostname s1/inbox/.r1\nput /etc/hostname s1/inbox/.r2\n"
             "-rename -l s1/inbox/.r1 s1/inbox/.r2\n")
    box.sh(f"systemctl stop dittohead@{STUDY}.path")
    try:
        r = as_user(box, sftp_user, f"printf '{batch}' | sftp -vvv -b - {SSH_ALIAS} 2>&1",
                    check=False)
        assert 'Sending SSH2_FXP_RENAME' in r.stdout, r.stdout
        assert "Failure" in r.stdout
        assert box.sh(f"ls -A {INBOX}").stdout.split() == [".r1", ".r2"]
        r = as_user(box, sftp_user, f"printf 'rename s1/inbox/.r1 s1/inbox/.r2\\n' | "
                    f"sftp -vvv -b - {SSH_ALIAS} 2>&1", check=False)
        assert "Sending SSH2_FXP_RENAME" in r.stdout, r.stdout
        assert box.sh(f"ls -A {INBOX}").stdout.split() == [".r1", ".r2"]  # not replaced
    finally:
        box.sh(f"rm -f {INBOX}/.r1 {INBOX}/.r2; systemctl start dittohead@{STUDY}.path")


def test_outcomes_over_sftp_are_the_uploaders_own(box: Box, sftp_user: Uploader) -> None:
    folder = f"{ROOT}/dropbox/{STUDY}/users/{sftp_user.name}/outcomes"
    wait_for(lambda: box.sh(f"ls {folder}", check=False).stdout != "", 30, "outcomes")
    notes = [json.loads(box.sh(f"cat {folder}/{n}").stdout)
             for n in box.sh(f"ls {folder}").stdout.split() if n.endswith(".json")]
    assert notes and all(n["uploader"] == sftp_user.name for n in notes)
