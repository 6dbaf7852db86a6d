"""Forked workers: the same plan and the same delivery as one process, errors carried home."""

from __future__ import annotations

import errno
import os
import pwd
import random
import subprocess
import sys
from pathlib import Path

import pytest

from dittohead import examine, parallel
from dittohead.claim import Claim
from dittohead.errors import EntryFailed, Outcome, TemporaryError
from dittohead.ownership import Ownership
from dittohead.plan import DirPlan, FilePlan, Plan

from . import sysbox
from .conftest import REPO, Env, manifest_verifies, no_leftovers, tree, wait_for


def test_run_gives_every_share_its_result_in_order() -> None:
    assert parallel.run(3, lambda k: [k, os.getpid()])[0] == [0, os.getpid()]
    results = parallel.run(3, lambda k: (k, "x" * 100_000))  # bigger than a pipe's buffer
    assert [r[0] for r in results] == [0, 1, 2]


def _fail_in_child(k: int, exc: BaseException) -> int:
    if k == 1:
        raise exc
    return k


@pytest.mark.parametrize("exc", [EntryFailed("photo.jpg changed", Outcome.FAILED),
                                 TemporaryError("the destination filled up"),
                                 OSError(errno.ENOSPC, "No space left on device", "f")],
                         ids=["failed", "temporary", "enospc"])
def test_an_error_in_a_worker_is_raised_in_the_parent(exc: BaseException) -> None:
    with pytest.raises(type(exc)) as got:
        parallel.run(2, lambda k: _fail_in_child(k, exc))
    assert str(got.value) == str(exc)
    if isinstance(exc, OSError):
        assert isinstance(got.value, OSError) and got.value.errno == errno.ENOSPC


@pytest.mark.slow
def test_an_error_in_this_process_stops_the_workers(tmp_path: Path) -> None:
    marker = tmp_path / "late"

    def work(k: int) -> int:
        if k == 0:
            raise EntryFailed("stop")
        import time
        time.sleep(2)
        marker.touch()  # a worker still running after run() returned would do this
        return k

    with pytest.raises(EntryFailed):
        parallel.run(2, work)
    import time
    time.sleep(2.5)
    assert not marker.exists()


def _records(plan: Plan) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for r in plan.records():
        if isinstance(r, DirPlan):
            # (not atime: the first walk's reads update it, relatime)
            out.append(("D", r.index, r.rel, r.mtime_ns))
        elif isinstance(r, FilePlan):
            out.append(("F", r.index, r.name, r.size, r.mtime_ns, r.executable))
        else:
            out.append(("S", r))
    return out


def _walk(env: Env, claim_id: str, walkers: int, monkeypatch: pytest.MonkeyPatch
          ) -> tuple[list[tuple[object, ...]], tuple[object, ...], str | None]:
    monkeypatch.setattr(parallel, "walkers_for", lambda subdirs: walkers if subdirs > 1 else 1)
    plan = examine.new_plan(env.study, Claim(claim_id, "e", "2026-01-01T00:00:00Z"))
    try:
        svc = pwd.getpwnam(env.cfg.service_user)
        examine.examine(env.study, plan, "e", Ownership(svc.pw_uid, -1, env.study.file_mode,
                                                        env.study.dir_mode, svc.pw_gid))
        error = None
    except EntryFailed as e:
        error = e.reason
    totals = (plan.files, plan.nbytes, plan.dirs, plan.skipped, tuple(plan.skipped_sample))
    return _records(plan), totals, error


@pytest.mark.parametrize("walkers", [2, 3])
def test_a_parallel_walk_plans_exactly_what_one_process_plans(
        env: Env, monkeypatch: pytest.MonkeyPatch, walkers: int) -> None:
    rnd = random.Random(5)
    claim_id = "20260101T000000Z-e-000000"
    top = env.study.processing / claim_id
    for d in range(7):
        for i in range(rnd.randint(0, 30)):
            p = top / f"d{d}" / ("sub" if i % 3 == 0 else "") / f"f{i}.txt"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(rnd.randbytes(rnd.randint(0, 100)))
    (top / "d2" / "Thumbs.db").write_bytes(b"x")  # ignored by default
    (top / "d6").mkdir(exist_ok=True)
    (top / "d6" / ".DS_Store").write_bytes(b"x")
    (top / "empty").mkdir()
    (top / "top.txt").write_bytes(b"top")
    one = _walk(env, claim_id, 1, monkeypatch)
    many = _walk(env, claim_id, walkers, monkeypatch)
    assert many == one
    files = one[1][0]
    assert isinstance(files, int) and files > 50 and one[2] is None
    assert not list(env.study.processing.glob(f".{claim_id}.*.plan"))  # parts removed


def test_problems_found_by_walkers_are_all_reported(env: Env,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    claim_id = "20260101T000000Z-e-000001"
    top = env.study.processing / claim_id
    for d in range(4):
        (top / f"d{d}").mkdir(parents=True)
        (top / f"d{d}" / "ok.txt").write_bytes(b"ok")
        os.symlink("/etc/passwd", top / f"d{d}" / f"link{d}")
    os.mkfifo(top / "d3" / "pipe")
    one = _walk(env, claim_id, 1, monkeypatch)
    many = _walk(env, claim_id, 3, monkeypatch)
    assert many[2] == one[2]
    assert one[2] is not None and "link0" in one[2] and "link3" in one[2] and "pipe" in one[2]


@pytest.mark.slow
def test_many_files_are_delivered_by_workers_byte_exact(env: Env) -> None:
    rnd = random.Random(9)
    files = {f"s{d:02d}/run{i:03d}.txt": rnd.randbytes(rnd.randint(0, 9000))
             for d in range(12) for i in range(60)}
    files["physio/big.acq"] = rnd.randbytes(40 << 20)  # the big-file path in a worker too
    env.drop("many", files)
    r = env.process()
    assert r.returncode == 0, r.stderr
    assert tree(env.study.destination) == files
    [rc] = env.done_receipts()
    manifest_verifies(env, rc)
    no_leftovers(env)


def test_a_manifest_written_by_workers_lists_every_file_once_in_plan_order(env: Env) -> None:
    # Files already delivered (PRESENT) sit in every worker's share: each
    # share writes their lines too, and the parts are joined in order.
    files = {f"s{d:02d}/run{i:03d}.txt": f"{d} {i}\n".encode() * (i % 7)
             for d in range(12) for i in range(60)}
    env.drop("first", {k: v for k, v in files.items() if k[1:3] in ("00", "03", "07", "11")})
    assert env.process().returncode == 0
    env.drop("all", files)
    r = env.process()
    assert r.returncode == 0, r.stderr
    assert tree(env.study.destination) == files
    rc = next(p for p in env.done_receipts() if "-all-" in p.name)
    manifest_verifies(env, rc)
    lines = rc.with_suffix(".sha256").read_text().splitlines()
    assert [line.split("  ", 1)[1] for line in lines] == sorted(files)
    no_leftovers(env)


def _gone(pid: int) -> bool:
    return sysbox.proc_stat(pid, 3) in (None, "Z")  # no such process, or dead, not yet reaped


def test_workers_die_when_the_run_is_killed(tmp_path: Path) -> None:
    # A killed run must not leave a worker writing into a staging directory
    # the next run removes.
    pidfile = tmp_path / "worker"
    code = f"""
import os, sys, time
sys.path.insert(0, {str(REPO)!r})
from dittohead import parallel
def work(k):
    if k == 1:
        with open({str(pidfile)!r} + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename({str(pidfile)!r} + ".tmp", {str(pidfile)!r})
    time.sleep(60)
parallel.run(2, work)
"""
    run = subprocess.Popen([sys.executable, "-c", code])
    try:
        wait_for(lambda: pidfile.exists() or run.poll() is not None, 20, "a worker to start")
        assert pidfile.exists() and run.poll() is None, "no worker started"
        worker = int(pidfile.read_text())
        assert not _gone(worker)
    finally:
        run.kill()
        run.wait()
    wait_for(lambda: _gone(worker), 10, f"worker {worker} to die with the killed run")


def test_when_no_process_can_be_forked_the_shares_run_here(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real_fork = os.fork
    forks = []

    def fork() -> int:
        forks.append(1)
        if len(forks) > 1:  # TasksMax= reached after the first worker
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return real_fork()

    monkeypatch.setattr(os, "fork", fork)
    assert [r[0] for r in parallel.run(4, lambda k: (k, os.getpid()))] == [0, 1, 2, 3]
    pids = [r[1] for r in parallel.run(3, lambda k: (k, os.getpid()))]
    assert pids[0] == pids[2] == os.getpid()  # share 2 ran here, after the failed fork
