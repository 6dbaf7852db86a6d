"""The RPM package: `make rpm` (packaging/rpm.mk, packaging/rpm/dittohead.spec).

Built on the host with Debian's rpmbuild (root: `make rpm` installs rpm and rpmlint when
missing), for EL 9. Checked with rpm's queries and rpmlint, and against `make deb`: the two
packages ship the same files with the same bytes and modes, apart from what each
packaging system adds by itself (named below, each with why).
"""

from __future__ import annotations

import gzip
import importlib.util
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
    RPM,
    VERSION,
    assert_removed_and_stopped,
    build,
    installed_box,
    run,
    set_up_study,
    study_config,
)

SPEC = REPO / "build" / "rpm" / "SPECS" / "dittohead.spec"  # as rpmbuild read it
LINTRC = REPO / "packaging" / "rpm" / "rpmlint.toml"

# Only in the .deb: dpkg's and debhelper's own files (the changelog dpkg wants, lintian's
# overrides, dh_python3's hook to recompile on a Python upgrade; the copyright file is the
# rpm's %license, see LICENSE below).
DEB_ONLY = {
    "/usr/share/doc/dittohead/changelog.gz",
    "/usr/share/lintian/overrides/dittohead",
    "/usr/share/python3/runtime.d/dittohead.rtupdate",
}
# The licence: Debian's /usr/share/doc/<package>/copyright is the rpm's %license.
LICENSE = ("/usr/share/doc/dittohead/copyright", "/usr/share/licenses/dittohead/copyright")
# The launchers name the interpreter: EL 9's python3.11, Debian's python3.
LAUNCHERS = {"/usr/bin/dittohead", "/usr/lib/systemd/system-generators/dittohead-generator"}

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def rpm() -> Path:
    """`make rpm`, once per module."""
    return build("rpm", RPM, "Debian's rpm and rpmlint")


@pytest.fixture(scope="module")
def deb() -> Path:
    """`make deb` of the same checkout, to compare with."""
    return build("deb", DEB, "dpkg-buildpackage/debhelper/dh-python")


def query(rpm: Path, fmt: str) -> str:
    return run("rpm", "-qp", "--qf", fmt, str(rpm)).stdout


def unpack_rpm(rpm: Path, into: Path) -> Path:
    into.mkdir()
    cpio = subprocess.run(["rpm2cpio", str(rpm)], capture_output=True, check=True).stdout
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=cpio,
                   cwd=into, check=True)
    return into


def unpack_deb(deb: Path, into: Path) -> Path:
    run("dpkg-deb", "-x", str(deb), str(into))
    return into


def files(root: Path) -> dict[str, Path]:
    """Every file and symlink under root, by its installed path."""
    return {"/" + str(p.relative_to(root)): p for p in sorted(root.rglob("*"))
            if p.is_symlink() or not p.is_dir()}


def normalized(path: str) -> str:
    """dh_compress gzips documents in /usr/share/doc; rpm does not."""
    if path.startswith("/usr/share/doc/") and path.endswith(".gz"):
        return path[: -len(".gz")]
    return path


def content(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def test_same_files_as_the_deb(rpm: Path, deb: Path, tmp_path: Path) -> None:
    in_rpm = files(unpack_rpm(rpm, tmp_path / "rpm"))
    in_deb = files(unpack_deb(deb, tmp_path / "deb"))
    # rpm ships the byte-code it compiled (test_bytecode); Debian compiles at install.
    pyc = {p for p in in_rpm if "/__pycache__/" in p}
    assert pyc, sorted(in_rpm)
    rpm_side = {p: in_rpm[p] for p in in_rpm if p not in pyc}
    rpm_side[LICENSE[0]] = rpm_side.pop(LICENSE[1])
    deb_side = {normalized(p): in_deb[p] for p in in_deb if p not in DEB_ONLY}
    assert sorted(rpm_side) == sorted(deb_side)

    for p in sorted(rpm_side):
        r, d = rpm_side[p], deb_side[p]
        assert (r.lstat().st_mode, r.is_symlink()) == (d.lstat().st_mode, d.is_symlink()), p
        if p in LAUNCHERS:
            r_first, r_rest = content(r).split(b"\n", 1)
            d_first, d_rest = content(d).split(b"\n", 1)
            assert (r_first, d_first) == (b"#!/usr/bin/python3.11 -I", b"#!/usr/bin/python3 -I")
            assert r_rest == d_rest, p
        else:
            assert content(r) == content(d), p


def test_header_requires_and_config(rpm: Path) -> None:
    assert query(rpm, "%{NAME} %{VERSION} %{RELEASE} %{ARCH} %{LICENSE}") == (
        f"dittohead {VERSION} 1 noarch MIT")
    init = (REPO / "dittohead" / "__init__.py").read_text()
    assert f'__version__ = "{VERSION}"' in init  # what `dittohead --version` says
    requires = set(run("rpm", "-qp", "--requires", str(rpm)).stdout.split("\n"))
    # EL 9: python3.11 from AppStream, whose stack has PyYAML but no systemd-python.
    assert {"python3.11", "python3.11-pyyaml", "systemd", "/usr/bin/python3.11"} <= requires
    assert not [r for r in requires if "systemd-python" in r or r.startswith("python3-")]
    flags = query(rpm, "[%{FILEFLAGS:fflags} %{FILENAMES}\n]").splitlines()
    assert "cn /etc/dittohead/config.yaml" in flags  # %config(noreplace)
    assert "d /usr/share/doc/dittohead/README.md" in flags
    assert "l /usr/share/licenses/dittohead/copyright" in flags
    owners = set(query(rpm, "[%{FILEUSERNAME}:%{FILEGROUPNAME}\n]").split())
    assert owners == {"root:root"}


def test_scriptlets(rpm: Path) -> None:
    """The user before any file, tmpfiles and a reload after; nothing enabled or started."""
    scripts = run("rpm", "-qp", "--scripts", str(rpm)).stdout
    pre = scripts.split("preinstall scriptlet")[1].split("postinstall scriptlet")[0]
    sysusers = (REPO / "units" / "dittohead.sysusers").read_text()
    user = next(line for line in sysusers.splitlines() if line.startswith("u "))
    assert "systemd-sysusers --replace=/usr/lib/sysusers.d/dittohead.conf -" in pre
    assert user in pre, pre
    post = scripts.split("postinstall scriptlet")[1].split("preuninstall scriptlet")[0]
    for step in ("systemd-tmpfiles --create dittohead.conf", "journalctl --update-catalog",
                 "[ -d /run/systemd/system ]", "systemctl daemon-reload"):
        assert step in post, step
    code = [line for line in post.splitlines() if not line.lstrip().startswith("#")]
    for word in ("systemctl enable", "systemctl start", "--now"):
        assert not [line for line in code if word in line], word
    preun = scripts.split("preuninstall scriptlet")[1].split("postuninstall scriptlet")[0]
    assert "if [ $1 -eq 0 ]" in preun  # removal only: an upgrade stops nothing
    assert "systemctl stop 'dittohead@*.path' 'dittohead@*.timer'" in preun
    assert "userdel" not in scripts and "groupdel" not in scripts


def test_bytecode_is_for_the_interpreter_and_checked_by_hash(rpm: Path, tmp_path: Path) -> None:
    """Compiled by python3.11 at build (EL 9's interpreter), valid whatever the file times."""
    root = unpack_rpm(rpm, tmp_path / "rpm")
    sources = sorted((root / "usr/lib/dittohead/dittohead").glob("*.py"))
    compiled = sorted((root / "usr/lib/dittohead/dittohead/__pycache__").glob("*.pyc"))
    assert [p.name.split(".")[0] for p in compiled] == [p.stem for p in sources]
    magic = subprocess.run(["/usr/bin/python3.11", "-c",
                            "import importlib.util,sys;"
                            "sys.stdout.write(importlib.util.MAGIC_NUMBER.hex())"],
                           capture_output=True, text=True, check=True).stdout
    for pyc in compiled:
        head = pyc.read_bytes()[:16]
        assert pyc.name.endswith(".cpython-311.pyc"), pyc.name
        assert head[:4].hex() == magic, pyc.name
        assert int.from_bytes(head[4:8], "little") == 0b11, pyc.name  # checked hash
        source = sources[[p.stem for p in sources].index(pyc.name.split(".")[0])]
        assert head[8:16] == importlib.util.source_hash(source.read_bytes()), pyc.name


def test_rpmlint_finds_nothing(rpm: Path) -> None:
    r = run("rpmlint", "--config", str(LINTRC), str(SPEC), str(rpm), check=False)
    print(f"\nrpmlint --config {LINTRC.name} {SPEC.name} {rpm.name}:\n{r.stdout}{r.stderr}")
    assert r.returncode == 0, r.stdout
    assert "0 errors, 0 warnings" in r.stdout, r.stdout



def test_el10_and_fedora_flavour_takes_python3_and_systemd_python(rpm: Path) -> None:
    """`make rpm RPM_RHEL=`: python3 (3.12 or newer there) and its python3-systemd."""
    top = "build/rpm-el10"
    run("make", "rpm", "RPM_RHEL=", f"RPM_TOPDIR={top}", f"RPM_OUTDIR={top}/out")
    other = REPO / top / "out" / RPM.name
    requires = set(run("rpm", "-qp", "--requires", str(other)).stdout.split("\n"))
    assert {"python3 >= 3.11", "python3-pyyaml", "python3-systemd", "/usr/bin/python3"} \
        <= requires, requires
    assert not [r for r in requires if r.startswith("python3.11")], requires
    launcher = subprocess.run(f"rpm2cpio {other} | cpio -i --quiet --to-stdout ./usr/bin/dittohead",
                              shell=True, capture_output=True, check=True).stdout
    assert launcher.startswith(b"#!/usr/bin/python3 -I\n"), launcher[:40]
    r = run("rpmlint", "--config", str(LINTRC), str(other), check=False)
    assert r.returncode == 0 and "0 errors, 0 warnings" in r.stdout, r.stdout


def test_a_unit_added_to_the_install_needs_no_edit_of_the_spec(
        rpm: Path, tmp_path: Path) -> None:
    """The spec takes the units from what `make install` installed (a glob)."""
    copy = tmp_path / "checkout"
    listed = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard").stdout
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    (copy / "units" / "dittohead-example.service").write_text(
        "[Service]\nType=oneshot\nExecStart=/bin/true\n")
    (copy / "units" / "dittohead-example.timer").write_text(
        "[Timer]\nOnCalendar=daily\n[Install]\nWantedBy=timers.target\n")
    install_mk = copy / "packaging" / "install.mk"
    text = install_mk.read_text()
    assert "DITTOHEAD_UNITS := " in text
    added = "dittohead-example.service dittohead-example.timer "
    install_mk.write_text(text.replace("DITTOHEAD_UNITS := ", "DITTOHEAD_UNITS := " + added, 1))
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    subprocess.run(["git", "add", "-A"], cwd=copy, check=True)
    made = subprocess.run(["make", "rpm"], cwd=copy, capture_output=True, text=True, check=False)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    listing = run("rpm", "-qlp", str(copy / "dist" / RPM.name)).stdout.split()
    assert {"/usr/lib/systemd/system/dittohead-example.service",
            "/usr/lib/systemd/system/dittohead-example.timer"} <= set(listing)


# --- installed in a booted throwaway systemd -----------------------------------------------

UPLOADER = "sbxrpmup"
DEST = "/srv/dittohead-rpm/s1"
CONFIG = study_config(DEST)
DELIVERED_ID = "38a8638a6c0e47ae85e1afdd33a44e53"


@pytest.fixture(scope="module")
def box(rpm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[sysbox.Sysbox]:
    """One box for the module, as an EL 9 host would be, with the package installed.

    `rpm -i --nodeps`: the box's rpm database is empty (Debian's), though what the
    package requires is there as Debian packages (python3.11, its PyYAML, systemd). Like
    EL 9, the box has no systemd-python for python3.11: its copy is removed (in the box's
    overlay only). And like EL, whose systemd ships `disable *` as its last preset
    (99-default-disable.preset; Debian enables by default), units are presets-disabled
    unless a preset says otherwise: %systemd_post applies presets to the package's
    timers for all studies (purge, metrics), which an admin enables when wanted.
    """
    with installed_box(tmp_path_factory, "rpm",
                       [("rm", "-rf", "/usr/lib/python3/dist-packages/systemd"),
                        ("sh", "-c", "mkdir -p /usr/lib/systemd/system-preset && echo "
                         "'disable *' > /usr/lib/systemd/system-preset/99-default-disable"
                         ".preset")],
                       ("rpm", "-i", "--nodeps", str(rpm))) as b:
        yield b

def sh(box: sysbox.Sysbox, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return box.run("/bin/sh", "-c", script, check=check)


def upload(box: sysbox.Sysbox, name: str, text: str) -> None:
    """An upload by UPLOADER into s1's inbox, then wait for its delivery into DEST."""
    box.run("/bin/sh", "-c", 'cd /data-dropbox/s1/inbox && mkdir ".$0" && '
            'echo "$1" > ".$0/$0.txt" && mv ".$0" "$0"', name, text, user=UPLOADER)
    deadline = time.monotonic() + 30
    while box.run("cat", f"{DEST}/{name}.txt", check=False).stdout != text + "\n":
        if time.monotonic() > deadline:
            state = sh(box, "ls -lAR /data-dropbox/s1; systemctl status --no-pager "
                       "'dittohead@s1.*'; journalctl -n 40 --no-pager", check=False)
            raise AssertionError(f"{name} not delivered after 30 s:\n{state.stdout}")
        time.sleep(0.25)


class TestInstalled:
    """In file order: installed, a delivery, a reinstall (an upgrade's path), removed."""

    pytestmark = pytest.mark.systemd

    def test_user_tmpfiles_catalog_and_nothing_enabled(self, box: sysbox.Sysbox) -> None:
        assert sh(box, "command -v dittohead").stdout.strip() == "/usr/bin/dittohead"
        assert "usage" in box.run("dittohead", "--help").stdout.lower()
        assert box.run("getent", "passwd", "dittohead").stdout.startswith("dittohead:")
        assert sh(box, "stat -c '%a %U %G' /etc/dittohead /data-dropbox").stdout.split() == [
            "755", "root", "root", "755", "root", "root"]
        assert DELIVERED_ID in box.run("journalctl", "--list-catalog", DELIVERED_ID).stdout
        listed = box.run("systemctl", "list-units", "--all", "--no-legend", "--plain",
                         "dittohead*").stdout
        assert listed.strip() == "", listed
        assert sh(box, "ls /etc/systemd/system/*.wants | grep dittohead",
                  check=False).stdout == ""

    def test_a_study_delivers_and_its_events_keep_their_fields(
            self, box: sysbox.Sysbox) -> None:
        assert box.run("python3.11", "-c", "import systemd", check=False).returncode != 0
        set_up_study(box, UPLOADER, DEST)
        upload(box, "visit1", "hello from the rpm")
        assert sh(box, f"stat -c '%U' {DEST}/visit1.txt").stdout.strip() == "dittohead"
        events = box.run("journalctl", "--no-pager", "-o", "export",
                         f"MESSAGE_ID={DELIVERED_ID}").stdout
        assert "DITTOHEAD_STUDY=s1" in events, events
        assert "DITTOHEAD_ENTRY=visit1" in events, events

    def test_reinstall_stops_nothing_and_the_study_delivers_on(
            self, box: sysbox.Sysbox) -> None:
        r = box.run("rpm", "-U", "--replacepkgs", "--nodeps", str(RPM), check=False,
                    timeout=300)
        assert r.returncode == 0, f"rpm -U failed:\n{r.stdout}\n{r.stderr}"
        assert box.run("systemctl", "is-active", "dittohead@s1.path").stdout.strip() == "active"
        assert box.run("cat", "/etc/dittohead/config.yaml").stdout == CONFIG
        upload(box, "visit2", "after the reinstall")

    def test_erase_stops_the_study_and_keeps_user_config_and_data(
            self, box: sysbox.Sysbox) -> None:
        r = box.run("rpm", "-e", "dittohead", check=False, timeout=300)
        assert r.returncode == 0, f"rpm -e failed:\n{r.stdout}\n{r.stderr}"
        # %preun stopped the study (letting its run finish: no failure, no notifier).
        assert_removed_and_stopped(box)
        # The admin's config, changed since install, is saved, as rpm does.
        assert box.run("cat", "/etc/dittohead/config.yaml.rpmsave").stdout == CONFIG
        assert box.run("getent", "passwd", "dittohead").returncode == 0
        assert box.run("cat", f"{DEST}/visit1.txt").stdout == "hello from the rpm\n"
