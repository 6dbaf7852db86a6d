"""Every common client, end to end on a booted systemd, as a lab's uploaders use them.

One box (tests/boxes.py) with samba and openssh-server installed inside it and the
shipped sample configs (tests/servers.py); study u1 with a quiet period of QUIET seconds
and two uploaders: `ra1`, an SFTP-only account (chrooted to the dropbox root by the sshd
sample), and `ra2`, an account with a shell; both have SMB passwords, and over SMB each
sees its own folder users/<account> (own inbox and outcomes) as the share `u1`. Each test uploads
with one client exactly as a user would, checks the delivered bytes and the receipt, and
reads the outcome back as the uploader, through the same kind of client.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from . import servers
from .boxes import CONFIG, ROOT, Box, boot_installed
from .conftest import wait_for
from .servers import SSH_ALIAS, Uploader, as_user, smbclient

pytestmark = [pytest.mark.systemd, pytest.mark.slow]

STUDY = "u1"
GROUP = "sbxra"  # the study's uploaders group
QUIET = 2
DROPBOX = f"{ROOT}/dropbox"
INBOX = f"{DROPBOX}/{STUDY}/inbox"
DEST = f"{ROOT}/study/{STUDY}"
SHARE = STUDY  # the sample's share: each account's own folder users/<account>


@dataclass(frozen=True)
class Site:
    """The booted server and its two uploaders."""

    box: Box
    sftp: Uploader  # ra1: SFTP-only, chrooted
    shell: Uploader  # ra2: a login shell


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    b = boot_installed(tmp_path_factory.mktemp("uploaders-box", numbered=True))
    try:
        servers.install(b)
        b.sh(f"groupadd {GROUP}")
        # Accounts first: `dittohead setup` makes the outcomes folders of the group's members.
        ra1 = servers.add_uploader(b, "ra1", [GROUP], sftp_only=True)
        ra2 = servers.add_uploader(b, "ra2", [GROUP], sftp_only=False)
        b.box.write_file("/etc/dittohead/config.yaml", CONFIG + f"""\
  {STUDY}:
    destination: {DEST}
    quiet_period: {QUIET}
    uploaders: [{GROUP}]
""")
        b.sh(f"dittohead setup {STUDY} >/dev/null && systemctl daemon-reload && "
             f"systemctl enable --now dittohead@{STUDY}.path")
        servers.start_smbd(b, DROPBOX, STUDY, GROUP)
        servers.start_sshd(b, DROPBOX)
        yield Site(b, ra1, ra2)
    finally:
        b.box.poweroff()


def make_source(s: Site, u: Uploader, name: str, size: int = 300_000) -> str:
    """~/src/NAME/NAME/{notes file.txt,sub/data.bin} in u's home; returns src/NAME."""
    as_user(s.box, u, f"""set -e
mkdir -p src/{name}/{name}/sub
printf 'notes of %s\\n' {name} > 'src/{name}/{name}/notes file.txt'
head -c {size} /dev/urandom > src/{name}/{name}/sub/data.bin""")
    return f"src/{name}"


def receipt(s: Site, name: str, timeout: float = 60) -> dict[str, Any]:
    """The receipt in done/ of the entry NAME, read as root, once it is delivered."""
    got = s.box.wait_delivered(STUDY, [name], timeout=timeout)
    assert got.get(name) == 1, (got, s.box.debug(STUDY))
    [r] = [r for r in s.box.receipts(STUDY)["done"] if r["entry"] == name]
    return r


def assert_delivered(s: Site, u: Uploader, name: str, r: dict[str, Any],
                     size: int = 300_000) -> None:
    """The receipt says delivered by u, and the destination holds the source's bytes."""
    assert (r["outcome"], r["uploader"], r["files"]) == ("delivered", u.name, 2), r
    assert r["bytes"] == size + len(f"notes of {name}\n"), r
    s.box.sh(f"diff -r /home/{u.name}/src/{name}/{name} {DEST}/{name} && cd {DEST} && "
             f"sha256sum --quiet --strict -c {DROPBOX}/{STUDY}/done/{r['id']}.sha256")


def assert_outcome(note: dict[str, Any], r: dict[str, Any]) -> None:
    """The uploader's own note says what the receipt says."""
    assert note["outcome"] == "delivered" and note["advice"], note
    for key in ("id", "entry", "uploader", "files", "bytes", "destination"):
        assert note[key] == r[key], (key, note, r)


Reader = Callable[[Site, Uploader, dict[str, Any]], dict[str, Any]]


def delivered_and_told(s: Site, u: Uploader, name: str, read: Reader,
                       size: int = 300_000) -> dict[str, Any]:
    """NAME is delivered whole, and `read` (the uploader's client) shows its outcome."""
    r = receipt(s, name)
    assert_delivered(s, u, name, r, size)
    assert_outcome(read(s, u, r), r)
    return r


def smb_outcome(s: Site, u: Uploader, r: dict[str, Any]) -> dict[str, Any]:
    """The outcome as the uploader reads it: the outcomes share listed, the note fetched."""
    rid = r["id"]
    wait_for(lambda: f"{rid}.txt" in smbclient(s.box, u, SHARE, "ls outcomes/*",
                                               check=False).stdout, 20, "the note over SMB")
    listed = smbclient(s.box, u, SHARE, "ls; ls outcomes/*").stdout
    assert "outcomes" in listed and f"{rid}.json" in listed, listed
    text = smbclient(s.box, u, SHARE,
                     f"get outcomes/{rid}.txt got.txt; get outcomes/{rid}.json got.json")
    assert "NT_STATUS" not in text.stdout, text.stdout
    got = as_user(s.box, u, "cat got.txt && rm got.txt").stdout
    assert f"{r['entry']}: DELIVERED" in got, got
    note: dict[str, Any] = json.loads(as_user(s.box, u, "cat got.json && rm got.json").stdout)
    return note


def sftp(s: Site, u: Uploader, batch: str, check: bool = True, limit_kbit: int = 0,
         kill_after: float = 0) -> subprocess.CompletedProcess[str]:
    """`sftp -b BATCH dropbox` as the uploader (optionally slowed down, and killed)."""
    s.box.box.run("/bin/sh", "-c", 'cat > "$HOME/batch.sftp"', user=u.name,
                  input=batch.encode())
    cmd = f"sftp {f'-l {limit_kbit} ' if limit_kbit else ''}-b batch.sftp {SSH_ALIAS}"
    if kill_after:
        cmd = f"timeout -s KILL {kill_after} {cmd}"
    return as_user(s.box, u, cmd, check=check)


def sftp_outcome(s: Site, u: Uploader, r: dict[str, Any]) -> dict[str, Any]:
    """What an SFTP-only uploader does: learn the layout from dittohead.json, get the note."""
    sftp(s, u, "get dittohead.json layout.json\n")
    layout = json.loads(as_user(s.box, u, "cat layout.json").stdout)
    folder = layout["outcomes"].format(study=STUDY, user=u.name)
    wait_for(lambda: sftp(s, u, f"ls {folder}/{r['id']}.json\n", check=False).returncode == 0,
             20, "the note over SFTP")
    sftp(s, u, f"get {folder}/{r['id']}.json got.json\n")
    note: dict[str, Any] = json.loads(as_user(s.box, u, "cat got.json && rm got.json").stdout)
    return note


def ssh_outcome(s: Site, u: Uploader, r: dict[str, Any]) -> dict[str, Any]:
    """What an uploader with a shell does: `dittohead status --mine` over ssh."""
    def found() -> list[dict[str, Any]]:
        out = as_user(s.box, u, f"ssh {SSH_ALIAS} dittohead status --mine --json {STUDY}")
        [mine] = json.loads(out.stdout)
        return [n for n in mine["uploads"] if n["id"] == r["id"]]
    wait_for(lambda: bool(found()), 20, "the note in status --mine")
    return found()[0]


def ssh_where(s: Site, u: Uploader) -> dict[str, Any]:
    where: dict[str, Any] = json.loads(
        as_user(s.box, u, f"ssh {SSH_ALIAS} dittohead where --json {STUDY}").stdout)
    assert where["inbox"] == INBOX and where["user"] == u.name, where
    return where


# --- SMB: the study's share, each account's own folder ------------------------------------

def test_smb_folder_dropped_into_the_own_inbox_is_delivered_and_its_outcome_listed(
        site: Site) -> None:
    u = site.shell
    make_source(site, u, "smbdrop")
    listed = smbclient(site.box, u, SHARE, "ls").stdout
    assert {"inbox", "outcomes"} <= set(listed.split()), listed
    # What Explorer does with a dragged folder: the folder by its final name, then its files.
    smbclient(site.box, u, SHARE, "cd inbox; lcd src; recurse ON; prompt OFF; mput smbdrop")
    r = delivered_and_told(site, u, "smbdrop", smb_outcome)
    assert r["inbox"] == f"users/{u.name}/inbox", r


def test_smbclient_folder_put_under_a_dot_name_then_renamed_is_delivered(site: Site) -> None:
    u = site.sftp
    src = make_source(site, u, "smbdot")
    smbclient(site.box, u, SHARE, f"cd inbox; mkdir .smbdot; cd .smbdot; lcd {src}; "
              "recurse ON; prompt OFF; mput smbdot; cd ..; rename .smbdot smbdot")
    delivered_and_told(site, u, "smbdot", smb_outcome)


def test_another_uploader_over_smb_can_neither_see_nor_take_an_upload_nor_its_outcome(
        site: Site) -> None:
    owner, other = site.sftp, site.shell
    as_user(site.box, owner, "mkdir -p src/private && echo secret > src/private/s.txt")
    smbclient(site.box, owner, SHARE, "cd inbox; mkdir .private; put src/private/s.txt "
              ".private/s.txt; ls .private/*")
    as_user(site.box, other, "echo mine > mine.txt")
    theirs = f"../{owner.name}/inbox"
    # Every path resolves inside the other's own folder, where none of these exist.
    for cmd in (f"ls {theirs}/*", f"get {theirs}/.private/s.txt stolen.txt",
                f"rename {theirs}/.private {theirs}/taken", f"del {theirs}/.private/s.txt",
                f"put mine.txt {theirs}/.private/m.txt"):
        out = smbclient(site.box, other, SHARE, cmd, check=False).stdout
        assert "NT_STATUS_OBJECT_PATH_NOT_FOUND" in out, (cmd, out)
    assert as_user(site.box, other, "test -e stolen.txt", check=False).returncode != 0
    mine = f"{DROPBOX}/{STUDY}/users/{owner.name}/inbox/.private"
    listing = site.box.sh(f"ls -A {mine} && stat -c %U:%a {mine}").stdout
    assert listing.split() == ["s.txt", f"{owner.name}:700"], listing
    smbclient(site.box, owner, SHARE, "cd inbox; rename .private private")
    r = receipt(site, "private")
    assert (r["uploader"], r["files"], r["bytes"]) == (owner.name, 1, 7), r
    assert site.box.sh(f"cat {DEST}/s.txt").stdout == "secret\n"
    rid = r["id"]
    smb_outcome(site, owner, r)
    for path in (f"../{owner.name}/outcomes/{rid}.txt", f"outcomes/../../{owner.name}/"
                 f"outcomes/{rid}.txt", f"/../{owner.name}/outcomes/{rid}.txt"):
        out = smbclient(site.box, other, SHARE, f"get {path} stolen.txt", check=False).stdout
        assert "NT_STATUS_" in out, (path, out)
        assert as_user(site.box, other, "test -e stolen.txt", check=False).returncode != 0
    out = smbclient(site.box, other, SHARE, "ls outcomes/*").stdout
    assert rid not in out, out


def test_a_lab_member_added_later_gets_a_folder_at_the_first_smb_connection(
        site: Site) -> None:
    u = servers.add_uploader(site.box, "ra3", [GROUP], sftp_only=False)
    folder = f"{DROPBOX}/{STUDY}/users/{u.name}"
    assert site.box.sh(f"test -e {folder}", check=False).returncode != 0
    make_source(site, u, "latecomer")
    smbclient(site.box, u, SHARE, "cd inbox; lcd src; recurse ON; prompt OFF; mput latecomer")
    delivered_and_told(site, u, "latecomer", smb_outcome)


# --- SFTP and scp (the SFTP-only account, chrooted to the dropbox root) ----------------------

def test_sftp_batch_upload_to_a_dot_name_then_rename_is_delivered(site: Site) -> None:
    u = site.sftp
    src = make_source(site, u, "sftpdot")
    sftp(site, u, f"""mkdir {STUDY}/inbox/.sftpdot
put -r {src}/sftpdot {STUDY}/inbox/.sftpdot/sftpdot
rename {STUDY}/inbox/.sftpdot {STUDY}/inbox/sftpdot
""")
    delivered_and_told(site, u, "sftpdot", sftp_outcome)


def test_sftp_killed_halfway_leaves_the_dot_name_undelivered_and_reput_finishes_it(
        site: Site) -> None:
    u, size = site.sftp, 3_000_000
    src = make_source(site, u, "sftpkill", size)
    remote = f"{STUDY}/inbox/.sftpkill/sftpkill"
    puts = f"put '{src}/sftpkill/notes file.txt' {remote}/\nput {src}/sftpkill/sub/data.bin "
    # About 6 s at 4 Mbit/s: killed after 2 s, as a laptop closed mid-upload.
    r = sftp(site, u, f"mkdir {STUDY}/inbox/.sftpkill\nmkdir {remote}\nmkdir {remote}/sub\n"
             f"{puts}{remote}/sub/\n", check=False, limit_kbit=4000, kill_after=2)
    assert r.returncode == 137, r
    part = int(site.box.sh(f"stat -c %s {INBOX}/.sftpkill/sftpkill/sub/data.bin").stdout)
    assert 0 < part < size, part
    time.sleep(QUIET + 2)
    assert "sftpkill" not in site.box.delivered(STUDY)
    # Rerun: reput appends what is missing; then the rename makes it an entry.
    sftp(site, u, f"reput {src}/sftpkill/sub/data.bin {remote}/sub/data.bin\n"
         f"rename {STUDY}/inbox/.sftpkill {STUDY}/inbox/sftpkill\n")
    delivered_and_told(site, u, "sftpkill", sftp_outcome, size)


def test_sftp_rename_never_replaces_an_upload_still_waiting(site: Site) -> None:
    u = site.sftp
    as_user(site.box, u, "echo first > first.txt && echo second > second.txt")
    inbox = f"{STUDY}/inbox"
    # The second upload's rename would replace the first, not claimed yet (quiet period).
    r = sftp(site, u, f"put first.txt {inbox}/norepl.txt\nput second.txt {inbox}/.norepl.txt\n"
             f"rename {inbox}/.norepl.txt {inbox}/norepl.txt\n", check=False)
    assert r.returncode == 1 and "Failure" in r.stderr, r
    rec = receipt(site, "norepl.txt")
    assert (rec["uploader"], rec["files"], rec["bytes"]) == (u.name, 1, 6), rec
    assert site.box.sh(f"cat {DEST}/norepl.txt {INBOX}/.norepl.txt").stdout == "first\nsecond\n"


def test_scp_r_straight_into_the_inbox_is_delivered_once_quiet(site: Site) -> None:
    u = site.sftp
    src = make_source(site, u, "scpdrop")
    as_user(site.box, u, f"scp -r -q {src} {SSH_ALIAS}:{STUDY}/inbox/scpdrop")
    delivered_and_told(site, u, "scpdrop", sftp_outcome)


def test_an_sftp_only_account_reads_no_one_elses_outcomes_and_gets_no_shell(
        site: Site) -> None:
    u, other = site.sftp, site.shell
    for cmd in (f"ls {STUDY}/users", f"ls {STUDY}/users/{other.name}",
                f"get {STUDY}/users/{other.name}/outcomes/x.json x.json", "ls /etc",
                f"ls {STUDY}/done"):
        r = sftp(site, u, cmd + "\n", check=False)
        assert r.returncode != 0, (cmd, r.stdout)
    r = as_user(site.box, u, f"ssh {SSH_ALIAS} cat /etc/hostname", check=False)
    assert r.returncode != 0 and "sftp connections only" in r.stdout + r.stderr, r


# --- rsync over ssh, cp and mv on the server (the account with a shell) ---------------------

def test_rsync_straight_into_the_inbox_is_delivered_whole(site: Site) -> None:
    u = site.shell
    src = make_source(site, u, "rsyncdrop")
    inbox = ssh_where(site, u)["inbox"]
    as_user(site.box, u, f"rsync -a --bwlimit=300 {src}/ {SSH_ALIAS}:{inbox}/rsyncdrop/")
    delivered_and_told(site, u, "rsyncdrop", ssh_outcome)
    # rsync wrote each file as .NAME.XXXXXX first (about 1 s at 300 KB/s): none delivered.
    assert site.box.sh(f"find {DEST}/rsyncdrop -name '.*'").stdout == ""


def test_rsync_to_a_dot_name_then_ssh_mv_is_delivered(site: Site) -> None:
    u = site.shell
    src = make_source(site, u, "rsyncdot")
    inbox = ssh_where(site, u)["inbox"]
    as_user(site.box, u, f"rsync -a {src}/ {SSH_ALIAS}:{inbox}/.rsyncdot/ && "
            f"ssh {SSH_ALIAS} mv -T {inbox}/.rsyncdot {inbox}/rsyncdot")
    delivered_and_told(site, u, "rsyncdot", ssh_outcome)


def test_rsync_killed_halfway_to_a_dot_name_is_finished_by_running_it_again(
        site: Site) -> None:
    u, size = site.shell, 2_000_000
    src = make_source(site, u, "rsynckill", size)
    inbox = ssh_where(site, u)["inbox"]
    rsync = f"rsync -a {src}/ {SSH_ALIAS}:{inbox}/.rsynckill/"
    r = as_user(site.box, u, f"timeout -s KILL 2 {rsync} --bwlimit=300", check=False)
    assert r.returncode == 137, r
    time.sleep(QUIET + 2)
    assert "rsynckill" not in site.box.delivered(STUDY)
    as_user(site.box, u, f"{rsync} && ssh {SSH_ALIAS} mv -T {inbox}/.rsynckill {inbox}/rsynckill")
    delivered_and_told(site, u, "rsynckill", ssh_outcome, size)


def test_cp_then_mv_on_the_server_is_delivered_and_its_note_readable(site: Site) -> None:
    u = site.shell
    src = make_source(site, u, "cpmv")
    where = json.loads(as_user(site.box, u, f"dittohead where --json {STUDY}").stdout)
    as_user(site.box, u, f"cp -r {src} {where['inbox']}/.cpmv && "
            f"mv -T {where['inbox']}/.cpmv {where['inbox']}/cpmv")
    r = receipt(site, "cpmv")
    assert_delivered(site, u, "cpmv", r)
    wait_for(lambda: as_user(site.box, u, f"test -e {where['outcomes']}/{r['id']}.txt",
                             check=False).returncode == 0, 20, "the note")
    text = as_user(site.box, u, f"cat {where['outcomes']}/{r['id']}.txt").stdout
    assert "cpmv: DELIVERED" in text, text
    [mine] = json.loads(as_user(site.box, u, f"dittohead status --mine --json {STUDY}").stdout)
    assert_outcome(next(n for n in mine["uploads"] if n["id"] == r["id"]), r)
    other = as_user(site.box, u, f"ls {DROPBOX}/{STUDY}/users/{site.sftp.name}", check=False)
    assert other.returncode != 0 and "Permission denied" in other.stderr, other
