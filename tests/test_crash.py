"""SIGKILL at any moment, then run again: delivered exactly once, nothing lost or left over."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import Env, make_env, manifest_verifies, no_leftovers, tree

POINTS = ["claimed", "checked", "staged:1", "staged:12", "synced", "published:1",
          "published:9", "verified", "receipt", "filed"]


def entry_files() -> dict[str, bytes]:
    rnd = random.Random(7)
    files = {f"run{d}/trial{i:02d}.txt": rnd.randbytes(rnd.randint(0, 5000))
             for d in range(3) for i in range(10)}
    files["physio/big.acq"] = rnd.randbytes(9 << 20)  # large enough for the overlapped copy
    return files


def assert_delivered_once(env: Env, files: dict[str, bytes], existing: dict[str, bytes]) -> None:
    assert tree(env.study.destination) == {**existing, **files}
    [rc] = env.done_receipts()
    assert json.loads(rc.read_text())["files"] == len(files)
    assert env.failed_receipts() == []
    manifest_verifies(env, rc)
    no_leftovers(env)


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_at_each_point_then_resume_delivers_once(shared_base: Path, point: str) -> None:
    env = make_env(shared_base)
    existing = {"run0/trial00.txt": entry_files()["run0/trial00.txt"], "keep.txt": b"mine"}
    for rel, data in existing.items():
        (env.study.destination / rel).parent.mkdir(parents=True, exist_ok=True)
        (env.study.destination / rel).write_bytes(data)
    files = entry_files()
    env.drop("session-1", files)
    r = env.process(env={"DITTOHEAD_TEST_FAULT": point})
    assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr)
    assert not (env.study.inbox / "session-1").exists()
    r = env.process()
    assert r.returncode == 0, r.stderr
    assert_delivered_once(env, files, existing)
    if point == "filed":
        assert "delivered session-1" in r.stderr  # the event the crash swallowed


@pytest.mark.slow
def test_sigkill_from_outside_at_random_moments(shared_base: Path) -> None:
    env = make_env(shared_base)
    rnd = random.Random(11)
    files = {f"d{i % 7}/f{i:03d}": rnd.randbytes(rnd.randint(1, 300_000)) for i in range(120)}
    files["big"] = rnd.randbytes(48 << 20)
    env.drop("e", files)
    kills = 0
    for delay in (0.05, 0.15, 0.3, 0.5, 0.8, 1.2):
        p = subprocess.Popen([sys.executable, "-m", "dittohead", "--config",
                              str(env.config_path), "process", "s1"],
                             env={**os.environ, "DITTOHEAD_LOG": "stderr"},
                             stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        if p.wait() == -signal.SIGKILL:
            kills += 1
        if env.done_receipts():
            break
    assert kills >= 1
    r = env.process()
    assert r.returncode == 0, r.stderr
    assert_delivered_once(env, files, {})


def test_temporary_files_of_a_killed_run_are_swept(env: Env) -> None:
    (env.study.processing / ".20260101T000000Z-x-abcdef.json.tmp").write_bytes(b"{")
    (env.study.processing / ".20260101T000000Z-x-abcdef.plan").write_bytes(b"")
    env.drop("e", {"a": b"1"})
    assert env.process().returncode == 0
    no_leftovers(env)


def test_a_killed_attempts_files_are_taken_back_when_the_resumed_one_fails(env: Env) -> None:
    # All or nothing across a kill: the killed attempt published a.txt; before
    # the next run, another c.txt appears in the destination, so the entry
    # fails; a.txt, which that attempt put there, must not stay behind.
    (env.study.destination / "sub").mkdir()
    env.drop("e", {"sub/a.txt": b"a", "sub/b.txt": b"b", "sub/c.txt": b"c"})
    r = env.process(env={"DITTOHEAD_TEST_FAULT": "published:1"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert tree(env.study.destination / "sub") == {"a.txt": b"a"}
    (env.study.destination / "sub" / "c.txt").write_bytes(b"someone else's")
    r = env.process()
    assert r.returncode == 0, r.stderr
    (rc,) = env.failed_receipts()
    assert "sub/c.txt" in json.loads(rc.read_text())["reason"]
    assert tree(env.study.destination) == {"sub/c.txt": b"someone else's"}
    no_leftovers(env)
    assert not [p for p in env.study.processing.iterdir() if "killed" in p.name]


def test_a_killed_attempts_files_belong_to_the_resumed_delivery(env: Env) -> None:
    (env.study.destination / "sub").mkdir()
    files = {"sub/a.txt": b"a", "sub/b.txt": b"b"}
    env.drop("e", files)
    r = env.process(env={"DITTOHEAD_TEST_FAULT": "published:1"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert env.process().returncode == 0
    assert tree(env.study.destination) == files
    (rc,) = env.done_receipts()
    manifest_verifies(env, rc)
    no_leftovers(env)
    assert not [p for p in env.study.processing.iterdir() if "killed" in p.name]


def _killed_at_first_publish(env: Env, files: dict[str, bytes]) -> str:
    """Drop `e` and kill its delivery right after its first name is published; its id."""
    env.drop("e", files)
    r = env.process(env={"DITTOHEAD_TEST_FAULT": "published:1"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    (record,) = env.study.processing.glob("*.json")
    return str(json.loads(record.read_text())["id"])


def test_another_entry_never_counts_on_what_a_killed_attempt_published(env: Env) -> None:
    # A killed attempt published sub/a.txt; its entry is then kept for later.
    # Another entry with the same sub/a.txt must get a file of its own, which
    # the first entry's later failure cannot take away.
    (env.study.destination / "sub").mkdir()
    _killed_at_first_publish(env, {"sub/a.txt": b"a", "sub/b.txt": b"b", "sub/c.txt": b"c"})
    claimed = next(p for p in env.study.processing.iterdir() if p.is_dir()
                   and not p.name.startswith("."))
    fd = os.open(claimed / "sub" / "b.txt", os.O_WRONLY | os.O_APPEND)  # a writer: kept
    try:
        assert env.process().returncode == 75
        assert tree(env.study.destination / "sub") == {}  # undone before anything else
        env.drop("other", {"sub/a.txt": b"a", "sub/d.txt": b"d"})
        assert env.process().returncode == 75  # `other` delivered, `e` still kept
    finally:
        os.close(fd)
    (env.study.destination / "sub" / "c.txt").write_bytes(b"someone else's")
    assert env.process().returncode == 0  # `e` fails on the conflict
    assert len(env.failed_receipts()) == 1
    (rc,) = env.done_receipts()
    manifest_verifies(env, rc)
    assert tree(env.study.destination / "sub") == {"a.txt": b"a", "d.txt": b"d",
                                                   "c.txt": b"someone else's"}


def test_a_new_directory_published_just_before_a_kill_is_taken_back(env: Env) -> None:
    (env.study.destination / "sub").mkdir()
    _killed_at_first_publish(env, {"new/x/f.txt": b"f", "sub/c.txt": b"c"})
    assert (env.study.destination / "new" / "x" / "f.txt").exists()
    (env.study.destination / "sub" / "c.txt").write_bytes(b"someone else's")
    assert env.process().returncode == 0
    assert len(env.failed_receipts()) == 1
    assert sorted(os.listdir(env.study.destination)) == ["sub"]


def test_a_kill_between_keeping_a_plan_and_its_state_is_finished_next_time(env: Env) -> None:
    (env.study.destination / "sub").mkdir()
    claim_id = _killed_at_first_publish(env, {"sub/a.txt": b"a", "sub/c.txt": b"c"})
    proc = env.study.processing
    (proc / f".{claim_id}.state").rename(proc / f".{claim_id}.killed-0.state")
    (env.study.destination / "sub" / "c.txt").write_bytes(b"someone else's")
    assert env.process().returncode == 0
    assert tree(env.study.destination / "sub") == {"c.txt": b"someone else's"}
    assert not [p for p in proc.iterdir() if "killed" in p.name]
