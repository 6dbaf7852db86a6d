"""smbd and sshd inside a booted test systemd, with the shipped sample configs, and clients.

The daemons come from Debian's samba and openssh-server packages, downloaded on the host
only (`make test-debs`; never installed there, so no daemon ever starts on the machine that
runs the tests) and installed inside the box's throwaway overlay with service starts
blocked. They listen on 127.0.0.1 in the box's own network namespace, on SMB_PORT and
SSH_PORT. The shares and the sshd Match stanza are packaging/samba/dittohead-smb.conf and
packaging/ssh/dittohead-sshd.conf as shipped, with the sample's paths and names replaced.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from .boxes import REPO, Box
from .conftest import wait_for

DEB_CACHE = REPO / ".cache" / "debs"
SERVER_PACKAGES = ("samba", "smbclient", "openssh-server")
SMB_PORT = 4445
SSH_PORT = 2222
SMB_SAMPLE = REPO / "packaging" / "samba" / "dittohead-smb.conf"
SSHD_SAMPLE = REPO / "packaging" / "ssh" / "dittohead-sshd.conf"
# What the samples name, replaced by the test's own values.
SAMPLE_ROOT = "/data-dropbox"
SAMPLE_STUDY = "nccam3"
SAMPLE_GROUP = "nccam3-ra"
SFTP_GROUP = "dittohead-sftp"
SSH_ALIAS = "dropbox"  # the Host alias in each uploader's ~/.ssh/config

# [global] of the box's smb.conf: only what a test needs (a port, loopback, no printers);
# the shares are the sample's, included as an admin would.
SMB_GLOBAL = f"""\
[global]
    server role = standalone server
    smb ports = {SMB_PORT}
    interfaces = 127.0.0.1
    bind interfaces only = yes
    disable netbios = yes
    load printers = no
    printcap name = /dev/null
    disable spoolss = yes
    map to guest = never
    log level = 1
    logging = systemd
    include = /etc/samba/dittohead-smb.conf
"""

SSHD_TEST = f"""\
# The test's port and address; sshd takes the first value of each keyword.
Port {SSH_PORT}
ListenAddress 127.0.0.1
"""


def _fetch_debs() -> None:
    """Download (never install) the server packages on the host: `make test-debs`."""
    r = subprocess.run(["make", "-s", "-C", str(REPO), "test-debs"], capture_output=True,
                       text=True, check=False, timeout=600)
    assert r.returncode == 0, f"make test-debs failed:\n{r.stdout}\n{r.stderr}"


def install(b: Box) -> None:
    """Install samba, smbclient and openssh-server inside the box, starting nothing."""
    script = f"""set -e
# Inside the box only (its / is a throwaway overlay): no maintainer script starts a daemon.
printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-download --no-install-recommends \\
    -o Dir::Cache::archives="$1" -o Dpkg::Options::=--force-unsafe-io \\
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \\
    {" ".join(SERVER_PACKAGES)}
"""
    if not any(DEB_CACHE.glob("*.deb")):
        # Before the box first looks: its overlay would keep a missing
        # directory missing even once the host has made it (a clean checkout
        # whose tests run without `make test`).
        _fetch_debs()
    r = b.sh(script, str(DEB_CACHE), check=False, timeout=600)
    if r.returncode != 0:  # not downloaded yet, or a newer version came out: fetch, retry
        _fetch_debs()
        r = b.sh(script, str(DEB_CACHE), check=False, timeout=600)
    assert r.returncode == 0, f"installing the servers in the box failed:\n{r.stdout}\n{r.stderr}"


def sample(path: Path, replace: dict[str, str]) -> str:
    """A shipped sample config with the sample's names replaced (in this order)."""
    text = path.read_text()
    for old, new in replace.items():
        assert old in text, f"{path}: no {old!r}"
        text = text.replace(old, new)
    return text


def start_smbd(b: Box, root: str, study: str, group: str) -> None:
    """smbd with the sample's share for study, listening on 127.0.0.1:SMB_PORT."""
    b.box.write_file("/etc/samba/dittohead-smb.conf", sample(SMB_SAMPLE, {
        SAMPLE_ROOT: root, SAMPLE_GROUP: group, SAMPLE_STUDY: study}))
    b.box.write_file("/etc/samba/smb.conf", SMB_GLOBAL)
    b.sh("testparm -s >/dev/null 2>&1 || { testparm -s; exit 1; }")
    b.box.run("systemctl", "restart", "smbd.service")
    _wait_listening(b, SMB_PORT)


def start_sshd(b: Box, root: str) -> None:
    """The distribution's ssh.service with the sample's stanza, on 127.0.0.1:SSH_PORT."""
    b.box.write_file("/etc/ssh/sshd_config.d/00-test.conf", SSHD_TEST)
    b.box.write_file("/etc/ssh/sshd_config.d/dittohead.conf",
                     sample(SSHD_SAMPLE, {SAMPLE_ROOT: root}))
    b.sh(f"""set -e
getent group {SFTP_GROUP} >/dev/null || groupadd {SFTP_GROUP}
# tests/sysbox.py masks ssh.service (the host's sshd must never start in a box): unmask it.
rm -f /etc/systemd/system/ssh.service
systemctl daemon-reload
mkdir -p -m 0755 /run/sshd  # ssh.service's RuntimeDirectory, for the check
sshd -t
systemctl restart ssh.service
# Every client knows the server's keys, as after a first `yes` to the fingerprint.
for k in /etc/ssh/ssh_host_*_key.pub; do
    printf '[127.0.0.1]:{SSH_PORT} %s\\n' "$(cut -d' ' -f1,2 "$k")"
done > /etc/ssh/ssh_known_hosts
""")
    _wait_listening(b, SSH_PORT)


def _wait_listening(b: Box, port: int) -> None:
    # python3, not ss: a clean Debian 12 may lack iproute2, never Python (dittohead needs it).
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 1).close()"
    wait_for(lambda: b.box.run("python3", "-c", probe, check=False).returncode == 0, 30,
             f"a server listening on 127.0.0.1:{port}")


@dataclass(frozen=True)
class Uploader:
    """A lab account in the box: an SMB password, an ssh key and ~/.ssh/config."""

    name: str
    password: str
    sftp_only: bool


def add_uploader(b: Box, name: str, groups: list[str], sftp_only: bool) -> Uploader:
    """useradd NAME (with a home), smbpasswd, a key pair and `Host dropbox` for ssh."""
    u = Uploader(name, f"pw-{name}-42", sftp_only)
    shell = "/usr/sbin/nologin" if sftp_only else "/bin/sh"
    all_groups = ",".join(groups + ([SFTP_GROUP] if sftp_only else []))
    b.sh(f"""set -e
getent group {SFTP_GROUP} >/dev/null || groupadd {SFTP_GROUP}
useradd --create-home --shell {shell} --groups {all_groups} {name}
# '*', not useradd's '!': no password, but not a locked account either.
usermod -p '*' {name}
printf '%s\\n%s\\n' "$1" "$1" | smbpasswd -a -s {name} >/dev/null
""", u.password)
    b.box.run("/bin/sh", "-c", f"""set -e
umask 077
mkdir -p ~/.ssh
ssh-keygen -q -t ed25519 -N '' -C {name} -f ~/.ssh/id_ed25519
cp ~/.ssh/id_ed25519.pub ~/.ssh/authorized_keys
printf 'Host {SSH_ALIAS}\\n    HostName 127.0.0.1\\n    Port {SSH_PORT}\\n' > ~/.ssh/config
""", user=name)
    return u


def as_user(b: Box, u: Uploader, script: str, *args: str, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """A shell script run in the box as the uploader, the way they type it at a terminal."""
    return b.box.run("/bin/sh", "-c", 'cd "$HOME" && ' + script, "sh", *args, user=u.name,
                     check=check, timeout=timeout)


def smbclient(b: Box, u: Uploader, share: str, commands: str, check: bool = True,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """smbclient //127.0.0.1/SHARE -c COMMANDS as the uploader, with their password."""
    return as_user(b, u, 'exec smbclient "$@"', f"//127.0.0.1/{share}", "-p", str(SMB_PORT),
                   "-U", f"{u.name}%{u.password}", "-c", commands, check=check,
                   timeout=timeout)


def install_and_start(b: Box, root: str, study: str, group: str) -> None:
    """Everything a test module needs once per box: packages, smbd, sshd."""
    install(b)
    start_smbd(b, root, study, group)
    start_sshd(b, root)
