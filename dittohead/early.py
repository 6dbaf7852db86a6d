"""The `dittohead` command's entry: `upload --host` logs in before the rest of start-up.

The ssh login (about 0.3 s) is the first thing `upload --host` waits for, and
Python's imports, the argument parsing and the walk that refuses symlinks and
FIFOs (about 0.05-0.1 s on a lab PC, more for many files) used to come before
it. When the command line is plainly an `upload --host` one, this starts the
login with the server's `where --then-ready` at once, importing only os, sys
and subprocess first, and the rest of start-up overlaps it.

The real parse still decides everything: remote.py adopts the started login
only when it would have started exactly the same ssh command (`adopt`);
anything else (a spelling this scan does not know, a refused path) ends it
with SIGTERM, on which ssh gives the terminal back even during a password
prompt, and the command goes on as without it.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys

# What remotesession.Session runs there, and how sshrun.Ssh starts a master:
# kept equal by tests/test_remote_client.py (a mismatch only costs a second login).
_MASTER = ["-o", "ControlMaster=yes", "-o", "ControlPersist=60", "-o", "ConnectTimeout=30"]
_VALUED = ("--host", "--ssh-config", "--timeout")


class Started:
    """The login begun early: its ssh command, its ControlMaster directory, its process."""

    def __init__(self, host: str, config: str | None, argv: list[str], control_dir: str,
                 process: subprocess.Popen[bytes]) -> None:
        self.host, self.config, self.argv = host, config, argv
        self.control_dir, self.process = control_dir, process


_started: Started | None = None


def entry_point() -> None:
    """console_scripts entry (and the installed launcher's, and `python3 -m dittohead`)."""
    sys.exit(main())


def main() -> int:
    """Start `upload --host`'s login when the command line is one, then run the command."""
    try:
        _prestart(sys.argv[1:])
    except (OSError, ValueError):
        pass  # the ordinary way then: the command reports what is wrong
    from .cli import main as run
    return run()


def _scan(argv: list[str]) -> tuple[str, str | None, str, list[str]] | None:
    """(host, ssh config, study, paths) of `[--config X] upload ... --host H ...`, else None."""
    args = list(argv)
    while args and args[0].startswith("--config"):  # the server's config: not ours
        if args[0] != "--config" and not args[0].startswith("--config="):
            return None
        args = args[2:] if args[0] == "--config" else args[1:]
    if args[:1] != ["upload"]:
        return None
    opts: dict[str, str] = {}
    positional: list[str] = []
    rest = iter(args[1:])
    for a in rest:
        key, eq, value = a.partition("=")
        if a == "--":
            positional += list(rest)
        elif a == "--wait":
            continue
        elif key in _VALUED:
            given = value if eq else next(rest, None)
            if given is None:
                return None
            opts[key] = given
        elif a.startswith("-"):
            return None  # -h, abbreviations, anything else: argparse's to say
        else:
            positional.append(a)
    if "--host" not in opts or len(positional) < 2:
        return None
    return opts["--host"], opts.get("--ssh-config"), positional[0], positional[1:]


def _name(path: str) -> str | None:
    """The entry name upload gives path (entrycheck.entry_name), if it is an ordinary one."""
    name = os.path.basename(os.path.normpath(path))
    if name in ("", ".", ".."):
        name = os.path.basename(os.path.realpath(path))
    return name if name and not name.startswith(".") and os.path.lexists(path) else None


def ssh_argv(host: str, config: str | None, control: str, study: str,
             names: list[str]) -> list[str]:
    """The ssh command Session starts as the master: where --then-ready, quoted for sh."""
    remote = ["dittohead", "where", "--json", "--then-ready", study, *names]
    opts = ["-F", config] if config else []
    return ["ssh", *_MASTER, *opts, "-o", f"ControlPath={control}", "-o", "ControlMaster=no",
            "--", host, " ".join(_quote(w) for w in remote)]


def _quote(word: str) -> str:
    """shlex.quote without importing re."""
    safe = word and all(c.isascii() and (c.isalnum() or c in "@%+=:,./-_") for c in word)
    return word if safe else "'" + word.replace("'", "'\"'\"'") + "'"


def _prestart(argv: list[str]) -> None:
    global _started
    found = _scan(argv)
    if found is None or not os.path.isdir("/tmp"):
        return
    host, config, study, paths = found
    names = [_name(p) for p in paths]
    if None in names or host.startswith("-") or not host or any(c.isspace() for c in host):
        return
    control_dir = f"/tmp/dh-ssh-{os.urandom(6).hex()}"
    os.mkdir(control_dir, 0o700)
    cmd = ssh_argv(host, config, os.path.join(control_dir, "cm"), study,
                   [n for n in names if n is not None])
    try:
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    except OSError:
        os.rmdir(control_dir)
        raise
    _started = Started(host, config, cmd, control_dir, p)
    atexit.register(discard)


def control_dir(host: str, config: str | None) -> str | None:
    """The ControlMaster directory of the login begun early to host, if there is one."""
    s = _started
    return s.control_dir if s is not None and (s.host, s.config) == (host, config) else None


def adopt(argv: list[str]) -> Started | None:
    """The login begun early, if its ssh command is argv; else end it (if any) and None."""
    global _started
    started, _started = _started, None
    if started is not None and started.argv == argv:
        return started
    if started is not None:
        _end(started)
    return None


def discard() -> None:
    """End a login begun early that nothing adopted (the command ended before)."""
    global _started
    started, _started = _started, None
    if started is not None:
        _end(started)


def _end(started: Started) -> None:
    p = started.process
    if p.poll() is None:
        p.terminate()  # SIGTERM: ssh restores the terminal if it was asking a password
    try:
        p.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    socket = os.path.join(started.control_dir, "cm")
    if os.path.exists(socket):  # it had logged in and gone to the background
        i = started.argv.index("--")
        options = started.argv[1 + len(_MASTER):i]
        subprocess.run(["ssh", *options, "-O", "exit", "--", started.argv[i + 1]],
                       capture_output=True, timeout=30, check=False)
    import shutil
    shutil.rmtree(started.control_dir, ignore_errors=True)
