"""No entry is stuck: what can never be delivered fails in the run that finds it, with a
reason its uploader understands; a storage problem gets its own exit code and a true message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dittohead.errors import EXIT_IOERR, EXIT_OK, EXIT_TEMPFAIL, ConfigError
from dittohead.examine import MAX_DEPTH
from dittohead.stage import remove_staging

from .conftest import REPO, Env, make_env, mount_tmpfs, no_leftovers, tree, wait_for


def _chain(top: Path, name: str, levels: int) -> None:
    """top/name/name/... `levels` deep with a file at the bottom, made by fds (no PATH_MAX)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        out = os.open("f.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, b"bottom")
        os.close(out)
    finally:
        os.close(fd)


def _failed_reason(env: Env) -> str:
    (rc,) = env.failed_receipts()
    return str(json.loads(rc.read_text())["reason"])


def _drop_built(env: Env, name: str, build: object) -> None:
    tmp = env.study.inbox / f".{name}"
    tmp.mkdir()
    assert callable(build)
    build(tmp)
    os.rename(tmp, env.study.inbox / name)


def test_tree_deeper_than_the_limit_fails_in_the_first_run(env: Env) -> None:
    _drop_built(env, "deep", lambda t: _chain(t, "d", 1200))
    r = env.process()
    assert r.returncode == EXIT_OK, r.stderr
    assert f"nested deeper than {MAX_DEPTH} levels" in _failed_reason(env)
    assert tree(env.study.destination) == {}
    no_leftovers(env)


def test_tree_at_the_depth_limit_is_delivered(env: Env) -> None:
    _drop_built(env, "deep", lambda t: _chain(t, "d", MAX_DEPTH))
    r = env.process()
    assert r.returncode == EXIT_OK, r.stderr
    assert len(env.done_receipts()) == 1
    assert tree(env.study.destination) == {"d/" * MAX_DEPTH + "f.txt": b"bottom"}


def test_path_longer_than_path_max_fails_with_a_short_reason(env: Env) -> None:
    _drop_built(env, "long", lambda t: _chain(t, "a" * 250, 20))
    r = env.process()
    assert r.returncode == EXIT_OK, r.stderr
    reason = _failed_reason(env)
    assert "paths longer than Linux allows" in reason and "..." in reason
    assert len(reason) < 1000
    no_leftovers(env)


@pytest.mark.parametrize("when", ["2300-01-01"])  # ext4 keeps 1901-2446
def test_file_dated_beyond_what_the_plan_records_fails_naming_it(env: Env, when: str) -> None:
    def build(t: Path) -> None:
        (t / "odd.dat").write_bytes(b"x")
        subprocess.run(["touch", "-d", when, str(t / "odd.dat")], check=True)

    _drop_built(env, "dated", build)
    r = env.process()
    assert r.returncode == EXIT_OK, r.stderr
    reason = _failed_reason(env)
    assert "dated before 1677 or after 2262" in reason and "odd.dat" in reason
    no_leftovers(env)


@pytest.fixture
def dropbox_mount(shared_base: Path) -> Iterator[tuple[Env, Path]]:
    """A study whose dropbox is a small filesystem of its own (tmpfs, 2 MiB)."""
    box = shared_base / "box"
    box.mkdir()
    mount_tmpfs(box, "size=2m")
    try:
        yield make_env(shared_base), box
    finally:
        subprocess.run(["umount", "-l", str(box)], check=False)


@pytest.mark.root
def test_full_dropbox_keeps_the_entry_in_the_inbox_with_exit_75(
        dropbox_mount: tuple[Env, Path]) -> None:
    env, box = dropbox_mount
    env.drop("e", {"a.txt": b"a"})
    hog = box / "hog"
    subprocess.run(["dd", "if=/dev/zero", f"of={hog}", "bs=64k"], capture_output=True)
    r = env.process()
    assert r.returncode == EXIT_TEMPFAIL, r.stderr
    assert "cannot claim e" in r.stderr and "free space" in r.stderr
    assert "does the service have" not in r.stderr
    assert tree(env.study.inbox / "e") == {"a.txt": b"a"}
    hog.unlink()
    assert env.process().returncode == EXIT_OK
    assert tree(env.study.destination) == {"a.txt": b"a"}


@pytest.mark.root
def test_read_only_dropbox_is_a_storage_error_74_and_the_entry_stays(
        dropbox_mount: tuple[Env, Path]) -> None:
    env, box = dropbox_mount
    env.drop("e", {"a.txt": b"a"})
    subprocess.run(["mount", "-o", "remount,ro", str(box)], check=True)
    r = env.process()
    assert r.returncode == EXIT_IOERR, r.stderr
    assert "Read-only file system" in r.stderr and "kernel log" in r.stderr
    assert "does the service have" not in r.stderr
    subprocess.run(["mount", "-o", "remount,rw", str(box)], check=True)
    assert tree(env.study.inbox / "e") == {"a.txt": b"a"}
    assert env.process().returncode == EXIT_OK


@pytest.mark.root
def test_read_only_destination_is_a_storage_error_74_and_the_entry_stays_claimed(
        shared_base: Path) -> None:
    env = make_env(shared_base)
    dest = str(env.study.destination)
    mount_tmpfs(dest, "size=2m")
    env.drop("e", {"a.txt": b"a"})
    subprocess.run(["mount", "-o", "remount,ro", dest], check=True)
    r = env.process()
    assert r.returncode == EXIT_IOERR, r.stderr
    assert "the storage failed (Read-only file system" in r.stderr
    assert not env.done_receipts() and not env.failed_receipts()
    subprocess.run(["mount", "-o", "remount,rw", dest], check=True)
    assert env.process().returncode == EXIT_OK
    assert tree(env.study.destination) == {"a.txt": b"a"}


@pytest.mark.root
def test_a_destination_directory_refusing_writes_unforeseen_is_a_config_error(
        shared_base: Path) -> None:
    # Writable when checked, refused when published (as NFS root squash or an
    # immutable flag set meanwhile do): the service's setup is wrong, not the
    # entry, which stays claimed; never an unexpected error.
    env = make_env(shared_base)
    sub = env.study.destination / "sub"
    sub.mkdir()
    st = os.stat(env.study.destination)
    os.chown(sub, st.st_uid, st.st_gid)
    env.drop("e", {"sub/new.txt": b"n"})
    go = shared_base / "go"
    run = subprocess.Popen(
        [sys.executable, "-m", "dittohead", "--config", str(env.config_path), "process", "s1"],
        env={**os.environ, "DITTOHEAD_LOG": "stderr",
             "DITTOHEAD_TEST_FAULT": f"checked=wait:{go}"},
        cwd=str(REPO), stderr=subprocess.PIPE, text=True)
    try:
        # The plan's state file is written when the walk ends; the destination
        # check follows within milliseconds, then the run waits for `go`.
        wait_for(lambda: any(env.study.processing.glob(".*.state")), 30, "the plan")
        time.sleep(1)
        subprocess.run(["chattr", "+i", str(sub)], check=True)
        go.touch()
        _, err = run.communicate(timeout=60)
        assert run.returncode == 78, err
        assert "must be able to write every directory" in err
        assert not env.done_receipts() and not env.failed_receipts()
        assert not list(env.study.destination.glob(".incoming-*"))
    finally:
        subprocess.run(["chattr", "-i", str(sub)], check=True)
        if run.poll() is None:
            run.kill()
    assert env.process().returncode == EXIT_OK
    assert tree(env.study.destination) == {"sub/new.txt": b"n"}


def test_a_top_level_name_kept_for_staging_fails_the_entry(env: Env) -> None:
    env.drop("e", {".incoming-20261130T000000Z-x-abcdef/precious.txt": b"p", "ok.txt": b"o"})
    r = env.process()
    assert r.returncode == EXIT_OK, r.stderr
    assert "names dittohead keeps for itself" in _failed_reason(env)
    assert tree(env.study.destination) == {}


def test_someone_elses_file_under_a_staging_name_is_never_removed(env: Env) -> None:
    env.drop("e", {"a.txt": b"a"})
    # What an admin (or an older version) left under the name a claim's staging takes:
    claim_id = "20261130T000000Z-e-abcdef"
    (env.study.destination / f".incoming-{claim_id}").write_bytes(b"someone's")
    fd = os.open(env.study.destination, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(ConfigError, match="not a staging directory"):
            remove_staging(fd, claim_id)
    finally:
        os.close(fd)
    assert (env.study.destination / f".incoming-{claim_id}").read_bytes() == b"someone's"


def test_a_symlink_in_an_ignored_directory_fails_the_entry(env: Env) -> None:
    def build(t: Path) -> None:
        (t / "data.txt").write_bytes(b"d")
        (t / "__MACOSX").mkdir()
        (t / "__MACOSX" / "shadow").symlink_to("/etc/shadow")

    env.reload(ignore=["__MACOSX"])
    _drop_built(env, "e", build)
    r = env.process()
    assert r.returncode == EXIT_OK, r.stderr
    assert "symlinks not delivered: __MACOSX/shadow" in _failed_reason(env)


def test_check_says_when_the_dropbox_shares_a_filesystem_with_users(env: Env) -> None:
    r = env.run("check", "s1")
    assert "on the same filesystem as" in r.stdout + r.stderr
    assert "/var/tmp" in r.stdout + r.stderr


def test_a_killed_attempts_staging_in_a_setgid_destination_is_removed(env: Env) -> None:
    os.chmod(env.study.destination, 0o2755)
    env.drop("e", {"a.txt": b"a"})
    assert env.process(env={"DITTOHEAD_TEST_FAULT": "staged:1"}).returncode != 0
    assert list(env.study.destination.glob(".incoming-*"))
    r = env.process()
    assert r.returncode == EXIT_OK, r.stderr
    assert tree(env.study.destination) == {"a.txt": b"a"}
    no_leftovers(env)


@pytest.mark.root
def test_many_empty_files_fit_a_small_destination(shared_base: Path) -> None:
    env = make_env(shared_base)
    mount_tmpfs(env.study.destination, "size=4m,nr_inodes=20000")
    env.drop("empties", {f"d{i // 1000}/f{i}": b"" for i in range(3000)})
    r = env.process()
    assert r.returncode == EXIT_OK, r.stderr
    assert len(env.done_receipts()) == 1
