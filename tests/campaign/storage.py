"""Storage faults: the destination or the dropbox fails under a run, and nothing is lost.

Each case mounts a filesystem (mounts.py) over the study's destination or its dropbox,
drops one entry, makes the storage fail (faultfs rules, a full or over-quota tmpfs, an
ext4 remounted read-only), runs `dittohead process` as the service user and checks the
exit code, the message, that the entry is still whole where it must wait (inbox or
processing) and that no file the entry did not bring is visible in the destination.
Then it lifts the fault and runs again: the entry must be delivered exactly once.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from random import Random

from ..conftest import (
    Env,
    ThrowawayUser,
    make_env,
    manifest_verifies,
    service_argv,
    tree,
    wait_for,
)
from . import DELIVERED, KEPT, OTHER, CampaignFailure, Observed, trial_rng, trials
from .hostile import run_service, waiting_at_point
from .mounts import Mounted, mount

WAITS = {"inbox": "the inbox", "processing": "processing/",
         "either": "the inbox or processing/ (as far as the claim got)"}


@dataclass(frozen=True)
class Case:
    """Where the storage fails, how, and what the run must do about it."""

    name: str
    does: str
    where: str  # "destination" or "dropbox": what the filesystem is mounted over
    fs: str  # faultfs, tmpfs-full, tmpfs-quota, ext4
    exit: int  # the first run's exit code (0: delivered despite the fault)
    message: str = ""  # a regex the first run's stderr must match
    waits: str = "processing"  # where the entry must be, whole: inbox, processing, either
    rules: tuple[tuple[str, str, str, int], ...] = ()  # faultfs: (op, path, errno, max after)
    hold: str = ""  # ext4: the fault point at which the filesystem goes read-only
    reduced: int = 1
    full: int = 5

    @property
    def trials(self) -> int:
        return trials(self.reduced, self.full)

    def expect(self) -> str:
        if self.exit == 0:
            return f"{DELIVERED} (the fallback), nothing left"
        return (f"{KEPT}: exit {self.exit}, message matching `{self.message}`, entry whole "
                f"in {WAITS[self.waits]}, then delivered once when the fault is lifted")


def drop(env: Env, ra: ThrowawayUser, rnd: Random) -> dict[str, bytes]:
    """One entry of a few files in two directories, the uploader's, in the inbox as `e`."""
    files = {f"d{i % 2}/f{i}.bin": rnd.randbytes(rnd.randint(1, 96 * 1024))
             for i in range(rnd.randint(3, 8))}
    tmp = env.study.inbox / ".e"
    for rel, content in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(content)
    for p in [tmp, *tmp.rglob("*")]:
        os.lchown(p, ra.uid, ra.gid)
    os.rename(tmp, env.study.inbox / "e")
    return files


def run_held(env: Env, svc: ThrowawayUser, m: Mounted, point: str,
             base: Path) -> subprocess.CompletedProcess[str]:
    """Hold the run at `point`, turn the filesystem read-only, let the run go on."""
    go = base / "go"
    run = subprocess.Popen(
        service_argv(env, svc, "process", "s1",
                     extra_env={"DITTOHEAD_TEST_FAULT": f"{point}=wait:{go}"}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        wait_for(lambda: waiting_at_point(run.pid) or run.poll() is not None, 120,
                 f"the run to stop at {point}")
        m.read_only()
        go.touch()
        out, err = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    return subprocess.CompletedProcess(run.args, run.returncode, out, err)


def waiting_entry(env: Env, where: str) -> dict[str, bytes] | None:
    """The entry's files where it waits (`inbox`: as `e`; processing: its claim)."""
    e = env.study.inbox / "e"
    if where == "inbox" or (where == "either" and e.is_dir()):
        return tree(e) if e.is_dir() else None
    claims = [p for p in env.study.processing.iterdir()
              if p.is_dir() and not p.name.startswith(".")]
    return tree(claims[0]) if len(claims) == 1 else None


def nothing_partial(dest: Path, before: dict[str, bytes], files: dict[str, bytes]) -> None:
    """Every visible file in the destination is one it held or one of the entry's, whole."""
    for rel, content in tree(dest).items():
        if rel.split("/")[0].startswith("."):
            continue  # staging: never under a final name
        assert before.get(rel, files.get(rel)) == content, f"{rel} visible and not whole"


def fill(path: Path) -> None:
    """Write zeros until the filesystem is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    chunk = b"\0" * (1 << 20)
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    return
                chunk = chunk[:len(chunk) // 2]
    finally:
        os.close(fd)


def first_run(case: Case, env: Env, svc: ThrowawayUser, m: Mounted, rnd: Random,
              base: Path) -> subprocess.CompletedProcess[str]:
    if case.fs == "faultfs":
        m.set_rules([{"op": op, "path": path, "errno": err, "after": rnd.randint(0, most)}
                     for op, path, err, most in case.rules])
    if case.hold:
        return run_held(env, svc, m, case.hold, base)
    if case.fs == "ext4":
        m.read_only()
    return run_service(env, svc)


def judge_first(case: Case, env: Env, m: Mounted, r: subprocess.CompletedProcess[str],
                before: dict[str, bytes], files: dict[str, bytes]) -> Observed:
    dest = env.study.destination
    if case.fs == "faultfs":
        hit = {h["op"] for h in m.hits()}
        assert {op for op, *_ in case.rules} <= hit, f"a fault never reached: only {hit}"
        m.set_rules([])  # reading what waits must not meet the fault again
    if r.returncode != case.exit:
        return Observed(OTHER, f"exit {r.returncode}, expected {case.exit}: {r.stderr[-800:]}")
    if case.exit == 0:
        return Observed(DELIVERED)
    assert re.search(case.message, r.stderr), f"message: {r.stderr[-800:]}"
    assert waiting_entry(env, case.waits) == files, f"the entry is not whole in {case.waits}"
    assert env.done_receipts() == [] and env.failed_receipts() == [], "an entry was filed"
    nothing_partial(dest, before, files)
    line = [x for x in r.stderr.splitlines() if re.search(case.message, x)][:1]
    said = line[0].partition(" [DITTOHEAD_")[0][-160:] if line else ""
    shown = [k for k in tree(dest) if k in files and not k.startswith(".")]
    if shown:  # published before the storage failed, not removable until it is back
        said += f"; {len(shown)} of its {len(files)} files visible (whole) until the next run"
    return Observed(KEPT, said)


def delivered_once(env: Env, before: dict[str, bytes], files: dict[str, bytes]) -> None:
    """One receipt, the destination is what it held plus the entry, nothing left."""
    assert len(env.done_receipts()) == 1 and env.failed_receipts() == [], "not one receipt"
    dest = env.study.destination
    visible = {k: v for k, v in tree(dest).items() if not k.startswith(".")}
    assert visible == {**before, **files}, "the destination differs"
    manifest_verifies(env, env.done_receipts()[0])
    assert [n for n in os.listdir(dest) if n.startswith(".incoming-")] == [], "staging left"
    assert [n for n in os.listdir(env.study.inbox) if not n.startswith(".")] == []
    assert [n for n in os.listdir(env.study.processing) if not n.startswith(".")] == []


def trial(case: Case, index: int, svc: ThrowawayUser, ra: ThrowawayUser) -> Observed:
    """One trial in a fresh study; raises CampaignFailure on any deviation."""
    base = Path(tempfile.mkdtemp(prefix="dh-storage-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    rnd = trial_rng(case.name, index)
    m: Mounted | None = None
    try:
        env = make_env(base, service_user=svc.name)
        (env.study.destination / "kept.txt").write_bytes(b"there before\n")
        at = env.study.destination if case.where == "destination" else env.cfg.dropbox_root
        m = mount(case.fs, Path(at), base / "mount", size_mb=64)
        files = drop(env, ra, rnd)
        before = {k: v for k, v in tree(env.study.destination).items()
                  if not k.startswith(".")}
        if case.fs == "tmpfs-full":
            fill(m.at / ".filler")
        started = time.monotonic()
        try:
            seen = judge_first(case, env, m, first_run(case, env, svc, m, rnd, base),
                               before, files)
            if seen.outcome != OTHER:
                if seen.outcome == KEPT:
                    m.lift()
                    again = run_service(env, svc)
                    assert again.returncode == 0, f"after the fault: {again.stderr[-800:]}"
                delivered_once(env, before, files)
        except AssertionError as e:
            raise CampaignFailure(f"{case.name} trial {index}: {e}") from e
        return Observed(seen.outcome, seen.reason, time.monotonic() - started,
                        sum(map(len, files.values())), len(files))
    finally:
        if m is not None:
            m.close()
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)


IO = r"(?i)input/output error|I/O error"
FULL = r"(?i)no space|out of space|full|quota"
RO = r"(?i)read-only"
STAGING = r"^\.incoming-"
CLAIM = r"^s1/processing/"


def _c(name: str, does: str, where: str, fs: str, exit: int, message: str = "",
       waits: str = "processing", rules: tuple[tuple[str, str, str, int], ...] = (),
       hold: str = "") -> Case:
    return Case(name, does, where, fs, exit, message, waits, rules, hold)


CASES = (
    _c("dest-write-eio", "EIO on a write into the staging directory, after 0-2 writes",
       "destination", "faultfs", 74, IO, rules=(("write", STAGING, "EIO", 2),)),
    _c("dest-write-enospc", "ENOSPC on a staged write, after 0-2 (statfs says there is room)",
       "destination", "faultfs", 75, FULL, rules=(("write", STAGING, "ENOSPC", 2),)),
    _c("dest-write-edquot", "EDQUOT on a staged write, after 0-2",
       "destination", "faultfs", 75, FULL, rules=(("write", STAGING, "EDQUOT", 2),)),
    _c("dest-create-enospc", "ENOSPC creating a staged file, after 0-2",
       "destination", "faultfs", 75, FULL, rules=(("create", STAGING, "ENOSPC", 2),)),
    _c("dest-mkdir-erofs", "EROFS making the staging directory or one in it, after 0-2",
       "destination", "faultfs", 74, RO, rules=(("mkdir", STAGING, "EROFS", 2),)),
    _c("dest-read-eio", "EIO reading a staged copy back (the verify), after 0-2",
       "destination", "faultfs", 74, IO, rules=(("read", STAGING, "EIO", 2),)),
    _c("dest-publish-eio", "EIO on a rename into a final name, after 0-1 (some published)",
       "destination", "faultfs", 74, IO, rules=(("rename2", r"^d[01]$", "EIO", 1),)),
    _c("dest-no-rename-noreplace", "renameat2 with flags fails EINVAL, as on sshfs and NFS: "
       "the link/mkdir fallback", "destination", "faultfs", 0,
       rules=(("rename2", "", "EINVAL", 0),)),
    _c("dest-mkdir-enospc", "ENOSPC making a directory in the staging directory, after 0-2",
       "destination", "faultfs", 75, FULL, rules=(("mkdir", STAGING, "ENOSPC", 2),)),
    _c("dest-statfs-eio", "EIO asking the destination's free space (the space check)",
       "destination", "faultfs", 74, IO + r".*: under /\S+/dest or ",
       rules=(("statfs", "", "EIO", 0),)),
    _c("dest-fallback-mkdir-enospc", "no RENAME_NOREPLACE, and ENOSPC on the fallback's "
       "mkdir of a new directory, after 0-1", "destination", "faultfs", 75, FULL,
       rules=(("rename2", "", "EINVAL", 0), ("mkdir", r"^d[01]$", "ENOSPC", 1))),
    _c("dropbox-claim-rename-eio", "EIO renaming the entry into processing/ (the claim)",
       "dropbox", "faultfs", 74, IO, "inbox", (("rename", CLAIM, "EIO", 0),)),
    _c("dropbox-spool-eio", "EIO writing a dot file in processing/ (claim record, plan, "
       "state), after 0-2", "dropbox", "faultfs", 74, IO, "either",
       (("write", CLAIM + r"\.", "EIO", 2),)),
    _c("dropbox-claim-enospc", "ENOSPC writing the claim record in processing/",
       "dropbox", "faultfs", 75, FULL, "inbox", (("create", CLAIM, "ENOSPC", 0),)),
    _c("dropbox-claim-edquot", "EDQUOT writing the claim record in processing/",
       "dropbox", "faultfs", 75, FULL, "inbox", (("create", CLAIM, "EDQUOT", 0),)),
    _c("dropbox-claim-erofs", "EROFS writing the claim record in processing/",
       "dropbox", "faultfs", 74, RO, "inbox", (("create", CLAIM, "EROFS", 0),)),
    _c("dropbox-read-eio", "EIO reading the claimed entry's files, after 0-2 reads",
       "dropbox", "faultfs", 74, IO, rules=(("read", CLAIM + r".+/d", "EIO", 2),)),
    _c("dropbox-receipt-eio", "EIO creating the receipt in done/ (the files are published)",
       "dropbox", "faultfs", 74, IO, rules=(("create", r"^s1/done/", "EIO", 0),)),
    _c("dropbox-receipt-enospc", "ENOSPC writing the receipt in done/ (files published)",
       "dropbox", "faultfs", 75, FULL, rules=(("write", r"^s1/done/", "ENOSPC", 0),)),
    _c("dest-tmpfs-full", "a real tmpfs destination, full", "destination",
       "tmpfs-full", 75, FULL),
    _c("dest-tmpfs-quota", "a real tmpfs destination, the service user's quota 256 KiB",
       "destination", "tmpfs-quota", 75, FULL),
    _c("dropbox-tmpfs-full", "the dropbox on a real tmpfs, full", "dropbox",
       "tmpfs-full", 75, FULL, "inbox"),
    _c("dropbox-tmpfs-quota", "the dropbox on a real tmpfs, the service user's quota 256 KiB "
       "(taking the entry over charges it)", "dropbox", "tmpfs-quota", 75, FULL, "inbox"),
    _c("dest-ext4-ro", "the destination's ext4 (loop) read-only before the run",
       "destination", "ext4", 74, RO),
    _c("dest-ext4-ro-checked", "the destination's ext4 goes read-only after the check",
       "destination", "ext4", 74, RO, hold="checked"),
    _c("dest-ext4-ro-published", "the destination's ext4 goes read-only after the first "
       "rename into a final name", "destination", "ext4", 74, RO, hold="published:1"),
    _c("dropbox-ext4-ro", "the dropbox's ext4 read-only before the run", "dropbox", "ext4",
       74, RO, "inbox"),
    _c("dropbox-ext4-ro-checked", "the dropbox's ext4 goes read-only after the check (the "
       "receipt cannot be written)", "dropbox", "ext4", 74, RO, hold="checked"),
)
