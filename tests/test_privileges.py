"""Real users and modes: uploads by non-root users, the service's capabilities, uploaders.

These need root (throwaway users, setpriv, tmpfs); they are skipped, saying
so, otherwise. The service side runs as a throwaway unprivileged user with
exactly the ambient capabilities its unit grants, through Debian's
/usr/bin/python3 (what `make install` uses), since pytest's own interpreter
may live under root's home.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import (
    Env,
    ThrowawayUser,
    add_group,
    as_service,
    make_env,
    manifest_verifies,
    mount_tmpfs,
    no_leftovers,
    service_argv,
    tree,
)

pytestmark = pytest.mark.root
def upload_as(user: ThrowawayUser, env: Env, src: Path, name: str, tool: list[str],
              umask: str) -> None:
    """The user's upload: copy to .name with `tool`, then rename (as the user)."""
    tmp = env.study.inbox / f".{name}"
    # rsync copies a directory's contents with a trailing slash; cp copies it whole.
    source = f"{src}/" if tool[0] == "rsync" else str(src)
    subprocess.run([*user.prefix(umask), *tool, source, str(tmp)], check=True)
    subprocess.run([*user.prefix(umask), "mv", str(tmp), str(env.study.inbox / name)],
                   check=True)


def make_source(user: ThrowawayUser, base: Path, umask: str) -> Path:
    src = base / f"src-{umask}"
    src.mkdir()
    os.chown(src, user.uid, user.gid)
    script = (f"mkdir -p {src}/eprime {src}/biopac && echo s01 > {src}/eprime/s01.txt && "
              f"head -c 300000 /dev/urandom > {src}/biopac/s01.acq && "
              f"printf '#!/bin/sh\\n' > {src}/run.sh && chmod +x {src}/run.sh")
    subprocess.run([*user.prefix(umask), "sh", "-c", script], check=True)
    return src


@pytest.mark.parametrize("umask", ["022", "077"])
@pytest.mark.parametrize("tool", [["cp", "-r"], ["cp", "-a"], ["rsync", "-a"]],
                         ids=["cp-r", "cp-a", "rsync-a"])
def test_ordinary_uploads_are_claimed_and_delivered(service_env: Env, svc: ThrowawayUser,
                                                    ra: ThrowawayUser, shared_base: Path,
                                                    umask: str, tool: list[str]) -> None:
    env = service_env
    src = make_source(ra, shared_base, umask)
    upload_as(ra, env, src, "up", tool, umask)
    r = as_service(env, svc, "process", "s1")
    assert r.returncode == 0, r.stderr
    dest = env.study.destination
    assert tree(dest) == tree(src)
    for p in dest.rglob("*"):
        st = os.lstat(p)
        assert st.st_uid == svc.uid, p
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISVTX)
    assert stat.S_IMODE(os.stat(dest / "run.sh").st_mode) == 0o750
    [rc] = env.done_receipts()
    data = json.loads(rc.read_text())
    assert data["uploader"] == ra.name
    assert f"DITTOHEAD_UPLOADER={ra.name}" in r.stderr
    manifest_verifies(env, rc)
    no_leftovers(env)


def test_without_capabilities_the_claim_fails_clearly_and_loses_nothing(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser, shared_base: Path) -> None:
    env = service_env
    src = make_source(ra, shared_base, "077")
    upload_as(ra, env, src, "up", ["cp", "-a"], "077")
    r = as_service(env, svc, "process", "s1", caps=None)
    assert r.returncode == 78, r.stderr  # the unit lacks a privilege: configuration
    assert "cannot claim up" in r.stderr and "CAP_CHOWN" in r.stderr
    assert tree(env.study.inbox / "up") == tree(src)
    assert tree(env.study.destination) == {}


def test_uploader_outside_uploaders_groups_is_rejected(shared_base: Path, svc: ThrowawayUser,
                                                      ra: ThrowawayUser) -> None:
    add_group("dh-test-other")
    env = make_env(shared_base, {"uploaders": ["dh-test-other"]}, service_user=svc.name)
    env.drop("e", {"a": b"1"}, uid=ra.uid)
    env.drop("anon", {"b": b"2"}, uid=54321)  # a uid with no user name
    r = as_service(env, svc, "process", "s1")
    assert r.returncode == 0, r.stderr
    reasons = sorted(str(json.loads(p.read_text())["reason"]) for p in env.failed_receipts())
    assert "dh-test-ra is not in any of the uploaders groups" in reasons[0]
    assert "uid 54321 has no user name" in reasons[1]
    assert all(json.loads(p.read_text())["outcome"] == "rejected"
               for p in env.failed_receipts())
    assert "DITTOHEAD_UPLOADER=54321" in r.stderr
    assert tree(env.study.destination) == {}


def test_uploader_in_uploaders_group_is_delivered(shared_base: Path, svc: ThrowawayUser,
                                                  ra: ThrowawayUser) -> None:
    env = make_env(shared_base, {"uploaders": ["dh-test-uploaders"]}, service_user=svc.name)
    env.drop("e", {"a": b"1"}, uid=ra.uid)
    r = as_service(env, svc, "process", "s1")
    assert r.returncode == 0, r.stderr
    assert tree(env.study.destination) == {"a": b"1"}


def test_file_of_another_user_inside_an_entry_fails(service_env: Env, svc: ThrowawayUser,
                                                    ra: ThrowawayUser) -> None:
    env = service_env
    entry = env.drop("e", {"mine": b"1", "theirs": b"secret"}, uid=ra.uid)
    os.lchown(entry / "theirs", 0, 0)
    os.chmod(entry / "theirs", 0o600)
    r = as_service(env, svc, "process", "s1")
    assert r.returncode == 0, r.stderr
    reason = json.loads(env.failed_receipts()[0].read_text())["reason"]
    assert "owned by another user than the uploader not delivered: theirs" in reason
    assert tree(env.study.destination) == {}


def test_overlapping_runs_claim_each_entry_once(service_env: Env, svc: ThrowawayUser) -> None:
    env = service_env
    for i in range(40):
        env.drop(f"e{i:02d}", {f"f{i:02d}.txt": os.urandom(2000)})
    procs = [subprocess.Popen(service_argv(env, svc, "process", "s1"),
                              stderr=subprocess.PIPE, text=True, cwd="/") for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert len(env.done_receipts()) == 40
    assert env.failed_receipts() == []
    assert len(tree(env.study.destination)) == 40
    no_leftovers(env)


@pytest.fixture
def waiting() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; killed if the test fails before they end."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def start_held(env: Env, fault: str,
               waiting: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    """Start `process` in the background, held at a fault point until the test says go."""
    p = subprocess.Popen([sys.executable, "-m", "dittohead", "--config", str(env.config_path),
                          "process", "s1"], stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "DITTOHEAD_LOG": "stderr",
                              "DITTOHEAD_TEST_FAULT": fault})
    waiting.append(p)
    return p


@pytest.fixture
def tiny_dest(shared_base: Path) -> Env:
    env = make_env(shared_base)
    mount_tmpfs(env.study.destination, "size=8m")
    return env


def test_entry_larger_than_free_space_waits_exit_75(tiny_dest: Env) -> None:
    env = tiny_dest
    (env.study.destination / "hog").write_bytes(b"\0" * (5 << 20))
    env.drop("big", {"a.bin": os.urandom(4 << 20)})
    r = env.process()
    assert r.returncode == 75, r.stderr
    assert "not enough space" in r.stderr
    assert os.listdir(env.study.destination) == ["hog"]
    assert os.listdir(env.study.inbox) == []
    claimed = [n for n in os.listdir(env.study.processing) if not n.endswith(".json")]
    assert len(claimed) == 1  # kept, claimed, for a later run


def test_entry_larger_than_the_whole_destination_fails_at_once(tiny_dest: Env) -> None:
    env = tiny_dest
    env.drop("huge", {"a.bin": os.urandom(10 << 20)})
    r = env.process()
    assert r.returncode == 0, r.stderr
    (rc,) = env.failed_receipts()
    reason = json.loads(rc.read_text())["reason"]
    assert "can never fit" in reason and "its largest file, a.bin, is 10.5 MB alone" in reason
    assert os.listdir(env.study.destination) == []
    no_leftovers(env)


def test_enospc_mid_copy_rolls_back_and_loses_nothing(
        tiny_dest: Env, waiting: list[subprocess.Popen[str]]) -> None:
    env = tiny_dest
    (env.study.destination / "already").write_bytes(b"there")
    files = {f"f{i}.bin": os.urandom(1 << 20) for i in range(5)}
    env.drop("e", files)
    go = env.base / "go"
    p = start_held(env, f"staged:2=wait:{go}", waiting)
    assert _wait_for_staging(env.study.destination)
    # Someone else fills the disk between the space check and the copy.
    hog = env.study.destination / "hog"
    subprocess.run(["dd", "if=/dev/zero", f"of={hog}", "bs=1M", "count=100"],
                   capture_output=True)
    go.touch()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 75, err
    assert "filled up" in err or "full" in err
    assert sorted(os.listdir(env.study.destination)) == ["already", "hog"]
    hog.unlink()
    r = env.process()
    assert r.returncode == 0, r.stderr
    assert tree(env.study.destination) == {"already": b"there", **files}
    manifest_verifies(env, env.done_receipts()[0])
    no_leftovers(env)


def _wait_for_staging(dest: Path) -> list[str]:
    import time
    for _ in range(500):
        names = [n for n in os.listdir(dest) if n.startswith(".incoming-")]
        if names and sum(1 for p in (dest / names[0]).rglob("*") if p.is_file()) >= 2:
            return names
        time.sleep(0.02)
    return []


def test_killed_service_user_run_resumes(service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser,
                                         shared_base: Path) -> None:
    env = service_env
    src = make_source(ra, shared_base, "077")
    upload_as(ra, env, src, "up", ["cp", "-a"], "077")
    r = as_service(env, svc, "process", "s1", extra_env={"DITTOHEAD_TEST_FAULT": "published:1"})
    assert r.returncode == -signal.SIGKILL
    r = as_service(env, svc, "process", "s1")
    assert r.returncode == 0, r.stderr
    assert tree(env.study.destination) == tree(src)
    no_leftovers(env)
    shutil.rmtree(src)


def test_disk_warning_once_each_time_a_threshold_is_crossed_upward(tiny_dest: Env) -> None:
    env = tiny_dest  # 8 MiB
    env.reload(disk_warn_percent=[50, 75])
    warnings = []
    for name, size in (("a", 3 << 20), ("b", 1536 << 10), ("c", 2 << 20), ("d", 4096)):
        env.drop(name, {f"{name}.bin": os.urandom(size)})
        r = env.process()
        assert r.returncode == 0, r.stderr
        warnings.append([line for line in r.stderr.splitlines() if "% full" in line])
    assert warnings[0] == []
    assert len(warnings[1]) == 1 and "(crossed 50%)" in warnings[1][0]
    assert len(warnings[2]) == 1 and "(crossed 75%)" in warnings[2][0]
    assert warnings[3] == []
    assert "MESSAGE_ID=6640f08ae1aa4f18906e215400188441" in warnings[1][0]


def test_destination_unmounted_during_delivery_is_rolled_back_and_kept(
        tiny_dest: Env, waiting: list[subprocess.Popen[str]]) -> None:
    env = tiny_dest
    files = {f"f{i}": os.urandom(1000) for i in range(3)}
    env.drop("e", files)
    go = env.base / "go"
    p = start_held(env, f"published:2=wait:{go}", waiting)
    for _ in range(500):
        if len([n for n in os.listdir(env.study.destination) if not n.startswith(".")]) >= 2:
            break
        time.sleep(0.02)
    # The storage goes away under the running delivery (a lazy unmount keeps
    # the service's open directories working, on a filesystem no one sees).
    subprocess.run(["umount", "-l", str(env.study.destination)], check=True)
    go.touch()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 75, err
    assert "unmounted or replaced during the delivery" in err
    assert env.done_receipts() == []
    claimed = [n for n in os.listdir(env.study.processing) if n.endswith(".json")
               and not n.startswith(".")]
    assert len(claimed) == 1
    r = env.process()  # the destination is now the bare directory: delivered there
    assert r.returncode == 0, r.stderr
    assert tree(env.study.destination) == files


def _hold_after_check(env: Env, waiting: list[subprocess.Popen[str]]
                      ) -> tuple[subprocess.Popen[str], Path]:
    go = env.base / "go-after-check"
    p = start_held(env, f"checked=wait:{go}", waiting)
    for _ in range(500):  # the state file is written when the walk ends; the check is quick
        if list(env.study.processing.glob(".*.state")):
            break
        time.sleep(0.02)
    time.sleep(0.5)
    return p, go


def test_directory_appearing_during_delivery_is_rolled_back_then_merged_into(
        env: Env, waiting: list[subprocess.Popen[str]]) -> None:
    files = {"top.txt": b"top", "new/a.txt": b"a", "new/sub/b.txt": b"b"}
    env.drop("e", files)
    p, go = _hold_after_check(env, waiting)
    (env.study.destination / "new").mkdir()  # someone else makes it meanwhile
    (env.study.destination / "new" / "theirs.txt").write_bytes(b"theirs")
    go.touch()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 75, err
    assert "new/ appeared in the destination during the delivery" in err
    assert tree(env.study.destination) == {"new/theirs.txt": b"theirs"}  # top.txt rolled back
    r = env.process()
    assert r.returncode == 0, r.stderr
    assert tree(env.study.destination) == {**files, "new/theirs.txt": b"theirs"}
    manifest_verifies(env, env.done_receipts()[0])
    no_leftovers(env)


def test_file_appearing_during_delivery_is_a_conflict_and_nothing_is_delivered(
        env: Env, waiting: list[subprocess.Popen[str]]) -> None:
    (env.study.destination / "old").mkdir()
    files = {"old/a.txt": b"a", "old/b.txt": b"b", "fresh/c.txt": b"c"}
    env.drop("e", files)
    p, go = _hold_after_check(env, waiting)
    (env.study.destination / "old" / "b.txt").write_bytes(b"someone else's")
    go.touch()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "old/b.txt appeared in the destination during the delivery" in err
    assert tree(env.study.destination) == {"old/b.txt": b"someone else's"}
    assert not (env.study.destination / "fresh").exists()  # published, then rolled back
    assert len(env.failed_receipts()) == 1
    no_leftovers(env)
