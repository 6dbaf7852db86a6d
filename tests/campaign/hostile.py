"""Run one hostile-input trial: build the entry, run the service as the units do, judge."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

from ..conftest import (
    Env,
    ThrowawayUser,
    make_env,
    manifest_verifies,
    service_argv,
    tree,
    wait_for,
)
from . import DELIVERED, FAILED, KEPT, OTHER, REJECTED, CampaignFailure, Observed, trial_rng
from .hostile_cases import Built, Case, Ctx, Race

SHELL_FUNCS = ('wait_act() { while [ ! -e "$S/act" ]; do sleep 0.02; done; }; '
               'acted() { : > "$S/acted"; }; '
               'wait_release() { while [ ! -e "$S/release" ]; do sleep 0.02; done; }; ')


def run_service(env: Env, svc: ThrowawayUser, fault: str | None = None,
                timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    extra = {"DITTOHEAD_TEST_FAULT": fault} if fault else None
    return subprocess.run(service_argv(env, svc, "process", "s1", extra_env=extra),
                          capture_output=True, text=True, timeout=timeout, cwd="/")


def waiting_at_point(pid: int) -> bool:
    """The run sleeps in faults.point's poll (clock_nanosleep, x86-64 syscall 230)."""
    try:
        return Path(f"/proc/{pid}/syscall").read_text().split()[0] == "230"
    except (OSError, IndexError):
        return False


def _race_script(race: Race, out: Path) -> str:
    if race.script:
        return race.script
    tries = "; ".join(f"if {op} 2>/dev/null; then echo 'ALLOWED: {op}'; fi"
                      for op in (o.replace("{out}", str(out)) for o in race.ops))
    return f"wait_act; {{ {tries}; }} > \"$S/result\"; acted"


def run_raced(ctx: Ctx, race: Race) -> tuple[subprocess.CompletedProcess[str], str]:
    """Hold the run at race.point while the uploader's shell in the entry acts."""
    env, sig = ctx.env, ctx.base / "signals"
    for d in (sig, ctx.base / "out"):
        d.mkdir()
        os.chmod(d, 0o777)
    held = env.study.inbox / ".e-held"
    shell = subprocess.Popen([*ctx.ra.prefix(), "env", f"S={sig}", "sh", "-c",
                              f"cd {held} && {SHELL_FUNCS}{_race_script(race, ctx.base / 'out')}"])
    try:
        time.sleep(0.2)  # the shell is in the entry before it is ready
        os.rename(held, env.study.inbox / "e")
        run = subprocess.Popen(
            service_argv(env, ctx.svc, "process", "s1",
                         extra_env={"DITTOHEAD_TEST_FAULT": f"{race.point}=wait:{sig}/go"}),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
        wait_for(lambda: waiting_at_point(run.pid), 60, f"the run to stop at {race.point}")
        (sig / "act").touch()
        wait_for(lambda: (sig / "acted").exists(), 30, "the uploader's attempts")
        (sig / "go").touch()
        out, err = run.communicate(timeout=600)
        result = (sig / "result").read_text() if (sig / "result").exists() else ""
        first = subprocess.CompletedProcess(run.args, run.returncode, out, err)
        if race.release:
            (sig / "release").touch()
            shell.wait(30)
    finally:
        shell.kill()
        shell.wait()
    return first, result


def classify(env: Env, r: subprocess.CompletedProcess[str]) -> Observed:
    done, failed = env.done_receipts(), env.failed_receipts()
    claimed = [p for p in env.study.processing.iterdir() if (not p.name.startswith(".")
               and p.is_dir()) or (p.name.endswith(".json") and not p.name.startswith("."))]
    if r.returncode == 0 and len(done) == 1 and not failed:
        data = json.loads(done[0].read_text())
        return Observed(DELIVERED, files=int(data["files"]), bytes=int(data["bytes"]))
    if r.returncode == 0 and len(failed) == 1 and not done:
        data = json.loads(failed[0].read_text())
        kind = REJECTED if data["outcome"] == "rejected" else FAILED
        return Observed(kind, str(data["reason"]))
    if r.returncode == 75 and not done and not failed and claimed:
        return Observed(KEPT, "")
    return Observed(OTHER, f"exit {r.returncode}: {r.stderr[-500:]}")


def no_leftovers(env: Env) -> None:
    """No staging in the destination, nothing ready in the inbox, no claim in processing."""
    dest = env.study.destination
    assert [n for n in os.listdir(dest) if n.startswith(".incoming-")] == [], "staging left"
    assert [n for n in os.listdir(env.study.inbox) if not n.startswith(".")] == []
    assert [n for n in os.listdir(env.study.processing) if not n.startswith(".")] == []


def no_set_id_bits(dest: Path) -> None:
    """No setuid, sticky, or setgid on a file (a directory's setgid keeps the study's group)."""
    for top, dirs, files in os.walk(dest):
        for name in files:
            mode = os.lstat(os.path.join(top, name)).st_mode
            assert not mode & 0o7000, f"{top}/{name}: mode {mode:o}"
        for name in dirs:
            mode = os.lstat(os.path.join(top, name)).st_mode
            assert not mode & 0o5000, f"{top}/{name}: mode {mode:o}"


def nothing_writable(env: Env) -> None:
    """What is filed in done/ is the service's and nobody else may write it."""
    for top, dirs, files in os.walk(env.study.done):
        for name in dirs + files:
            assert not os.lstat(os.path.join(top, name)).st_mode & 0o022, f"{top}/{name}"


def judge(case: Case, ctx: Ctx, built: Built, before: dict[str, bytes],
          seen: Observed) -> None:
    """Everything a trial must show besides its outcome."""
    env, dest = ctx.env, ctx.env.study.destination
    if seen.outcome == DELIVERED:
        assert tree(dest) == {**before, **built.files}, "destination differs"
        manifest_verifies(env, env.done_receipts()[0])
        no_set_id_bits(dest)
        for d in built.dirs:
            assert (dest / d).is_dir(), f"directory {d} not delivered"
        no_leftovers(env)
    elif seen.outcome in (FAILED, REJECTED):
        assert tree(dest) == before, "a failed entry changed the destination"
        assert re.search(case.expect.reason, seen.reason, re.S), seen.reason
        assert built.names in seen.reason, f"the reason does not name {built.names!r}"
        no_leftovers(env)
    elif seen.outcome == KEPT:
        assert tree(dest) == before, "a kept entry changed the destination"


def trial(case: Case, index: int, svc: ThrowawayUser, ra: ThrowawayUser) -> Observed:
    """One trial of a case in a fresh study tree; raises CampaignFailure on any deviation."""
    base = Path(tempfile.mkdtemp(prefix="dh-campaign-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    try:
        env = make_env(base, service_user=svc.name)
        ctx = Ctx(env, svc, ra, trial_rng(case.name, index), base)
        built = case.build(ctx)
        before = tree(env.study.destination)
        started = time.monotonic()
        breach = ""
        if built.race is not None:
            r, breach = run_raced(ctx, built.race)
        else:
            r = run_service(env, svc)
        seen = classify(env, r)
        seen = Observed(seen.outcome, seen.reason, time.monotonic() - started, seen.bytes,
                        seen.files)
        try:
            if built.race is not None and built.race.may_act:
                nothing_writable(env)
            else:
                assert breach == "", f"the lockdown let the uploader act: {breach}"
            if seen.outcome == case.expect.outcome:
                judge(case, ctx, built, before, seen)
                if built.then is not None:
                    again = classify(env, run_service(env, svc))
                    assert again.outcome == DELIVERED, again
                    judge(case, ctx, Built(built.then), before, again)
        except AssertionError as e:
            raise CampaignFailure(f"{case.name} trial {index}: {e}") from e
        return seen
    finally:
        if os.path.ismount(base / "dest"):
            subprocess.run(["umount", "-l", str(base / "dest")], check=False)
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)
