"""The filesystems the storage-fault campaign puts under a study: faultfs, tmpfs, ext4 on loop.

Each mounts over a directory that make_env laid out (the destination or the dropbox root)
with that directory's owner, mode and contents, and can lift its fault again, so a second
run shows what the first kept is delivered.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

FAULTFS = Path(__file__).with_name("faultfs.py")


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _copy_top(src: Path, dst: Path) -> None:
    """Give dst src's owner and mode, and a copy of everything in it (owners, ACLs kept)."""
    st = os.stat(src)
    os.chown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, st.st_mode & 0o7777)
    if any(src.iterdir()):
        _sh("cp", "-a", f"{src}/.", str(dst))


def _empty(path: Path) -> None:
    for p in path.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def fuse_available() -> str:
    """'' when faultfs can run here, else why not."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    r = subprocess.run(["/usr/bin/python3", "-c", "import pyfuse3, trio"], capture_output=True,
                       check=False)
    if r.returncode != 0:
        return "python3-pyfuse3 is not installed (make test installs it)"
    if shutil.which("fusermount3") is None:
        return "fusermount3 (fuse3) is not installed"
    return ""


def quota_available() -> str:
    """'' when a tmpfs takes user quotas here, else why not."""
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,usrquota", "dh-probe", d],
                           capture_output=True, text=True, check=False)
        if r.returncode == 0:
            subprocess.run(["umount", d], check=False)
            return ""
    return ("this kernel's tmpfs takes no quotas (CONFIG_TMPFS_QUOTA unset; ext4's need "
            "QFMT_V2, unset too): EDQUOT is injected with faultfs instead")


@dataclass
class Mounted:
    """One filesystem mounted over `at`; `lift` ends its fault, `close` puts `at` back."""

    kind: str
    at: Path
    work: Path  # the mount's own files: backing directory, control file, image
    proc: subprocess.Popen[bytes] | None = None

    @property
    def control(self) -> Path:
        return self.work / "control.json"

    def set_rules(self, rules: list[dict[str, object]]) -> None:
        """faultfs: the rules it applies from now on (their call counts start again)."""
        tmp = self.work / ".control.tmp"
        tmp.write_text(json.dumps(rules))
        os.replace(tmp, self.control)

    def hits(self) -> list[dict[str, str]]:
        """faultfs: every failure it injected."""
        path = self.work / "control.json.hits"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def lift(self) -> None:
        """End the fault: rules off, filler gone, quota off, read-write again."""
        if self.kind == "faultfs":
            self.set_rules([])
        elif self.kind == "tmpfs-full":
            (self.at / ".filler").unlink()
        elif self.kind == "ext4":
            _sh("mount", "-o", "remount,rw", str(self.at))
        elif self.kind == "tmpfs-quota":
            # tmpfs takes no new default limit on remount: move the files off it.
            keep = self.work / "keep"
            keep.mkdir()
            _copy_top(self.at, keep)
            _sh("umount", str(self.at))
            _empty(self.at)
            _sh("cp", "-a", f"{keep}/.", str(self.at))
            self.kind = "lifted"

    def read_only(self) -> None:
        """ext4: the filesystem goes read-only under the run."""
        _sh("mount", "-o", "remount,ro", str(self.at))

    def close(self) -> None:
        if os.path.ismount(self.at):
            if self.kind == "faultfs":
                subprocess.run(["fusermount3", "-u", "-z", str(self.at)], check=False)
            else:
                subprocess.run(["umount", "-l", str(self.at)], check=False)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.work)], check=False)


def mount(kind: str, at: Path, work: Path, size_mb: int = 64) -> Mounted:
    """Mount a `kind` filesystem over `at`, holding what `at` held, with its owner and mode."""
    work.mkdir(mode=0o700)
    saved = work / "saved"
    saved.mkdir()
    _copy_top(at, saved)
    m = Mounted(kind, at, work)
    if kind == "faultfs":
        backing = work / "backing"
        backing.mkdir()
        _copy_top(saved, backing)
        m.control.write_text("[]")
        with open(work / "faultfs.log", "wb") as log:
            m.proc = subprocess.Popen(["/usr/bin/python3", str(FAULTFS), str(backing), str(at),
                                       str(m.control)], stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while not os.path.ismount(at):
            if m.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("faultfs did not mount: "
                                   + (work / "faultfs.log").read_text()[-2000:])
            time.sleep(0.05)
        return m
    _empty(at)
    if kind == "tmpfs-full":
        _sh("mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "dh-campaign", str(at))
    elif kind == "tmpfs-quota":
        _sh("mount", "-t", "tmpfs", "-o", f"size={size_mb}m,usrquota,"
            "usrquota_block_hardlimit=256k", "dh-campaign", str(at))
    elif kind == "ext4":
        image = work / "ext4.img"
        _sh("truncate", "-s", f"{size_mb}M", str(image))
        _sh("mkfs.ext4", "-q", "-F", str(image))
        _sh("mount", "-o", "loop", str(image), str(at))
        os.rmdir(at / "lost+found")
    else:
        raise ValueError(kind)
    _copy_top(saved, at)
    return m
