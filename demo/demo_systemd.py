"""`make demo` as root: dittohead's systemd units at work on a booted throwaway systemd.

A throwaway systemd boots on a copy-on-write overlay of this machine's / (tests/sysbox.py):
`make install`, users, groups, the study, the journal and every delivered byte live in
the box's tmpfs and vanish when it powers off. Nothing reaches the host.

Inside the box an admin installs dittohead and sets up study nccam3; a research
assistant (ra1, not root) uploads two sessions, once with `dittohead upload --wait` and
once by hand; the path unit starts the service, which delivers both. Then: the delivered
tree, a receipt, its manifest checked by sha256sum, the journal's events (all fields, the
service's run, the catalog's text), and a changed re-upload refused as a conflict.

Exit codes: 0 everything worked; 1 a step failed (the message says which); 3 no throwaway
systemd can boot here (not root, no overlayfs...): `make demo` runs demo/demo.py then.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import sysbox  # noqa: E402  (needs REPO on sys.path)

EXIT_UNAVAILABLE = 3
STUDY = "nccam3"
DROPBOX = f"/data-dropbox/{STUDY}"
DEST = f"/study/{STUDY}/raw-data"
RA = "ra1"
# dittohead/log.py MESSAGE_IDS (fixed for ever); copied so that this script needs nothing
# of the package on the host.
DELIVERED = "38a8638a6c0e47ae85e1afdd33a44e53"
FAILED = "e3e512004cb645aa863366fbb0f85d87"
WAIT = 30.0  # seconds for a delivery (the service lingers 3 s per run)

CONFIG = f"""\
# The demo's /etc/dittohead/config.yaml: one study (the repo's config.yaml documents all keys)
dropbox_root: /data-dropbox
studies:
  {STUDY}:
    destination: {DEST}
    group: {STUDY}
    uploaders: [{STUDY}-ra]
    # Taken once nothing in an entry changed for 2 s (default 120 s: see config.yaml).
    quiet_period: 2
"""

# What a lab PC leaves behind: demo/demo.py's make_session, run inside the box
# as ra1. demo.py is copied in beside a two-line runner, because ra1 may not be
# able to reach the checkout itself (e.g. under a 0700 home directory).
SHARE = "/usr/local/share/dittohead-demo"
MAKE_SESSIONS = f"{SHARE}/make-sessions.py"
MAKE_SESSIONS_PY = """\
import sys
from pathlib import Path
from demo import make_session
for subject in sys.argv[2:]:
    make_session(Path(sys.argv[1]), subject)
"""

# The demo's own look-up (as root, not shown): the receipts in done/ or failed/.
RECEIPTS_PY = r"""
import json, os, sys
d = sys.argv[1]
names = sorted(n for n in os.listdir(d) if n.endswith(".json") and not n.startswith("."))
print(json.dumps([json.load(open(os.path.join(d, n))) for n in names]))
"""


class DemoFailed(Exception):
    """A step did not do what the demo shows; the message says which."""


class Stopped(BaseException):
    """SIGINT, SIGTERM or SIGHUP: power the box off, then exit 128 + the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


def note(text: str) -> None:
    print(f"{DIM}# {text}{RESET}", flush=True)


class Demo:
    def __init__(self, box: sysbox.Sysbox) -> None:
        self.box = box

    def sh(self, script: str, *, user: str | None = None, check: bool = True,
           shown: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Show a shell command (as root or as user, with umask 022), run it, show its output."""
        prompt = f"{user}$ " if user else "root# "
        print(f"{prompt}{shown or script}", flush=True)
        r = self.quiet(f"exec 2>&1\n{script}", user=user, timeout=timeout)
        out = r.stdout + r.stderr
        if out:
            print(out, end="" if out.endswith("\n") else "\n", flush=True)
        if r.returncode != 0:
            note(f"exit status {r.returncode}")
            if check:
                raise DemoFailed(f"`{shown or script}` exited with {r.returncode}")
        return r

    def quiet(self, script: str, *, user: str | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a shell command in the box without showing it (the demo's own look-ups)."""
        if user is not None:  # setpriv --reset-env: HOME, USER, PATH of the user
            script = f'umask 022 && cd "$HOME" || exit 125\n{script}'
        return self.box.run("/bin/sh", "-c", script, check=False, user=user, timeout=timeout)

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        print(f"root# cat > {path} <<'EOF'\n{text}EOF", flush=True)
        self.box.write_file(path, text, mode)

    def receipts(self, kind: str) -> dict[str, dict[str, object]]:
        """The receipts in done/ or failed/, by delivery id."""
        r = self.box.run("/usr/bin/python3", "-c", RECEIPTS_PY, f"{DROPBOX}/{kind}")
        out: dict[str, dict[str, object]] = {}
        for data in json.loads(r.stdout):
            out[str(data["id"])] = data
        return out

    def wait_receipts(self, kind: str, entries: list[str]) -> dict[str, dict[str, object]]:
        """Poll done/ or failed/ until each entry has a receipt there (at most WAIT s)."""
        start = time.monotonic()
        note(f"waiting for receipts of {', '.join(entries)} in {DROPBOX}/{kind}/ "
             f"(at most {WAIT:.0f} s)")
        while True:
            got = {i: r for i, r in self.receipts(kind).items() if r.get("entry") in entries}
            if {r.get("entry") for r in got.values()} >= set(entries):
                note(f"there after {time.monotonic() - start:.1f} s")
                return got
            if time.monotonic() - start > WAIT:
                self.sh(f"ls -la {DROPBOX}/*; systemctl status --no-pager "
                        f"'dittohead@{STUDY}.*'; journalctl -n 30 --no-pager", check=False)
                raise DemoFailed(f"no receipt in {kind}/ for {', '.join(entries)} "
                                 f"after {WAIT:.0f} s")
            time.sleep(0.25)

    def wait_journal(self, *matches: str) -> None:
        """journald writes asynchronously: wait until an event is readable (at most 10 s)."""
        deadline = time.monotonic() + 10
        query = "journalctl --no-pager -q -o cat " + " ".join(map(shlex.quote, matches))
        while not self.quiet(query).stdout.strip():
            if time.monotonic() > deadline:
                raise DemoFailed(f"no journal event {' '.join(matches)} after 10 s")
            time.sleep(0.2)

    def wait_inactive(self, unit: str) -> None:
        """Wait (at most WAIT s) until a unit has stopped, e.g. the service after its linger."""
        deadline = time.monotonic() + WAIT
        while self.quiet(f"systemctl is-active {unit}").stdout.strip() in (
                "active", "activating", "deactivating", "reloading"):
            if time.monotonic() > deadline:
                raise DemoFailed(f"{unit} still runs after {WAIT:.0f} s")
            time.sleep(0.2)

    def one_id(self, receipts: dict[str, dict[str, object]], entry: str) -> str:
        ids = sorted(i for i, r in receipts.items() if r.get("entry") == entry)
        if not ids:
            raise DemoFailed(f"no receipt for {entry}")
        return ids[-1]


def show(d: Demo) -> None:
    say("An admin installs dittohead (as `make install` does on a real host)")
    d.sh(f"make -C {REPO} install PREFIX=/usr/local", timeout=300)

    say(f"The admin adds study {STUDY}, its groups and a research assistant, {RA}")
    d.write("/etc/dittohead/config.yaml", CONFIG)
    d.sh(f"groupadd {STUDY} && groupadd {STUDY}-ra && "
         f"useradd --create-home --shell /bin/bash --groups {STUDY}-ra {RA} && id {RA}")

    say("`dittohead check` before setup: it lists what is still missing")
    d.sh(f"dittohead check {STUDY}", check=False)

    say("Setup: the study's tree, the generator's per-study settings, the units")
    d.sh(f"dittohead setup {STUDY}")
    d.sh("systemctl daemon-reload")
    d.sh(f"systemctl enable --now dittohead@{STUDY}.path dittohead@{STUDY}.timer")
    d.sh(f"systemctl status --no-pager --lines=0 dittohead@{STUDY}.path", check=False)
    d.sh("systemctl list-units --all --no-pager 'dittohead@*'", check=False)
    d.sh(f"cat /run/systemd/generator/dittohead@{STUDY}.path.d/50-paths.conf")
    d.sh(f"dittohead check {STUDY}", check=False)

    say(f"{RA} (not root) has two sessions from the lab PC in ~/data")
    d.box.write_file(f"{SHARE}/demo.py", (REPO / "demo" / "demo.py").read_text())
    d.box.write_file(MAKE_SESSIONS, MAKE_SESSIONS_PY)
    note(f"{MAKE_SESSIONS}: demo/demo.py's sample-data maker")
    d.sh(f"python3 {MAKE_SESSIONS} data s01 s02 && find data -type f | sort", user=RA)

    say(f"{RA} uploads s01 with `dittohead upload` (copy as .name, fsync, rename)")
    d.sh(f"dittohead upload --wait {STUDY} data/s01-session1", user=RA, timeout=WAIT + 30)
    note("--wait printed the outcome from the uploader's own outcomes folder")

    say(f"{RA} uploads s02 by hand, as users are told to: cp -r to .name, then mv to name")
    d.sh(f"cp -r data/s02-session1 {DROPBOX}/inbox/.s02-session1 && "
         f"mv {DROPBOX}/inbox/.s02-session1 {DROPBOX}/inbox/s02-session1", user=RA)

    say("dittohead@nccam3.path saw them; dittohead@nccam3.service delivers")
    done = d.wait_receipts("done", ["s01-session1", "s02-session1"])
    d.sh(f"ls -l {DROPBOX}/done/")

    say(f"Delivered: both merged into {DEST}, owned by the service and group {STUDY} "
        "(.DS_Store skipped)")
    d.sh(f"cd {DEST} && find . -printf '%M %u:%g %8s %TY-%Tm-%Td %TH:%TM  %p\\n' | sort -k6")

    s01 = d.one_id(done, "s01-session1")
    say(f"s01's receipt ({s01}.json) and its manifest, checked by sha256sum itself")
    d.sh(f"python3 -m json.tool {DROPBOX}/done/{s01}.json")
    d.sh(f"cd {DEST} && sha256sum -c {DROPBOX}/done/{s01}.sha256")

    say("The journal is the audit log: s01's delivery event, every field")
    match = [f"DITTOHEAD_STUDY={STUDY}", f"MESSAGE_ID={DELIVERED}",
             "DITTOHEAD_ENTRY=s01-session1"]
    d.wait_journal(*match)
    d.sh("journalctl --no-pager -o verbose " + " ".join(match))
    note(f"a week of deliveries: journalctl DITTOHEAD_STUDY={STUDY} "
         f"MESSAGE_ID={DELIVERED} --since -7d")

    say(f"The journal of dittohead@{STUDY}.service: its run and what it did")
    note("the run ends once the inbox has been empty for 3 s (--linger 3)")
    d.wait_inactive(f"dittohead@{STUDY}.service")
    d.sh(f"journalctl -u dittohead@{STUDY}.service --no-pager -o short")

    if DELIVERED in d.quiet("journalctl --list-catalog").stdout:
        say("journalctl -x: the message catalog explains each event")
        d.sh("journalctl --no-pager -x -o short " + " ".join(match))
    else:
        note("the journal catalog is not installed here: no `journalctl -x` text")

    say(f"{RA} re-uploads s01 with one file changed: a conflict, never overwritten")
    d.sh("echo 'RT of trial 3 corrected by hand' >> data/s01-session1/eprime/s01_run1.txt",
         user=RA)
    r = d.sh(f"dittohead upload --wait {STUDY} data/s01-session1", user=RA,
             timeout=WAIT + 30, check=False)
    if r.returncode != 65:
        raise DemoFailed(f"upload --wait of a conflict exited {r.returncode}, not 65")
    note("exit code 65: failed (77: rejected, 75: no outcome before --timeout)")
    failed = d.wait_receipts("failed", ["s01-session1"])
    bad = d.one_id(failed, "s01-session1")
    d.sh(f"ls -l {DROPBOX}/failed/")
    d.sh(f"python3 -m json.tool {DROPBOX}/failed/{bad}.json")
    reason = str(failed[bad].get("reason") or "")
    if "s01_run1.txt" not in reason:
        raise DemoFailed(f"the failed receipt's reason does not name the file: {reason!r}")
    note("the delivered files are untouched: s01's manifest still checks")
    d.sh(f"cd {DEST} && sha256sum --quiet -c {DROPBOX}/done/{s01}.sha256 && echo all OK")
    fmatch = [f"DITTOHEAD_STUDY={STUDY}", f"MESSAGE_ID={FAILED}"]
    d.wait_journal(*fmatch)
    d.sh("journalctl --no-pager -x -o short " + " ".join(fmatch))

    say(f"What {RA} sees of their own uploads, and nobody else can: their outcomes folder")
    d.sh(f"dittohead status --mine {STUDY}", user=RA)
    d.sh(f"ls -l {DROPBOX}/users/{RA}/outcomes/ && "
         f"tr -d '\\r' < {DROPBOX}/users/{RA}/outcomes/{bad}.txt", user=RA)
    note("the '+' is the ACL that lets only this uploader in: no group to join")
    d.sh(f"ls -ld {DROPBOX}/users {DROPBOX}/users/{RA}")

    say(f"What an admin checks each morning: dittohead status {STUDY}")
    d.sh(f"dittohead status {STUDY}")


def main() -> int:
    if isinstance(sys.stdout, io.TextIOWrapper):  # journalctl -x draws with box characters
        sys.stdout.reconfigure(errors="replace")
    reason = sysbox.available()
    if reason is not None:
        print(f"demo_systemd: no throwaway systemd here: {reason}", file=sys.stderr)
        return EXIT_UNAVAILABLE

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise Stopped(signum)  # unwinds through the finally below: poweroff

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, terminate)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="dittohead-demo-", dir="/var/tmp"))
    workdir = tmp / "box"
    box: sysbox.Sysbox | None = None
    rc = 1  # until show() returns
    try:
        say("Boot a throwaway systemd on an overlay of this machine's / (nothing reaches "
            "the host)")
        note(f"state in {workdir} (removed at the end); {REPO} is seen copy-on-write")
        box = sysbox.Sysbox.boot(workdir, binds=[REPO])
        note(f"booted in {time.monotonic() - started:.1f} s: is-system-running says "
             f"{box.state}; the host's PID 1 is not involved")
        show(Demo(box))
        rc = 0
    except DemoFailed as e:
        print(f"\ndemo_systemd: FAILED: {e}", file=sys.stderr)
    except sysbox.SysboxError as e:
        print(f"\ndemo_systemd: FAILED: the throwaway systemd: {e}", file=sys.stderr)
    except subprocess.TimeoutExpired as e:
        print(f"\ndemo_systemd: FAILED: timed out: {e}", file=sys.stderr)
    except BrokenPipeError:  # `... | head`: the reader has gone; stop as quietly as cat does
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        rc = 128 + signal.SIGPIPE
    except Stopped as e:
        print(f"\ndemo_systemd: stopped by {signal.Signals(e.signum).name}", file=sys.stderr)
        rc = 128 + e.signum
    finally:
        # A second Ctrl-C must not cut the power-off short.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if box is not None:
            with contextlib.suppress(OSError):  # stdout may be a closed pipe (| head)
                if rc == 1:
                    print(f"--- the box's journal (last lines) ---\n{journal_tail(box)}",
                          file=sys.stderr)
                say("Power off the box: its users, files and journal go with it")
            box.poweroff()
        try:
            tmp.rmdir()
        except OSError as e:
            print(f"demo_systemd: could not remove {tmp}: {e}", file=sys.stderr)
    if rc == 0:
        say(f"Done in {time.monotonic() - started:.0f} s. `make test` runs every test "
            "(as root, the booted-systemd ones too).")
    return rc


def journal_tail(box: sysbox.Sysbox, lines: int = 25) -> str:
    """What the box logged last, to tell why a step failed (the box may be gone already)."""
    try:
        return box.run("journalctl", "--no-pager", "-q", "-o", "short-precise", "-n",
                       str(lines), check=False, timeout=10).stdout
    except (sysbox.SysboxError, subprocess.TimeoutExpired, OSError) as e:
        return f"(unreadable: {e})"


if __name__ == "__main__":
    sys.exit(main())
