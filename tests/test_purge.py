"""Retention: `dittohead purge` removes old done/ copies and abandoned uploads, nothing else."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from dittohead import config
from dittohead.errors import ConfigError

from .conftest import SERVICE_CAPS, Env, ThrowawayUser, as_service, tree


def _deliver(env: Env, name: str = "s01", files: dict[str, bytes] | None = None) -> str:
    env.drop(name, files or {"a.txt": b"alpha", "sub/b.txt": b"beta"})
    r = env.process()
    assert r.returncode == 0, r.stderr
    receipt = max(env.done_receipts(), key=lambda p: p.stat().st_mtime_ns)
    return str(json.loads(receipt.read_text())["id"])


def _age_receipt(env: Env, delivery: str, days: float) -> None:
    path = env.study.done / f"{delivery}.json"
    data = json.loads(path.read_text())
    when = time.gmtime(time.time() - days * 86400)
    data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", when)
    path.write_text(json.dumps(data))


def test_retention_keys_default_and_validate() -> None:
    s = config.parse({"studies": {"a1": {"destination": "/srv/a1"}}}).study("a1")
    assert (s.keep_done_days, s.abandoned_days, s.failed_warn_days, s.purge_abandoned) == \
        (30.0, 7.0, 14.0, False)
    s = config.parse({"defaults": {"keep_done_days": None, "purge_abandoned": True},
                      "studies": {"a1": {"destination": "/srv/a1"}}}).study("a1")
    assert s.keep_done_days is None and s.purge_abandoned
    with pytest.raises(ConfigError) as e:
        config.parse({"studies": {"a1": {"destination": "/srv/a1", "keep_done_days": -1,
                                         "abandoned_days": None, "failed_warn_days": "x",
                                         "purge_abandoned": "yes"}}})
    text = str(e.value)
    for key in ("keep_done_days", "abandoned_days", "failed_warn_days", "purge_abandoned"):
        assert f"studies.a1.{key}:" in text


def test_purge_removes_old_done_copy_and_keeps_receipt_manifest_and_destination(
        env: Env) -> None:
    old = _deliver(env, "old")
    new = _deliver(env, "new")
    _age_receipt(env, old, 31)
    delivered = tree(env.study.destination)
    r = env.run("purge", "s1")
    assert r.returncode == 0, r.stderr
    assert f"done/{old} (old): purged (2 files, 9 bytes freed)" in r.stdout
    assert not os.path.lexists(env.study.done / old)
    assert os.path.isdir(env.study.done / new)  # younger than keep_done_days
    assert (env.study.done / f"{old}.sha256").exists()
    receipt = json.loads((env.study.done / f"{old}.json").read_text())
    assert receipt["purged"].endswith("Z") and receipt["outcome"] == "delivered"
    assert tree(env.study.destination) == delivered
    assert "MESSAGE_ID=a461bf2b74104b38bf8513a13f40b7cb" in r.stderr
    assert f"DITTOHEAD_DELIVERY={old}" in r.stderr and "DITTOHEAD_BYTES=9" in r.stderr
    again = env.run("purge", "s1")  # nothing left to do: no second event
    assert again.returncode == 0 and "purged" not in again.stdout + again.stderr


def test_dry_run_removes_nothing(env: Env) -> None:
    d = _deliver(env)
    env.reload(keep_done_days=0)
    r = env.run("purge", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "would be purged (2 files, 9 bytes)" in r.stdout
    assert os.path.isdir(env.study.done / d)
    assert "purged" not in json.loads((env.study.done / f"{d}.json").read_text())


def test_keep_forever_and_failed_entries_untouched(env: Env) -> None:
    d = _deliver(env)
    _age_receipt(env, d, 10000)
    env.drop("bad", {"x": b"1"})
    os.symlink("/etc/passwd", env.study.inbox / "bad" / "link")
    env.process()
    failed = sorted(p.name for p in env.study.failed.iterdir())
    env.reload(keep_done_days=None)
    assert env.run("purge").returncode == 0
    assert os.path.isdir(env.study.done / d)
    env.reload(keep_done_days=0)
    assert env.run("purge").returncode == 0
    assert not os.path.lexists(env.study.done / d)
    assert sorted(p.name for p in env.study.failed.iterdir()) == failed


def test_a_killed_purge_is_finished_by_the_next(env: Env) -> None:
    d = _deliver(env)
    env.reload(keep_done_days=0)
    # As a purge killed after its rename: the copy is gone under its name, not removed.
    os.rename(env.study.done / d, env.study.done / f".purge-{d}")
    r = env.run("purge")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in env.study.done.iterdir()) == \
        [f"{d}.dirs", f"{d}.json", f"{d}.published", f"{d}.sha256"]  # the records stay
    assert "purged" in json.loads((env.study.done / f"{d}.json").read_text())


@pytest.mark.slow
def test_abandoned_upload_is_reported_and_removed_only_when_asked(env: Env) -> None:
    dot = env.study.inbox / ".s02"
    (dot / "deep").mkdir(parents=True)
    (dot / "deep" / "f").write_bytes(b"12345")
    env.reload(abandoned_days=0.00003)  # 2.6 s (a ctime cannot be set back)
    time.sleep(3)
    young = env.study.inbox / ".s03"
    young.write_bytes(b"new")
    r = env.run("purge")
    assert r.returncode == 0, r.stderr
    assert "inbox/.s02 of" in r.stdout and "purge --abandoned s1` removes it" in r.stdout
    assert dot.exists()
    r = env.run("check")
    assert "inbox/.s02" in r.stdout and "abandoned" in r.stdout and ".s03" not in r.stdout
    r = env.run("purge", "--abandoned", "s1")
    assert r.returncode == 0, r.stderr
    assert not dot.exists() and young.exists()
    assert "abandoned upload removed" in r.stdout
    assert "MESSAGE_ID=3b7d9720d1654fb081164abf96a9916a" in r.stderr
    assert "DITTOHEAD_BYTES=5" in r.stderr and "DITTOHEAD_ENTRY=.s02" in r.stderr


def test_status_json_lists_uploading_entries(env: Env) -> None:
    (env.study.inbox / ".s04").mkdir()
    r = env.run("status", "s1", "--json")
    assert r.returncode == 0, r.stderr
    [entry] = json.loads(r.stdout)[0]["uploading_entries"]
    assert entry["name"] == "inbox/.s04" and entry["age_seconds"] >= 0
    assert entry["uploader"]
    text = env.run("status", "s1").stdout
    assert f"uploading: inbox/.s04 by {entry['uploader']}, unchanged for 0 minutes" in text


def test_check_names_old_failed_entries(env: Env) -> None:
    env.drop("bad", {"x": b"1"})
    os.symlink("/etc/passwd", env.study.inbox / "bad" / "link")
    env.process()
    [receipt] = [p for p in env.failed_receipts()]
    data = json.loads(receipt.read_text())
    data["finished"] = "2020-01-01T00:00:00Z"
    receipt.write_text(json.dumps(data))
    r = env.run("check", "s1")
    assert f"failed/{data['id']}" in r.stdout and "dittohead retry s1" in r.stdout


def test_plain_file_entry_is_purged(env: Env) -> None:
    env.drop("single.bin", b"0123456789")
    env.process()
    d = json.loads(env.done_receipts()[0].read_text())["id"]
    env.reload(keep_done_days=0)
    r = env.run("purge", "s1")
    assert "(1 files, 10 bytes freed)" in r.stdout, r.stdout + r.stderr
    assert not os.path.lexists(env.study.done / d)
    assert (env.study.destination / "single.bin").read_bytes() == b"0123456789"


# --- throwaway users: trees of other users, taken over without CAP_DAC_OVERRIDE -----------

def _users_tree(top: Path, owner: ThrowawayUser) -> None:
    """An entry as filed before the lockdown, or an upload: the uploader's, some of it private."""
    (top / "open" / "closed").mkdir(parents=True)
    (top / "private").mkdir()
    for rel in ("a", "open/b", "open/closed/c", "private/d"):
        (top / rel).write_bytes(b"data")
    for p in [top, *top.rglob("*")]:
        os.lchown(p, owner.uid, owner.gid)
        os.chmod(p, 0o400 if p.is_file() else 0o755)
    os.chmod(top / "open" / "closed", 0o500)
    os.chmod(top / "private", 0o700)


@pytest.mark.root
@pytest.mark.parametrize("caps", ["+chown", None])
def test_purge_takes_an_uploaders_done_copy_over_with_cap_chown_only(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser, caps: str | None) -> None:
    env = service_env
    d = "20200101T000000Z-old-abcdef"
    _users_tree(env.study.done / d, ra)
    receipt = {"study": "s1", "id": d, "entry": "old", "uploader": ra.name,
               "outcome": "delivered", "files": 4, "bytes": 16, "finished": "2020-01-01T00:00:00Z"}
    (env.study.done / f"{d}.json").write_text(json.dumps(receipt))
    os.chown(env.study.done / f"{d}.json", svc.uid, svc.gid)
    r = as_service(env, svc, "purge", "s1", caps=caps)
    if caps is None:  # without CAP_CHOWN: said, and nothing of the data lost
        assert r.returncode == 78 and "needs CAP_CHOWN" in r.stderr, r.stderr
        assert (env.study.done / f".purge-{d}" / "private" / "d").read_bytes() == b"data"
        return
    assert r.returncode == 0, r.stderr
    assert "(4 files, 16 bytes freed)" in r.stdout
    assert sorted(os.listdir(env.study.done)) == [f"{d}.json"]
    assert "purged" in json.loads((env.study.done / f"{d}.json").read_text())


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("caps", [SERVICE_CAPS, "+chown"])
def test_purge_removes_a_private_abandoned_upload_only_when_it_can_see_all_of_it(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser, caps: str) -> None:
    env = service_env
    env.reload(abandoned_days=0.00002)  # 1.7 s
    dot = env.study.inbox / ".s05"
    _users_tree(dot, ra)
    time.sleep(2)
    r = as_service(env, svc, "purge", "--abandoned", caps=caps)
    if caps == "+chown":  # CAP_DAC_READ_SEARCH is what lets it see a private upload's age
        assert r.returncode == 1 and "cannot be read" in r.stdout, r.stdout + r.stderr
        assert (dot / "private" / "d").read_bytes() == b"data"
        assert os.stat(dot).st_uid == ra.uid
        return
    assert r.returncode == 0, r.stderr
    assert f"inbox/.s05 of {ra.name}: abandoned upload removed" in r.stdout
    assert not os.path.lexists(dot)
    assert f"DITTOHEAD_UPLOADER={ra.name}" in r.stderr


@pytest.mark.root
def test_purge_refuses_other_users(service_env: Env, ra: ThrowawayUser) -> None:
    r = as_service(service_env, ra, "purge", caps=None)
    assert r.returncode == 77 and "root or the service user" in r.stderr, r.stderr


def test_a_copy_whose_receipt_cannot_be_read_is_kept_and_said(env: Env) -> None:
    d = _deliver(env)
    env.reload(keep_done_days=0)
    (env.study.done / f"{d}.json").write_text("{not json")
    (env.study.done / "notes.json").write_text("[]")  # a stray file: nothing to purge
    r = env.run("purge")
    assert r.returncode == 1
    assert f"done/{d}.json is not a readable receipt: its copy is kept" in r.stdout
    assert "notes.json" not in r.stdout
    assert os.path.isdir(env.study.done / d)


def test_wide_and_deep_trees_are_removed_whole(env: Env) -> None:
    dot = env.study.inbox / ".wide"
    for i in range(300):
        (dot / f"d{i}" / "x" / "y").mkdir(parents=True)
        (dot / f"d{i}" / "x" / "y" / "f").write_bytes(b"1")
    deep = dot / "deep"
    deep.mkdir()
    os.chmod(dot / "d0", 0o777)
    os.symlink("/etc", dot / "d1" / "x" / "link")
    env.reload(abandoned_days=0, purge_abandoned=True)
    r = env.run("purge", "s1")
    assert r.returncode == 0, r.stderr
    assert "300 files, 300 bytes freed" in r.stdout
    assert not dot.exists() and os.path.isdir("/etc")


def test_abandoned_upload_in_an_own_inbox_is_found_and_removed(env: Env) -> None:
    own = env.study.users / "someone" / "inbox"
    own.mkdir(parents=True)
    (own / ".half").mkdir()
    (own / ".half" / "f").write_bytes(b"abc")
    env.reload(abandoned_days=0)
    r = env.run("status", "s1", "--json")
    assert [u["name"] for u in json.loads(r.stdout)[0]["uploading_entries"]] == [
        "users/someone/inbox/.half"]
    r = env.run("purge", "--abandoned", "--dry-run")
    assert "users/someone/inbox/.half of" in r.stdout and "would be removed" in r.stdout
    assert (own / ".half" / "f").exists()
    r = env.run("purge", "--abandoned")
    assert r.returncode == 0 and not (own / ".half").exists(), r.stdout + r.stderr
