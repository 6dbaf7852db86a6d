"""The sandbox campaign: what systemd-analyze still flags, and writes the service must not do.

On a booted box with the checkout installed: `systemd-analyze security` of every service
dittohead ships (score and the directives it still flags), and, from inside
dittohead@s1.service's own namespace (its ExecStart replaced by a probe), attempts to
create, make a directory, rename, unlink and chmod in places outside study s1, to write
through /proc/self/root and to reach the network; s1's own paths are the control.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

from ..boxes import ROOT, SMTP_PORT, Box, start_smtp_sink
from ..test_units import probe_in_unit

# Every .service in units/, as an instance where it is a template.
SERVICES = ("dittohead@s1.service", "dittohead-purge.service", "dittohead-metrics.service",
            "dittohead-mail@s4.service", "dittohead-notify@dittohead@s1.service.service")
PROM = "/var/lib/prometheus/node-exporter"  # metrics_dir in the box, so the unit is real

# Why a directive the analyser flags stays as it is (each unit's comments say more).
WHY_KEPT = {
    "AmbientCapabilities=": "the two capabilities, each proven needed (tests/test_units.py, "
                            "tests/test_capabilities.py, tests/test_purge.py)",
    "CapabilityBoundingSet=~CAP_(DAC_*|FOWNER|IPC_OWNER)": "CAP_DAC_READ_SEARCH: reads "
        "uploads made private (0700) before they are taken over",
    "CapabilityBoundingSet=~CAP_(CHOWN|FSETID|SETFCAP)": "CAP_CHOWN: takes an entry over "
        "from its uploader",
    "SystemCallFilter=~@privileged": "@privileged holds chown(), which CAP_CHOWN is for; "
                                     "the rest of it is denied by name",
    "PrivateUsers=": "a user namespace maps no uploader: chown to the service user and "
                     "the study group would fail",
    "RestrictSUIDSGID=": "makes chmod to dir_mode 2750 fail (EPERM) in a destination that "
                         "is not setgid: such deliveries were kept for ever",
    "UMask=": "0027: receipts and manifests readable by admins in group dittohead",
    "ProtectSystem=": "yes, not strict: on systemd 252 strict's read-only / silently "
                      "replaces the empty read-only root (TemporaryFileSystem=/), which "
                      "shows far less",
    "DeviceAllow=": "PrivateDevices=yes allows its pseudo devices (null, zero, full, "
                    "random, urandom, tty), which the analyser counts as special devices; "
                    "an empty list means no PrivateDevices=, a worse score",
    "RestrictAddressFamilies=~AF_UNIX": "the journal is an AF_UNIX socket",
    "PrivateNetwork=": "the mailer's job: SMTP (the only unit with network)",
    "RestrictAddressFamilies=~AF_(INET|INET6)": "the mailer's job: SMTP",
    "IPAddressDeny=": "the mailer: only the SMTP host is allowed (IPAddressAllow=)",
}


@dataclass(frozen=True)
class Security:
    """One unit's analysis: its exposure score and the checks it fails, with exposures."""

    unit: str
    score: float
    checks: int
    flagged: tuple[tuple[str, float, str], ...]  # (name, exposure, description)


def security(box: Box, unit: str) -> Security:
    """`systemd-analyze security --json=short UNIT` in the box, and its score."""
    r = box.box.run("systemd-analyze", "security", "--no-pager", "--json=short", unit)
    rows = cast(list[dict[str, Any]], json.loads(r.stdout))
    text = box.box.run("systemd-analyze", "security", "--no-pager", unit).stdout
    score = float(text.rsplit("Overall exposure level for ", 1)[1].split(":")[1].split()[0])
    flagged = tuple((str(x["name"]), float(x["exposure"] or 0), str(x["description"]))
                    for x in rows if float(x.get("exposure") or 0) > 0)
    return Security(unit, score, len(rows), flagged)


# Runs inside the unit: each (label, path, kind) of the spec tried each way; errno names.
PROBE_PY = r"""
import errno, json, os, socket, sys
spec = json.load(open(sys.argv[1]))
def attempt(f):
    try:
        f()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
def ops(path, kind):
    if kind == "net":
        fam, host, port = path.split(" ")
        def connect():
            with socket.socket(getattr(socket, fam), socket.SOCK_STREAM) as s:
                s.settimeout(3)
                s.connect((host, int(port)))
        return {"connect": attempt(connect)}
    if kind == "file":
        return {"write": attempt(lambda: os.close(os.open(path, os.O_WRONLY | os.O_APPEND))),
                "chmod": attempt(lambda: os.chmod(path, 0o666)),
                "rename": attempt(lambda: os.rename(path, path + ".x")),
                "unlink": attempt(lambda: os.unlink(path))}
    v, n = os.path.join(path, ".victim"), os.path.join(path, ".probe")
    return {"create": attempt(lambda: os.close(os.open(n, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                                        0o600))),
            "mkdir": attempt(lambda: os.mkdir(n + ".d")),
            "chmod": attempt(lambda: os.chmod(v, 0o666)),
            "rename": attempt(lambda: os.rename(v, v + ".x")),
            "unlink": attempt(lambda: os.unlink(n if os.path.lexists(n) else v))}
print("WRITES " + json.dumps({t[0]: ops(t[1], t[2]) for t in spec}), flush=True)
"""
PROBE = "/usr/local/lib/dittohead-test-sandbox-probe.py"  # under /usr: bound into every unit
SPEC = "/usr/local/lib/dittohead-test-sandbox-probe.json"
REFUSED = {"EROFS", "EACCES", "EPERM", "ENOENT"}
NET_REFUSED = REFUSED | {"EAFNOSUPPORT", "ENETUNREACH"}


@dataclass(frozen=True)
class Target:
    """A place the probe tries to change; control: s1's own, where it must work."""

    label: str
    path: str
    kind: str = "dir"  # dir: create, mkdir, chmod, rename, unlink; file; net: connect
    control: bool = False

    def does(self) -> str:
        verbs = {"dir": "create, mkdir, chmod, rename, unlink in",
                 "file": "open for writing, chmod, rename, unlink", "net": "connect to"}
        return f"{verbs[self.kind]} `{self.path}`"


TARGETS = (
    Target("own destination (control)", f"{ROOT}/study/s1", control=True),
    Target("own processing/ (control)", f"{ROOT}/dropbox/s1/processing", control=True),
    Target("other study's destination", f"{ROOT}/study/s2"),
    Target("other study's dropbox", f"{ROOT}/dropbox/s2"),
    Target("other study's inbox", f"{ROOT}/dropbox/s2/inbox"),
    Target("dropbox root", f"{ROOT}/dropbox"),
    Target("/etc", "/etc"),
    Target("config file", "/etc/dittohead/config.yaml", "file"),
    Target("/etc/passwd", "/etc/passwd", "file"),
    Target("/var", "/var"),
    Target("/var/lib", "/var/lib"),
    Target("/home", "/home"),
    Target("other user's home", "/home/sbxother"),
    Target("/root", "/root"),
    Target("/usr", "/usr"),
    Target("/usr/local/lib", "/usr/local/lib"),
    Target("/run", "/run"),
    Target("/tmp (private)", "/tmp"),
    Target("/var/tmp (private)", "/var/tmp"),
    Target("/dev/shm", "/dev/shm"),
    Target("/dev/mqueue", "/dev/mqueue"),
    Target("the program", "/usr/local/bin/dittohead", "file"),
    Target("/proc/self/root/etc", "/proc/self/root/etc"),
    Target("/proc/self/root + other destination", f"/proc/self/root{ROOT}/study/s2"),
    Target("/proc/1/root/etc", "/proc/1/root/etc"),
    Target("IPv4 loopback", f"AF_INET 127.0.0.1 {SMTP_PORT}", "net"),
    Target("IPv6 loopback", f"AF_INET6 ::1 {SMTP_PORT}", "net"),
    Target("IPv4 outside", "AF_INET 192.0.2.1 25", "net"),
)


def plant(box: Box) -> None:
    """A .victim (the service user's, 0644) in every directory target that exists, the
    probe, its spec, another user's home, and the SMTP sink listening."""
    dirs = " ".join(t.path for t in TARGETS if t.kind == "dir" and "/proc/" not in t.path)
    box.sh(f"""set -e
mkdir -p /home/sbxother && chmod 0755 /home/sbxother
for d in {dirs}; do
    [ -d "$d" ] || continue
    rm -rf "$d/.victim" "$d/.victim.x" "$d/.probe" "$d/.probe.d"
    echo victim > "$d/.victim" && chown dittohead:dittohead "$d/.victim"
    chmod 0644 "$d/.victim"
done
""")
    start_smtp_sink(box)
    box.box.write_file(PROBE, PROBE_PY)
    box.box.write_file(SPEC, json.dumps([[t.label, t.path, t.kind] for t in TARGETS]))


def probe(box: Box) -> dict[str, dict[str, str]]:
    """What each attempt of the probe ended with, from inside dittohead@s1.service."""
    plant(box)
    try:
        seen = probe_in_unit(box, "dittohead@s1.service", PROBE, "WRITES", [SPEC])
    finally:
        dirs = " ".join(t.path for t in TARGETS if t.kind == "dir" and "/proc/" not in t.path)
        box.sh(f'for d in {dirs}; do rm -rf "$d"/.victim* "$d"/.probe*; done')
    return cast(dict[str, dict[str, str]], seen)


def refused(target: Target, result: str) -> bool:
    """Whether an attempt's result is what the target must give."""
    if target.control:
        return result == "ok"
    return result in (NET_REFUSED if target.kind == "net" else REFUSED)
