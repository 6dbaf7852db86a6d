"""The service's two capabilities, each shown needed, and what it does without DAC_OVERRIDE.

The service runs as a throwaway user with exactly the capabilities its unit
grants (SERVICE_CAPS), or with one of them removed; uploads are made by
another throwaway user with umask 077, as sftp -p or rsync -p would leave them.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from .conftest import (
    Env,
    ThrowawayUser,
    add_group,
    as_service,
    make_env,
    manifest_verifies,
    no_leftovers,
    service_argv,
    tree,
    wait_for,
)

pytestmark = pytest.mark.root

FILES = {"d/f.txt": b"private\n", "top.txt": b"top\n"}


def upload(env: Env, user: ThrowawayUser, name: str = "up") -> Path:
    """A umask-077 upload by `user` (0700 directories, 0600 files), renamed into place."""
    inbox = env.study.inbox
    script = (f"mkdir -p {inbox}/.{name}/d && printf 'private\\n' > {inbox}/.{name}/d/f.txt && "
              f"printf 'top\\n' > {inbox}/.{name}/top.txt && mv {inbox}/.{name} {inbox}/{name}")
    subprocess.run([*user.prefix("077"), "sh", "-c", script], check=True)
    entry = inbox / name
    assert stat.S_IMODE(entry.stat().st_mode) == 0o700
    return entry


def untouched(entry: Path, user: ThrowawayUser) -> None:
    assert tree(entry) == FILES
    assert all(p.lstat().st_uid == user.uid for p in [entry, *entry.rglob("*")])


def delivered(env: Env, user: ThrowawayUser) -> dict[str, object]:
    assert tree(env.study.destination) == FILES
    [rc] = env.done_receipts()
    manifest_verifies(env, rc)
    no_leftovers(env)
    data: dict[str, object] = json.loads(rc.read_text())
    assert data["uploader"] == user.name
    return data


def test_the_unit_capabilities_deliver_a_umask_077_upload(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser) -> None:
    upload(service_env, ra)
    r = as_service(service_env, svc, "process", "s1")
    assert r.returncode == 0, r.stderr
    delivered(service_env, ra)


@pytest.mark.parametrize(("caps", "missing"), [("+chown", "CAP_DAC_READ_SEARCH"),
                                             ("+dac_read_search", "CAP_CHOWN")])
def test_without_either_capability_an_upload_stays_in_the_inbox_its_uploaders(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser, caps: str,
        missing: str) -> None:
    # Without CAP_DAC_READ_SEARCH its 0700 directory cannot be opened; without
    # CAP_CHOWN it cannot be taken over, so it cannot be moved out of the inbox.
    entry = upload(service_env, ra)
    r = as_service(service_env, svc, "process", "s1", caps=caps)
    assert r.returncode == 78, r.stderr
    assert "cannot claim up" in r.stderr and missing in r.stderr
    untouched(entry, ra)
    assert list(service_env.study.processing.glob("*.json")) == []
    assert as_service(service_env, svc, "process", "s1").returncode == 0
    delivered(service_env, ra)


def test_a_claimed_directory_is_the_services_before_it_leaves_the_inbox(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser) -> None:
    env = service_env
    entry = upload(env, ra)
    go = env.study.root / ".test-go"
    run = subprocess.Popen(
        service_argv(env, svc, "process", "s1",
                     extra_env={"DITTOHEAD_TEST_FAULT": f"chowned=wait:{go}"}),
        stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        wait_for(lambda: entry.lstat().st_uid == svc.uid, 20, "the takeover")
        # Its uploader can neither take it back nor put something else in its place.
        for argv in (["mv", str(entry), f"{entry}.mine"], ["rm", "-rf", str(entry)],
                     ["mkdir", str(entry / "extra")], ["touch", str(entry / "new.txt")]):
            r = subprocess.run([*ra.prefix(), *argv], capture_output=True, text=True)
            assert r.returncode != 0, argv
    finally:
        go.touch()
        _, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    delivered(env, ra)


def killed_after_takeover(env: Env, svc: ThrowawayUser, ra: ThrowawayUser) -> Path:
    """ra's upload, taken over by a run killed before it renamed it out of the inbox."""
    entry = upload(env, ra)
    r = as_service(env, svc, "process", "s1", extra_env={"DITTOHEAD_TEST_FAULT": "chowned"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    return entry


def test_a_run_killed_between_takeover_and_rename_finishes_the_claim(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser) -> None:
    env = service_env
    entry = killed_after_takeover(env, svc, ra)
    [record] = env.study.processing.glob("*.json")
    claim_id = json.loads(record.read_text())["id"]
    assert entry.lstat().st_uid == svc.uid  # taken over, still in the inbox
    r = as_service(env, svc, "process", "s1")
    assert r.returncode == 0, r.stderr
    data = delivered(env, ra)  # credited to the uploader the record names
    assert data["id"] == claim_id


def test_a_directory_renamed_just_before_a_killed_takeover_is_given_back(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser) -> None:
    # The uploader renamed the entry between the claim's open and its chown,
    # and the run was killed before it could see that: the next run finds the
    # directory by inode under its new name and gives it back, untouched.
    env = service_env
    entry = killed_after_takeover(env, svc, ra)
    moved = env.study.inbox / ".renamed"
    os.rename(entry, moved)  # what the uploader did, a moment before the chown
    r = as_service(env, svc, "process", "s1")
    assert r.returncode == 0, r.stderr
    untouched(moved, ra)
    assert stat.S_IMODE(moved.stat().st_mode) == 0o700
    assert not list(env.study.processing.glob("*.json"))  # the claim is forgotten
    assert not env.done_receipts() and not env.failed_receipts()


def test_a_destination_directory_the_service_cannot_write_fails_the_entry_naming_it(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser) -> None:
    env = service_env
    closed = env.study.destination / "d"
    closed.mkdir(mode=0o755)  # an admin's, root's
    upload(env, ra)
    r = as_service(env, svc, "process", "s1")
    assert r.returncode == 0, r.stderr
    [rc] = env.failed_receipts()
    reason = json.loads(rc.read_text())["reason"]
    assert "the service cannot write to directories in" in reason and ": d/." in reason
    assert tree(env.study.destination) == {}
    no_leftovers(env)
    os.chown(closed, svc.uid, svc.gid)
    assert env.run("retry", "s1", rc.stem).returncode == 0
    r = as_service(env, svc, "process", "s1")
    assert r.returncode == 0, r.stderr
    assert tree(env.study.destination) == FILES


def test_a_destination_the_service_cannot_write_is_a_config_error_and_keeps_the_entry(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser) -> None:
    env = service_env
    os.chown(env.study.destination, 0, 0)
    os.chmod(env.study.destination, 0o755)
    upload(env, ra)
    r = as_service(env, svc, "process", "s1")
    assert r.returncode == 78, r.stderr
    assert "the service cannot write to the destination" in r.stderr
    assert len(list(env.study.processing.glob("*.json"))) == 1
    os.chown(env.study.destination, svc.uid, svc.gid)
    r = as_service(env, svc, "process", "s1")
    assert r.returncode == 0, r.stderr
    delivered(env, ra)


def test_check_names_destination_directories_the_service_cannot_write(
        service_env: Env, svc: ThrowawayUser) -> None:
    env = service_env
    (env.study.destination / "admins" / "deeper").mkdir(parents=True)  # root's, 0755
    (env.study.destination / "ours").mkdir()
    os.chown(env.study.destination / "ours", svc.uid, svc.gid)
    (env.study.destination / "group").mkdir()
    os.chmod(env.study.destination / "group", 0o770)
    os.chown(env.study.destination / "group", 0, svc.gid)
    r = env.run("check", "s1")
    assert r.returncode == 1
    closed = sorted(line for line in r.stdout.splitlines() if "is not writable by" in line)
    assert [line.split(": ", 1)[1].split(" is ")[0] for line in closed] == [
        str(env.study.destination / "admins"), str(env.study.destination / "admins/deeper")]
    assert f"entries adding to it fail (chown {svc.name} it)" in closed[0]


def test_a_claim_of_an_older_version_still_the_uploaders_is_filed_when_rejected(
        shared_base: Path, svc: ThrowawayUser, ra: ThrowawayUser) -> None:
    # Claimed before claims took directories over, then rejected before its walk:
    # moving it on to failed/ needs it to be the service's first.
    add_group("dh-test-other")
    env = make_env(shared_base, {"uploaders": ["dh-test-other"]}, service_user=svc.name)
    upload(env, ra, "old")
    claim_id = "20260101T000000Z-old-000000"
    os.rename(env.study.inbox / "old", env.study.processing / claim_id)
    (env.study.processing / f"{claim_id}.json").write_text(json.dumps(
        {"format": 1, "id": claim_id, "entry": "old", "entry_hex": b"old".hex(),
         "started": "2026-01-01T00:00:00Z", "uploader_uid": ra.uid}))
    r = as_service(env, svc, "process", "s1")
    assert r.returncode == 0, r.stderr
    [rc] = env.failed_receipts()
    assert json.loads(rc.read_text())["outcome"] == "rejected"
    assert tree(env.study.failed / claim_id) == FILES
    no_leftovers(env)


def test_check_and_delivery_agree_on_a_destination_writable_through_its_group(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser) -> None:
    env = service_env
    dest = env.study.destination
    os.chown(dest, 0, svc.gid)  # root's, the service's group may write: deliveries work
    os.chmod(dest, 0o2770)
    assert "is not writable by" not in env.run("check", "s1").stdout
    upload(env, ra)
    r = as_service(env, svc, "process", "s1")
    assert r.returncode == 0, r.stderr
    delivered(env, ra)
    os.chmod(dest, 0o2750)  # now only its owner, root, may add
    assert f"destination {dest} is not writable by {svc.name}" in env.run("check", "s1").stdout
