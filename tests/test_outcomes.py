"""Each uploader learns what became of their uploads, and only of theirs (outcomes.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dittohead import layout
from dittohead.outcomes import acl_for_user, acl_problem, open_outcomes, outcomes_dir

from .conftest import (
    IS_ROOT,
    REPO,
    Env,
    ThrowawayUser,
    add_user,
    as_service,
    make_env,
    me,
    service_argv,
)

root = pytest.mark.root
needs_root = pytest.mark.skipif(not IS_ROOT, reason="NEEDS ROOT: real uploaders and ACLs")


def notes(env: Env, uid: int | None = None) -> list[dict[str, object]]:
    folder = outcomes_dir(env.study, os.getuid() if uid is None else uid)
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def test_delivered_upload_leaves_a_note_in_its_uploaders_folder(env: Env) -> None:
    env.drop("s01", {"a.txt": b"hello"})
    assert env.process().returncode == 0
    [note] = notes(env)
    assert note["outcome"] == "delivered" and note["entry"] == "s01"
    assert note["files"] == 1 and note["bytes"] == 5
    text = (outcomes_dir(env.study, os.getuid()) / f"{note['id']}.txt").read_bytes()
    assert text.startswith(b"s01: DELIVERED\r\n")  # CRLF: readable in any Notepad
    assert b"Nothing to do" in text


def test_failed_upload_note_says_why_and_what_to_do(env: Env) -> None:
    (env.study.destination / "a.txt").write_bytes(b"other")
    env.drop("s02", {"a.txt": b"mine"})
    env.process()
    [note] = notes(env)
    assert note["outcome"] == "failed"
    assert "a.txt" in str(note["reason"])
    text = (outcomes_dir(env.study, os.getuid()) / f"{note['id']}.txt").read_text()
    assert "FAILED, not delivered" in text and "upload it again" in text


def test_kept_entry_is_noted_pending_then_replaced_by_its_outcome(env: Env) -> None:
    dest = env.study.destination
    dest.rename(dest.with_name("away"))  # not mounted, say
    env.drop("s03", {"a.txt": b"x"})
    assert env.process().returncode == 75
    [note] = notes(env)
    assert note["outcome"] == "pending" and note["finished"] is None
    dest.with_name("away").rename(dest)
    assert env.process().returncode == 0
    [note] = notes(env)
    assert note["outcome"] == "delivered"


def test_status_mine_lists_own_uploads_newest_first(env: Env) -> None:
    env.drop("first", {"a": b"1"})
    env.process()
    env.drop("second", {"b": b"2"})
    env.process()
    out = env.run("status", "--mine", "--json", check=True).stdout
    [study] = json.loads(out)
    assert [u["entry"] for u in study["uploads"]] == ["second", "first"]
    text = env.run("status", "--mine", check=True).stdout
    assert "second: delivered: 1 files, 1 bytes" in text


def test_where_tells_a_client_the_inbox_and_its_outcomes(env: Env) -> None:
    data = json.loads(env.run("where", "--json", "s1", check=True).stdout)
    assert data["inbox"] == str(env.study.inbox)
    assert data["outcomes"] == str(outcomes_dir(env.study, os.getuid()))
    assert env.run("where", "nope").returncode == 78


def test_upload_wait_prints_the_outcome_and_exits_by_it(env: Env, tmp_path: Path) -> None:
    src = tmp_path / "s04"
    src.mkdir()
    (src / "a.txt").write_bytes(b"data")
    with drained(lambda: env.process()):
        r = env.run("upload", "--wait", "--timeout", "60", "s1", str(src))
    assert r.returncode == 0, r.stderr
    assert "s04: delivered: 1 files, 4 bytes" in r.stdout
    (env.study.destination / "b.txt").write_bytes(b"theirs")
    (src / "b.txt").write_bytes(b"mine")
    with drained(lambda: env.process()):
        r = env.run("upload", "--wait", "--timeout", "60", "s1", str(src))
    assert r.returncode == 65, r.stderr
    assert "s04: failed:" in r.stdout and "b.txt" in r.stdout


def test_upload_wait_times_out_with_75_saying_where_the_upload_is(env: Env,
                                                                 tmp_path: Path) -> None:
    src = tmp_path / "s05"
    src.write_bytes(b"x")
    r = env.run("upload", "--wait", "--timeout", "1", "s1", str(src))
    assert r.returncode == 75
    assert "still in the inbox" in r.stderr


@contextmanager
def drained(run: Callable[[], object]) -> Iterator[None]:
    """Run the service's drain over and over in a thread while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(0.3):
            run()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# --- real users: the folder is the uploader's alone --------------------------------------

@pytest.fixture
def other() -> ThrowawayUser:
    return add_user("dh-test-ra2")


def as_user(user: ThrowawayUser, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*user.prefix(), *argv], capture_output=True, text=True,
                          timeout=120, cwd="/")


def dittohead_as(user: ThrowawayUser, env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    return as_user(user, "env", f"PYTHONPATH={REPO}", "DITTOHEAD_LOG=stderr",
                   "/usr/bin/python3", "-m", "dittohead", "--config", str(env.config_path), *args)


@root
@needs_root
def test_only_the_uploader_reads_their_outcomes(service_env: Env, svc: ThrowawayUser,
                                                ra: ThrowawayUser,
                                                other: ThrowawayUser) -> None:
    env = service_env
    src = env.base / "s06"
    src.mkdir()
    (src / "a.txt").write_bytes(b"private")
    os.chmod(src / "a.txt", 0o644)
    argv = service_argv(env, svc, "process", "s1")
    with drained(lambda: subprocess.run(argv, capture_output=True, timeout=120, cwd="/")):
        r = dittohead_as(ra, env, "upload", "--wait", "--timeout", "60", "s1", str(src))
    assert r.returncode == 0, r.stderr
    assert "s06: delivered" in r.stdout
    folder = outcomes_dir(env.study, ra.uid)
    assert as_user(ra, "ls", str(folder)).returncode == 0
    mine = dittohead_as(ra, env, "status", "--mine", "s1")
    assert "s06: delivered" in mine.stdout
    # Another uploader can neither list who uploads nor read ra's folder, and sees no
    # uploads of their own.
    assert as_user(other, "ls", str(env.study.users)).returncode != 0
    assert as_user(other, "ls", str(folder)).returncode != 0
    assert as_user(other, "cat", *[str(p) for p in folder.glob("*.txt")]).returncode != 0
    theirs = dittohead_as(other, env, "status", "--mine", "--json", "s1")
    assert json.loads(theirs.stdout)[0]["uploads"] == []


@root
@needs_root
def test_rejected_upload_wait_exits_77(shared_base: Path, svc: ThrowawayUser,
                                       ra: ThrowawayUser) -> None:
    env = make_env(shared_base, {"uploaders": ["dh-test-nobody-here"]}, service_user=svc.name)
    src = env.base / "s07"
    src.write_bytes(b"x")
    os.chmod(src, 0o644)
    argv = service_argv(env, svc, "process", "s1")
    with drained(lambda: subprocess.run(argv, capture_output=True, timeout=120, cwd="/")):
        r = dittohead_as(ra, env, "upload", "--wait", "--timeout", "60", "s1", str(src))
    assert r.returncode == 77, r.stderr
    assert "s07: rejected:" in r.stdout


@root
@needs_root
def test_setup_makes_folders_for_uploaders_and_the_sftp_marker(
        shared_base: Path, svc: ThrowawayUser, ra: ThrowawayUser) -> None:
    env = make_env(shared_base, {"uploaders": ["dh-test-uploaders"]}, service_user=svc.name)
    out = subprocess.run(["python3", "-m", "dittohead", "--config", str(env.config_path),
                          "setup", "s1"], capture_output=True, text=True, cwd=REPO, check=True)
    folder = outcomes_dir(env.study, ra.uid)
    assert f"created {folder.parent}" in out.stdout
    st = os.stat(folder)
    assert (st.st_uid, oct(st.st_mode & 0o7777)) == (svc.uid, "0o755")
    assert as_user(ra, "ls", str(folder)).returncode == 0
    marker = json.loads((env.cfg.dropbox_root / layout.MARKER).read_text())
    assert marker["outcomes"] == "{study}/users/{user}/outcomes"
    # Notes are written by the service into the folder setup made.
    drop_as(ra, env, "s08")
    r = as_service(env, svc, "process", "s1")
    assert r.returncode == 0, r.stderr
    assert [n["entry"] for n in notes(env, ra.uid)] == ["s08"]


def drop_as(user: ThrowawayUser, env: Env, name: str) -> None:
    inbox = env.study.inbox
    assert as_user(user, "sh", "-c", f"echo hi > {inbox}/.{name} && "
                   f"mv {inbox}/.{name} {inbox}/{name}").returncode == 0


# --- an uploader's own inbox, which they can list -------------------------------------

def own_inbox(env: Env) -> Path:
    """The current user's own inbox, made as the service makes it."""
    os.close(open_outcomes(env.study, os.getuid(), (os.geteuid(), os.getegid())))
    return outcomes_dir(env.study, os.getuid()).parent / "inbox"


def test_entry_in_an_uploaders_own_inbox_is_delivered(env: Env) -> None:
    inbox = own_inbox(env)
    (inbox / "s09").mkdir()
    (inbox / "s09" / "a.txt").write_bytes(b"own")
    assert env.process().returncode == 0
    assert (env.study.destination / "a.txt").read_bytes() == b"own"
    assert list(inbox.iterdir()) == []
    [receipt] = [json.loads(p.read_text()) for p in env.done_receipts()]
    assert receipt["inbox"] == f"users/{me()}/inbox"
    assert [n["entry"] for n in notes(env)] == ["s09"]


def test_failed_entry_from_own_inbox_is_retried_back_there(env: Env) -> None:
    inbox = own_inbox(env)
    (env.study.destination / "a.txt").write_bytes(b"theirs")
    (inbox / "s10").mkdir()
    (inbox / "s10" / "a.txt").write_bytes(b"mine")
    env.process()
    [failed] = [json.loads(p.read_text()) for p in env.failed_receipts()]
    out = env.run("retry", "s1", failed["id"], check=True).stdout
    assert f"back in {inbox} as s10" in out
    assert (inbox / "s10" / "a.txt").read_bytes() == b"mine"


def test_status_mine_lists_what_waits_in_the_own_inbox(env: Env) -> None:
    inbox = own_inbox(env)
    (inbox / "s14").write_bytes(b"x")
    (inbox / ".s15").write_bytes(b"y")  # still being copied: not listed
    text = env.run("status", "--mine", "s1", check=True).stdout
    assert "waiting in your inbox: s14 (taken once nothing in it has changed for 0 s)" in text
    [study] = json.loads(env.run("status", "--mine", "--json", "s1", check=True).stdout)
    assert study["waiting"] == ["s14"]


def test_status_counts_entries_in_own_inboxes(env: Env) -> None:
    inbox = own_inbox(env)
    (inbox / "s11").write_bytes(b"x")
    (inbox / ".s12").write_bytes(b"y")
    [status] = json.loads(env.run("status", "--json", check=True).stdout)
    assert (status["pending"], status["uploading"]) == (1, 1)


@root
@needs_root
def test_own_inbox_is_listable_and_writable_by_its_uploader_only(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser,
        other: ThrowawayUser) -> None:
    env = service_env
    out = subprocess.run(["python3", "-m", "dittohead", "--config", str(env.config_path),
                          "setup", "s1", "--user", ra.name], capture_output=True, text=True,
                         cwd=REPO, check=True)
    inbox = outcomes_dir(env.study, ra.uid).parent / "inbox"
    assert f"created {inbox.parent}" in out.stdout
    assert as_user(ra, "sh", "-c", f"mkdir {inbox}/s13 && echo hi > {inbox}/s13/a.txt && "
                   f"ls {inbox}").stdout == "s13\n"
    assert as_user(other, "ls", str(inbox)).returncode != 0
    assert as_user(other, "touch", f"{inbox}/theirs").returncode != 0
    r = as_service(env, svc, "process", "s1")
    assert r.returncode == 0, r.stderr
    assert (env.study.destination / "a.txt").read_bytes() == b"hi\n"
    assert as_user(ra, "ls", str(inbox)).stdout == ""
    assert "s13: delivered" in dittohead_as(ra, env, "status", "--mine", "s1").stdout


@root
@needs_root
def test_check_says_when_the_dropbox_has_no_acls(env: Env, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # ramfs has no xattrs at all, so no ACLs (ext4 cannot be mounted without them now).
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], check=True)
    try:
        (mnt / "users").mkdir()
        study = dataclasses.replace(env.study, root=mnt)
        assert "has no POSIX ACLs" in str(acl_problem(study))
        assert acl_problem(env.study) is None
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@root
@needs_root
def test_check_names_a_folder_whose_acl_lets_another_uid_in(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser, other: ThrowawayUser) -> None:
    env = service_env
    os.close(open_outcomes(env.study, ra.uid, (svc.uid, svc.gid)))
    assert env.run("check", "s1").stdout.count("ACL") == 0
    # A login reused by a new account: the folder still lets the old uid in.
    os.setxattr(env.study.users / ra.name, "system.posix_acl_access",
                acl_for_user(other.uid, 5))
    out = env.run("check", "s1").stdout
    assert f"users/{ra.name}: its ACL does not let exactly uid {ra.uid}" in out


@root
@needs_root
def test_setup_of_a_study_whose_group_is_missing_says_so_and_changes_nothing(
        shared_base: Path, svc: ThrowawayUser) -> None:
    env = make_env(shared_base, {"group": "dh-test-nosuchgroup"}, service_user=svc.name)
    (env.cfg.dropbox_root / layout.MARKER).unlink(missing_ok=True)
    r = env.run("setup", "s1")
    assert r.returncode == 78, r.stderr
    assert "no such group 'dh-test-nosuchgroup': create it first" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (env.cfg.dropbox_root / layout.MARKER).exists()
