"""The Debian package: `make deb` (packaging/deb.mk, packaging/debian).

Built on the host (root: `make deb` installs dpkg-dev, debhelper and dh-python when
missing), then checked with `dpkg-deb -c`/`-I` and, when it is installed, lintian. Then
installed with `dpkg -i` inside ONE throwaway systemd (tests/sysbox.py; no network there,
so the dependencies come from the host, as python3-yaml and python3-systemd do), where it
must do what `make install` does: the command, the dittohead user, the units, nothing
enabled; a study set up by hand delivers; `dpkg -r` leaves no unit behind and
`dpkg --purge` the admin's config neither, but keeps the user.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import sysbox
from .packages import (
    DEB,
    REPO,
    VERSION,
    assert_removed_and_stopped,
    build,
    installed_box,
    run,
    set_up_study,
    study_config,
)

UNITS = ("dittohead@.path", "dittohead@.service", "dittohead@.timer",
         "dittohead-notify@.service", "dittohead-purge.service", "dittohead-purge.timer",
         "dittohead-metrics.service", "dittohead-metrics.timer")
FILES = (
    "./usr/bin/dittohead",
    "./usr/lib/dittohead/dittohead/cli.py",
    "./usr/lib/dittohead/dittohead/generator.py",
    "./usr/lib/dittohead/notify-failure",
    *(f"./usr/lib/systemd/system/{u}" for u in UNITS),
    "./usr/lib/systemd/system-generators/dittohead-generator",
    "./usr/lib/sysusers.d/dittohead.conf",
    "./usr/lib/tmpfiles.d/dittohead.conf",
    "./usr/lib/systemd/catalog/dittohead.catalog",
    "./usr/share/man/man8/dittohead.8.gz",
    "./usr/share/doc/dittohead/upload.md.gz",
    "./usr/share/doc/dittohead/admin.md.gz",
    "./usr/share/doc/dittohead/contract.md.gz",
    "./usr/share/doc/dittohead/examples/dittohead-smb.conf",
    "./usr/share/doc/dittohead/examples/dittohead-sshd.conf",
    "./usr/share/doc/dittohead/examples/dittohead-alerts.yml",
    "./etc/dittohead/config.yaml",
)
DEPENDS = ("python3 (>= 3.11)", "python3-yaml", "python3-systemd", "systemd")
UPLOADER = "sbxdebup"
DEST = "/srv/dittohead-deb/s1"
CONFIG = study_config(DEST)

# `make deb` (which installs its build tools when missing) and lintian take seconds; the
# installed tests boot a box. tests/conftest.py skips them, saying why, where they cannot run.
pytestmark = [pytest.mark.root, pytest.mark.slow]
booted = [pytest.mark.systemd]


@pytest.fixture(scope="module")
def deb() -> Path:
    """`make deb`, once per module."""
    return build("deb", DEB, "dpkg-buildpackage/debhelper/dh-python")


def info(deb: Path, *member: str) -> str:
    return run("dpkg-deb", "-I", str(deb), *member).stdout


def test_contents(deb: Path) -> None:
    listing = run("dpkg-deb", "-c", str(deb)).stdout
    paths = {line.split()[5] for line in listing.splitlines()}
    assert set(FILES) <= paths, sorted(set(FILES) - paths)
    assert not [p for p in paths if "__pycache__" in p or p.endswith(".pyc")]  # py3compile
    assert {line.split()[1] for line in listing.splitlines()} == {"root/root"}
    for line in listing.splitlines():
        if line.split()[5] in ("./usr/bin/dittohead", "./usr/lib/dittohead/notify-failure",
                               "./usr/lib/systemd/system-generators/dittohead-generator"):
            assert line.startswith("-rwxr-xr-x"), line

    control = info(deb, "control")
    fields = dict(line.split(": ", 1) for line in control.splitlines()
                  if ": " in line and not line.startswith(" "))
    assert (fields["Package"], fields["Version"], fields["Architecture"]) == (
        "dittohead", VERSION, "all")
    depends = [d.strip() for d in fields["Depends"].split(",")]
    assert set(DEPENDS) <= set(depends), depends
    assert info(deb, "conffiles").split() == ["/etc/dittohead/config.yaml"]

    tree = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                          check=True).stdout
    config = subprocess.run(["tar", "-xO", "./etc/dittohead/config.yaml"], input=tree,
                            capture_output=True, check=True).stdout
    # The installed config has no study; the documented example is in the docs.
    assert config == (REPO / "packaging" / "config.yaml").read_bytes()
    assert any(p.startswith("./usr/share/doc/dittohead/config.yaml.example") for p in
               run("dpkg-deb", "-c", str(deb)).stdout.split())
    service = subprocess.run(["tar", "-xO", "./usr/lib/systemd/system/dittohead@.service"],
                             input=tree, capture_output=True, check=True).stdout.decode()
    assert "ExecStart=/usr/bin/dittohead process %i --linger 3" in service

    postinst = info(deb, "postinst")
    for step in ("systemd-sysusers", "dittohead.conf", "systemd-tmpfiles",
                 "--create dittohead.conf", "journalctl --update-catalog",
                 "[ -d /run/systemd/system ]", "daemon-reload", "py3compile"):
        assert step in postinst, step
    code = [line for line in postinst.splitlines() if not line.lstrip().startswith("#")]
    for word in ("enable", "deb-systemd-invoke start", "systemctl start", "--now"):
        assert not [line for line in code if word in line], word
    # The one start: after an upgrade, exactly the units the old prerm paused for it.
    assert [line.strip() for line in code if " start" in line] == [
        'systemctl --system start $(sort -u "$PAUSED") || true'], code
    assert "userdel" not in info(deb, "postrm")


@pytest.mark.skipif(shutil.which("lintian") is None,
                    reason="SKIPPED LOUDLY: lintian is not installed (apt-get install lintian)")
def test_lintian(deb: Path) -> None:
    r = run("lintian", "--display-info", "--pedantic", str(deb), check=False)
    print(f"\nlintian --display-info --pedantic {deb.name}:\n{r.stdout}{r.stderr}")
    assert not [line for line in r.stdout.splitlines() if line.startswith("E:")], r.stdout


# --- installed in a booted throwaway systemd -----------------------------------------------


@pytest.fixture(scope="module")
def box(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[sysbox.Sysbox]:
    """One box for the module, with the package installed by `dpkg -i`.

    A host built from a container image may have Docker's policy-rc.d (exit 101: no
    maintainer script starts or stops a service; the prerm honours it). The box stands
    for a real host, which has none; the host's own file is untouched.
    """
    with installed_box(tmp_path_factory, "deb", [("rm", "-f", "/usr/sbin/policy-rc.d")],
                       ("dpkg", "-i", str(deb))) as b:
        yield b

def sh(box: sysbox.Sysbox, script: str, *args: str,
       check: bool = True) -> subprocess.CompletedProcess[str]:
    return box.run("/bin/sh", "-c", script, "sh", *args, check=check)


class TestInstalled:
    """In file order: installed, then a delivery, then removed and purged."""

    pytestmark = booted

    def test_command_user_units_and_nothing_enabled(self, box: sysbox.Sysbox) -> None:
        assert sh(box, "command -v dittohead").stdout.strip() == "/usr/bin/dittohead"
        r = box.run("dittohead", "--help")
        assert "usage" in r.stdout.lower(), r.stdout
        assert box.run("getent", "passwd", "dittohead").stdout.startswith("dittohead:")
        cat = box.run("systemctl", "cat", "dittohead@.service").stdout
        # systemd 252 names it by the first search path with it: /lib is /usr/lib here.
        assert cat.split("\n", 1)[0] in ("# /usr/lib/systemd/system/dittohead@.service",
                                         "# /lib/systemd/system/dittohead@.service"), cat
        assert "ExecStart=/usr/bin/dittohead process %i --linger 3" in cat
        # tmpfiles.d, as `systemd-tmpfiles --create dittohead.conf` made them.
        assert sh(box, "stat -c '%a %U %G' /etc/dittohead /data-dropbox").stdout.split() == [
            "755", "root", "root", "755", "root", "root"]
        assert box.run("dpkg-query", "-W", "-f=${Conffiles}", "dittohead").stdout.split()[0] \
            == "/etc/dittohead/config.yaml"
        # The catalog is in journalctl's database.
        assert "38a8638a6c0e47ae85e1afdd33a44e53" in box.run("journalctl", "--list-catalog",
                                                             "38a8638a6c0e47ae85e1afdd33a44e53"
                                                             ).stdout
        # A fresh host: the shipped config has no study, and check finds nothing wrong.
        r = box.run("dittohead", "check", check=False)
        assert (r.returncode, r.stdout) == (0, "no problems found\n"), r.stdout + r.stderr
        # Only the purge's drop-in, which is written for any valid config (docs/contract.md:
        # the daily purge, once enabled, must not fail on a host with no study yet).
        assert box.run("sh", "-c", "ls /run/systemd/generator | grep dittohead",
                       check=False).stdout == "dittohead-purge.service.d\n"
        # Nothing enabled, nothing started.
        listed = box.run("systemctl", "list-units", "--all", "--no-legend", "--plain",
                         "dittohead*").stdout
        assert listed.strip() == "", listed
        assert sh(box, "ls /etc/systemd/system/*.wants | grep dittohead",
                  check=False).stdout == ""

    def test_a_study_delivers(self, box: sysbox.Sysbox) -> None:
        set_up_study(box, UPLOADER, DEST)
        assert box.run("systemctl", "is-active", "dittohead@s1.path").stdout.strip() == "active"
        box.run("/bin/sh", "-c", 'cd /data-dropbox/s1/inbox && mkdir .visit1 && '
                'echo "hello from the deb" > .visit1/s01.txt && mv .visit1 visit1',
                user=UPLOADER)
        deadline = time.monotonic() + 30
        while not sh(box, "ls /data-dropbox/s1/done/*.json", check=False).stdout.strip():
            if time.monotonic() > deadline:
                state = sh(box, "ls -lAR /data-dropbox/s1; systemctl status --no-pager "
                           "'dittohead@s1.*'; journalctl -n 40 --no-pager", check=False)
                raise AssertionError(f"nothing in done/ after 30 s:\n{state.stdout}")
            time.sleep(0.25)
        assert box.run("cat", f"{DEST}/s01.txt").stdout == "hello from the deb\n"
        owner = sh(box, f"stat -c '%U' {DEST}/s01.txt").stdout.strip()
        assert owner == "dittohead"

    def test_remove_then_purge(self, box: sysbox.Sysbox) -> None:
        r = box.run("dpkg", "-r", "dittohead", check=False, timeout=300)
        assert r.returncode == 0, f"dpkg -r failed:\n{r.stdout}\n{r.stderr}"
        # prerm stopped the study (letting its run finish: no failure, no notifier).
        assert_removed_and_stopped(box)
        # remove keeps the admin's config (a conffile) and the studies' enablement.
        assert box.run("cat", "/etc/dittohead/config.yaml").stdout == CONFIG
        assert sh(box, "ls /etc/systemd/system/*.wants/ | grep -c dittohead@s1.path",
                  check=False).stdout.strip() == "1"

        r = box.run("dpkg", "--purge", "dittohead", check=False, timeout=300)
        assert r.returncode == 0, f"dpkg --purge failed:\n{r.stdout}\n{r.stderr}"
        assert box.run("test", "-e", "/etc/dittohead/config.yaml",
                       check=False).returncode != 0
        assert sh(box, "ls /etc/systemd/system/*.wants/ | grep dittohead",
                  check=False).stdout == ""
        assert box.run("systemctl", "list-unit-files", "--no-legend", "dittohead*",
                       check=False).stdout.strip() == ""
        # Debian practice: the system user stays (its uid owns the studies' data).
        assert box.run("getent", "passwd", "dittohead").returncode == 0
        assert box.run("cat", f"{DEST}/s01.txt").stdout == "hello from the deb\n"
