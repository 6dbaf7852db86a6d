"""A destination on sshfs is refused (exit 78, `check` names it), never written to.

Before, a run delivered onto sshfs, failed each entry at the name check ("does not lead to
the verified copy": a hard link shows as another inode there, and times lose their
nanoseconds), and the rollback, unable to tell its own files, left them all in the
destination under a receipt saying nothing was delivered. The root tests mount a real
sshfs whose sftp-server (Debian's openssh-sftp-server, unpacked, never installed) talks
over a socketpair (`sshfs -o passive`): no sshd. The campaign's network table
(tests/test_campaign_sshfs.py) runs the same through a real sshd in a booted box.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dittohead.fstype import Mount, mount_of, parse

from .conftest import Env, make_env, wait_for
from .servers import DEB_CACHE, _fetch_debs

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:25 / /srv rw shared:5 - tmpfs tmpfs rw
41 30 0:40 / /srv/nas\\040data rw,nosuid,nodev shared:9 - fuse.sshfs nas@h:/exp rw,user_id=0
42 30 0:41 / /srv/nas\\040data/sub rw - tmpfs other rw
43 22 0:42 / /srv rw master:3 opt:x - xfs /dev/sdb rw
"""


def test_the_deepest_and_latest_mount_holds_a_path() -> None:
    mounts = parse(MOUNTINFO)
    assert mounts[2] == Mount("/srv/nas data", "fuse.sshfs", "nas@h:/exp")
    assert mount_of("/srv/nas data/s1/x", mounts) == mounts[2]
    assert mount_of("/srv/nas data", mounts) == mounts[2]
    assert mount_of("/srv/nas data/sub/y", mounts) == mounts[3]
    assert mount_of("/srv/nas datax", mounts) == mounts[4]  # /srv over-mounted later: xfs
    assert mount_of("/etc", mounts) == mounts[0]


def _sftp_server(where: Path) -> Path:
    """Debian's sftp-server, unpacked from the downloaded openssh-sftp-server package."""
    debs = sorted(DEB_CACHE.glob("openssh-sftp-server_*.deb"))
    if not debs:
        _fetch_debs()
        debs = sorted(DEB_CACHE.glob("openssh-sftp-server_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(where)], check=True)
    return where / "usr/lib/openssh/sftp-server"


@contextmanager
def sshfs_over_a_pipe(served: Path, mountpoint: Path, tools: Path) -> Iterator[None]:
    """sshfs of `served` on `mountpoint`, its sftp-server at the other end of a socketpair."""
    server_end, client_end = socket.socketpair()
    server = subprocess.Popen([str(_sftp_server(tools)), "-e", "-l", "ERROR"],
                              stdin=server_end.fileno(), stdout=server_end.fileno())
    fs = subprocess.Popen(["sshfs", "-f", "-o", "passive,allow_other", f":{served}",
                           str(mountpoint)], stdin=client_end.fileno(),
                          stdout=client_end.fileno())
    server_end.close()
    client_end.close()
    try:
        wait_for(lambda: os.path.ismount(mountpoint), 10, f"sshfs on {mountpoint}")
        yield
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        for p in (fs, server):
            p.kill()
            p.wait()


@pytest.fixture
def sshfs_env(shared_base: Path) -> Iterator[tuple[Env, Path]]:
    if shutil.which("sshfs") is None or not os.path.exists("/dev/fuse"):
        pytest.skip("NEEDS sshfs AND /dev/fuse (`make test` installs sshfs)")
    env = make_env(shared_base)
    served = shared_base / "nas"
    served.mkdir()
    (served / "c.txt").write_bytes(b"the NAS's own file\n")
    with sshfs_over_a_pipe(served, shared_base / "dest", shared_base / "tools"):
        yield env, served


def _tree(top: Path) -> dict[str, bytes]:
    return {str(p.relative_to(top)): p.read_bytes() if p.is_file() else b"/"
            for p in sorted(top.rglob("*"))}


@pytest.mark.root
def test_destination_on_sshfs_is_refused_with_exit_78_and_nothing_written(
        sshfs_env: tuple[Env, Path]) -> None:
    env, served = sshfs_env
    before = _tree(served)
    env.drop("e1", {"a/x.bin": b"x" * 5000, "b.txt": b"hello"})
    env.drop("c.txt", b"other content, a conflict\n")
    r = env.process()
    assert r.returncode == 78, r.stderr
    assert f"the destination {env.study.destination} is on fuse.sshfs" in r.stderr
    assert "RENAME_NOREPLACE" in r.stderr
    assert sorted(p.name for p in env.study.inbox.iterdir()) == ["c.txt", "e1"]
    assert not [p for p in env.study.processing.iterdir() if not p.name.startswith(".")]
    assert not env.done_receipts() and not env.failed_receipts()
    assert _tree(served) == before  # nothing staged, nothing published, nothing replaced
    r = env.run("check", "s1")
    assert r.returncode == 1 and "is on fuse.sshfs" in r.stdout, r.stdout + r.stderr


@pytest.mark.root
def test_entries_refused_on_sshfs_are_delivered_once_the_destination_is_local(
        sshfs_env: tuple[Env, Path]) -> None:
    env, _ = sshfs_env
    env.drop("e1", {"a/x.bin": b"x" * 5000})
    assert env.process().returncode == 78
    subprocess.run(["umount", "-l", str(env.study.destination)], check=True)
    r = env.process()  # make_env's destination, under the mount, is the service's
    assert r.returncode == 0, r.stderr
    assert (env.study.destination / "a/x.bin").read_bytes() == b"x" * 5000
    assert len(env.done_receipts()) == 1
