"""A claimed entry belongs to the service: its uploader (or anyone) can no longer change it.

Real users: an uploader `ra`, the service user with exactly the unit's
capabilities; real races: the uploader's shell sits in a directory of the
entry, and the service is held (fault hook) right after the lockdown.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .conftest import Env, ThrowawayUser, as_service, service_argv, tree, wait_for

pytestmark = pytest.mark.root


def _as(user: ThrowawayUser, *cmd: str) -> None:
    subprocess.run([*user.prefix(), *cmd], check=True)


def test_a_held_directory_cannot_add_rename_or_rewrite_after_the_claim(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser, shared_base: Path) -> None:
    env = service_env
    signals = shared_base / "signals"
    signals.mkdir(mode=0o777)
    os.chmod(signals, 0o777)
    hidden = env.study.inbox / ".e"
    _as(ra, "mkdir", "-p", str(hidden / "sub"))
    _as(ra, "sh", "-c", f"echo original > {hidden}/sub/a.txt")
    # The uploader's shell, in the entry before the claim, tries after the lockdown.
    script = ("cd sub && : > " + str(signals / "ready") + "; "
              f"while [ ! -e {signals}/go ]; do sleep 0.05; done; "
              "for op in 'touch new' 'mv a.txt b.txt' 'rm a.txt' 'sh -c \"echo evil > a.txt\"' "
              "'mkdir d'; do if sh -c \"$op\" 2>/dev/null; then echo \"ALLOWED: $op\"; "
              f"fi; done > {signals}/result; : > {signals}/done")
    shell = subprocess.Popen([*ra.prefix(), "sh", "-c", f"cd {hidden} && {script}"])
    try:
        wait_for(lambda: (signals / "ready").exists(), 10, "the uploader's shell")
        _as(ra, "mv", str(hidden), str(env.study.inbox / "e"))
        run = subprocess.Popen(
            service_argv(env, svc, "process", "s1",
                         extra_env={"DITTOHEAD_TEST_FAULT": f"checked=wait:{signals}/resume"}),
            stderr=subprocess.PIPE, text=True, cwd="/")
        def locked() -> bool:
            claimed = [p for p in env.study.processing.iterdir()
                       if p.is_dir() and not p.name.startswith(".")]
            return bool(claimed) and (claimed[0] / "sub" / "a.txt").stat().st_uid == svc.uid

        wait_for(locked, 20, "the lockdown")
        (signals / "go").touch()
        wait_for(lambda: (signals / "done").exists(), 20, "the uploader's attempts")
        (signals / "resume").touch()
        _, err = run.communicate(timeout=60)
    finally:
        shell.kill()
    assert run.returncode == 0, err
    assert (signals / "result").read_text() == ""  # every operation was refused
    assert tree(env.study.destination) == {"sub/a.txt": b"original\n"}
    done = env.study.done / json.loads(env.done_receipts()[0].read_text())["id"]
    assert sorted(p.name for p in done.rglob("*")) == ["a.txt", "sub"]
    assert all(p.stat().st_uid == svc.uid for p in [done, *done.rglob("*")])
    assert json.loads(env.done_receipts()[0].read_text())["uploader"] == ra.name


def test_hard_linked_files_fail_the_entry_and_stay_their_uploaders(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser, shared_base: Path) -> None:
    env = service_env
    mine = shared_base / "ra-home"
    _as(ra, "mkdir", str(env.study.inbox / ".e"))
    subprocess.run(["install", "-d", "-o", str(ra.uid), str(mine)], check=True)
    _as(ra, "sh", "-c", f"echo data > {mine}/a.txt && ln {mine}/a.txt {env.study.inbox}/.e/a.txt"
        f" && echo ok > {env.study.inbox}/.e/b.txt && mv {env.study.inbox}/.e "
        f"{env.study.inbox}/e")
    r = as_service(env, svc, "process", "s1")
    assert r.returncode == 0, r.stderr
    reason = json.loads(env.failed_receipts()[0].read_text())["reason"]
    assert "hard links" in reason and "a.txt" in reason
    assert tree(env.study.destination) == {}
    assert (mine / "a.txt").stat().st_uid == ra.uid  # the uploader's other copy is untouched


def test_a_lockdown_cut_short_resumes_and_delivers_once(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser) -> None:
    env = service_env
    env.drop("e", {"sub/a.txt": b"a", "b.txt": b"b"}, uid=ra.uid)
    r = as_service(env, svc, "process", "s1", extra_env={"DITTOHEAD_TEST_FAULT": "claimed"})
    assert r.returncode != 0
    top = next(p for p in env.study.processing.iterdir() if p.is_dir())
    os.chown(top, svc.uid, svc.gid)  # as far as a killed lockdown got
    r = as_service(env, svc, "process", "s1")
    assert r.returncode == 0, r.stderr
    assert tree(env.study.destination) == {"sub/a.txt": b"a", "b.txt": b"b"}
    assert json.loads(env.done_receipts()[0].read_text())["uploader"] == ra.name


def test_retry_gives_a_failed_entry_back_to_its_uploader(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser) -> None:
    env = service_env
    (env.study.destination / "a.txt").write_bytes(b"theirs")
    env.drop("e", {"a.txt": b"mine", "d/c.txt": b"c"}, uid=ra.uid)
    assert as_service(env, svc, "process", "s1").returncode == 0
    failed = env.failed_receipts()[0]
    entry = failed.with_suffix("")
    assert all(p.stat().st_uid == svc.uid for p in [entry, *entry.rglob("*")])
    r = env.run("retry", "s1", failed.stem)
    assert r.returncode == 0, r.stderr
    back = env.study.inbox / "e"
    assert all(p.stat().st_uid == ra.uid for p in [back, *back.rglob("*")])
    _as(ra, "rm", "-r", str(back))  # theirs again: they may change or remove it


def test_a_chmod_racing_the_takeover_leaves_nothing_writable(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser, shared_base: Path) -> None:
    # The uploader owns `z` until the chown lands: a chmod 777 just before it
    # must not leave a service-owned directory anyone can write into.
    env = service_env
    signals = shared_base / "signals"
    signals.mkdir()
    os.chmod(signals, 0o777)
    entry = env.drop("e", {"z/f.txt": b"mine"}, uid=ra.uid)
    # The uploader's shell sits in z from before the claim.
    shell = subprocess.Popen([*ra.prefix(), "sh", "-c",
                              f"cd {entry}/z && while [ ! -e {signals}/chmod ]; do sleep 0.02;"
                              f" done; chmod 0777 . && : > {signals}/done"])
    results: list[subprocess.CompletedProcess[str]] = []
    run = threading.Thread(target=lambda: results.append(as_service(
        env, svc, "process", "s1",
        extra_env={"DITTOHEAD_TEST_FAULT": f"taking:z=wait:{signals}/go"})))
    run.start()
    try:
        def at_z() -> bool:
            claimed = [p for p in env.study.processing.iterdir()
                       if p.is_dir() and not p.name.startswith(".")]
            return bool(claimed) and claimed[0].stat().st_uid == svc.uid
        wait_for(at_z, 20, "the claim")
        time.sleep(0.5)  # the walk is held at z: after its fstat, before its chown
        (signals / "chmod").touch()
        wait_for(lambda: (signals / "done").exists(), 20, "the uploader's chmod")
    finally:
        (signals / "go").touch()
        run.join(60)
        shell.kill()
    (r,) = results
    assert r.returncode == 0, r.stderr
    done = env.study.done / json.loads(env.done_receipts()[0].read_text())["id"]
    assert not (done / "z").stat().st_mode & 0o022
    assert tree(env.study.destination) == {"z/f.txt": b"mine"}


def test_a_root_owned_entry_holding_another_users_file_fails(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser) -> None:
    # Root's directory, left where users write, filled with ra's file and
    # moved into the inbox by anyone: root's entries hold root's files only.
    env = service_env
    entry = env.drop("projects", {"notes.txt": b"root's", "other.txt": b"ra's"})
    os.chown(entry / "other.txt", ra.uid, ra.gid)
    r = as_service(env, svc, "process", "s1")
    assert r.returncode == 0, r.stderr
    reason = json.loads(env.failed_receipts()[0].read_text())["reason"]
    assert "owned by another user than the uploader" in reason and "other.txt" in reason
    assert tree(env.study.destination) == {}


def test_another_users_file_in_an_ignored_directory_fails_the_entry(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser, shared_base: Path) -> None:
    env = service_env
    env.reload(ignore=["._*"])
    entry = env.drop("e", {"data.txt": b"d", "._meta/secret": b"not ra's"}, uid=ra.uid)
    os.chown(entry / "._meta" / "secret", svc.uid + 1, svc.gid)
    r = as_service(env, svc, "process", "s1")
    assert r.returncode == 0, r.stderr
    reason = json.loads(env.failed_receipts()[0].read_text())["reason"]
    assert "._meta/secret" in reason
    assert tree(env.study.destination) == {}


@pytest.mark.parametrize("mode", [0o4755, 0o2750, 0o2644])
def test_a_set_id_file_fails_the_entry_naming_it_instead_of_a_config_error(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser, mode: int) -> None:
    # Linux refuses the service's chown of another user's set-id file (it would also
    # drop the bits: CAP_FOWNER): this was exit 78 blaming CAP_CHOWN, the entry stuck.
    env = service_env
    entry = env.drop("e", {"tool": b"#!/bin/sh\n", "ok.txt": b"ok"}, uid=ra.uid)
    os.chmod(entry / "tool", mode)
    r = as_service(env, svc, "process", "s1")
    assert r.returncode == 0, r.stderr
    reason = json.loads(env.failed_receipts()[0].read_text())["reason"]
    assert "setuid or setgid" in reason and "tool" in reason
    assert tree(env.study.destination) == {}
