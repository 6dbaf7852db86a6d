"""Tests of tests/sysbox.py: a throwaway systemd that works and leaves the host alone."""

from __future__ import annotations

import os
import pathlib
import secrets
import time
from collections.abc import Iterator

import pytest

from . import sysbox

REPO = pathlib.Path(__file__).resolve().parent.parent
# Every test boots a box (tests/conftest.py skips them, saying why, where none can boot).
pytestmark = [pytest.mark.systemd, pytest.mark.slow]
# Daemons a leaky box would start in the HOST's pid namespace.
HOST_DAEMONS = {"postgres", "systemd-journal", "systemd-logind", "dbus-daemon",
                "systemd-udevd", "cron", "sshd", "systemd-timesyn"}
ACCOUNT_FILES = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow")


def _host_state() -> dict[str, object]:
    journal = pathlib.Path("/var/log/journal")
    return {
        # Lines, not digests: other root tests may add and remove their own users meanwhile;
        # every account a test here makes inside a box is named sbx*.
        **{
            f: {line for line in pathlib.Path(f).read_text().splitlines() if line.startswith("sbx")}
            for f in ACCOUNT_FILES
            if pathlib.Path(f).exists()
        },
        "/etc/machine-id": pathlib.Path("/etc/machine-id").read_text(),
        # ctime too: an ACL or mode change (tmpfiles' "a+ /var/log/journal") shows there.
        "journal": [(str(p), p.stat().st_ctime_ns) for p in [journal, *sorted(journal.rglob("*"))]]
        if journal.exists()
        else [],
    }


def _host_daemons() -> set[str]:
    """Names of HOST_DAEMONS running in the host's own pid namespace."""
    mine = os.readlink("/proc/self/ns/pid")
    found = set()
    for d in pathlib.Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            comm = (d / "comm").read_text().strip()
            if comm in HOST_DAEMONS and os.readlink(d / "ns" / "pid") == mine:
                found.add(comm)
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def host_marker() -> Iterator[pathlib.Path]:
    """A file in the host's /tmp, made before any box boots: a box must not empty /tmp."""
    marker = pathlib.Path("/tmp") / f"sysbox-marker-{secrets.token_hex(4)}"
    marker.write_text("host\n")
    yield marker
    marker.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def host_before(host_marker: pathlib.Path) -> dict[str, object]:
    return {**_host_state(), "daemons": _host_daemons()}


@pytest.fixture(scope="module")
def box(
    tmp_path_factory: pytest.TempPathFactory, host_before: dict[str, object]
) -> Iterator[sysbox.Sysbox]:
    with sysbox.Sysbox.boot(tmp_path_factory.mktemp("sysbox"), binds=[REPO]) as b:
        yield b


def wait_for(box: sysbox.Sysbox, *test_argv: str, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if box.run(*test_argv, check=False).returncode == 0:
            return True
        time.sleep(0.05)
    return False


def test_boots_clean(box: sysbox.Sysbox) -> None:
    assert box.state == "running", box.run("systemctl", "--failed", check=False).stdout
    assert box.run("systemctl", "is-system-running").stdout.strip() == "running"
    assert box.run("systemd-detect-virt", check=False).stdout.strip() == "container-other"
    assert box.run("systemctl", "get-default").stdout.strip() == "multi-user.target"


def test_service_and_journal(box: sysbox.Sysbox) -> None:
    token = secrets.token_hex(8)
    box.write_file("/etc/systemd/system/hello.service", f"""\
[Unit]
Description=sysbox hello
[Service]
Type=oneshot
ExecStart=/bin/echo hello-{token}
""")
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "start", "hello.service")
    assert wait_for(box, "sh", "-c", f"journalctl -u hello.service -o cat | grep -qx hello-{token}")
    assert box.run("systemd-analyze", "verify", "/etc/systemd/system/hello.service").stderr == ""
    out = box.run("systemd-run", "--wait", "--pipe", "-q", "-p", "PrivateTmp=yes",
                  "sh", "-c", "echo transient; ls -A /tmp").stdout
    assert out == "transient\n"


def test_useradd_stays_inside(box: sysbox.Sysbox) -> None:
    name = f"sbx{secrets.token_hex(3)}"
    box.run("useradd", "--create-home", name)
    assert box.run("id", "-un", user=name).stdout.strip() == name
    assert box.run("sh", "-c", "echo $HOME; touch ~/made", user=name).stdout == f"/home/{name}\n"
    assert name not in pathlib.Path("/etc/passwd").read_text()
    assert not pathlib.Path(f"/home/{name}").exists()


def test_path_unit_fires_on_glob(box: sysbox.Sysbox) -> None:
    box.run("mkdir", "-p", "/srv/inbox", "/srv/out")
    box.write_file("/etc/systemd/system/sbxwatch.path", """\
[Path]
PathExistsGlob=/srv/inbox/*
""")
    box.write_file("/etc/systemd/system/sbxwatch.service", """\
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'mv /srv/inbox/* /srv/out/'
""")
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "start", "sbxwatch.path")
    # Upload as a dot name (must not trigger), then rename it ready (must).
    box.run("sh", "-c", "echo data > /srv/inbox/.a")
    time.sleep(0.5)
    started = ("systemctl", "show", "-P", "ExecMainStartTimestampMonotonic", "sbxwatch.service")
    assert box.run(*started).stdout.strip() == "0"
    box.run("mv", "/srv/inbox/.a", "/srv/inbox/a")
    assert wait_for(box, "test", "-e", "/srv/out/a")
    assert box.run("systemctl", "is-active", "sbxwatch.path").stdout.strip() == "active"


HARDENED = """\
[Service]
Type=oneshot
User=sbxsvc
AmbientCapabilities=CAP_DAC_READ_SEARCH CAP_DAC_OVERRIDE CAP_FOWNER
CapabilityBoundingSet=CAP_DAC_READ_SEARCH CAP_DAC_OVERRIDE CAP_FOWNER
ProtectSystem=strict
ReadWritePaths=/srv/rw
PrivateTmp=yes
PrivateDevices=yes
PrivateNetwork=yes
ProtectHome=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
NoNewPrivileges=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
UMask=0077
ExecStart=/bin/sh -c 'exec > /srv/rw/result; \\
  cat /srv/secret/data.txt; \\
  touch /etc/x 2>/dev/null || echo etc-ro; \\
  touch /tmp/t && ls -A /tmp; \\
  test -e /dev/console || echo no-console; \\
  unshare -U true 2>/dev/null || echo no-userns; \\
  grep CapAmb /proc/self/status'
"""


def test_hardened_service(box: sysbox.Sysbox) -> None:
    box.run("useradd", "--system", "--no-create-home", "sbxsvc")
    box.write_file("/srv/secret/data.txt", "secret\n", 0o600)
    box.run("chmod", "700", "/srv/secret")
    box.run("mkdir", "-p", "/srv/rw")
    box.write_file("/etc/systemd/system/sbxhard.service", HARDENED)
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "start", "sbxhard.service")
    result = box.run("cat", "/srv/rw/result").stdout.split("\n")
    # Ambient DAC caps read a 0600 root file; ProtectSystem, PrivateTmp, PrivateDevices
    # and RestrictNamespaces all held.
    assert result == ["secret", "etc-ro", "t", "no-console", "no-userns",
                      "CapAmb:\t000000000000000e", ""]
    assert box.run("systemd-analyze", "verify", "/etc/systemd/system/sbxhard.service").stderr == ""
    out = box.run("systemd-analyze", "security", "sbxhard.service").stdout
    assert "Overall exposure level for sbxhard.service" in out


def test_binds_are_copy_on_write(box: sysbox.Sysbox) -> None:
    inside = REPO / "tests" / "sysbox.py"
    assert box.run("cat", str(inside)).stdout == inside.read_text()
    written = REPO / f"written-inside-{secrets.token_hex(3)}"
    box.run("touch", str(written))
    assert not written.exists()


def test_host_untouched(
    box: sysbox.Sysbox, host_marker: pathlib.Path, host_before: dict[str, object]
) -> None:
    # Last in the module: every test above has had its go at the host.
    assert host_marker.read_text() == "host\n"
    assert box.run("test", "-e", str(host_marker), check=False).returncode == 1
    assert {**_host_state(), "daemons": _host_daemons()} == host_before


def test_poweroff_cleans_up(tmp_path: pathlib.Path) -> None:
    before = time.monotonic()
    box = sysbox.Sysbox.boot(tmp_path)
    booted = time.monotonic()
    pid, cgroup = box.pid, box._cgroup
    assert cgroup is not None and cgroup.is_dir()
    box.poweroff()
    assert time.monotonic() - booted < 10 and booted - before < 30
    assert not pathlib.Path(f"/proc/{pid}").exists() or sysbox._start_time(pid) != box._pid_start
    assert not cgroup.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["console.log"]
    assert "Exiting container." in (tmp_path / "console.log").read_text()
    box.poweroff()  # idempotent
