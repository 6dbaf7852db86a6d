"""Shared fixtures and helpers: a real study tree on real files, entries to drop, checks.

Markers (every test carries the ones that apply; the hook below acts on them):

  root     needs root: real owners, throwaway users, setpriv, mounts, `make deb`.
           Skipped, saying so loudly, when not running as root (CI runs as root).
  systemd  boots a throwaway systemd (tests/sysbox.py). Implies root: such tests are
           marked `root` too, so `-m "not root"` leaves them out. Skipped loudly when
           not root, or when no box can boot here.
  slow     the test takes 2 s or more: setup, call and teardown together, as
           `pytest --durations=0` reports them when run as root (the median of a few runs
           for a test whose time varies). Every test that boots a box is slow. Nothing
           faster is marked, so `-m "not slow"` runs all the rest.
  campaign the proof campaign (tests/test_campaign.py): reduced counts unless
           DITTOHEAD_CAMPAIGN=full, which also rewrites docs/reliability.md.

Skips for a missing tool (lintian, man, systemd-analyze) stay with their tests.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import yaml

from dittohead import config as cfgmod
from dittohead import layout
from dittohead.config import Config, StudyConfig

from . import sysbox

REPO = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0


@pytest.hookimpl(tryfirst=True)  # before -m deselects: `systemd` must already imply `root`
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every `systemd` test `root` too; skip, saying why, what cannot run here."""
    running_as = f"running as uid {os.geteuid()}; CI runs as root"
    for item in items:
        why = None
        if item.get_closest_marker("systemd") is not None:
            if item.get_closest_marker("root") is None:
                item.add_marker(pytest.mark.root)
            # sysbox.available() is cached: one probe (a mount in a namespace) per session.
            reason = (sysbox.available() if IS_ROOT else
                      f"boots a throwaway systemd on an overlay root ({running_as})")
            if reason is not None:
                why = f"NEEDS ROOT AND A BOOTABLE SYSTEMD: {reason}"
        elif item.get_closest_marker("root") is not None and not IS_ROOT:
            why = f"NEEDS ROOT: real owners, throwaway users, setpriv or mounts ({running_as})"
        if why is not None:
            # A skipif put first: pytest evaluates it before the tests' own skipifs for a
            # missing tool, so this reason is the one reported.
            item.add_marker(pytest.mark.skipif(True, reason=why), append=False)


# --- checks shared by the test modules ------------------------------------------------------

def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under root, by relative path, with its content."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def manifest_verifies(env: Env, receipt_path: Path) -> None:
    """The receipt's .sha256 manifest checks out against the destination."""
    manifest = receipt_path.with_suffix(".sha256")
    r = subprocess.run(["sha256sum", "--strict", "-c", str(manifest)],
                       cwd=env.study.destination, capture_output=True, text=True,
                       errors="backslashreplace")
    assert r.returncode == 0, r.stdout + r.stderr


def no_leftovers(env: Env) -> None:
    """No staging in the destination, nothing ready in the inbox, no claim in processing."""
    assert [p.name for p in env.study.destination.iterdir() if p.name.startswith(".")] == []
    assert [n for n in os.listdir(env.study.inbox) if not n.startswith(".")] == []
    assert os.listdir(env.study.processing) in ([], [".disk-usage.json"])


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll cond every 0.1 s; fail naming `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


@dataclass
class Env:
    """One configured study on disk, and how to run dittohead against it."""

    base: Path
    config_path: Path
    cfg: Config
    study: StudyConfig

    def reload(self, **study_keys: object) -> None:
        data = yaml.safe_load(self.config_path.read_text())
        data["studies"][self.study.name].update(study_keys)
        self.config_path.write_text(yaml.safe_dump(data))
        self.cfg = cfgmod.load(self.config_path)
        self.study = self.cfg.study(self.study.name)

    def run(self, *args: str, env: Mapping[str, str] | None = None,
            check: bool = False, timeout: float = 120,
            prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        """Run `python -m dittohead --config ... ARGS` as a real process."""
        full_env = {**os.environ, "DITTOHEAD_LOG": "stderr", **(env or {})}
        return subprocess.run(
            [*prefix, sys.executable, "-m", "dittohead", "--config", str(self.config_path),
             *args], capture_output=True, text=True, env=full_env, check=check,
            timeout=timeout, cwd=str(REPO))

    def process(self, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run("process", self.study.name, **kw)  # type: ignore[arg-type]

    def drop(self, name: str, files: Mapping[str, bytes] | bytes | None = None,
             uid: int | None = None) -> Path:
        """Upload an entry the way users must: build it as .name, then rename it."""
        tmp = self.study.inbox / ("." + name)
        if isinstance(files, bytes):
            tmp.write_bytes(files)
        else:
            tmp.mkdir()
            for rel, data in (files or {}).items():
                p = tmp / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
        if uid is not None:
            for p in [tmp, *tmp.rglob("*")] if tmp.is_dir() else [tmp]:
                os.lchown(p, uid, uid)
        final = self.study.inbox / name
        os.rename(tmp, final)
        return final

    def done_receipts(self) -> list[Path]:
        return sorted(self.study.done.glob("*.json"))

    def failed_receipts(self) -> list[Path]:
        return sorted(self.study.failed.glob("*.json"))


def me() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def make_env(base: Path, study_keys: Mapping[str, object] | None = None,
             service_user: str | None = None) -> Env:
    """Write a config for study `s1` under base and lay out its tree."""
    dest = base / "dest"
    dest.mkdir(mode=0o755)
    data = {
        "dropbox_root": str(base / "box"),
        "service_user": service_user or me(),
        # quiet_period 0: entries are ready at once, as dropped (test_readiness.py sets it).
        "studies": {"s1": {"destination": str(dest), "quiet_period": 0, **(study_keys or {})}},
    }
    path = base / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = cfgmod.load(path)
    study = cfg.study("s1")
    for w in layout.wanted(cfg, study):  # the modes and owners `dittohead setup` gives
        w.path.mkdir(exist_ok=True)
        os.chmod(w.path, w.mode)
        if IS_ROOT:  # otherwise everything stays the current user's (the service user's)
            os.chown(w.path, w.uid, w.gid)
    if IS_ROOT:
        svc = pwd.getpwnam(cfg.service_user)
        os.chown(dest, svc.pw_uid, svc.pw_gid)
    return Env(base=base, config_path=path, cfg=cfg, study=study)


def mount_tmpfs(path: Path | str, options: str) -> None:
    """A small tmpfs of its own on path (mode 0755, more -o options given): a
    filesystem that fills. shared_base's end unmounts one on its `dest`."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"{options},mode=0755", "dittohead-test",
                    str(path)], check=True)


@pytest.fixture
def shared_base() -> Iterator[Path]:
    """A directory other users can reach (pytest's tmp_path is 0700 root's)."""
    base = Path(tempfile.mkdtemp(prefix="dittohead-test-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        if IS_ROOT and os.path.ismount(base / "dest"):
            # Lazy: a test that failed may leave a process holding it open.
            subprocess.run(["umount", "-l", str(base / "dest")], check=False)
        # rm, not shutil.rmtree: some tests leave trees deeper than Python's
        # recursion limit; never into a filesystem a test failed to unmount.
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)


@pytest.fixture
def env(shared_base: Path) -> Env:
    return make_env(shared_base)


@dataclass
class ThrowawayUser:
    name: str
    uid: int
    gid: int

    def prefix(self, umask: str = "022") -> tuple[str, ...]:
        """Run a command as this user, with the given umask, through setpriv."""
        return ("setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups",
                "--reset-env", "sh", "-c", f'umask {umask}; exec "$@"', "sh")


_created_users: list[str] = []
_created_groups: list[str] = []


def add_group(name: str) -> int:
    subprocess.run(["groupadd", "-f", name], check=True)
    if name not in _created_groups:
        _created_groups.append(name)
    return grp.getgrnam(name).gr_gid


def add_user(name: str, groups: tuple[str, ...] = ()) -> ThrowawayUser:
    """A throwaway system user (removed at the end of the session)."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--shell", "/usr/sbin/nologin", name], check=True)
        _created_users.append(name)
        pw = pwd.getpwnam(name)
    for g in groups:
        add_group(g)
        subprocess.run(["usermod", "-a", "-G", g, name], check=True)
    return ThrowawayUser(name, pw.pw_uid, pw.pw_gid)


@pytest.fixture(scope="session", autouse=True)
def _remove_throwaway_users() -> Iterator[None]:
    yield
    for u in _created_users:
        subprocess.run(["userdel", u], check=False, capture_output=True)
    for g in _created_groups:
        subprocess.run(["groupdel", g], check=False, capture_output=True)


SERVICE_CAPS = "+dac_read_search,+chown"  # exactly what units/dittohead@.service grants


def as_service(env: Env, svc: ThrowawayUser, *args: str, caps: str | None = SERVICE_CAPS,
               extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `dittohead ARGS` as the service user with the unit's capabilities."""
    return subprocess.run(service_argv(env, svc, *args, caps=caps, extra_env=extra_env),
                          capture_output=True, text=True, timeout=120, cwd="/")


def service_argv(env: Env, svc: ThrowawayUser, *args: str, caps: str | None = SERVICE_CAPS,
                 extra_env: dict[str, str] | None = None) -> list[str]:
    """The command line of `dittohead ARGS` as the service user (for tests that hold a run)."""
    cmd = ["setpriv", f"--reuid={svc.uid}", f"--regid={svc.gid}", "--init-groups"]
    if caps:
        cmd += [f"--inh-caps={caps}", f"--ambient-caps={caps}"]
    return [*cmd, "env", f"PYTHONPATH={REPO}", "DITTOHEAD_LOG=stderr",
            *[f"{k}={v}" for k, v in (extra_env or {}).items()],
            "/usr/bin/python3", "-m", "dittohead", "--config", str(env.config_path), *args]


@pytest.fixture
def svc() -> ThrowawayUser:
    return add_user("dh-test-svc")


@pytest.fixture
def ra() -> ThrowawayUser:
    return add_user("dh-test-ra", groups=("dh-test-uploaders",))


@pytest.fixture
def service_env(shared_base: Path, svc: ThrowawayUser) -> Env:
    return make_env(shared_base, service_user=svc.name)


# --- mail: a real SMTP server on 127.0.0.1 --------------------------------------------------

class Inbox:
    """An aiosmtpd handler that keeps every message it is given."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], Message]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append((list(envelope.rcpt_tos), message_from_bytes(envelope.content)))
        return "250 OK"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    """A real SMTP server on 127.0.0.1 that keeps what it is sent; (inbox, port)."""
    from aiosmtpd.controller import Controller
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


def mail_env(base: Path, port: int, on: list[str] | None = None) -> Env:
    """Study s1 mailing pi@example.edu and its uploaders through 127.0.0.1:port."""
    env = make_env(base, {"notify": {"to": ["pi@example.edu"],
                                     **({"on": on} if on is not None else {})}})
    data = yaml.safe_load(env.config_path.read_text())
    data["notify"] = {"from": "dittohead@example.edu", "uploader_address": "{user}@example.edu",
                      "smtp": {"host": "127.0.0.1", "port": port}}
    env.config_path.write_text(yaml.safe_dump(data))
    return env
