"""The network table: a study whose destination is an sshfs mount, on a booted systemd.

In the box (tests/boxes.py, with the checkout installed) Debian's sshd runs on 127.0.0.1
(tests/servers.py); a NAS account there exports a directory, and root mounts it with
sshfs (`allow_other`, as an admin's fstab line would) where study s2's destination is.
Deliveries refuse sshfs (dittohead/fstype.py): each case checks the run's exit code and
message, that every entry is still whole where it was, and that the NAS's tree is exactly
what it was (nothing staged, published or replaced); then the admin's fix (the mount
gone, the destination made on a local filesystem with `dittohead setup`) and the next
run must deliver every entry exactly once, byte-identical, its manifest verifying.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from random import Random

from ..boxes import CONFIG, ROOT, UPLOADER, Box
from ..servers import SSH_PORT, start_sshd
from ..servers import install as install_servers
from . import KEPT, CampaignFailure, Observed, trial_rng, trials

STUDY = "s2"
UNIT = f"dittohead@{STUDY}.service"
NAS = "nasacct"  # the NAS's own account, which the mount logs in as
EXPORT = f"/home/{NAS}/export"
MNT = "/srv/nas"  # the admin's mount point (root's, 0755), on the box's /
DEST = f"{MNT}/{STUDY}"
BOX = f"{ROOT}/dropbox/{STUDY}"
STATUS = "dittohead-test-exit="  # the run's exit status, in its unit's journal
SSHFS = (f"sshfs -o allow_other,BatchMode=yes,IdentityFile=/root/.ssh/id_ed25519,"
         f"port={SSH_PORT} {NAS}@127.0.0.1:{EXPORT} {MNT}")


@dataclass(frozen=True)
class Case:
    """What is done to the mount before the run, and the run's expected exit and words."""

    name: str
    does: str
    exit: int
    says: str
    trials: int


CASES = [
    Case("sshfs-deliver", "3 entries (a new directory, files into one the NAS has, a single "
         "file) for a destination on sshfs", 78, "is on fuse.sshfs", trials(1, 3)),
    Case("sshfs-conflict", "an entry whose file the NAS already has with other content",
         78, "is on fuse.sshfs", trials(1, 3)),
    Case("sshfs-sshd-killed", "sshd stopped and the mount's session (its sshd and "
         "sftp-server) SIGKILLed before the run: sshfs ends and its mount goes (the destination "
         "is missing); then sshd back, mounted again for a second run", 75,
         "is not available", trials(1, 3)),
    Case("sshfs-mount-gone", "the sshfs unmounted before the run (the destination is "
         "missing), then mounted again for a second run", 75, "is not available",
         trials(1, 3)),
]

# As the uploader: seeded entries into the inbox (built as .NAME, renamed); their digests.
UPLOAD_PY = r"""
import hashlib, json, os, random, sys
spec = json.load(sys.stdin)
rnd = random.Random(spec["seed"])
out = {}
for name, files in spec["entries"].items():
    tmp = os.path.join(spec["inbox"], "." + name)
    digests = {}
    for rel, size in files.items():
        p = os.path.join(tmp, rel) if rel else tmp
        if rel:
            os.makedirs(os.path.dirname(p), exist_ok=True)
        data = rnd.randbytes(size)
        with open(p, "wb") as f:
            f.write(data)
        digests[rel] = hashlib.sha256(data).hexdigest()
    os.rename(tmp, os.path.join(spec["inbox"], name))
    out[name] = digests
print(json.dumps(out))
"""

# As root: every path under a tree with its sha256 (or "dir"), mode and owner.
TREE_PY = r"""
import hashlib, json, os, sys
out = {}
for top, dirs, files in os.walk(sys.argv[1]):
    for n in dirs + files:
        p = os.path.join(top, n)
        st = os.lstat(p)
        kind = "dir" if n in dirs else hashlib.sha256(open(p, "rb").read()).hexdigest()
        out[os.path.relpath(p, sys.argv[1])] = [kind, st.st_mode, st.st_uid, st.st_mtime_ns]
print(json.dumps(out, sort_keys=True))
"""


def prepare(b: Box) -> None:
    """sshd, the NAS account and its export, /dev/fuse, and s2's destination on the mount."""
    install_servers(b)
    start_sshd(b, f"{ROOT}/dropbox")
    b.sh(f"""set -e
# The box's private /dev has no fuse node; the host's kernel has the driver.
[ -e /dev/fuse ] || mknod -m 0666 /dev/fuse c 10 229
useradd --create-home --shell /bin/sh {NAS}
usermod -p '*' {NAS}
mkdir -p -m 0700 /root/.ssh
[ -e /root/.ssh/id_ed25519 ] || ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/id_ed25519
install -d -o {NAS} -g {NAS} -m 0700 /home/{NAS}/.ssh
install -o {NAS} -g {NAS} -m 0600 /root/.ssh/id_ed25519.pub /home/{NAS}/.ssh/authorized_keys
install -d -m 0755 {MNT}
""")
    b.box.write_file("/etc/dittohead/config.yaml",
                     CONFIG.replace(f"destination: {ROOT}/study/{STUDY}\n",
                                    f"destination: {DEST}\n"))
    b.box.run("systemctl", "daemon-reload")
    # Each run is started by the trial: not by the path unit a successful run starts.
    b.box.run("systemctl", "mask", "--runtime", f"dittohead@{STUDY}.path")
    # systemd forgets ExecMainStatus once a oneshot has succeeded (75 counts as
    # success): the unit's journal gets it from ExecStopPost= (its sandbox is read-only).
    b.dropin(UNIT, "test-status", "[Service]\nExecStopPost=/bin/sh -c "
             f"'echo {STATUS}$$EXIT_STATUS'\n")


def _nas(b: Box, script: str) -> None:
    b.box.run("/bin/sh", "-c", f"set -e; cd; {script}", user=NAS)


def _mount(b: Box) -> None:
    b.sh(SSHFS)
    r = b.box.run("findmnt", "-no", "FSTYPE", MNT, check=False)
    if r.stdout.strip() != "fuse.sshfs":
        raise CampaignFailure(f"sshfs did not mount on {MNT}: {r.stdout}{r.stderr}")


def _unmount(b: Box) -> None:
    b.sh(f"if mountpoint -q {MNT}; then umount -l {MNT}; fi")


def _fresh_nas(b: Box) -> None:
    """The export as the NAS has it: s2/ with the study's existing shared/ in it."""
    _unmount(b)
    b.sh(f"rm -rf {DEST} {EXPORT}")
    _nas(b, f"mkdir -p export/{STUDY}/shared && echo 'the NAS keeps this' > "
            f"export/{STUDY}/shared/old.txt")


def _tree(b: Box, path: str) -> str:
    return b.box.run("/usr/bin/python3", "-c", TREE_PY, path).stdout


def _upload(b: Box, rng: Random, tag: str, conflict: bool) -> dict[str, dict[str, str]]:
    def size() -> int:
        return rng.randrange(1, 64 << 10)

    entries: dict[str, dict[str, int]] = {
        f"new-{tag}": {f"d-{tag}/x.bin": size(), f"d-{tag}/sub/y.bin": size()}}
    if conflict:
        entries[f"c-{tag}.txt"] = {"": size()}
        _nas(b, f"echo 'the NAS version' > export/{STUDY}/c-{tag}.txt")
    else:
        entries[f"merge-{tag}"] = {f"shared/m-{tag}.bin": size()}
        entries[f"single-{tag}.bin"] = {"": size()}
    spec = {"inbox": f"{BOX}/inbox", "entries": entries, "seed": rng.random()}
    r = b.box.run("/usr/bin/python3", "-c", UPLOAD_PY, user=UPLOADER,
                  input=json.dumps(spec).encode())
    digests: dict[str, dict[str, str]] = json.loads(r.stdout)
    return digests


def _run(b: Box) -> tuple[int, str]:
    """Start the study's service once; its exit status and the journal's words of the run."""
    since = b.now()
    b.box.run("systemctl", "start", UNIT, check=False, timeout=120)
    lines = [str(e.get("MESSAGE", "")) for e in b.journal(
        f"--since=@{since}", f"_SYSTEMD_UNIT={UNIT}")]
    codes = [int(x.removeprefix(STATUS)) for x in lines if x.startswith(STATUS)]
    status = codes[-1] if codes else -1
    words = " ".join(x for x in lines if not x.startswith(STATUS))
    b.box.run("systemctl", "reset-failed", UNIT, check=False)
    if status not in (0, 75, 78):
        words += " " + b.sh(f"systemctl show {UNIT} | grep -e Result -e Exec -e Restart",
                            check=False).stdout
    return status, words


def _kill_sshd(b: Box) -> None:
    """SIGKILL sshd and the NAS account's sessions (the mount's sftp-server among them)."""
    # The listener is stopped (killed, ssh.service would restart it); the session that
    # serves the mount (its sshd and sftp-server, in a logind session scope) is SIGKILLed.
    b.sh(f"""systemctl stop ssh.service
loginctl kill-user -s KILL {NAS}
# sshfs (no -o reconnect) ends when its connection dies, and its mount goes with it.
for i in $(seq 100); do stat {MNT}/{STUDY} >/dev/null 2>&1 || exit 0; sleep 0.1; done
echo "the mount still answers after sshd was killed" >&2; exit 1""")


def _delivered(b: Box, digests: dict[str, dict[str, str]]) -> list[str]:
    """Why the entries are not each delivered once, byte-identical, manifest verifying."""
    problems = []
    receipts = b.receipts(STUDY)
    for name, files in digests.items():
        done = [r for r in receipts["done"] if r["entry"] == name]
        failed = [r for r in receipts["failed"] if r["entry"] == name]
        if len(done) != 1 or failed:
            problems.append(f"{name}: {len(done)} receipts in done/, {len(failed)} in failed/ "
                            f"{[r.get('reason') for r in failed]}")
            continue
        for rel, digest in files.items():
            path = f"{DEST}/{rel or name}"
            got = b.sh('sha256sum "$1" 2>&1 | cut -d" " -f1', path).stdout.strip()
            if got != digest:
                problems.append(f"{name}: {rel or name} is not what was uploaded ({got})")
        r = b.sh(f'cd {DEST} && sha256sum --quiet -c "$1"', f"{BOX}/done/{done[0]['id']}.sha256",
                 check=False)
        if r.returncode != 0:
            problems.append(f"{name}: the manifest does not verify: {r.stdout}{r.stderr}")
    left = b.sh(f"ls -A {BOX}/inbox {BOX}/processing | grep -v -e '^\\.' -e ':$' -e '^$'",
                check=False).stdout.split()
    if left:
        problems.append(f"left in the inbox or processing: {left}")
    return problems


def trial(b: Box, case: Case, index: int) -> Observed:
    """One trial of a case: refused (nothing written on the NAS), then delivered once."""
    rng = trial_rng(case.name, index)
    tag = f"{index}-{rng.randrange(1 << 20):05x}"
    started = time.monotonic()
    _fresh_nas(b)
    _mount(b)
    digests = _upload(b, rng, tag, conflict=case.name == "sshfs-conflict")
    nas_before = _tree(b, EXPORT)
    if case.name == "sshfs-sshd-killed":
        _kill_sshd(b)
    if case.name == "sshfs-mount-gone":
        _unmount(b)
    status, words = _run(b)
    problems = [] if status == case.exit and case.says in words else [
        f"the run exited {status} (expected {case.exit}, saying {case.says!r}): {words}\n"
        + b.sh(f"journalctl -u {UNIT} -n 30 -o short-precise --no-pager; systemctl show "
               f"-p ExecMainStatus,ExecMainCode,Result,ExecMainStartTimestamp {UNIT}",
               check=False).stdout]
    if case.exit == 75:  # the entries claimed meanwhile wait in processing
        if case.name == "sshfs-sshd-killed":
            b.box.run("systemctl", "start", "ssh.service")
            _unmount(b)
        _mount(b)
        again, said = _run(b)
        if again != 78 or "is on fuse.sshfs" not in said:
            problems.append(f"the run after the mount came back exited {again}: {said}")
    _unmount(b)
    if _tree(b, EXPORT) != nas_before:
        problems.append("the NAS's export changed: " + _tree(b, EXPORT))
    receipts = b.receipts(STUDY)
    if any(r["entry"] in digests for r in receipts["done"] + receipts["failed"]):
        problems.append("an entry has a receipt from before the fix")
    # The admin's fix: the destination on a local filesystem, made by `dittohead setup`.
    b.sh(f"dittohead setup {STUDY} >/dev/null")
    fixed, said = _run(b)
    if fixed != 0:
        problems.append(f"the run on the local destination exited {fixed}: {said}")
    problems += _delivered(b, digests)
    b.sh(f"rm -rf {DEST}")
    if problems:
        raise CampaignFailure(f"{case.name} trial {index}: " + "; ".join(problems))
    first = re.split(r"(?<=[.?]) ", words)[0]
    return Observed(KEPT, reason=first[:200], seconds=time.monotonic() - started)
