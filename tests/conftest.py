"""Shared fixtures: a real study tree on real files, and helpers to drop entries."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from dittohead import config as cfgmod
from dittohead.config import Config, StudyConfig

REPO = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(
    not IS_ROOT, reason="NEEDS ROOT: real owners, throwaway users and setpriv (CI runs as root)")


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
        "studies": {"s1": {"destination": str(dest), **(study_keys or {})}},
    }
    path = base / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = cfgmod.load(path)
    study = cfg.study("s1")
    svc = pwd.getpwnam(cfg.service_user)
    for d, mode in ((cfg.dropbox_root, 0o755), (study.root, 0o755), (study.inbox, 0o1733),
                    (study.processing, 0o750), (study.done, 0o750), (study.failed, 0o750)):
        d.mkdir(exist_ok=True)
        os.chmod(d, mode)
        if d not in (cfg.dropbox_root, study.root) and IS_ROOT:
            os.chown(d, svc.pw_uid, svc.pw_gid)
    if IS_ROOT:
        os.chown(dest, svc.pw_uid, svc.pw_gid)
    return Env(base=base, config_path=path, cfg=cfg, study=study)


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
        shutil.rmtree(base, ignore_errors=True)


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
