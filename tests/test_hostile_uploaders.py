"""A hostile uploader at a lab PC against the per-uploader folders (users/<user>/).

Each attack is made by a real unprivileged user (a throwaway one, through
setpriv) against the service run as its own user with exactly the unit's
capabilities (conftest.service_argv): nothing here may make the service
exit 1 or 78 for everybody, misroute or lose an entry, or tell one uploader
about another's uploads.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from pathlib import Path

import pytest

from dittohead.errors import TemporaryError
from dittohead.outcomes import acl_for_user, outcomes_dir
from dittohead.upload import before, wait

from .conftest import IS_ROOT, REPO, Env, ThrowawayUser, add_user, as_service, service_argv
from .test_outcomes import as_user, dittohead_as, drop_as, notes, own_inbox

root = pytest.mark.root
other = pytest.fixture(lambda: add_user("dh-test-ra2"), name="other")
needs_root = pytest.mark.skipif(not IS_ROOT, reason="NEEDS ROOT: real uploaders and ACLs")

# Swaps two names of a directory for ever (RENAME_EXCHANGE), as fast as it can:
# an uploader's own inbox is theirs to write, so they may do this to their entries.
SWAPPER = r"""
import ctypes, errno, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
a, b = (os.fsencode(x) for x in sys.argv[1:3])
AT_FDCWD, RENAME_EXCHANGE = -100, 2
end = time.monotonic() + float(sys.argv[3])
print("go", flush=True)
while time.monotonic() < end:
    for _ in range(1000):
        if libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) != 0:
            if ctypes.get_errno() == errno.ENOENT:
                sys.exit(0)
"""


def setup_user(env: Env, user: ThrowawayUser) -> Path:
    """`dittohead setup s1 --user NAME`, as root does it; the user's own inbox."""
    subprocess.run(["python3", "-m", "dittohead", "--config", str(env.config_path), "setup",
                    "s1", "--user", user.name], capture_output=True, cwd=REPO, check=True)
    return outcomes_dir(env.study, user.uid).parent / "inbox"


@root
@needs_root
@pytest.mark.parametrize("shared", [False, True], ids=["own-inbox", "shared-inbox"])
@pytest.mark.parametrize("second", ["dir", "file"])
def test_swapping_entries_during_claims_never_ends_a_run_with_1_or_78(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser, shared: bool,
        second: str) -> None:
    """An uploader swaps two of their entries (RENAME_EXCHANGE) while the service claims
    them: a swap that passed its checks before the takeover still lands after it, so the
    claim's rename may move the other entry. Each is delivered all the same, as theirs."""
    env = service_env
    inbox = env.study.inbox if shared else setup_user(env, ra)
    argv = service_argv(env, svc, "process", "s1")
    for i in range(8):
        a, b = inbox / f"e{i}", inbox / f"f{i}"
        assert as_user(ra, "sh", "-c", f"mkdir {a} && echo {a.name} > {a}/{a.name}.txt"
                       ).returncode == 0
        make = (f"mkdir {b} && echo {b.name} > {b}/{b.name}.txt" if second == "dir"
                else f"echo {b.name} > {b}")
        assert as_user(ra, "sh", "-c", make).returncode == 0
        swapper = subprocess.Popen([*ra.prefix(), "/usr/bin/python3", "-c", SWAPPER, str(a),
                                    str(b), "20"], stdout=subprocess.PIPE, text=True, cwd="/")
        assert swapper.stdout is not None and swapper.stdout.readline() == "go\n"
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd="/")
        swapper.kill()
        swapper.wait()
        assert r.returncode == 0, r.stderr
        assert os.listdir(inbox) == []
    delivered = set(os.listdir(env.study.destination))
    for i in range(8):  # a plain file is delivered under the name it was claimed by
        assert {f"e{i}.txt", f"f{i}.txt"} <= delivered if second == "dir" else \
            f"e{i}.txt" in delivered and len({f"e{i}", f"f{i}"} & delivered) == 1
    for p in env.done_receipts():
        assert json.loads(p.read_text())["uploader_uid"] == ra.uid


def run_as_service(env: Env, svc: ThrowawayUser) -> subprocess.CompletedProcess[str]:
    return as_service(env, svc, "process", "s1")


def free_uid() -> int:
    """A uid nobody has (an account deleted since, a domain user the host cannot name)."""
    return next(u for u in range(4242, 60000) if _nameless(u))


def _nameless(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return True
    return False


@root
@needs_root
def test_a_user_named_like_another_uploaders_uid_never_reads_their_outcomes(
        service_env: Env, svc: ThrowawayUser) -> None:
    """Student numbers are common logins: the user named '4242' and the nameless uid
    4242 (whose folder is named by its uid) get folders of their own."""
    env = service_env
    nameless = free_uid()
    numeric = add_user(str(nameless))
    assert numeric.uid != nameless
    setup_user(env, numeric)
    env.drop("theirs", {"secret-plan.txt": b"x"}, uid=nameless)
    r = run_as_service(env, svc)
    assert r.returncode == 0, r.stderr
    mine = dittohead_as(numeric, env, "status", "--mine", "--json", "s1")
    assert json.loads(mine.stdout)[0]["uploads"] == [], mine.stdout
    assert outcomes_dir(env.study, nameless) != outcomes_dir(env.study, numeric.uid)
    [note] = notes(env, nameless)
    assert note["entry"] == "theirs"


@root
@needs_root
def test_notes_never_go_into_a_folder_another_uid_may_read(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser,
        other: ThrowawayUser) -> None:
    """A login reused by a new account (another uid) finds the old account's folder;
    the service writes nothing there and warns, so the old uid learns nothing."""
    env = service_env
    inbox = setup_user(env, ra)
    folder = inbox.parent
    # The folder as it was left by the name's previous holder, now `other`'s uid.
    os.setxattr(folder, "system.posix_acl_access", acl_for_user(other.uid, 5))
    drop_as(ra, env, "s20")
    r = run_as_service(env, svc)
    assert r.returncode == 0, r.stderr
    assert "note could not be written" in r.stderr and "another user" in r.stderr
    assert list((folder / "outcomes").iterdir()) == []
    assert [p.name for p in env.done_receipts()]  # delivered all the same
    r = subprocess.run(["python3", "-m", "dittohead", "--config", str(env.config_path), "setup",
                        "s1", "--user", ra.name], capture_output=True, text=True, cwd=REPO)
    assert r.returncode != 0 and "another user" in r.stderr


def test_upload_wait_never_takes_the_outcome_of_the_same_name_in_the_own_inbox(
        env: Env) -> None:
    """`upload` drops into the shared inbox; the same name dropped into the uploader's
    own inbox meanwhile (a lab PC over SMB) is another upload, with its own outcome."""
    then = before(env.study)
    (env.study.destination / "s30").write_bytes(b"theirs")
    (own_inbox(env) / "s30").write_bytes(b"mine")  # fails: a conflict
    assert env.process().returncode == 0
    [note] = notes(env)
    assert note["outcome"] == "failed"
    with pytest.raises(TemporaryError, match="no outcome"):
        wait(env.study, "s30", then, 0.5)


@root
@needs_root
def test_retry_never_puts_another_users_file_into_an_own_inbox(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser,
        other: ThrowawayUser) -> None:
    """ra hard-links other's world-writable upload into ra's own inbox (Linux lets
    anyone link a file they may read and write): it fails (other names) as other's
    entry, and `retry` puts it back into the shared inbox, not into ra's."""
    env = service_env
    inbox = setup_user(env, ra)
    assert as_user(other, "sh", "-c", f"umask 0; echo secret > {env.study.inbox}/.b1 && "
                   f"mv {env.study.inbox}/.b1 {env.study.inbox}/b1").returncode == 0
    assert as_user(ra, "ln", f"{env.study.inbox}/b1", f"{inbox}/a1").returncode == 0
    r = run_as_service(env, svc)
    assert r.returncode == 0, r.stderr
    failed = [json.loads(p.read_text()) for p in env.failed_receipts()]
    [mine] = [f for f in failed if f["entry"] == "a1"]
    assert mine["uploader_uid"] == other.uid and mine["inbox"] == f"users/{ra.name}/inbox"
    out = subprocess.run(["python3", "-m", "dittohead", "--config", str(env.config_path),
                          "retry", "s1", mine["id"]], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    assert f"back in {env.study.inbox} as a1" in out
    assert os.listdir(inbox) == []


@root
@needs_root
def test_odd_entries_in_an_own_inbox_are_filed_and_the_run_ends_0(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser,
        other: ThrowawayUser) -> None:
    """FIFOs, sockets, symlinks into another uploader's folder, 0000 directories,
    names with newlines or like another inbox's key: each is filed (failed where it
    must), nothing waits for ever, nothing is followed."""
    env = service_env
    inbox = setup_user(env, ra)
    theirs = setup_user(env, other).parent / "outcomes"
    script = (f"cd {inbox} && mkfifo p1 && ln -s {theirs} l1 && "
              "mkdir -p d0/sub && echo x > d0/sub/f && chmod 0 d0/sub d0 && "
              "printf x > \"$(printf 'n\\nl')\" && mkdir users && echo y > users/y && "
              "python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"s1\")'")
    assert as_user(ra, "sh", "-c", script).returncode == 0
    r = run_as_service(env, svc)
    assert r.returncode == 0, r.stderr
    assert os.listdir(inbox) == []
    receipts = {json.loads(p.read_text())["entry"]: json.loads(p.read_text())
                for p in [*env.done_receipts(), *env.failed_receipts()]}
    assert set(receipts) == {"p1", "l1", "d0", "n\\nl", "users", "s1"}
    assert {e for e, x in receipts.items() if x["outcome"] == "delivered"} == \
        {"d0", "n\\nl", "users"}
    assert all(x["uploader_uid"] == ra.uid for x in receipts.values())
    assert os.listdir(theirs) == []
