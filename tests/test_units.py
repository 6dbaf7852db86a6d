"""The systemd units on a real systemd, and the checks that need none.

Offline (any user, no booted systemd): `systemd-analyze verify` and
`systemd-analyze security --offline` on the shipped units rendered as `make
install` renders them, with the generator's drop-ins for a sample study; the
catalog, sysusers.d and a staged `make install`.

Booted (root: tests/sysbox.py boots a throwaway systemd on an overlay root):
`make install` from this checkout inside it, four studies, a non-root
uploader, `systemctl enable --now dittohead@s1.path dittohead@s1.timer`, then:
uploads with umask 022 and 077 and their journal fields, an entry arriving
during a busy run, bursts, backup-looking names, a SIGKILL in the middle of a
delivery, the sandbox seen from inside the service, each capability proven
needed, mail sent by the mailer only, a config error's restart loop, and
`systemd-analyze verify`/`security`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dittohead import generator
from dittohead.config import parse
from dittohead.log import MESSAGE_IDS

from .boxes import CONFIG, ROOT, SINK, UPLOADER, Box, boot_installed, start_smtp_sink
from .conftest import wait_for

REPO = Path(__file__).resolve().parent.parent
UNITS = ("dittohead@.path", "dittohead@.service", "dittohead@.timer",
         "dittohead-notify@.service", "dittohead-mail@.service", "dittohead-purge.service",
         "dittohead-purge.timer")
NOTIFY_ID = "d49d0a088dd54a0286ba26b8f857ba0b"  # units/dittohead-notify-failure
DELIVERED = MESSAGE_IDS["delivered"]
EXPOSURE_MAX = 1.1  # what the units had before their root became an allowlist
EXPOSURE_RE = re.compile(r"Overall exposure level for \S+: ([0-9.]+)")

HAVE_ANALYZE = shutil.which("systemd-analyze") is not None
needs_analyze = pytest.mark.skipif(not HAVE_ANALYZE, reason="SKIPPED: no systemd-analyze here")
# Boots a throwaway systemd (tests/conftest.py skips it, saying why, where none can boot).
booted = [pytest.mark.systemd, pytest.mark.slow]

SAMPLE = {
    "dropbox_root": "/data-dropbox",
    "studies": {"s1": {"destination": "/study/s1/raw"},
                "s2": {"destination": "/study/s2/raw"}},
}


# --- offline -----------------------------------------------------------------

def render(target: Path, bindir: str, libdir: str) -> None:
    """The units as `make install` writes them."""
    target.mkdir(parents=True, exist_ok=True)
    for name in UNITS:
        text = (REPO / "units" / name).read_text()
        (target / name).write_text(text.replace("@BINDIR@", bindir).replace("@LIBDIR@", libdir))


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """Rendered units plus the generator's drop-ins for SAMPLE, and stand-in binaries."""
    bindir, libdir, units = tmp_path / "bin", tmp_path / "lib", tmp_path / "units"
    for d in (bindir, libdir):
        d.mkdir()
    (bindir / "dittohead").write_text("#!/bin/sh\n")
    (bindir / "dittohead").chmod(0o755)
    shutil.copy(REPO / "units" / "dittohead-notify-failure", libdir / "notify-failure")
    render(units, str(bindir), str(libdir))
    generator.write(units, generator.expected_dropins(parse(SAMPLE)))
    # The manual page the units' Documentation= names, where `verify` looks.
    (tmp_path / "man" / "man8").mkdir(parents=True)
    shutil.copy(REPO / "packaging" / "dittohead.8", tmp_path / "man" / "man8")
    return units


def analyze(unit_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:", "SYSTEMD_LOG_COLOR": "0",
           "MANPATH": str(unit_dir.parent / "man")}
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True,
                          env=env, cwd=unit_dir, check=False, timeout=60)


@needs_analyze
def test_verify_offline(unit_dir: Path) -> None:
    # verify runs `man` for each Documentation= page; without man-db it cannot.
    man = [] if shutil.which("man") else ["--man=no"]
    if man:
        print("\nSKIPPED LOUDLY: the Documentation= check (man is not installed: "
              "apt-get install man-db)")
    r = analyze(unit_dir, "verify", *man, "dittohead@s1.path", "dittohead@s1.service",
                "dittohead@s1.timer", "dittohead-notify@dittohead@s1.service.service",
                "dittohead-mail@s1.service", "dittohead-purge.service", "dittohead-purge.timer")
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


@needs_analyze
def test_path_unit_refuses_without_generated_settings(unit_dir: Path) -> None:
    r = analyze(unit_dir, "verify", "dittohead@unknown.path")
    assert r.returncode != 0
    assert "lacks path setting" in r.stderr


@needs_analyze
def test_security_offline(unit_dir: Path) -> None:
    r = analyze(unit_dir, "security", "--offline=yes", "--no-pager", "dittohead@s1.service")
    m = EXPOSURE_RE.search(r.stdout)
    assert m, r.stdout + r.stderr
    print(f"\nsystemd-analyze security --offline dittohead@s1.service: {m.group(1)}")
    assert float(m.group(1)) <= EXPOSURE_MAX
    r = analyze(unit_dir, "security", "--offline=yes", "--no-pager",
                "dittohead-notify@dittohead@s1.service.service")
    m = EXPOSURE_RE.search(r.stdout)
    assert m and float(m.group(1)) <= 1.0, r.stdout
    r = analyze(unit_dir, "security", "--offline=yes", "--no-pager", "dittohead-purge.service")
    m = EXPOSURE_RE.search(r.stdout)
    assert m and float(m.group(1)) <= EXPOSURE_MAX, r.stdout
    print(f"systemd-analyze security --offline dittohead-purge.service: {m.group(1)}")


@pytest.mark.parametrize("unit", ["dittohead@.service", "dittohead-purge.service"])
def test_service_capabilities_are_exactly_two(unit: str) -> None:
    text = (REPO / "units" / unit).read_text()
    for key in ("AmbientCapabilities", "CapabilityBoundingSet"):
        values = re.findall(rf"^{key}=(.*)$", text, re.M)
        assert values == ["CAP_DAC_READ_SEARCH CAP_CHOWN"], (key, values)


def test_every_unit_builds_its_root_from_an_allowlist() -> None:
    # ProtectSystem=strict would silently void TemporaryFileSystem=/ on 252, and
    # ReadWritePaths= would not reach through it (docs/field-notes.md).
    for name in ("dittohead@.service", "dittohead-mail@.service", "dittohead-notify@.service",
                 "dittohead-purge.service"):
        text = (REPO / "units" / name).read_text()
        settings = re.findall(r"^(\w+)=(.*)$", text, re.M)
        assert ("TemporaryFileSystem", "/:ro") in settings, name
        assert ("RootDirectory", "/run/dittohead/root") in settings, name
        assert ("ProtectSystem", "yes") in settings, name
        assert not [k for k, _ in settings if k in ("ReadWritePaths", "ReadOnlyPaths")], name
    tmpfiles = (REPO / "units" / "dittohead.tmpfiles").read_text()
    assert re.search(r"^d /run/dittohead/root 0555 root root -$", tmpfiles, re.M)


def test_catalog_explains_every_message_id(tmp_path: Path) -> None:
    text = (REPO / "units" / "dittohead.catalog").read_text()
    ids = re.findall(r"^-- ([0-9a-f]{32})$", text, re.M)
    assert sorted(ids) == sorted({*MESSAGE_IDS.values(), NOTIFY_ID})
    assert NOTIFY_ID in (REPO / "units" / "dittohead-notify-failure").read_text()
    if shutil.which("journalctl") is None:
        return
    cat = tmp_path / "usr/lib/systemd/catalog"
    cat.mkdir(parents=True)
    shutil.copy(REPO / "units" / "dittohead.catalog", cat)
    subprocess.run(["journalctl", f"--root={tmp_path}", "--update-catalog"], check=True)
    listed = subprocess.run(["journalctl", f"--root={tmp_path}", "--list-catalog"],
                            capture_output=True, text=True, check=True).stdout
    assert {line.split()[0] for line in listed.splitlines()} == set(ids)


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_sysusers_makes_the_service_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    r = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", "--dry-run",
                        str(REPO / "units" / "dittohead.sysusers")],
                       capture_output=True, text=True, check=True)
    assert "Creating user 'dittohead'" in r.stdout + r.stderr


def test_install_files_runs_from_its_prefix(tmp_path: Path) -> None:
    """`make install-files` into a private prefix: the launcher runs, units are rendered."""
    prefix = tmp_path / "usr"
    r = subprocess.run(["make", "-s", "-f", "packaging/install.mk", "install-files",
                        f"PREFIX={prefix}", f"SYSCONFDIR={tmp_path}/etc",
                        f"CATALOGDIR={tmp_path}/catalog", f"DOCDIR={tmp_path}/doc"],
                       cwd=REPO, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no /usr/bin/python3 to run the launcher")
    out = subprocess.run([str(prefix / "bin/dittohead"), "--version"], capture_output=True,
                         text=True, check=False)
    if "No module named 'yaml'" in out.stderr:
        pytest.skip("python3-yaml is not installed for /usr/bin/python3")
    assert out.returncode == 0 and out.stdout.startswith("dittohead "), out.stderr
    service = (prefix / "lib/systemd/system/dittohead@.service").read_text()
    assert f"ExecStart={prefix}/bin/dittohead process %i --linger 3" in service
    for name in UNITS:
        assert "@BINDIR@" not in (prefix / "lib/systemd/system" / name).read_text()
        assert "@LIBDIR@" not in (prefix / "lib/systemd/system" / name).read_text()
    gen = prefix / "lib/systemd/system-generators/dittohead-generator"
    assert os.access(gen, os.X_OK)
    assert (tmp_path / "etc/dittohead/config.yaml").exists()
    assert (prefix / "lib/sysusers.d/dittohead.conf").exists()
    assert (tmp_path / "catalog/dittohead.catalog").exists()
    # An existing config is never replaced.
    (tmp_path / "etc/dittohead/config.yaml").write_text("# mine\n")
    subprocess.run(["make", "-s", "-f", "packaging/install.mk", "install-files",
                    f"PREFIX={prefix}", f"SYSCONFDIR={tmp_path}/etc",
                    f"CATALOGDIR={tmp_path}/catalog", f"DOCDIR={tmp_path}/doc"], cwd=REPO,
                   check=True,
                   capture_output=True)
    assert (tmp_path / "etc/dittohead/config.yaml").read_text() == "# mine\n"


# --- booted: a throwaway systemd with dittohead installed (tests/boxes.py) ----

@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    b = boot_installed(tmp_path_factory.mktemp("units-box", numbered=True))
    try:
        yield b
    finally:
        b.box.poweroff()


# A fault hook in dittohead@s1.service waits for this file (dittohead/faults.py):
# in s1's dropbox directory, one of the few paths its sandbox sees.
GO = f"{ROOT}/dropbox/s1/.test-go"
PROBE_PATHS = {
    # path: may the service write it?
    f"{ROOT}/study/s1/.probe": True,
    f"{ROOT}/dropbox/s1/processing/.probe": True,
    f"{ROOT}/study/s2/.probe": False,  # another study's destination
    f"{ROOT}/dropbox/s2/inbox/.probe": False,  # another study's inbox
    f"{ROOT}/.probe": False,
    "/etc/.probe": False,
    "/home/.probe": False,
    "/root/.probe": False,
    "/usr/.probe": False,
    "/var/lib/.probe": False,
    "/run/.probe": False,
}


def caps_dropin(caps: str) -> str:
    return (f"[Service]\nAmbientCapabilities=\nAmbientCapabilities={caps}\n"
            f"CapabilityBoundingSet=\nCapabilityBoundingSet={caps}\n")


# Runs inside a unit's sandbox: which of the paths given exist there.
SEES_PY = r"""
import json, os, sys
print("SEES " + json.dumps({p: os.path.lexists(p) for p in sys.argv[1:]}), flush=True)
"""
SEES = "/usr/local/lib/dittohead-test-sees.py"  # under /usr: bound into every unit
# What no unit of study s1 (or of any study but the one named) may see.
NOT_S1 = ["/etc/shadow", "/etc/gshadow", "/home", "/root", "/var/lib",
          f"{ROOT}/study/s2", f"{ROOT}/study/s2/secret.txt", f"{ROOT}/dropbox/s2",
          f"{ROOT}/dropbox/s2/done", f"{ROOT}/dropbox/s2/done/secret.json",
          f"{ROOT}/dropbox/s4/processing/.mail", f"{ROOT}/study/s3"]


def plant_secrets(box: Box) -> None:
    """Data of study s2 that the service user may read, were it visible."""
    box.sh(f"""set -e
echo s2data > {ROOT}/study/s2/secret.txt
echo '{{}}' > {ROOT}/dropbox/s2/done/secret.json
chown dittohead:dittohead {ROOT}/study/s2/secret.txt {ROOT}/dropbox/s2/done/secret.json
chmod 0640 {ROOT}/study/s2/secret.txt {ROOT}/dropbox/s2/done/secret.json
""")
    box.box.write_file(SEES, SEES_PY)


def sees_in_unit(box: Box, unit: str, paths: list[str]) -> dict[str, bool]:
    """Start unit with its ExecStart= replaced by SEES_PY: which paths exist in its sandbox."""
    return probe_in_unit(box, unit, SEES, "SEES", paths)


def probe_in_unit(box: Box, unit: str, script: str, tag: str,
                  paths: list[str]) -> dict[str, bool]:
    """Start unit with its ExecStart= replaced by a Python script (already in the box,
    under /usr) that prints `TAG {path: bool}`; what it printed."""
    box.dropin(unit, "90-probe", "[Service]\nExecStart=\n"
               f"ExecStart=/usr/bin/python3 {script} {' '.join(paths)}\n")
    try:
        since = box.now()
        box.box.run("systemctl", "start", unit, check=False)
        lines = [str(e.get("MESSAGE")) for e in box.journal("-u", unit, f"--since=@{since}")]
    finally:
        box.dropin(unit, "90-probe", None)
    found = [line for line in lines if line.startswith(tag + " ")]
    assert len(found) == 1, lines
    seen: dict[str, bool] = json.loads(found[0][len(tag) + 1:])
    return seen


class TestOnSystemd:
    """Deliveries, faults, sandbox and capabilities on a booted throwaway systemd with
    `make install` done in it."""

    pytestmark = booted

    def test_mail_is_sent_by_the_mailer_not_the_delivery_service(self, box: Box) -> None:
        start_smtp_sink(box)
        box.sh("systemctl enable --now dittohead@s4.path")
        box.upload("s4", [("mailed-1", {"a.txt": 10})])
        assert box.wait_delivered("s4", ["mailed-1"]).get("mailed-1") == 1, box.debug("s4")
        wait_for(lambda: "delivered mailed-1" in box.sh(
            f"journalctl -u {SINK} -o cat --no-pager", check=False).stdout, 60,
            "the mail in the SMTP sink")
        wait_for(lambda: box.prop("dittohead-mail@s4.service", "Result") == "success", 30,
                 "the mailer to finish")
        # s1 sends no mail: its mailer is skipped, not failed.
        assert box.prop("dittohead-mail@s1.service", "ActiveState") != "failed"
        # The delivery service never had the network the mailer has.
        assert box.prop("dittohead@s4.service", "PrivateNetwork") == "yes"
        assert box.prop("dittohead-mail@s4.service", "PrivateNetwork") == "no"
        assert box.prop("dittohead-mail@s4.service", "CapabilityBoundingSet") == ""

    @pytest.mark.parametrize("umask", [0o022, 0o077])
    def test_upload_is_delivered_with_journal_fields(self, box: Box, umask: int) -> None:
        name = f"visit-{umask:03o}"
        box.upload("s1", [(name, {f"eprime-{umask:o}/s01.txt": 1000,
                                  f"eprime-{umask:o}/deep/s02.txt": 10})], umask=umask)
        got = box.wait_delivered("s1", [name])
        assert got.get(name) == 1, got
        events = box.journal("DITTOHEAD_STUDY=s1", f"MESSAGE_ID={DELIVERED}",
                             f"DITTOHEAD_ENTRY={name}")
        assert len(events) == 1, events
        e = events[0]
        assert e["SYSLOG_IDENTIFIER"] == "dittohead"
        assert e["_SYSTEMD_UNIT"] == "dittohead@s1.service"
        assert e["DITTOHEAD_UPLOADER"] == UPLOADER
        assert (e["DITTOHEAD_FILES"], e["DITTOHEAD_BYTES"]) == ("2", "1010")
        assert e["DITTOHEAD_DESTINATION"] == f"{ROOT}/study/s1"
        assert e["MESSAGE"].startswith("s1: delivered")
        manifest = f"{ROOT}/dropbox/s1/done/{e['DITTOHEAD_DELIVERY']}.sha256"
        box.sh(f'cd {ROOT}/study/s1 && sha256sum --quiet -c "$1"', manifest)
        owner = box.sh(f"stat -c '%U %G %a' {ROOT}/study/s1/eprime-{umask:o}/deep/s02.txt")
        assert owner.stdout.split() == ["dittohead", "sbxs1", "640"]

    def test_many_files_are_walked_and_copied_by_workers_inside_the_sandbox(self,
                                                                            box: Box) -> None:
        # 3 top-level directories and 600 files: forked walkers and copiers, under
        # the unit's system-call filter and capabilities.
        files = {f"{d}/trial{i:03d}.txt": 100 + i for d in ("eprime", "biopac", "mri")
                 for i in range(200)}
        box.upload("s1", [("many", files)])
        got = box.wait_delivered("s1", ["many"])
        assert got.get("many") == 1, got
        (r,) = [r for r in box.receipts("s1")["done"] if r["entry"] == "many"]
        assert r["files"] == 600
        box.sh(f'cd {ROOT}/study/s1 && sha256sum --quiet -c "$1"',
               f"{ROOT}/dropbox/s1/done/{r['id']}.sha256")

    def test_entry_renamed_during_a_busy_run_is_delivered(self, box: Box) -> None:
        # The run holds (a fault hook) after staging the large entry's first file.
        box.dropin("dittohead@s1.service", "90-hold",
                   f"[Service]\nEnvironment=DITTOHEAD_TEST_FAULT=staged:1=wait:{GO}\n")
        try:
            box.wait_inactive("dittohead@s1.service")
            box.wait_path_waiting("s1")
            box.upload("s1", [("large", {"large/data.bin": 64 << 20})])
            wait_for(lambda: box.prop("dittohead@s1.service", "ActiveState") == "activating"
                     and "large" not in box.sh(f"ls {ROOT}/dropbox/s1/inbox").stdout,
                     30, "the service to claim the large entry")
            box.upload("s1", [("late", None)])
            time.sleep(1)
            assert "late" in box.sh(f"ls {ROOT}/dropbox/s1/inbox").stdout  # the run is busy
            box.box.run("touch", GO)
            got = box.wait_delivered("s1", ["large", "late"], timeout=60)
            assert (got.get("large"), got.get("late")) == (1, 1), got
            runs = {e["_SYSTEMD_INVOCATION_ID"] for n in ("large", "late")
                    for e in box.journal(f"MESSAGE_ID={DELIVERED}", f"DITTOHEAD_ENTRY={n}")}
            assert len(runs) == 1, "both were delivered by the same run, with no new event"
        finally:
            # The lingering run keeps the hook in its environment: let it end first.
            box.box.run("touch", GO)
            box.wait_inactive("dittohead@s1.service")
            box.dropin("dittohead@s1.service", "90-hold", None)
            box.box.run("rm", "-f", GO)

    def test_backup_looking_names_are_delivered(self, box: Box) -> None:
        names = ["x.bak", "y~", "z.old", "a.new", "b.swp", "c.dpkg-new"]
        box.upload("s1", [(n, None) for n in names])
        got = box.wait_delivered("s1", names)
        assert {n: got.get(n) for n in names} == dict.fromkeys(names, 1), box.debug("s1")

    def test_bursts_are_delivered_and_the_path_unit_never_fails(self, box: Box) -> None:
        since = box.now()
        at_once = [f"burst-{i:03d}" for i in range(200)]
        box.upload("s1", [(n, None) for n in at_once])
        got = box.wait_delivered("s1", at_once, timeout=180)
        assert [n for n in at_once if got.get(n) != 1] == []
        steady = [f"steady-{i:02d}" for i in range(30)]
        box.upload("s1", [(n, None) for n in steady], interval=1.0, timeout=120)
        got = box.wait_delivered("s1", steady, timeout=60)
        assert [n for n in steady if got.get(n) != 1] == []
        box.wait_inactive("dittohead@s1.service")
        box.wait_path_waiting("s1")
        assert box.prop("dittohead@s1.path", "Result") == "success"
        assert box.sh(f"ls -A {ROOT}/dropbox/s1/inbox").stdout == ""
        path_log = box.sh(f"journalctl -u dittohead@s1.path --since @{since} -o cat").stdout
        assert "limit" not in path_log and "Failed" not in path_log, path_log
        runs = {e["_SYSTEMD_INVOCATION_ID"]
                for e in box.journal(f"MESSAGE_ID={DELIVERED}", "DITTOHEAD_STUDY=s1",
                                     f"--since=@{since}")}
        print(f"\n230 entries (200 at once, then 1/s for 30 s): {len(runs)} service run(s)")

    def test_kill_in_the_middle_of_a_delivery_then_finished_exactly_once(self,
                                                                         box: Box) -> None:
        box.dropin("dittohead@s1.service", "90-hold",
                   f"[Service]\nEnvironment=DITTOHEAD_TEST_FAULT=published:1=wait:{GO}\n")
        try:
            box.wait_inactive("dittohead@s1.service")
            files = {f"killed/part{i}.bin": 4 << 20 for i in range(4)}
            box.upload("s1", [("killme", files)])
            # A new directory is published whole, by one rename: all 4 at once.
            wait_for(lambda: box.sh(f"ls {ROOT}/study/s1/killed 2>/dev/null | wc -l")
                     .stdout.strip() == "4", 30, "the new directory to be published")
            box.box.run("systemctl", "kill", "-s", "KILL", "dittohead@s1.service")
            box.wait_inactive("dittohead@s1.service")
            assert box.prop("dittohead@s1.service", "Result") == "signal"
            assert "killme" not in box.delivered("s1")
            assert box.sh(f"ls -A {ROOT}/study/s1 | grep -c '^.incoming-'",
                          check=False).stdout.strip() == "1"  # the killed run's staging
        finally:
            box.box.run("systemctl", "kill", "-s", "KILL", "dittohead@s1.service", check=False)
            box.wait_inactive("dittohead@s1.service")
            box.dropin("dittohead@s1.service", "90-hold", None)
        # The next run, started by the next upload (or the timer's sweep), resumes it.
        box.upload("s1", [("after-kill", None)])
        got = box.wait_delivered("s1", ["killme", "after-kill"])
        assert (got.get("killme"), got.get("after-kill")) == (1, 1), got
        (r,) = [r for r in box.receipts("s1")["done"] if r["entry"] == "killme"]
        assert r["files"] == 4
        box.sh(f'cd {ROOT}/study/s1 && sha256sum --quiet -c "$1"',
               f"{ROOT}/dropbox/s1/done/{r['id']}.sha256")
        box.wait_inactive("dittohead@s1.service")
        assert box.sh(f"ls -A {ROOT}/study/s1 | grep -c '^.incoming-'",
                      check=False).stdout.strip() == "0"
        assert box.sh(f"ls -A {ROOT}/dropbox/s1/processing | grep -v '^[.]'",
                      check=False).stdout == ""
        wait_for(lambda: bool(box.journal(f"MESSAGE_ID={NOTIFY_ID}",
                                          "DITTOHEAD_UNIT=dittohead@s1.service",
                                          "DITTOHEAD_REASON=signal")),
                 30, "dittohead-notify@ to report the kill")

    def test_the_service_cannot_write_outside_its_study(self, box: Box) -> None:
        box.wait_inactive("dittohead@s1.service")
        box.sh(f"touch {ROOT}/study/s2/.probe-target && rm {ROOT}/study/s2/.probe-target")
        probe = ("for p in \"$$@\"; do if touch \"$$p\" 2>/dev/null; then "
                 "echo \"PROBE writable $$p\"; rm -f \"$$p\"; else echo \"PROBE denied $$p\"; "
                 "fi; done")
        box.dropin("dittohead@s1.service", "90-probe",
                   f"[Service]\nExecStart=\nExecStart=/bin/sh -c '{probe}' sh "
                   + " ".join(PROBE_PATHS) + "\n")
        try:
            since = box.now()
            box.box.run("systemctl", "start", "dittohead@s1.service")
            lines = [e["MESSAGE"] for e in box.journal("-u", "dittohead@s1.service",
                                                       f"--since=@{since}")
                     if str(e.get("MESSAGE", "")).startswith("PROBE ")]
        finally:
            box.dropin("dittohead@s1.service", "90-probe", None)
        seen = {line.split(" ", 2)[2]: line.split(" ", 2)[1] == "writable" for line in lines}
        assert seen == PROBE_PATHS
        r = box.box.run("systemd-analyze", "security", "--no-pager", "dittohead@s1.service")
        m = EXPOSURE_RE.search(r.stdout)
        assert m, r.stdout
        print(f"\nsystemd-analyze security dittohead@s1.service: {m.group(1)}")
        assert float(m.group(1)) <= EXPOSURE_MAX

    @pytest.mark.parametrize(("kept", "missing", "umask"), [
        ("CAP_CHOWN", "CAP_DAC_READ_SEARCH", 0o077),  # a private upload cannot be read
        ("CAP_DAC_READ_SEARCH", "CAP_CHOWN", 0o022),  # no directory can be taken over
    ])
    def test_each_capability_is_needed_to_claim_an_upload(self, box: Box, kept: str,
                                                          missing: str, umask: int) -> None:
        name = f"needs-{missing.lower()}"
        box.dropin("dittohead@s1.service", "90-caps", caps_dropin(kept))
        try:
            box.box.run("systemctl", "stop", "dittohead@s1.path")
            box.wait_inactive("dittohead@s1.service")
            box.upload("s1", [(name, {f"{name}/f.txt": 10})], umask=umask)
            since = box.now()
            box.box.run("systemctl", "start", "dittohead@s1.service", check=False)
            msgs = " ".join(str(e.get("MESSAGE")) for e in
                            box.journal("-u", "dittohead@s1.service", f"--since=@{since}"))
            assert f"cannot claim {name}" in msgs and missing in msgs, msgs
            owner = box.sh(f"stat -c %U {ROOT}/dropbox/s1/inbox/{name}/{name}/f.txt").stdout
            assert owner.strip() == UPLOADER  # untouched, still in the inbox
        finally:
            box.dropin("dittohead@s1.service", "90-caps", None)
            box.box.run("systemctl", "reset-failed", "dittohead@s1.service")
            box.box.run("systemctl", "start", "dittohead@s1.path")
        assert box.wait_delivered("s1", [name]).get(name) == 1, box.debug("s1")

    def test_cap_chown_is_needed_for_a_study_group_the_destination_lacks(self,
                                                                        box: Box) -> None:
        box.dropin("dittohead@s3.service", "90-caps", caps_dropin("CAP_DAC_READ_SEARCH"))
        try:
            box.upload("s3", [("needs-chown", {"c/f.txt": 10})])
            box.box.run("systemctl", "start", "dittohead@s3.service", check=False)
            assert "needs-chown" not in box.delivered("s3")
            assert box.sh(f"ls {ROOT}/study/s3").stdout == ""
        finally:
            box.dropin("dittohead@s3.service", "90-caps", None)
        box.box.run("systemctl", "reset-failed", "dittohead@s3.service")
        box.box.run("systemctl", "start", "dittohead@s3.service")
        assert box.delivered("s3").get("needs-chown") == 1
        owner = box.sh(f"stat -c '%U %G' {ROOT}/study/s3/c/f.txt").stdout.split()
        assert owner == ["dittohead", "sbxs1"]

    def test_a_destination_directory_the_service_cannot_write_fails_the_entry(
            self, box: Box) -> None:
        box.sh(f"mkdir -m 0755 {ROOT}/study/s1/admins")  # root's: no DAC_OVERRIDE to write it
        try:
            box.upload("s1", [("into-admins", {"admins/f.txt": 10, "ok/g.txt": 5})])
            reason = ""
            deadline = time.monotonic() + 60
            while not reason and time.monotonic() < deadline:
                time.sleep(0.25)
                reason = next((str(r["reason"]) for r in box.receipts("s1")["failed"]
                               if r["entry"] == "into-admins"), "")
            assert "the service cannot write to directories in" in reason, reason
            assert "admins/" in reason
            assert box.sh(f"ls {ROOT}/study/s1/admins").stdout == ""
            assert "ok" not in box.sh(f"ls {ROOT}/study/s1").stdout.split()
        finally:
            box.sh(f"rmdir {ROOT}/study/s1/admins")

    def test_a_config_error_is_told_at_the_terminal_and_in_the_journal(self,
                                                                        box: Box) -> None:
        since = box.now()
        r = box.sh("printf 'studies:\\n  Bad: {}\\n' > /tmp/bad.yaml; "
                   "dittohead --config /tmp/bad.yaml check", check=False)
        assert r.returncode == 78, r.stderr
        assert "studies.Bad: study id must match" in r.stderr
        assert "MESSAGE_ID" not in r.stderr
        assert box.journal(f"MESSAGE_ID={MESSAGE_IDS['config-error']}", f"--since=@{since}")

    def test_verify_and_timer_on_the_booted_system(self, box: Box) -> None:
        # --generators=yes: verify's own manager runs the generators (ours too).
        r = box.box.run("systemd-analyze", "verify", "--generators=yes", "dittohead@s1.path",
                        "dittohead@s1.service", "dittohead@s1.timer",
                        "dittohead-notify@dittohead@s1.service.service", check=False)
        assert (r.returncode, r.stdout + r.stderr) == (0, "")
        assert box.prop("dittohead@s1.timer", "ActiveState") == "active"
        assert box.prop("dittohead@s1.timer", "UnitFileState") == "enabled"
        assert box.prop("dittohead@s1.path", "UnitFileState") == "enabled"
        listed = box.box.run("systemctl", "list-timers", "--all", "--no-pager").stdout
        assert "dittohead@s1.timer" in listed
        gen = box.sh("cat /run/systemd/generator/dittohead@s1.path.d/50-paths.conf").stdout
        assert f"PathExistsGlob={ROOT}/dropbox/s1/inbox/*" in gen

    def test_config_error_loop_stops_then_recovers_on_the_next_good_run(self,
                                                                       box: Box) -> None:
        box.wait_inactive("dittohead@s1.service")
        box.box.write_file("/etc/dittohead/config.yaml", CONFIG + "  bad: [\n")
        try:
            box.upload("s1", [("during-config-error", None)])
            # Each run exits 78 at once and the entry still waits: the start limit
            # stops the loop, and the path unit says why.
            wait_for(lambda: box.prop("dittohead@s1.path", "Result") == "unit-start-limit-hit",
                     60, "the path unit to stop on the service's start limit")
            assert box.prop("dittohead@s1.service", "ExecMainStatus") == "78"
            assert box.journal(f"MESSAGE_ID={MESSAGE_IDS['config-error']}")
            wait_for(lambda: bool(box.journal(f"MESSAGE_ID={NOTIFY_ID}",
                                              "DITTOHEAD_UNIT=dittohead@s1.path")),
                     30, "dittohead-notify@ to report the path unit")
        finally:
            box.box.write_file("/etc/dittohead/config.yaml", CONFIG)
        # What the timer's next sweep does (its start limit has passed by then).
        box.box.run("systemctl", "reset-failed", "dittohead@s1.service")
        box.box.run("systemctl", "start", "dittohead@s1.service")
        assert box.delivered("s1").get("during-config-error") == 1
        # OnSuccess= restarted the failed path unit.
        box.wait_path_waiting("s1", timeout=30)
        box.upload("s1", [("after-recovery", None)])
        assert box.wait_delivered("s1", ["after-recovery"]).get("after-recovery") == 1

    def test_a_running_delivery_sees_only_its_own_study(self, box: Box) -> None:
        """From inside the mount namespace of s1's delivery, paused after its claim."""
        plant_secrets(box)
        box.dropin("dittohead@s1.service", "90-hold",
                   f"[Service]\nEnvironment=DITTOHEAD_TEST_FAULT=claimed=wait:{GO}\n")
        try:
            box.wait_inactive("dittohead@s1.service")
            box.upload("s1", [("isolated", {"i/data.txt": 100})], umask=0o077)
            wait_for(lambda: box.prop("dittohead@s1.service", "ActiveState") == "activating"
                     and "isolated" not in box.sh(f"ls {ROOT}/dropbox/s1/inbox").stdout,
                     30, "the service to claim the entry")
            pid = box.prop("dittohead@s1.service", "MainPID")
            own = [f"{ROOT}/dropbox/s1/processing", f"{ROOT}/dropbox/s1/done",
                   f"{ROOT}/study/s1", "/etc/dittohead/config.yaml", "/etc/passwd"]
            r = box.box.run("nsenter", "-t", pid, "-m", "-r", "-w", "/usr/bin/python3", "-c",
                            SEES_PY, *own, *NOT_S1)
            seen = json.loads(r.stdout.removeprefix("SEES "))
            # The same view as root in there: credentials do not matter, the paths are gone.
            shadow = box.box.run("nsenter", "-t", pid, "-m", "-r", "-w", "cat", "/etc/shadow",
                                 check=False)
        finally:
            box.box.run("touch", GO)
            box.wait_inactive("dittohead@s1.service")
            box.dropin("dittohead@s1.service", "90-hold", None)
            box.box.run("rm", "-f", GO)
        assert seen == {**dict.fromkeys(own, True), **dict.fromkeys(NOT_S1, False)}
        assert shadow.returncode != 0 and "No such file" in shadow.stderr
        assert box.wait_delivered("s1", ["isolated"]).get("isolated") == 1

    def test_the_mailer_and_the_notifier_see_only_what_they_need(self, box: Box) -> None:
        plant_secrets(box)
        box.sh(f"mkdir -p -m 0700 {ROOT}/dropbox/s4/processing/.mail && "
               f"chown dittohead:dittohead {ROOT}/dropbox/s4/processing/.mail")
        mail_own = [f"{ROOT}/dropbox/s4/processing/.mail", "/etc/dittohead/config.yaml"]
        mail_not = ["/etc/shadow", "/home", "/root", "/var/lib", f"{ROOT}/dropbox/s4/done",
                    f"{ROOT}/dropbox/s4/inbox", f"{ROOT}/study/s4", f"{ROOT}/study/s2",
                    f"{ROOT}/dropbox/s2/done", f"{ROOT}/dropbox/s1"]
        seen = sees_in_unit(box, "dittohead-mail@s4.service", mail_own + mail_not)
        assert seen == {**dict.fromkeys(mail_own, True), **dict.fromkeys(mail_not, False)}
        notify_not = ["/etc/shadow", "/etc/dittohead/config.yaml", f"{ROOT}/dropbox/s1",
                      f"{ROOT}/study/s1", f"{ROOT}/study/s2", "/home", "/var/lib"]
        seen = sees_in_unit(box, "dittohead-notify@dittohead@s1.service.service",
                            ["/usr/bin/logger", "/run/systemd/journal/socket", *notify_not])
        assert seen == {"/usr/bin/logger": True, "/run/systemd/journal/socket": True,
                        **dict.fromkeys(notify_not, False)}
        for unit, most in (("dittohead@s1.service", EXPOSURE_MAX),
                           ("dittohead-mail@s4.service", 1.0),
                           ("dittohead-notify@dittohead@s1.service.service", 0.2)):
            r = box.box.run("systemd-analyze", "security", "--no-pager", unit)
            m = EXPOSURE_RE.search(r.stdout)
            assert m, r.stdout
            print(f"\nsystemd-analyze security {unit}: {m.group(1)}")
            assert float(m.group(1)) <= most, r.stdout
