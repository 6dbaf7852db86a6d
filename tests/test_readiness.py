"""Readiness for clients that cannot rename: an entry is taken once nothing in it changed
for the study's quiet_period; client temporary names hold it, and fail it once stale.

In-process (readiness.Watch, claim.ready_entries) and as real `dittohead process` runs
with writers at work beside them. The same with rsync and a booted systemd: test_clients.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dittohead import claim as claimmod
from dittohead import readiness
from dittohead.config import parse
from dittohead.errors import ConfigError
from dittohead.readiness import Watch

from .conftest import REPO, Env, make_env, tree


def quiet_env(base: Path, quiet: float, **keys: object) -> Env:
    return make_env(base, {"quiet_period": quiet, **keys})


def start_run(env: Env, linger: float) -> subprocess.Popen[str]:
    """`dittohead process s1 --linger N` as a real process, in the background."""
    return subprocess.Popen(
        [sys.executable, "-m", "dittohead", "--config", str(env.config_path), "process", "s1",
         "--linger", str(linger)], env={**os.environ, "DITTOHEAD_LOG": "stderr"},
        stderr=subprocess.PIPE, text=True, cwd=str(REPO))


def receipts(env: Env) -> list[str]:
    return [p.name for p in env.done_receipts() + env.failed_receipts()]


def slow_writer(root: Path, files: dict[str, bytes], pause: float) -> threading.Thread:
    """Write files one by one straight into root (no dot rule), pausing between them."""
    def write() -> None:
        root.mkdir()
        for rel, data in files.items():
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            time.sleep(pause)
    t = threading.Thread(target=write)
    t.start()
    return t


# --- which entries are ready ---------------------------------------------------

def test_quiet_period_zero_takes_entries_at_once(env: Env) -> None:
    (env.study.inbox / "fresh").mkdir()
    (env.study.inbox / "fresh" / "a").write_bytes(b"1")
    (env.study.inbox / ".dot").mkdir()
    seen = Watch(env.study).scan()
    assert (seen.ready, seen.waiting, seen.next_due) == (["fresh"], [], None)


def test_an_entry_changed_lately_waits_until_it_is_due(shared_base: Path) -> None:
    env = quiet_env(shared_base, 1.0)
    env.drop("e", {"a/b.txt": b"x"})
    watch = Watch(env.study)
    seen = watch.scan()
    assert (seen.ready, seen.waiting) == ([], ["e"])
    assert seen.next_due is not None and 0.8 < seen.next_due <= 1.0
    time.sleep(seen.next_due + 0.05)
    assert watch.scan().ready == ["e"]
    assert claimmod.ready_entries(env.study) == ["e"]


def test_a_change_deep_inside_postpones_readiness(shared_base: Path) -> None:
    env = quiet_env(shared_base, 1.0)
    env.drop("e", {"a/b/c/d.txt": b"x"})
    time.sleep(0.6)
    (env.study.inbox / "e" / "a" / "b" / "c" / "d.txt").write_bytes(b"more")
    watch = Watch(env.study)
    # The walk stops at the first change too recent (the entry itself): a lower bound.
    assert watch.scan().waiting == ["e"]
    time.sleep(0.5)
    assert watch.scan().ready == []  # would be ready by its first file alone
    time.sleep(0.6)
    assert watch.scan().ready == ["e"]


def test_a_tree_moved_in_whole_waits_one_quiet_period_from_the_move(
        shared_base: Path) -> None:
    # `mv` (a rename) changes the ctime of the entry itself and of nothing in it: that
    # ctime counts, so the move is one quiet period old before the entry is taken.
    env = quiet_env(shared_base, 0.5)
    old = shared_base / "old-tree"
    (old / "sub").mkdir(parents=True)
    (old / "sub" / "f.txt").write_bytes(b"old")
    time.sleep(0.6)
    os.rename(old, env.study.inbox / "old-tree")
    watch = Watch(env.study)
    seen = watch.scan()
    assert seen.waiting == ["old-tree"] and seen.next_due is not None and seen.next_due > 0.4
    time.sleep(seen.next_due + 0.05)
    assert watch.scan().ready == ["old-tree"]


def test_ready_entries_are_still_oldest_first(shared_base: Path) -> None:
    env = quiet_env(shared_base, 0.3)
    for i, name in enumerate(["b", "a", ".up"]):
        (env.study.inbox / name).write_bytes(b"x")
        os.utime(env.study.inbox / name, (100 - i, 100 - i))
    time.sleep(0.4)
    assert claimmod.ready_entries(env.study) == ["a", "b"]


def test_a_waiting_entry_is_walked_again_only_when_due(shared_base: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    env = quiet_env(shared_base, 1.0)
    env.drop("e", {"f": b"x"})
    walks: list[str] = []
    real = readiness.walk

    def counted(inbox: Path, name: str, *rest: Any) -> tuple[int, bool]:
        walks.append(name)
        return real(inbox, name, *rest)
    monkeypatch.setattr(readiness, "walk", counted)
    watch = Watch(env.study)
    for _ in range(5):
        assert watch.scan().waiting == ["e"]
        time.sleep(0.1)
    assert walks == ["e"]
    time.sleep(0.6)
    assert watch.scan().ready == ["e"]
    assert walks == ["e", "e"]


def test_what_is_too_deep_to_judge_does_not_hold_the_entry(
        shared_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Examine judges the whole entry once claimed; the walk judges what it can see.
    monkeypatch.setattr(readiness, "MAX_DEPTH", 3)
    env = quiet_env(shared_base, 0.5)
    # deep/1/2/3 is listed (3 levels below the entry): its 4's ctime counts, not 4's names.
    (env.study.inbox / "deep" / "1" / "2" / "3" / "4" / "5").mkdir(parents=True)
    time.sleep(0.6)
    (env.study.inbox / "deep" / "1" / "2" / "3" / "4" / "5" / "late").write_bytes(b"x")
    assert Watch(env.study).scan().ready == ["deep"]
    monkeypatch.setattr(readiness, "MAX_DEPTH", 4)
    assert Watch(env.study).scan().waiting == ["deep"]


def test_the_walk_never_follows_a_symlink(shared_base: Path) -> None:
    env = quiet_env(shared_base, 0.5)
    elsewhere = shared_base / "busy"
    elsewhere.mkdir()
    (env.study.inbox / "e").mkdir()
    os.symlink(elsewhere, env.study.inbox / "e" / "link")
    time.sleep(0.6)
    (elsewhere / "changing").write_bytes(b"x")
    assert Watch(env.study).scan().ready == ["e"]  # (examine then fails it: a symlink)


# --- temporary names -----------------------------------------------------------

@pytest.mark.parametrize("name", [".data.bin.AbC12z", "data.bin.filepart", "~$report.docx",
                                  ".~lock.report.odt#"])
def test_client_temporary_names_are_recognised(name: str) -> None:
    assert readiness.is_temp(name)


@pytest.mark.parametrize("name", ["data.bin", ".hidden", ".data.bin", "report~.docx",
                                  ".data.bin.AbC12", "filepart", "x.filepart.txt"])
def test_ordinary_names_are_not_temporary(name: str) -> None:
    assert not readiness.is_temp(name)


def test_a_temporary_name_holds_a_quiet_entry_until_stale(shared_base: Path) -> None:
    quiet = 0.15
    stale = quiet * readiness.STALE_FACTOR
    env = quiet_env(shared_base, quiet)
    env.drop("e", {"a.txt": b"done", "sub/.b.bin.Xy12Ab": b"partial"})
    watch = Watch(env.study)
    time.sleep(quiet + 0.05)
    seen = watch.scan()
    assert seen.waiting == ["e"] and watch.held("e")
    # Looked at again each quiet period: the upload may still finish.
    assert seen.next_due is not None and seen.next_due <= quiet
    time.sleep(stale - quiet - 0.05 - 0.3)
    assert watch.scan().ready == []
    time.sleep(0.4)
    assert watch.scan().ready == ["e"]


def test_a_temporary_file_renamed_into_place_releases_the_entry(shared_base: Path) -> None:
    env = quiet_env(shared_base, 0.3)
    env.drop("e", {".b.bin.Xy12Ab": b"whole"})
    watch = Watch(env.study)
    time.sleep(0.4)
    assert watch.scan().waiting == ["e"]
    os.rename(env.study.inbox / "e" / ".b.bin.Xy12Ab", env.study.inbox / "e" / "b.bin")
    time.sleep(0.4)
    assert watch.scan().ready == ["e"]


def test_a_stale_temporary_file_fails_the_entry_naming_it(shared_base: Path) -> None:
    env = quiet_env(shared_base, 0.1)
    env.drop("e", {"a.txt": b"done", "sub/.b.bin.Xy12Ab": b"partial"})
    time.sleep(0.1 * readiness.STALE_FACTOR + 0.1)
    r = env.process()
    assert r.returncode == 0, r.stderr
    [receipt] = env.failed_receipts()
    reason = receipt.read_text()
    assert "sub/.b.bin.Xy12Ab" in reason and "did not finish" in reason
    assert tree(env.study.destination) == {}


def test_a_temporary_file_in_an_entry_taken_at_once_fails_it(env: Env) -> None:
    # quiet_period 0: what the dot rule said is complete, but a file is partial.
    env.drop("e", {"a.txt": b"done", "report.docx.filepart": b"half"})
    assert env.process().returncode == 0
    [receipt] = env.failed_receipts()
    assert "report.docx.filepart" in receipt.read_text()
    assert tree(env.study.destination) == {}


def test_an_ignored_temporary_name_neither_holds_nor_fails(shared_base: Path) -> None:
    env = quiet_env(shared_base, 0.3, ignore=["*.filepart"])
    env.drop("e", {"a.txt": b"done", "b.filepart": b"junk"})
    time.sleep(0.4)
    assert Watch(env.study).scan().ready == ["e"]
    assert env.process().returncode == 0
    assert tree(env.study.destination) == {"a.txt": b"done"}


def test_a_temporary_name_dropped_in_the_inbox_is_not_taken(shared_base: Path) -> None:
    env = quiet_env(shared_base, 0.5)
    (env.study.inbox / "big.iso.filepart").write_bytes(b"half")
    (env.study.inbox / "~$notes.docx").write_bytes(b"owner")
    time.sleep(0.6)
    r = env.process()
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(env.study.inbox)) == ["big.iso.filepart", "~$notes.docx"]
    assert receipts(env) == []
    assert "holds temporary files" in r.stderr and "left in the inbox" in r.stderr


# --- the run -------------------------------------------------------------------

@pytest.mark.slow
def test_an_entry_written_slowly_is_taken_once_quiet_and_whole(shared_base: Path) -> None:
    env = quiet_env(shared_base, 1.0)
    files = {f"run{i}/data.bin": os.urandom(10_000) for i in range(6)}
    writer = slow_writer(env.study.inbox / "slow", files, pause=0.5)  # < quiet_period
    run = start_run(env, linger=0.5)
    writer.join()
    last_write = time.monotonic() - 0.5  # (the writer slept after its last file)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert time.monotonic() - last_write >= 1.0
    assert len(env.done_receipts()) == 1 and env.failed_receipts() == []
    assert tree(env.study.destination) == files
    assert "slow is still changing" in err


@pytest.mark.slow
def test_a_run_does_not_end_while_an_entry_waits(shared_base: Path) -> None:
    env = quiet_env(shared_base, 2.0)
    env.drop("e", {"a": b"1"})
    t0 = time.monotonic()
    r = env.run("process", "s1", "--linger", "0.5")
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 >= 1.5
    assert tree(env.study.destination) == {"a": b"1"}


@pytest.mark.slow
def test_a_run_that_filed_something_ends_though_an_entry_still_waits(
        shared_base: Path) -> None:
    env = quiet_env(shared_base, 1.0)
    env.drop("ready", {"a": b"1"})
    time.sleep(1.1)
    stop = threading.Event()

    def keep_writing() -> None:
        (env.study.inbox / "busy").mkdir()
        while not stop.is_set():
            (env.study.inbox / "busy" / "log.txt").write_text(str(time.monotonic()))
            time.sleep(0.2)
    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        t0 = time.monotonic()
        r = env.run("process", "s1", "--linger", "0.5", timeout=30)
        took = time.monotonic() - t0
    finally:
        stop.set()
        writer.join()
    assert r.returncode == 0, r.stderr
    assert tree(env.study.destination) == {"a": b"1"}
    assert "busy" in os.listdir(env.study.inbox)
    assert took < 5, f"the run waited {took:.1f} s for an entry still being written"


@pytest.mark.slow
def test_a_waiting_run_lets_a_run_by_hand_take_the_lock(shared_base: Path) -> None:
    env = quiet_env(shared_base, 4.0)
    env.drop("e", {"a": b"1"})
    waiting = start_run(env, linger=0.5)
    try:
        time.sleep(1.0)
        t0 = time.monotonic()
        r = env.process(timeout=10)
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t0 < 2.5
        assert "left in the inbox" in r.stderr
    finally:
        _, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 0, err
    assert tree(env.study.destination) == {"a": b"1"}


# --- config --------------------------------------------------------------------

def test_quiet_period_defaults_and_is_validated() -> None:
    base = {"studies": {"a": {"destination": "/d/a"},
                        "b": {"destination": "/d/b", "quiet_period": 0}}}
    cfg = parse(base)
    assert (cfg.studies["a"].quiet_period, cfg.studies["b"].quiet_period) == (120.0, 0.0)
    cfg = parse({**base, "defaults": {"quiet_period": 30.5}})
    assert (cfg.studies["a"].quiet_period, cfg.studies["b"].quiet_period) == (30.5, 0.0)
    bad = {"studies": {f"s{i}": {"destination": f"/d/{i}", "quiet_period": v}
                       for i, v in enumerate([-1, "60", True, float("inf"), float("nan"),
                                              86401, None])}}
    with pytest.raises(ConfigError) as e:
        parse(bad)
    text = str(e.value)
    for i in range(7):
        assert f"studies.s{i}.quiet_period: must be a number of seconds" in text


def test_status_tells_waiting_entries_from_ready_ones(shared_base: Path) -> None:
    env = quiet_env(shared_base, 60)
    (env.study.inbox / "still-copying").mkdir()
    (env.study.inbox / "still-copying" / "a.txt").write_bytes(b"a")
    r = env.run("status", "s1", "--json")
    assert r.returncode == 0, r.stderr
    (s,) = json.loads(r.stdout)
    assert (s["pending"], s["waiting"]) == (0, 1)
    assert "0 pending, 1 waiting to be quiet" in env.run("status", "s1").stdout


def test_an_entry_written_to_while_earlier_ones_are_delivered_is_judged_again(
        shared_base: Path) -> None:
    # Both entries are quiet when the run looks; the first one's delivery
    # takes a while (held here), and meanwhile a client starts writing into
    # the second: it must not be claimed half-written on the strength of the
    # old look.
    env = quiet_env(shared_base, 1)
    for name in ("a", "b"):
        (env.study.inbox / name).mkdir()
        (env.study.inbox / name / "first.txt").write_bytes(b"1")
    time.sleep(1.5)
    go = shared_base / "go"
    run = subprocess.Popen(
        [sys.executable, "-m", "dittohead", "--config", str(env.config_path), "process", "s1"],
        env={**os.environ, "DITTOHEAD_LOG": "stderr",
             "DITTOHEAD_TEST_FAULT": f"checked=wait:{go}"},
        stderr=subprocess.PIPE, text=True, cwd=str(REPO))
    try:
        deadline = time.monotonic() + 20
        while len(list(env.study.processing.glob("*.json"))) < 1:
            assert time.monotonic() < deadline, "no claim"
            time.sleep(0.05)
        (env.study.inbox / "b" / "second.txt").write_bytes(b"2")  # the client goes on
        time.sleep(0.5)  # a's delivery goes on a while longer
    finally:
        go.touch()
        _, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert len(env.done_receipts()) == 1  # a only
    assert sorted(os.listdir(env.study.inbox / "b")) == ["first.txt", "second.txt"]
