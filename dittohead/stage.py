"""Copy an entry's files into a staging directory on the destination's filesystem.

Staging lives in `<destination>/.incoming-<id>` (hidden, and never named
after dittohead, as the destination's admins asked): `<dir>/<file>`, both
plan record numbers, one staging directory per entry directory (a single
flat one made 20,000 creates five times slower on ext4), so
that publishing is a link() per file: no partial file ever appears under a
final name, and a crash leaves only this directory, which the next run
removes before it resumes the same claim. Each file is hashed in the same
pass as the copy; the staged inode gets its final owner, group, mode and
mtime before it is published, so publishing changes nothing but names.
"""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from hashlib import sha256

from .check import CHUNK, FILE_FLAGS, DirCache, Source
from .config import StudyConfig
from .errors import ConfigError, EntryFailed
from .faults import point
from .log import printable
from .plan import COPIED, PRESENT, DirPlan, FilePlan, Plan

STAGING_PREFIX = ".incoming-"
# Files at least this big are hashed on a second thread while the main one
# writes (hashlib and os.write both release the GIL); smaller ones are not
# worth the hand-off.
OVERLAP_MIN = 4 * CHUNK


@dataclass(frozen=True)
class Ownership:
    """Owner, group and modes every delivered inode gets."""

    uid: int
    gid: int
    file_mode: int
    dir_mode: int

    def apply(self, fd: int, mode: int) -> None:
        """Give a new inode its owner, group and mode, changing only what differs.

        In a destination whose directories are setgid and of the study's group
        (what `setup` makes) new inodes inherit the group and the setgid bit,
        so neither chown (CAP_CHOWN) nor a chmod with S_ISGID (refused under
        RestrictSUIDSGID=) is needed; they are only used where they must be.
        """
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) != (self.uid, self.gid):
            # chown first: it clears set-id bits that the chmod below then sets.
            try:
                os.fchown(fd, self.uid if st.st_uid != self.uid else -1,
                          self.gid if st.st_gid != self.gid else -1)
            except PermissionError:
                raise ConfigError(
                    f"cannot give delivered files owner {self.uid} and group {self.gid}: the "
                    "service has no CAP_CHOWN. Make the destination setgid and of the "
                    "study's group (chmod g+s; `dittohead setup` does it for a new one), "
                    "or grant CAP_CHOWN. The entry stays claimed.") from None
            st = os.fstat(fd)
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)

    def mode_for(self, f: FilePlan) -> int:
        if f.executable:
            # An executable keeps x where the configured mode grants r.
            return self.file_mode | ((self.file_mode & 0o444) >> 2)
        return self.file_mode


@dataclass
class Staging:
    """The staging directory of one delivery: staged file names are plan record numbers."""

    dest_fd: int
    name: str
    fd: int
    destination: str  # the configured path, to check it still leads to dest_fd
    copied: int = 0


def staging_name(claim_id: str) -> str:
    return STAGING_PREFIX + claim_id


def remove_staging(dest_fd: int, claim_id: str) -> bool:
    """Remove a (possibly half-built) staging directory; True if one was there."""
    name = staging_name(claim_id)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dest_fd)
    except FileNotFoundError:
        return False
    try:
        with os.scandir(fd) as it:
            for bucket in it:
                bfd = os.open(bucket.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                              dir_fd=fd)
                try:
                    with os.scandir(bfd) as files:
                        for f in files:
                            os.unlink(f.name, dir_fd=bfd)
                finally:
                    os.close(bfd)
                os.rmdir(bucket.name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dest_fd)
    return True


def bucket(d: DirPlan) -> str:
    """The staging sub-directory of the files of one entry directory."""
    return str(d.index)


def stage(study: StudyConfig, plan: Plan, dest_fd: int, owner: Ownership) -> Staging:
    """Copy and hash every file not yet in the destination; return the staging."""
    remove_staging(dest_fd, plan.claim_id)
    name = staging_name(plan.claim_id)
    os.mkdir(name, 0o700, dir_fd=dest_fd)
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dest_fd)
    staging = Staging(dest_fd=dest_fd, name=name, fd=fd, destination=str(study.destination))
    try:
        with plan.state() as state, Source(study, plan) as src, \
                DirCache(fd) as buckets, ThreadPoolExecutor(1) as hasher:
            for d, f in plan.iter_files():
                if state.flags(f.index) & PRESENT:
                    continue
                if buckets.rel != bucket(d):
                    os.mkdir(bucket(d), 0o700, dir_fd=fd)
                digest = _copy_one(src.dir_fd(d.rel), f, f.src_name(plan),
                                   buckets.dir_fd(bucket(d)), str(f.index), owner, hasher,
                                   d.rel)
                state.set(f.index, COPIED, digest)
                staging.copied += 1
                point(f"staged:{staging.copied}")
    except BaseException:
        # ENOSPC, a vanished destination, a changed file: nothing was published
        # yet, so dropping the staging directory undoes everything.
        os.close(fd)
        remove_staging(dest_fd, plan.claim_id)
        raise
    return staging


def _copy_one(src_dir: int, f: FilePlan, src_name: str, staging_fd: int, staged: str,
              owner: Ownership, hasher: ThreadPoolExecutor, rel: str) -> bytes:
    src = os.open(src_name, FILE_FLAGS, dir_fd=src_dir)
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode) or st.st_size != f.size \
                or st.st_mtime_ns != f.mtime_ns:
            raise EntryFailed(f"{printable(_join(rel, f.name))} changed while it was being "
                              "delivered; upload it again. Nothing of this entry was "
                              "delivered.")
        # FILE_FLAGS has O_NONBLOCK (so a FIFO swapped in could not hang the
        # open); it changes nothing for the regular file fstat just confirmed.
        if f.size >= OVERLAP_MIN:
            os.posix_fadvise(src, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        dst = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                      dir_fd=staging_fd)
        try:
            digest, copied = _copy_data(src, dst, f.size, hasher)
            if copied != f.size:
                raise EntryFailed(f"{printable(_join(rel, f.name))} changed size while it "
                                  "was being delivered; upload it again. Nothing of this "
                                  "entry was delivered.")
            owner.apply(dst, owner.mode_for(f))
            os.utime(dst, ns=(f.atime_ns, f.mtime_ns))
            return digest
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy_data(src: int, dst: int, size: int, hasher: ThreadPoolExecutor) -> tuple[bytes, int]:
    h = sha256()
    total = 0
    if size < OVERLAP_MIN:
        buf = bytearray(min(size + 4096, CHUNK))  # one read also sees EOF
        view = memoryview(buf)
        while n := os.readv(src, [buf]):
            h.update(view[:n])
            _write_all(dst, view[:n])
            total += n
        return h.digest(), total
    # Two buffers: the hasher thread digests one while the next is read and written.
    bufs = [bytearray(CHUNK), bytearray(CHUNK)]
    pending = None
    i = 0
    while True:
        buf = bufs[i]
        n = os.readv(src, [buf])
        if pending is not None:
            pending.result()
        if not n:
            break
        view = memoryview(buf)[:n]
        pending = hasher.submit(h.update, view)
        _write_all(dst, view)
        total += n
        i ^= 1
    return h.digest(), total


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name
