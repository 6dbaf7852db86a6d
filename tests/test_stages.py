"""Each pipeline stage on its own, in this process: a failure here names its stage.

The black-box tests (test_engine.py and others) run the whole command; these
call one stage's function on a real study tree and look at what it left.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from dittohead import claim as claimmod
from dittohead import report
from dittohead.conflicts import check_destination
from dittohead.errors import EntryFailed, Outcome
from dittohead.examine import examine, new_plan
from dittohead.ownership import Ownership
from dittohead.plan import COPIED, EXISTS, PRESENT, DirPlan, FilePlan, Plan
from dittohead.publish import publish
from dittohead.record import file_entry, read_receipt
from dittohead.stage import Staging, stage, staging_name

from .conftest import Env


def _claimed(env: Env, files: dict[str, bytes]) -> claimmod.Claim:
    env.drop("e", files)
    c = claimmod.claim(env.study, "e", _owner(env))
    assert c is not None
    return c


def _examined(env: Env, files: dict[str, bytes]) -> tuple[claimmod.Claim, Plan]:
    c = _claimed(env, files)
    plan = new_plan(env.study, c)
    examine(env.study, plan, c.entry, _owner(env))
    return c, plan


def _owner(env: Env) -> Ownership:
    return Ownership(uid=os.geteuid(), gid=os.getegid(), file_mode=env.study.file_mode,
                     dir_mode=env.study.dir_mode, service_gid=os.getegid())


def _dest_fd(env: Env) -> int:
    return os.open(env.study.destination, os.O_RDONLY | os.O_DIRECTORY)


# --- claim --------------------------------------------------------------------

def test_claim_records_the_entry_then_moves_it_out_of_the_inbox(env: Env) -> None:
    c = _claimed(env, {"a": b"1"})
    record = json.loads((env.study.processing / f"{c.id}.json").read_text())
    assert (record["entry"], record["entry_hex"], record["format"], record["uploader_uid"]) \
        == ("e", b"e".hex(), 1, os.geteuid())
    assert (env.study.processing / c.id / "a").read_bytes() == b"1"
    assert os.listdir(env.study.inbox) == []
    assert list(claimmod.pending_claims(env.study)) == [c]


def test_claiming_an_entry_that_vanished_leaves_no_record(env: Env) -> None:
    assert claimmod.claim(env.study, "gone", _owner(env)) is None
    assert os.listdir(env.study.processing) == []


def test_ready_entries_are_oldest_first_and_never_dot_names(env: Env) -> None:
    for i, name in enumerate(["b", "a", ".up"]):
        (env.study.inbox / name).write_bytes(b"x")
        os.utime(env.study.inbox / name, (100 - i, 100 - i))
    assert claimmod.ready_entries(env.study) == ["a", "b"]


# --- examine ------------------------------------------------------------------

def test_examine_plans_parents_before_their_files_and_skips_ignored_names(env: Env) -> None:
    _, plan = _examined(env, {"x/y/z.txt": b"z", "x/a.txt": b"a", "x/.DS_Store": b"junk"})
    kinds = [("dir", r.rel) if isinstance(r, DirPlan) else ("file", r.name)
             if isinstance(r, FilePlan) else ("skipped", r) for r in plan.records()]
    assert kinds == [("dir", ""), ("dir", "x"), ("skipped", "x/.DS_Store"),
                     ("file", "a.txt"), ("dir", "x/y"), ("file", "z.txt")]
    assert (plan.files, plan.nbytes, plan.skipped) == (2, 2, 1)


def test_examine_reports_every_problem_at_once_and_keeps_the_totals(env: Env) -> None:
    c = _claimed(env, {"ok.txt": b"fine"})
    top = env.study.processing / c.id
    os.symlink("/etc/passwd", top / "link")
    os.mkfifo(top / "pipe")
    plan = new_plan(env.study, c)
    with pytest.raises(EntryFailed) as e:
        examine(env.study, plan, c.entry, _owner(env))
    assert "symlinks not delivered: link" in e.value.reason
    assert "FIFOs not delivered: pipe" in e.value.reason
    assert plan.files == 1


# --- conflicts ----------------------------------------------------------------

def test_same_content_is_present_and_other_content_is_a_conflict(env: Env) -> None:
    (env.study.destination / "same.txt").write_bytes(b"same")
    (env.study.destination / "other.txt").write_bytes(b"mine")
    _, plan = _examined(env, {"same.txt": b"same", "other.txt": b"your", "new.txt": b"n"})
    fd = _dest_fd(env)
    try:
        with pytest.raises(EntryFailed) as e:
            check_destination(env.study, plan, fd)
        assert "other.txt" in e.value.reason and "same.txt" not in e.value.reason
        (env.study.destination / "other.txt").unlink()
        check_destination(env.study, plan, fd)
    finally:
        os.close(fd)
    with plan.state() as state:
        flags = {r.name: state.flags(r.index) for r in plan.records() if isinstance(r, FilePlan)}
        top = next(r for r in plan.records() if isinstance(r, DirPlan))
        assert state.flags(top.index) & EXISTS
    assert flags == {"new.txt": 0, "other.txt": 0, "same.txt": PRESENT}


# --- stage ----------------------------------------------------------------------

def test_staging_is_removed_whatever_happens_inside(env: Env) -> None:
    fd = _dest_fd(env)
    try:
        with pytest.raises(RuntimeError), Staging(fd, "id1", env.study.destination) as s:
            os.mkdir("half-built", dir_fd=s.fd)
            raise RuntimeError("stop")
        assert os.listdir(env.study.destination) == []
    finally:
        os.close(fd)


def test_stage_copies_with_final_mode_and_mtime_and_writes_the_manifest(env: Env) -> None:
    c, plan = _examined(env, {"new/a.txt": b"a", "top.txt": b"top"})
    src_mtime = os.stat(env.study.processing / c.id / "top.txt").st_mtime_ns
    fd = _dest_fd(env)
    try:
        check_destination(env.study, plan, fd)
        with Staging(fd, c.id, env.study.destination) as s:
            stage(plan, s, _owner(env))
            staged = env.study.destination / staging_name(c.id)
            files = sorted(p for p in staged.rglob("*") if p.is_file())
            assert [p.read_bytes() for p in files] == [b"top", b"a"]
            st = files[0].stat()
            assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o640, src_mtime)
            assert os.listdir(env.study.destination) == [staging_name(c.id)]  # nothing published
    finally:
        os.close(fd)
    lines = plan.manifest_path.read_text().splitlines()
    assert [line.split("  ")[1] for line in lines] == ["top.txt", "new/a.txt"]


# --- publish ------------------------------------------------------------------

def _staged(env: Env, files: dict[str, bytes]) -> tuple[claimmod.Claim, Plan, int]:
    c, plan = _examined(env, files)
    fd = _dest_fd(env)
    check_destination(env.study, plan, fd)
    return c, plan, fd


def _published(env: Env, files: dict[str, bytes]) -> tuple[claimmod.Claim, Plan]:
    c, plan, fd = _staged(env, files)
    try:
        with Staging(fd, c.id, env.study.destination) as s:
            stage(plan, s, _owner(env))
            publish(plan, s)
    finally:
        os.close(fd)
    return c, plan


def test_publish_gives_final_names_and_leaves_no_staging(env: Env) -> None:
    _published(env, {"new/a.txt": b"a", "top.txt": b"top"})
    assert sorted(os.listdir(env.study.destination)) == ["new", "top.txt"]
    assert (env.study.destination / "new" / "a.txt").read_bytes() == b"a"


def test_a_name_taken_during_publishing_rolls_everything_back(env: Env) -> None:
    c, plan, fd = _staged(env, {"a.txt": b"a", "z.txt": b"ours"})
    try:
        with Staging(fd, c.id, env.study.destination) as s:
            stage(plan, s, _owner(env))
            (env.study.destination / "z.txt").write_bytes(b"theirs")  # after the check
            with pytest.raises(EntryFailed) as e:
                publish(plan, s)
    finally:
        os.close(fd)
    assert "z.txt appeared in the destination" in e.value.reason
    # a.txt was published first, then removed again: only the other file stays.
    assert os.listdir(env.study.destination) == ["z.txt"]
    assert (env.study.destination / "z.txt").read_bytes() == b"theirs"
    with plan.state() as state:
        assert any(state.flags(r.index) & COPIED for r in plan.records()
                   if isinstance(r, FilePlan))


# --- record -------------------------------------------------------------------

def test_filing_writes_the_receipt_and_manifest_then_moves_the_entry(env: Env) -> None:
    c, plan = _published(env, {"a.txt": b"a"})
    r = file_entry(env.study, c, plan, Outcome.DELIVERED, "ra")
    assert read_receipt(env.study.done / f"{c.id}.json") == r
    assert (r.outcome, r.files, r.nbytes, r.entry) == (Outcome.DELIVERED, 1, 1, "e")
    assert (env.study.done / c.id / "a.txt").exists()
    assert Path(env.study.done / f"{c.id}.sha256").read_text().endswith("  a.txt\n")
    # The claim stays until the entry is told of (a killed run's next run tells it)...
    assert f"{c.id}.json" in os.listdir(env.study.processing)
    report.filed_and_released(env.cfg, env.study, r, c)
    # ...then it goes with everything else of the entry: left, the fill the disk check
    # measured.
    assert os.listdir(env.study.processing) == [".disk-usage.json"]


def test_a_failed_entry_is_filed_with_its_reason_and_no_manifest(env: Env) -> None:
    c = _claimed(env, {"a.txt": b"a"})
    r = file_entry(env.study, c, None, Outcome.FAILED, "ra", "because")
    assert read_receipt(env.study.failed / f"{c.id}.json").reason == "because"
    assert (r.files, r.nbytes) == (0, 0)
    assert not (env.study.failed / f"{c.id}.sha256").exists()
    assert (env.study.failed / c.id / "a.txt").exists()
