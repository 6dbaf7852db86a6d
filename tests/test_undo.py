"""`dittohead undo`: exactly what a delivery created leaves the destination, nothing else.

Real deliveries into a real destination under /var/tmp, then `undo` as a
real process; the permission test runs it as a throwaway user.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dittohead.log import MESSAGE_IDS
from dittohead.outcomes import outcomes_dir

from .boxes import ROOT, boot_installed
from .conftest import Env, ThrowawayUser, add_user, as_service, make_env, service_argv, tree


def receipt(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def deliver(env: Env, name: str, files: dict[str, bytes]) -> str:
    """Drop and deliver one entry; its delivery id."""
    env.drop(name, files)
    r = env.process()
    assert r.returncode == 0, r.stderr
    ids = [receipt(p)["id"] for p in env.done_receipts() if receipt(p)["entry"] == name]
    assert len(ids) == 1
    return str(ids[0])


def test_undo_removes_exactly_the_files_the_delivery_created(env: Env) -> None:
    dest = env.study.destination
    (dest / "old").mkdir()
    (dest / "old" / "same").write_bytes(b"was here")  # the entry brings the same content
    (dest / "old" / "other").write_bytes(b"not the entry's")
    delivery = deliver(env, "e", {"old/same": b"was here", "old/new": b"1",
                                  "fresh/deep/f": b"2", "top": b"3"})
    published = (env.study.done / f"{delivery}.published").read_text()
    assert sorted(line.split("  ")[1] for line in published.splitlines()) == \
        ["fresh/deep/f", "old/new", "top"]
    assert (env.study.done / f"{delivery}.dirs").read_text() == "fresh\nfresh/deep\n"
    check = subprocess.run(["sha256sum", "--strict", "-c",
                            str(env.study.done / f"{delivery}.published")],
                           cwd=dest, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == 3, check.stdout
    r = env.run("undo", "s1", delivery)
    assert r.returncode == 0, r.stderr
    assert tree(dest) == {"old/same": b"was here", "old/other": b"not the entry's"}
    assert sorted(os.listdir(dest)) == ["old"]  # fresh/ and fresh/deep/ are gone too
    assert "removed 3 files and 2 directories" in r.stdout
    data = receipt(env.study.failed / f"{delivery}.json")
    assert data["outcome"] == "undone"
    assert data["undone"]["removed"] == 3 and data["undone"]["kept"] == []
    assert data["undone"]["fallback"] is False
    assert not (env.study.done / f"{delivery}.json").exists()
    for suffix in ("", ".sha256", ".published", ".dirs"):
        assert os.path.lexists(env.study.failed / f"{delivery}{suffix}")
    assert f"MESSAGE_ID={MESSAGE_IDS['undone']}" in r.stderr
    assert "DITTOHEAD_FILES=3" in r.stderr and f"DITTOHEAD_DELIVERY={delivery}" in r.stderr


def test_an_undone_delivery_is_delivered_again_by_retry(env: Env) -> None:
    delivery = deliver(env, "e", {"a": b"1", "d/b": b"2"})
    assert env.run("undo", "s1", delivery).returncode == 0
    assert tree(env.study.destination) == {}
    r = env.run("retry", "s1", delivery)
    assert r.returncode == 0, r.stderr
    assert env.process().returncode == 0
    assert tree(env.study.destination) == {"a": b"1", "d/b": b"2"}


def test_undo_keeps_a_file_changed_since_delivery(env: Env) -> None:
    delivery = deliver(env, "e", {"d/a": b"1", "d/b": b"2", "c": b"3"})
    (env.study.destination / "d" / "a").write_bytes(b"edited by the study")
    r = env.run("undo", "s1", delivery)
    assert r.returncode == 0, r.stderr
    assert tree(env.study.destination) == {"d/a": b"edited by the study"}
    assert "kept d/a: changed since delivery: other content" in r.stdout
    assert "kept d/: not empty" in r.stdout
    undone = receipt(env.study.failed / f"{delivery}.json")["undone"]
    assert undone["removed"] == 2 and undone["kept_count"] == 2
    assert undone["kept"][0].startswith("d/a: changed since delivery")


def test_undo_keeps_a_file_a_later_delivery_also_lists(env: Env) -> None:
    first = deliver(env, "e1", {"shared": b"same", "only1": b"1"})
    deliver(env, "e2", {"shared": b"same", "only2": b"2"})  # found "shared" already there
    r = env.run("undo", "s1", first)
    assert r.returncode == 0, r.stderr
    assert tree(env.study.destination) == {"shared": b"same", "only2": b"2"}
    assert "kept shared: delivered by" in r.stdout


def test_undo_dry_run_changes_nothing(env: Env) -> None:
    delivery = deliver(env, "e", {"d/a": b"1", "b": b"2"})
    (env.study.destination / "b").write_bytes(b"changed")
    before = tree(env.study.destination)
    r = env.run("undo", "s1", delivery, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "would remove d/a" in r.stdout and "would remove the directory d/" in r.stdout
    assert "would keep b: changed since delivery" in r.stdout
    assert tree(env.study.destination) == before
    assert receipt(env.study.done / f"{delivery}.json")["outcome"] == "delivered"
    assert MESSAGE_IDS["undone"] not in r.stderr


def test_undo_never_follows_a_symlinked_directory(env: Env, tmp_path: Path) -> None:
    delivery = deliver(env, "e", {"d/a": b"1"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a").write_bytes(b"1")  # same name and content, outside the destination
    dest = env.study.destination
    (dest / "d" / "a").unlink()
    (dest / "d").rmdir()
    (dest / "d").symlink_to(elsewhere)
    r = env.run("undo", "s1", delivery)
    assert r.returncode == 0, r.stderr
    assert (elsewhere / "a").read_bytes() == b"1"
    assert (dest / "d").is_symlink()
    assert "kept d/a: changed since delivery: a directory on its path is a symlink" in r.stdout


@pytest.mark.parametrize("fault", ["unpublished:1", "undo-recorded", "undo-moved"])
def test_undo_killed_midway_is_finished_by_a_rerun(env: Env, fault: str) -> None:
    (env.study.destination / "keep").write_bytes(b"k")
    delivery = deliver(env, "e", {"a": b"1", "b": b"2", "d/c": b"3", "keep": b"k"})
    r = env.run("undo", "s1", delivery, env={"DITTOHEAD_TEST_FAULT": fault})
    assert r.returncode == -9, r.stderr
    dry = env.run("undo", "s1", delivery, "--dry-run")  # changes nothing, even now
    assert dry.returncode == 0, dry.stderr
    assert (env.study.done / f"{delivery}.json").exists()
    if fault != "unpublished:1":
        assert "was interrupted" in dry.stdout
    r = env.run("undo", "s1", delivery)
    assert r.returncode == 0, r.stderr
    assert tree(env.study.destination) == {"keep": b"k"}
    data = receipt(env.study.failed / f"{delivery}.json")
    assert data["outcome"] == "undone"
    assert data["undone"]["removed"] + data["undone"]["gone"] == 3
    assert (env.study.failed / delivery).is_dir()
    assert sorted(p.name for p in env.study.done.iterdir()) == []
    again = env.run("undo", "s1", delivery)
    assert again.returncode == 0 and "undone already" in again.stdout


def test_undo_of_a_delivery_filed_before_the_published_record_uses_birth_times(
        env: Env) -> None:
    dest = env.study.destination
    (dest / "old").mkdir()
    (dest / "old" / "same").write_bytes(b"was here")
    time.sleep(1.1)  # receipts keep whole seconds: born before the delivery's first second
    delivery = deliver(env, "e", {"old/same": b"was here", "old/new": b"1", "n/f": b"2"})
    (env.study.done / f"{delivery}.published").unlink()
    (env.study.done / f"{delivery}.dirs").unlink()
    r = env.run("undo", "s1", delivery)
    assert r.returncode == 0, r.stderr
    assert "were told by birth time" in r.stdout
    assert tree(dest) == {"old/same": b"was here"}
    assert not (dest / "n").exists()
    assert receipt(env.study.failed / f"{delivery}.json")["undone"]["fallback"] is True


def test_undo_refuses_what_is_not_a_delivery(env: Env) -> None:
    (env.study.destination / "a").write_bytes(b"old")
    env.drop("e", {"a": b"new"})  # a conflict: fails
    env.process()
    failed = receipt(env.failed_receipts()[0])["id"]
    r = env.run("undo", "s1", str(failed))
    assert r.returncode == 1 and "was not delivered (outcome failed)" in r.stderr
    r = env.run("undo", "s1", "20990101T000000Z-nosuch-000000")
    assert r.returncode == 1 and "no delivery" in r.stderr
    r = env.run("undo", "s1", "../done/x")
    assert r.returncode == 1 and "not a delivery id" in r.stderr
    assert (env.study.destination / "a").read_bytes() == b"old"


@pytest.mark.root
def test_undo_by_someone_else_than_root_or_the_service_is_refused(env: Env) -> None:
    delivery = deliver(env, "e", {"a": b"1"})
    other = add_user("dh-test-undoer")
    os.chmod(env.config_path, 0o644)
    r = subprocess.run(service_argv(env, other, "undo", "s1", delivery, caps=None),
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 77, r.stderr
    assert "dittohead undo is for root or the service user" in r.stderr
    assert (env.study.destination / "a").read_bytes() == b"1"


@pytest.mark.root
def test_undo_by_the_service_rewrites_the_uploaders_note_and_retry_gives_it_back(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser) -> None:
    env = service_env
    env.drop("e", {"a": b"1", "d/b": b"2"}, uid=ra.uid)
    assert as_service(env, svc, "process", "s1").returncode == 0
    [delivery] = [p.stem for p in env.done_receipts()]
    r = as_service(env, svc, "undo", "s1", delivery, caps=None)
    assert r.returncode == 0, r.stderr
    assert tree(env.study.destination) == {}
    note = outcomes_dir(env.study, ra.uid) / f"{delivery}.json"
    assert json.loads(note.read_text())["outcome"] == "undone"
    text = note.with_suffix(".txt").read_text()
    assert "e: UNDONE, removed from the study's storage again" in text
    assert "DITTOHEAD_UPLOADER=dh-test-ra" in r.stderr
    assert env.run("retry", "s1", delivery).returncode == 0
    assert (env.study.inbox / "e").stat().st_uid == ra.uid  # given back to its uploader
    assert as_service(env, svc, "process", "s1").returncode == 0
    assert tree(env.study.destination) == {"a": b"1", "d/b": b"2"}


@pytest.mark.root
def test_undo_by_root_leaves_the_note_the_services(env: Env) -> None:
    ra = add_user("dh-test-ra", groups=("dh-test-uploaders",))
    env.drop("e", {"a": b"1"}, uid=ra.uid)
    assert env.process().returncode == 0
    [delivery] = [p.stem for p in env.done_receipts()]
    assert env.run("undo", "s1", delivery).returncode == 0
    note = outcomes_dir(env.study, ra.uid) / f"{delivery}.json"
    assert json.loads(note.read_text())["outcome"] == "undone"
    assert note.stat().st_uid == pwd.getpwnam(env.cfg.service_user).pw_uid


@pytest.mark.root
def test_undo_without_birth_times_refuses_and_removes_nothing(
        shared_base: Path) -> None:
    # ramfs keeps no birth time: an old delivery (no published record) cannot be
    # told from what was there before.
    # (ramfs says it has no space, so the delivery goes to ext4 and is moved there.)
    env = make_env(shared_base)
    delivery = deliver(env, "e", {"a": b"1", "d/b": b"2"})
    dest = env.study.destination
    subprocess.run(["cp", "-a", str(dest), str(shared_base / "copy")], check=True)
    subprocess.run(["mount", "-t", "ramfs", "-o", "mode=755", "none", str(dest)],
                   check=True)  # the fixture unmounts it
    subprocess.run(["cp", "-a", f"{shared_base}/copy/.", str(dest)], check=True)
    (env.study.done / f"{delivery}.published").unlink()
    (env.study.done / f"{delivery}.dirs").unlink()
    r = env.run("undo", "s1", delivery)
    assert r.returncode == 1
    assert "keeps no birth times" in r.stderr and "nothing was removed" in r.stderr
    assert tree(env.study.destination) == {"a": b"1", "d/b": b"2"}
    assert receipt(env.study.done / f"{delivery}.json")["outcome"] == "delivered"


def test_undo_removes_files_and_directories_with_newlines_and_backslashes(env: Env) -> None:
    files = {"d\nir\\x/f\\i\nle": b"1", "plain/a": b"2", "back\\slash": b"3"}
    delivery = deliver(env, "e", files)
    dirs = (env.study.done / f"{delivery}.dirs").read_bytes()
    assert dirs == b"\\d\\nir\\\\x\nplain\n"  # escaped as in the manifest
    r = env.run("undo", "s1", delivery)
    assert r.returncode == 0, r.stderr
    assert os.listdir(env.study.destination) == []
    assert "removed 3 files and 2 directories" in r.stdout


def test_undo_without_its_records_removes_nothing(env: Env) -> None:
    delivery = deliver(env, "e", {"a": b"1"})
    for suffix in (".published", ".dirs", ".sha256"):
        (env.study.done / f"{delivery}{suffix}").unlink()
    r = env.run("undo", "s1", delivery)
    assert r.returncode == 1
    assert "cannot be read" in r.stderr and "nothing was removed" in r.stderr
    assert tree(env.study.destination) == {"a": b"1"}


def test_a_published_record_written_by_workers_lists_what_they_copied_in_plan_order(
        env: Env) -> None:
    # 720 files: copied by forked workers, each writing its share's part.
    files = {f"s{d:02d}/run{i:03d}.txt": f"{d} {i}\n".encode() * (i % 7 + 1)
             for d in range(12) for i in range(60)}
    first = {k: v for k, v in files.items() if k[1:3] in ("00", "07")}
    deliver(env, "first", first)
    delivery = deliver(env, "all", files)
    lines = (env.study.done / f"{delivery}.published").read_text().splitlines()
    assert [line.split("  ", 1)[1] for line in lines] == sorted(set(files) - set(first))
    dirs = (env.study.done / f"{delivery}.dirs").read_text().split()
    assert dirs == sorted({k.split("/")[0] for k in files} - {"s00", "s07"})
    r = env.run("undo", "s1", delivery)
    assert r.returncode == 0, r.stderr
    assert tree(env.study.destination) == first


def test_undo_refuses_a_delivery_into_another_destination(env: Env) -> None:
    delivery = deliver(env, "e", {"a": b"1"})
    moved = env.base / "moved"
    moved.mkdir()
    (moved / "a").write_bytes(b"1")
    env.reload(destination=str(moved))
    r = env.run("undo", "s1", delivery)
    assert r.returncode == 1 and "was delivered into" in r.stderr
    assert "nothing was removed" in r.stderr
    assert (moved / "a").exists() and (env.base / "dest" / "a").exists()


@pytest.mark.slow
def test_undo_waits_for_a_running_delivery_and_says_so(env: Env) -> None:
    delivery = deliver(env, "e", {"a": b"1"})
    lock = os.open(env.study.processing, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as a run holds it
    proc = subprocess.Popen([sys.executable, "-m", "dittohead", "--config",
                             str(env.config_path), "undo", "s1", delivery],
                            env={**os.environ, "DITTOHEAD_LOG": "stderr"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    assert proc.poll() is None and (env.study.destination / "a").exists()
    os.close(lock)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "undo waits until it ends" in err
    assert not (env.study.destination / "a").exists()


def test_undo_of_a_purged_delivery_says_the_upload_is_gone(env: Env) -> None:
    delivery = deliver(env, "e", {"a": b"1"})
    subprocess.run(["rm", "-r", str(env.study.done / delivery)], check=True)  # as purge does
    r = env.run("undo", "s1", delivery, env={"SUDO_USER": "alice"})
    assert r.returncode == 0, r.stderr
    assert "no longer in" in r.stdout and "(purged)" in r.stdout
    assert tree(env.study.destination) == {}
    undone = receipt(env.study.failed / f"{delivery}.json")["undone"]
    if os.geteuid() == 0:
        assert undone["by"] == "root (sudo by alice)"


@pytest.mark.parametrize("fault", ["published:1", "verified", "receipt", "filed"])
def test_a_delivery_resumed_after_a_kill_files_the_published_record_of_what_it_created(
        env: Env, fault: str) -> None:
    (env.study.destination / "there").write_bytes(b"t")
    env.drop("e", {"there": b"t", "a": b"1", "d/b": b"2"})
    assert env.process(env={"DITTOHEAD_TEST_FAULT": fault}).returncode == -9
    assert env.process().returncode == 0
    [rc] = env.done_receipts()
    lines = rc.with_suffix(".published").read_text().splitlines()
    assert sorted(line.split("  ", 1)[1] for line in lines) == ["a", "d/b"]
    assert env.run("undo", "s1", rc.stem).returncode == 0
    assert tree(env.study.destination) == {"there": b"t"}


@pytest.mark.systemd
@pytest.mark.slow
def test_undo_on_the_booted_system_takes_back_a_delivery_of_the_units(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    # Delivered by dittohead@s1.service in its sandbox (which files the published
    # record), undone by root; the journal has the event, the catalog explains it.
    box = boot_installed(tmp_path_factory.mktemp("undo-box", numbered=True))
    try:
        box.sh(f"echo before > {ROOT}/study/s1/kept.txt && "
               f"chown dittohead {ROOT}/study/s1/kept.txt")
        box.upload("s1", [("visit", {"visit/a.txt": 100, "visit/deep/b.txt": 10})])
        assert box.wait_delivered("s1", ["visit"]).get("visit") == 1, box.debug("s1")
        [e] = box.journal("DITTOHEAD_STUDY=s1", f"MESSAGE_ID={MESSAGE_IDS['delivered']}")
        delivery = e["DITTOHEAD_DELIVERY"]
        r = box.sh(f"dittohead undo s1 {delivery}")
        assert "removed 2 files and 2 directories" in r.stdout, r.stdout + r.stderr
        assert box.sh(f"cd {ROOT}/study/s1 && find . -mindepth 1").stdout.split() == \
            ["./kept.txt"]
        [u] = box.journal("DITTOHEAD_STUDY=s1", f"MESSAGE_ID={MESSAGE_IDS['undone']}")
        assert u["DITTOHEAD_FILES"] == "2" and u["DITTOHEAD_DELIVERY"] == delivery
        assert u["PRIORITY"] == "5"
        explained = box.sh("journalctl -x --no-pager "
                           f"MESSAGE_ID={MESSAGE_IDS['undone']}")
        assert f"dittohead retry s1 {delivery}" in explained.stdout
        box.sh(f"test -f {ROOT}/dropbox/s1/failed/{delivery}.json")
    finally:
        box.box.poweroff()


def test_undo_after_purge_removes_the_files_and_keeps_the_receipts_purged_key(env: Env) -> None:
    delivery = deliver(env, "e", {"a": b"1", "d/b": b"2"})
    env.reload(keep_done_days=0)
    r = env.run("purge", "s1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (env.study.done / delivery).exists()
    r = env.run("undo", "s1", delivery)
    assert r.returncode == 0, r.stderr
    assert "(purged)" in r.stdout
    assert tree(env.study.destination) == {}
    data = receipt(env.study.failed / f"{delivery}.json")
    assert data["outcome"] == "undone" and "purged" in data
    assert env.run("purge", "s1").returncode == 0  # finds nothing of it in done/ now
    assert not (env.study.done / f"{delivery}.json").exists()
