"""`dittohead process` on real files: claim, check, merge, verify, record."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import IS_ROOT, Env, add_group, make_env, manifest_verifies, no_leftovers, tree


def receipt(p: Path) -> dict[str, Any]:
    data = json.loads(p.read_text())
    assert isinstance(data, dict)
    return data


def test_directory_entry_is_merged_into_destination(env: Env) -> None:
    (env.study.destination / "eprime").mkdir()
    (env.study.destination / "eprime" / "s00.txt").write_bytes(b"earlier")
    env.drop("foo-1", {"eprime/s01.txt": b"subject 1\n", "biopac/s01.acq": b"\0\1\2" * 1000,
                       "notes.txt": b""})
    r = env.process()
    assert r.returncode == 0, r.stderr
    assert tree(env.study.destination) == {
        "eprime/s00.txt": b"earlier", "eprime/s01.txt": b"subject 1\n",
        "biopac/s01.acq": b"\0\1\2" * 1000, "notes.txt": b""}
    [rc] = env.done_receipts()
    data = receipt(rc)
    assert data["outcome"] == "delivered" and data["entry"] == "foo-1"
    assert data["files"] == 3 and data["bytes"] == 3010 and data["reason"] is None
    for key in ("study", "id", "uploader", "skipped", "started", "finished"):
        assert key in data
    assert (env.study.done / str(data["id"]) / "eprime" / "s01.txt").exists()
    manifest_verifies(env, rc)
    lines = rc.with_suffix(".sha256").read_text().splitlines()
    assert sorted(line.split("  ", 1)[1] for line in lines) == [
        "biopac/s01.acq", "eprime/s01.txt", "notes.txt"]
    no_leftovers(env)
    assert "DITTOHEAD_DELIVERY=" + str(data["id"]) in r.stderr


def test_plain_file_entry_is_delivered_as_one_file(env: Env) -> None:
    env.drop("scan.dcm", b"DICM" * 100)
    assert env.process().returncode == 0
    assert tree(env.study.destination) == {"scan.dcm": b"DICM" * 100}
    manifest_verifies(env, env.done_receipts()[0])


def test_empty_entry_is_a_delivery_of_zero_files(env: Env) -> None:
    env.drop("empty", {})
    assert env.process().returncode == 0
    data = receipt(env.done_receipts()[0])
    assert data["files"] == 0 and data["outcome"] == "delivered"
    assert env.done_receipts()[0].with_suffix(".sha256").read_bytes() == b""


def test_same_content_counts_as_already_delivered(env: Env) -> None:
    files = {"a/x.txt": b"same", "b.txt": b"bee"}
    env.drop("up", files)
    assert env.process().returncode == 0
    env.drop("up", files)  # the same name again, the same content
    r = env.process()
    assert r.returncode == 0, r.stderr
    assert len(env.done_receipts()) == 2
    for rc in env.done_receipts():
        manifest_verifies(env, rc)
    assert tree(env.study.destination) == files


def test_conflicting_file_fails_whole_entry(env: Env) -> None:
    (env.study.destination / "eprime").mkdir()
    (env.study.destination / "eprime" / "s01.txt").write_bytes(b"original!")
    before = os.stat(env.study.destination / "eprime" / "s01.txt")
    env.drop("foo", {"eprime/s01.txt": b"different", "eprime/s02.txt": b"new",
                     "other/z.txt": b"zz"})
    r = env.process()
    assert r.returncode == 0, r.stderr  # a failed entry with a receipt still drains
    assert tree(env.study.destination) == {"eprime/s01.txt": b"original!"}
    assert not (env.study.destination / "other").exists()
    after = os.stat(env.study.destination / "eprime" / "s01.txt")
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    [rc] = env.failed_receipts()
    data = receipt(rc)
    assert data["outcome"] == "failed"
    assert "eprime/s01.txt" in str(data["reason"]) and "s02" not in str(data["reason"])
    assert (env.study.failed / str(data["id"]) / "eprime" / "s02.txt").read_bytes() == b"new"
    no_leftovers(env)


def test_same_size_other_content_is_a_conflict(env: Env) -> None:
    (env.study.destination / "a.txt").write_bytes(b"AAAA")
    env.drop("e", {"a.txt": b"BBBB"})
    env.process()
    assert (env.study.destination / "a.txt").read_bytes() == b"AAAA"
    assert len(env.failed_receipts()) == 1


def test_symlink_in_destination_path_is_a_conflict(env: Env, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (env.study.destination / "eprime").symlink_to(elsewhere)
    env.drop("e", {"eprime/s01.txt": b"x"})
    env.process()
    assert list(elsewhere.iterdir()) == []
    assert "eprime/ (not a directory" in str(receipt(env.failed_receipts()[0])["reason"])


def test_symlink_to_file_outside_is_never_read(env: Env, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"do not deliver")
    os.utime(secret, (1_000_000_000, 1_500_000_000))  # atime < mtime: a read updates it
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it would block the run until the timeout
    entry = env.drop("e", {"ok.txt": b"fine"})
    (entry / "link").symlink_to(secret)
    (entry / "link-to-fifo").symlink_to(fifo)
    r = env.process(timeout=30)
    assert r.returncode == 0
    data = receipt(env.failed_receipts()[0])
    assert "symlinks not delivered: link, link-to-fifo" in str(data["reason"])
    assert os.stat(secret).st_atime == 1_000_000_000
    assert tree(env.study.destination) == {}


def test_fifo_socket_and_device_fail_naming_them(env: Env) -> None:
    entry = env.drop("e", {"ok.txt": b"fine"})
    os.mkfifo(entry / "pipe")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(entry / "sock"))
    s.close()
    if IS_ROOT:
        os.mknod(entry / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    env.process(timeout=30)
    reason = str(receipt(env.failed_receipts()[0])["reason"])
    assert "FIFOs not delivered: pipe" in reason
    assert "sockets not delivered: sock" in reason
    if IS_ROOT:
        assert "device nodes not delivered: null" in reason
    assert tree(env.study.destination) == {}


def test_top_level_symlink_entry_fails(env: Env, tmp_path: Path) -> None:
    (tmp_path / "t").write_bytes(b"x")
    (env.study.inbox / "link").symlink_to(tmp_path / "t")
    env.process()
    assert "symlinks not delivered: link" in str(receipt(env.failed_receipts()[0])["reason"])
    no_leftovers(env)


def test_ignored_names_are_skipped_and_listed(env: Env) -> None:
    env.drop("e", {"a.txt": b"a", ".DS_Store": b"x", "sub/Thumbs.db": b"t",
                   "sub/._a.txt": b"apple", "sub/b.txt": b"b"})
    assert env.process().returncode == 0
    assert tree(env.study.destination) == {"a.txt": b"a", "sub/b.txt": b"b"}
    data = receipt(env.done_receipts()[0])
    assert sorted(data["skipped"]) == [".DS_Store", "sub/._a.txt", "sub/Thumbs.db"]


def test_modes_and_mtimes_follow_the_config(env: Env) -> None:
    entry = env.drop("e", {"data.txt": b"d", "run.sh": b"#!/bin/sh\n", "sub/x": b"x"})
    os.chmod(entry / "run.sh", 0o4755)  # setuid must never be delivered
    os.chmod(entry / "data.txt", 0o666)
    os.utime(entry / "data.txt", ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    os.utime(entry / "sub", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    assert env.process().returncode == 0
    d = env.study.destination
    assert stat.S_IMODE(os.stat(d / "data.txt").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(d / "run.sh").st_mode) == 0o750
    assert os.stat(d / "data.txt").st_mtime_ns == 1_600_000_000_123_456_789
    assert stat.S_IMODE(os.stat(d / "sub").st_mode) & 0o777 == 0o750
    assert os.stat(d / "sub").st_mtime_ns == 1_500_000_000_000_000_000
    assert os.stat(d / "data.txt").st_uid == os.geteuid()


def test_odd_names_are_delivered_byte_exact(env: Env) -> None:
    names = [b"new\nline.txt", b"back\\slash", b"cr\rname", b"latin1-\xe9\xff.txt",
             b"x" * 255, "caf\u00e9.txt".encode(), b" leading space", b"-dash"]
    entry = env.drop("odd", {})
    for n in names:
        with open(os.path.join(os.fsencode(entry), n), "wb") as f:
            f.write(n)
    r = env.process()
    assert r.returncode == 0, r.stderr
    got = sorted(os.listdir(os.fsencode(env.study.destination)))
    assert got == sorted(names)
    for n in names:
        with open(os.path.join(os.fsencode(env.study.destination), n), "rb") as f:
            assert f.read() == n
    manifest_verifies(env, env.done_receipts()[0])


def test_dot_entries_are_left_alone_and_nothing_ready_stays(env: Env) -> None:
    (env.study.inbox / ".uploading").mkdir()
    (env.study.inbox / ".uploading" / "a").write_bytes(b"partial")
    env.drop("r1", {"a": b"1"})
    env.drop("r2.bak", {"b": b"2"})
    env.drop("r3~", b"3")
    assert env.process().returncode == 0
    assert sorted(os.listdir(env.study.inbox)) == [".uploading"]
    assert len(env.done_receipts()) == 3


def test_missing_destination_keeps_entry_for_later_exit_75(env: Env) -> None:
    env.study.destination.rmdir()
    env.drop("e", {"a": b"1"})
    r = env.process()
    assert r.returncode == 75, r.stderr
    assert "is not available" in r.stderr
    assert [n for n in os.listdir(env.study.processing) if n.endswith(".json")]
    assert os.listdir(env.study.inbox) == []
    env.study.destination.mkdir()
    r = env.process()
    assert r.returncode == 0, r.stderr
    assert tree(env.study.destination) == {"a": b"1"}
    no_leftovers(env)


def test_retry_puts_a_failed_delivery_back(env: Env) -> None:
    (env.study.destination / "a").write_bytes(b"old")
    env.drop("e", {"a": b"new"})
    env.process()
    data = receipt(env.failed_receipts()[0])
    (env.study.destination / "a").unlink()  # the admin resolved the conflict
    r = env.run("retry", "s1", str(data["id"]))
    assert r.returncode == 0, r.stderr
    assert (env.study.inbox / "e" / "a").exists()
    assert env.process().returncode == 0
    assert (env.study.destination / "a").read_bytes() == b"new"


def test_status_reports_counts(env: Env) -> None:
    env.drop("e", {"a": b"1"})
    assert env.process().returncode == 0
    r = env.run("status", "s1", "--json")
    assert r.returncode == 0, r.stderr
    [s] = json.loads(r.stdout)
    assert s["delivered"] == 1 and s["pending"] == 0 and s["failed"] == 0
    assert s["last_delivery"]["entry"] == "e"


@pytest.mark.slow
def test_linger_picks_up_entries_arriving_during_the_run(env: Env) -> None:
    env.drop("first", {"a": b"1"})
    proc = subprocess.Popen([sys.executable, "-m", "dittohead", "--config",
                             str(env.config_path), "process", "s1", "--linger", "2"],
                            env={**os.environ, "DITTOHEAD_LOG": "stderr"},
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.8)
    env.drop("second", {"b": b"2"})
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert tree(env.study.destination) == {"a": b"1", "b": b"2"}


@pytest.mark.root
def test_group_from_config_and_setgid_dirs(shared_base: Path) -> None:
    gid = add_group("dh-test-study")
    e = make_env(shared_base, {"group": "dh-test-study"})
    e.drop("e", {"sub/a": b"1"})
    assert e.process().returncode == 0
    st = os.stat(e.study.destination / "sub" / "a")
    assert st.st_gid == gid and stat.S_IMODE(st.st_mode) == 0o640
    dst = os.stat(e.study.destination / "sub")
    assert dst.st_gid == gid and stat.S_IMODE(dst.st_mode) == 0o2750


@pytest.mark.root  # reads a source file its owner cannot read (mode 0200)
def test_upload_copies_as_dot_name_then_renames_and_is_delivered(env: Env,
                                                                  tmp_path: Path) -> None:
    src = tmp_path / "s01-session1"
    (src / "eprime").mkdir(parents=True)
    os.chmod(src, 0o2775)  # a shared project folder
    (src / "eprime" / "s01.txt").write_bytes(b"trial data")
    os.chmod(src / "eprime" / "s01.txt", 0o200)  # not even readable by its owner
    single = tmp_path / "notes.txt"
    single.write_bytes(b"notes")
    r = env.run("upload", "s1", str(src), str(single))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(env.study.inbox)) == ["notes.txt", "s01-session1"]
    assert os.stat(env.study.inbox / "s01-session1" / "eprime" / "s01.txt").st_mode & 0o400
    # Private while it waits: nobody else can reach inside before the claim.
    assert os.stat(env.study.inbox / "s01-session1").st_mode & 0o777 == 0o700
    r = env.process()
    assert r.returncode == 0, r.stderr
    assert tree(env.study.destination) == {"eprime/s01.txt": b"trial data",
                                           "notes.txt": b"notes"}


def test_upload_refuses_what_would_never_be_delivered(env: Env, tmp_path: Path) -> None:
    src = tmp_path / "with-link"
    src.mkdir()
    (src / "link").symlink_to("/etc/passwd")
    r = env.run("upload", "s1", str(src))
    assert r.returncode == 2 and "symlinks or special files" in r.stderr
    dot = tmp_path / ".hidden"
    dot.write_bytes(b"x")
    r = env.run("upload", "s1", str(dot))
    assert r.returncode == 2 and "starting with '.'" in r.stderr
    r = env.run("upload", "s1", str(tmp_path / "missing"))
    assert r.returncode == 2
    assert os.listdir(env.study.inbox) == []


def test_upload_never_replaces_an_entry_waiting_in_the_inbox(env: Env, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"first")
    assert env.run("upload", "s1", str(tmp_path / "a.txt")).returncode == 0
    (tmp_path / "a.txt").write_bytes(b"second")
    r = env.run("upload", "s1", str(tmp_path / "a.txt"))
    assert r.returncode == 1 and "already waits" in r.stderr
    assert (env.study.inbox / "a.txt").read_bytes() == b"first"
    assert [n for n in os.listdir(env.study.inbox) if n.startswith(".")] == []


def test_upload_wait_reports_the_outcome(env: Env, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"data")
    up = subprocess.Popen([sys.executable, "-m", "dittohead", "--config", str(env.config_path),
                           "upload", "--wait", "--timeout", "30", "s1",
                           str(tmp_path / "a.txt")], stdout=subprocess.PIPE, text=True)
    for _ in range(100):
        if (env.study.inbox / "a.txt").exists():
            break
        time.sleep(0.05)
    assert env.process().returncode == 0
    out, _ = up.communicate(timeout=30)
    assert up.returncode == 0
    assert "a.txt: delivered" in out


def test_sizes_around_the_copy_chunk_are_delivered_exactly(env: Env) -> None:
    from dittohead.copier import OVERLAP_MIN
    from dittohead.fsops import CHUNK
    sizes = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 7, OVERLAP_MIN - 1, OVERLAP_MIN,
             OVERLAP_MIN + 1]
    files = {f"f{size}.bin": os.urandom(size) for size in sizes}
    env.drop("sizes", files)
    r = env.process()
    assert r.returncode == 0, r.stderr
    assert tree(env.study.destination) == files
    manifest_verifies(env, env.done_receipts()[0])


def test_without_rename_noreplace_files_are_linked_and_directories_renamed_onto_new_ones(
        tmp_path: Path) -> None:
    from dittohead import publish
    (tmp_path / "staging" / "d").mkdir(parents=True)
    (tmp_path / "staging" / "7").write_bytes(b"seven")
    (tmp_path / "staging" / "d" / "x").write_bytes(b"x")
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "taken").write_bytes(b"theirs")
    src = os.open(tmp_path / "staging", os.O_RDONLY | os.O_DIRECTORY)
    dst = os.open(tmp_path / "dest", os.O_RDONLY | os.O_DIRECTORY)

    def no_flag(*args: object) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")  # NFS, some FUSE

    try:
        used = publish._move(no_flag, publish._link, "7", "seven.txt", src, dst)
        assert used is publish._link and (tmp_path / "dest" / "seven.txt").read_bytes() == b"seven"
        with pytest.raises(FileExistsError):
            publish._move(used, publish._link, "7", "taken", src, dst)
        assert (tmp_path / "dest" / "taken").read_bytes() == b"theirs"
        used = publish._move(no_flag, publish._mkdir_rename, "d", "new", src, dst)
        assert (tmp_path / "dest" / "new" / "x").read_bytes() == b"x"
        (tmp_path / "staging" / "e").mkdir()
        with pytest.raises(FileExistsError):
            publish._move(used, publish._mkdir_rename, "e", "taken", src, dst)
    finally:
        os.close(src)
        os.close(dst)


def test_check_reports_abandoned_staging_and_stale_mail_only(env: Env) -> None:
    dest, processing = env.study.destination, env.study.processing
    (dest / ".incoming-20260101T000000Z-gone-000000" / "3").mkdir(parents=True)
    (dest / ".incoming-20260101T000000Z-live-000000").mkdir()
    (processing / "20260101T000000Z-live-000000.json").write_text("{}")  # will resume
    (processing / ".mail").mkdir()
    for i, age in enumerate((3 * 86400, 60)):
        m = processing / ".mail" / f"{i}.eml"
        m.write_bytes(b"Subject: x\n\nx\n")
        os.utime(m, (time.time() - age, time.time() - age))
    r = env.run("check", "s1")
    assert r.returncode == 1
    assert ".incoming-20260101T000000Z-gone-000000 belongs to no claim" in r.stdout
    assert "live-000000" not in r.stdout
    assert "1 of 2 queued mails are more than a day old" in r.stdout

