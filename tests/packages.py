"""Building the packages for tests: `make deb` (test_deb.py), `make rpm` (test_rpm.py)."""

from __future__ import annotations

import contextlib
import subprocess
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from . import sysbox

REPO = Path(__file__).resolve().parent.parent
VERSION: str = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
# Where packaging/deb.mk and packaging/rpm.mk put them.
DEB = REPO / "dist" / f"dittohead_{VERSION}_all.deb"
RPM = REPO / "dist" / f"dittohead-{VERSION}-1.noarch.rpm"


def run(*argv: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run in the checkout; with check, a failure shows the end of both outputs."""
    r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {r.returncode}:\n"
                             f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def build(target: str, package: Path, tools: str) -> Path:
    """`make <target>-deps` (skipped loudly when its Debian packages cannot be
    installed: `tools` names them), then `make <target>`, timed."""
    deps = run("make", "-s", f"{target}-deps", check=False)
    if deps.returncode != 0:
        pytest.skip(f"SKIPPED LOUDLY: cannot install {tools} "
                    f"(make {target}-deps): {(deps.stdout + deps.stderr).strip()[-1000:]}")
    package.unlink(missing_ok=True)
    start = time.monotonic()
    run("make", target)
    print(f"\nmake {target}: {time.monotonic() - start:.1f} s")
    assert package.is_file()
    return package


# What units/dittohead-notify-failure logs when a unit failed.
NOTIFY_ID = "d49d0a088dd54a0286ba26b8f857ba0b"


def assert_removed_and_stopped(box: sysbox.Sysbox) -> None:
    """After a package's removal: none of its files, none of its units running or failed,
    and no failure told (the removal let a running delivery finish)."""
    left = box.run("/bin/sh", "-c",
                   "ls -d /usr/lib/systemd/system/dittohead* /lib/systemd/system/dittohead* "
                   "/usr/lib/systemd/system-generators/dittohead* /usr/lib/sysusers.d/dittohead* "
                   "/usr/lib/tmpfiles.d/dittohead* /usr/lib/systemd/catalog/dittohead* "
                   "/usr/lib/dittohead /usr/bin/dittohead /run/systemd/generator/dittohead*",
                   check=False).stdout
    assert left == "", left
    running = box.run("systemctl", "list-units", "--no-legend", "--plain",
                      "--state=active,activating,deactivating,reloading,failed",
                      "dittohead*").stdout
    assert running.strip() == "", running
    assert box.run("journalctl", "--no-pager", f"MESSAGE_ID={NOTIFY_ID}").stdout.strip() \
        in ("", "-- No entries --")


def study_config(destination: str) -> str:
    """A config with one study, s1, under the default dropbox_root (/data-dropbox, which
    the packages' tmpfiles.d makes); quiet_period 0: an upload renamed into place is ready."""
    return ("defaults: {quiet_period: 0}\n"
            "studies:\n"
            "  s1:\n"
            f"    destination: {destination}\n")


@contextlib.contextmanager
def installed_box(factory: pytest.TempPathFactory, name: str,
                  prepare: Sequence[Sequence[str]],
                  install: Sequence[str]) -> Iterator[sysbox.Sysbox]:
    """A booted box (binding the checkout) in which `prepare`, then `install` ran."""
    b = sysbox.Sysbox.boot(factory.mktemp(f"{name}-box", numbered=True), binds=[REPO])
    try:
        for argv in prepare:
            b.run(*argv)
        start = time.monotonic()
        r = b.run(*install, check=False, timeout=300)
        assert r.returncode == 0, f"{' '.join(install)} failed:\n{r.stdout}\n{r.stderr}"
        print(f"\n{' '.join(install[:2])} in the box: {time.monotonic() - start:.1f} s")
        yield b
    finally:
        b.poweroff()


def set_up_study(box: sysbox.Sysbox, uploader: str, destination: str) -> None:
    """Study s1 (study_config) set up as an admin would, with its path unit enabled."""
    box.write_file("/etc/dittohead/config.yaml", study_config(destination))
    box.run("/bin/sh", "-c", """set -e
useradd --no-create-home --shell /bin/sh "$0"
mkdir -p "$1"
dittohead setup s1
systemctl daemon-reload
systemctl enable --now dittohead@s1.path
""", uploader, destination)
