"""Copy an entry's files into a staging directory on the destination's filesystem.

Staging lives in `<destination>/.incoming-<id>` (hidden, and never named
after dittohead, as the destination's admins asked). A directory the
destination already has gets a bucket there, `<dir index>/<file index>`
(one per directory: a single flat one made 20,000 creates five times
slower on ext4), and each file is published by its own rename. A directory
the destination lacks is staged whole, as `<dir index>/<its subtree under
the final names>`, and published by renaming that one directory: a new
session directory of 20,000 files appears at once, complete, for one
metadata operation. Either way no partial file ever appears under a final
name, and a crash leaves only the staging directory, which the next run
removes before it resumes the same claim. Staged inodes are created with
their final mode and get their owner and mtime before they are published,
so publishing changes nothing but names.

Copy, hash and verify are one pass: each chunk read from the source is
written, read back from the staged file, compared byte for byte with what
was read, and the read-back bytes are hashed. So the manifest's digest is
that of the staged copy as the filesystem returns it, and that copy is
proven equal to the source as read. A second, separate sha256 pass would
read the same page-cache pages again and prove nothing more, at the cost of
a whole extra pass over the data (sha256 alone runs at about the speed of
`cp` here). A file of OVERLAP_MIN or more is hashed on a second thread
while the main one copies, and every WRITEBACK_EVERY bytes a background
syncfs starts writing back what is staged, so the syncfs before publishing
has little left to wait for. Entries with many files are copied by forked
workers (parallel.py), each a contiguous share.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections import deque
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING

from . import faults, parallel
from .check import CHUNK, DIR_FLAGS, FILE_FLAGS, DirCache, Source, join
from .config import StudyConfig
from .errors import ConfigError, EntryFailed
from .faults import point
from .fsops import syncfs
from .log import printable
from .plan import PRESENT, DirPlan, FilePlan, Plan, State
from .record import Manifest

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

STAGING_PREFIX = ".incoming-"
# Files at least this big are hashed on a second thread while the main one
# copies (hashlib, read and write all release the GIL); smaller ones are not
# worth the hand-off.
OVERLAP_MIN = 4 * CHUNK
RING = 4  # read-back buffers in flight between the copying and the hashing thread
# After this much is staged, a background syncfs starts writing it back, so
# the disk works while the CPU copies and the syncfs before publishing has
# little left to do.
WRITEBACK_EVERY = 16 * CHUNK


@dataclass(frozen=True)
class Ownership:
    """Owner, group and modes every delivered inode gets."""

    uid: int
    gid: int
    file_mode: int
    dir_mode: int

    def apply(self, fd: int, mode: int) -> os.stat_result:
        """Give a new inode its owner, group and mode, changing only what differs.

        In a destination whose directories are setgid and of the study's group
        (what `setup` makes) new inodes inherit the group and the setgid bit,
        so neither chown (CAP_CHOWN) nor a chmod with S_ISGID (refused under
        RestrictSUIDSGID=) is needed; they are only used where they must be.
        Returns the inode's stat (its st_ino is what publishing checks).
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
        return st

    def mode_for(self, f: FilePlan) -> int:
        if f.executable:
            # An executable keeps x where the configured mode grants r.
            return self.file_mode | ((self.file_mode & 0o444) >> 2)
        return self.file_mode


@dataclass
class Staging:
    """The staging directory of one delivery (its layout: this module's docstring)."""

    dest_fd: int
    name: str
    fd: int
    destination: str  # the configured path, to check it still leads to dest_fd


def staging_name(claim_id: str) -> str:
    return STAGING_PREFIX + claim_id


def remove_staging(dest_fd: int, claim_id: str) -> bool:
    """Remove a (possibly half-built) staging directory; True if one was there."""
    try:
        # shutil's fd-based walk never follows a symlink (not that any could be
        # in there: the directory is the service's own, mode 0700).
        shutil.rmtree(staging_name(claim_id), dir_fd=dest_fd)
    except FileNotFoundError:
        return False
    return True


def stage(study: StudyConfig, plan: Plan, dest_fd: int, owner: Ownership) -> Staging:
    """Copy, hash and verify every file not yet in the destination; return the staging.

    Also writes the manifest to plan.manifest_path: a line for every file,
    those already delivered included, in plan order (the copying workers
    write their shares' lines as they go). The caller has removed any
    staging directory a killed attempt left.
    """
    name = staging_name(plan.claim_id)
    os.mkdir(name, 0o700, dir_fd=dest_fd)
    fd = os.open(name, DIR_FLAGS, dir_fd=dest_fd)
    staging = Staging(dest_fd=dest_fd, name=name, fd=fd, destination=str(study.destination))
    try:
        with plan.state() as state:
            n = parallel.workers_for(plan)
            bounds = _make_dirs(plan, state, fd, owner, n)
            parallel.run(n, lambda k: _copy_share(study, plan, state, fd, owner, bounds[k],
                                                  bounds[k + 1], plan.manifest_part(k)))
        _join_manifest(plan, n)
    except BaseException:
        # ENOSPC, a vanished destination, a changed file: nothing was published
        # yet, so dropping the staging directory undoes everything.
        os.close(fd)
        remove_staging(dest_fd, plan.claim_id)
        raise
    return staging


def _make_dirs(plan: Plan, state: State, staging_fd: int, owner: Ownership,
               shares: int) -> list[int]:
    """Make the staged new directories and a bucket for each existing one with files to copy.

    Returns where the shares of the copy start and end: shares + 1 record
    numbers cutting the files into contiguous runs of about equal cost, so
    each worker mostly has directories to itself (creates in one directory
    serialise on its lock).
    """
    d: DirPlan | None = None
    bucket_made = True
    # The cost of every file (a few already delivered count too: close enough).
    total = plan.files * parallel.FILE_COST + plan.nbytes
    cuts = [total * k // shares for k in range(1, shares)]
    bounds = [0]
    cost = 0
    for r in plan.placed(state):
        if isinstance(r, DirPlan):
            d = r
            if d.new:
                inode = _make_dir(staging_fd, d.staged, owner)
                if d.root:
                    state.set_inode(d.index, inode)
            bucket_made = d.new
        elif isinstance(r, FilePlan) and not state.flags(r.index) & PRESENT:
            if not bucket_made:
                assert d is not None
                os.mkdir(d.staged, 0o700, dir_fd=staging_fd)
                bucket_made = True
            while len(bounds) < shares and cost >= cuts[len(bounds) - 1]:
                bounds.append(r.index)
            cost += parallel.FILE_COST + r.size
    bounds += [1 << 62] * (shares + 1 - len(bounds))
    return bounds


def _copy_share(study: StudyConfig, plan: Plan, state: State, staging_fd: int, owner: Ownership,
                lo: int, hi: int, manifest_part: Path) -> None:
    """Copy the files whose record numbers are in [lo, hi); write their manifest lines.

    The lines of files already delivered are written too, so the parts of
    all shares, joined in order, are the whole manifest in plan order.
    """
    copied = 0
    with Source(study, plan) as src, DirCache(staging_fd) as staged, \
            _Copier(staging_fd) as copier, Manifest(manifest_part) as manifest:
        d: DirPlan | None = None
        for r in plan.placed(state):
            if isinstance(r, DirPlan):
                d = r  # (those before lo too: placement needs every directory)
                continue
            if not isinstance(r, FilePlan) or r.index < lo:
                continue
            if r.index >= hi:
                break
            assert d is not None
            if state.flags(r.index) & PRESENT:
                manifest.add(d.rel, r.name, state.digest(r.index))
                continue  # already delivered
            digest, inode = copier.copy(src.dir_fd(d.rel), r.src_name(plan), r,
                                        staged.dir_fd(d.staged), d.staged_name(r), owner, d.rel)
            state.set_copied(r.index, digest, inode)
            manifest.add(d.rel, r.name, digest)
            copied += 1
            if faults.enabled():
                point(f"staged:{copied}")


def _join_manifest(plan: Plan, parts: int) -> None:
    """Put the shares' manifest parts together, in order, as plan.manifest_path."""
    if parts == 1:
        plan.manifest_part(0).rename(plan.manifest_path)
        return
    with open(plan.manifest_path, "wb") as out:
        for k in range(parts):
            part = plan.manifest_part(k)
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out)
            part.unlink()


def _make_dir(staging_fd: int, staged: str, owner: Ownership) -> int:
    # The final permission bits at once (a setgid parent adds S_ISGID); nobody
    # can reach it before it is published: the staging directory is 0700.
    os.mkdir(staged, owner.dir_mode & 0o777, dir_fd=staging_fd)
    dfd = os.open(staged, DIR_FLAGS, dir_fd=staging_fd)
    try:
        return owner.apply(dfd, owner.dir_mode).st_ino
    finally:
        os.close(dfd)


class _Copier:
    """Buffers and helper threads shared by every file of one delivery."""

    def __init__(self, staging_fd: int) -> None:
        # Buffers and thread pools of big files and of writeback are made on
        # first use: an entry of a few small files (what users wait for most
        # often) neither allocates them nor imports concurrent.futures.
        self.buf = bytearray()  # what was read from the source
        self.ring: list[bytearray] = []  # read-back buffers
        self._pools: dict[str, ThreadPoolExecutor] = {}
        # The background syncs use their own open file: syncfs() reports a
        # writeback error once per open file, and the one that counts, before
        # publishing, must still see it (publish.py syncs staging.fd).
        self.sync_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                               dir_fd=staging_fd)
        self.unsynced = 0
        self.syncing: Future[None] | None = None

    def __enter__(self) -> _Copier:
        return self

    def __exit__(self, *exc: object) -> None:
        for pool in self._pools.values():
            pool.shutdown()
        os.close(self.sync_fd)

    def _pool(self, name: str) -> ThreadPoolExecutor:
        """A one-thread pool for sha256 or writeback, made on first use."""
        if name not in self._pools:
            from concurrent.futures import ThreadPoolExecutor
            self._pools[name] = ThreadPoolExecutor(1, name)
        return self._pools[name]

    def written(self, n: int) -> None:
        """Count staged bytes; start a background syncfs when enough are waiting."""
        self.unsynced += n
        if self.unsynced >= WRITEBACK_EVERY and (self.syncing is None or self.syncing.done()):
            self.syncing = self._pool("writeback").submit(_sync_quietly, self.sync_fd)
            self.unsynced = 0

    def copy(self, src_dir: int, src_name: str, f: FilePlan, staging_fd: int, staged: str,
             owner: Ownership, rel: str) -> tuple[bytes, int]:
        """Stage one file; return the sha256 of the staged copy and its inode number."""
        src = os.open(src_name, FILE_FLAGS, dir_fd=src_dir)
        try:
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode) or st.st_size != f.size \
                    or st.st_mtime_ns != f.mtime_ns:
                raise EntryFailed(_changed(rel, f))
            # FILE_FLAGS has O_NONBLOCK (so a FIFO swapped in could not hang the
            # open); it changes nothing for the regular file fstat just confirmed.
            big = f.size >= OVERLAP_MIN
            if big:
                os.posix_fadvise(src, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            mode = owner.mode_for(f)
            # Created with its final mode (in a 0700 directory, so no one can
            # open it meanwhile); apply() then usually finds nothing to change.
            dst = os.open(staged, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode,
                          dir_fd=staging_fd)
            try:
                digest, copied = (self._copy_big(src, dst) if big
                                  else self._copy_small(src, dst, f.size))
                if not big:
                    self.written(copied)
                if copied != f.size:
                    raise EntryFailed(_changed(rel, f))
                inode = owner.apply(dst, mode).st_ino
                os.utime(dst, ns=(f.atime_ns, f.mtime_ns))
                return digest, inode
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def _copy_small(self, src: int, dst: int, size: int) -> tuple[bytes, int]:
        # Per-file costs rule here: a bytes object per chunk (sized to the file,
        # one byte more to see its end) is cheaper than slicing fixed buffers.
        want = min(size + 1, CHUNK)
        data = os.read(src, want)
        if len(data) < want:  # the whole file in one read: the usual case, kept short
            return sha256(_write_checked(dst, data, 0)).digest(), len(data)
        h = sha256()
        total = 0
        while data:
            h.update(_write_checked(dst, data, total))
            total += len(data)
            if len(data) < want:
                break  # a short read of a regular file is its end: no read() just for EOF
            data = os.read(src, want)
        return h.digest(), total

    def _copy_big(self, src: int, dst: int) -> tuple[bytes, int]:
        # The hasher digests read-back buffers in order while this thread reads,
        # writes and reads back the next ones.
        if not self.ring:
            self.buf = bytearray(CHUNK)
            self.ring = [bytearray(CHUNK) for _ in range(RING)]
        hasher = self._pool("sha256")
        h = sha256()
        buf = self.buf
        hashed: deque[Future[None]] = deque()
        total = 0
        i = 0
        try:
            while True:
                if len(hashed) == RING:
                    hashed.popleft().result()  # the buffer about to be reused is digested
                back = self.ring[i]
                n = os.readv(src, [buf])
                if not n:
                    break
                _write_all(dst, memoryview(buf)[:n])
                _check_back(dst, buf, back, n, total)
                hashed.append(hasher.submit(h.update, memoryview(back)[:n]))
                total += n
                self.written(n)
                i = (i + 1) % RING
        finally:
            # Whatever happened, the hasher may not still use a buffer once we return.
            for fut in hashed:
                fut.exception()
        for fut in hashed:
            fut.result()
        return h.digest(), total


def _sync_quietly(fd: int) -> None:
    try:
        syncfs(fd)
    except OSError:
        pass  # an early start only: the syncfs before publishing reports any error


def _write_checked(dst: int, data: bytes, offset: int) -> bytes:
    """Write data at dst's end (offset), read it back, and return it if it is the same."""
    _write_all(dst, memoryview(data))
    back = os.pread(dst, len(data), offset)
    if back != data:
        raise EntryFailed(_MISMATCH)
    return back


def _check_back(dst: int, buf: bytearray, back: bytearray, n: int, offset: int) -> None:
    got = os.preadv(dst, [back], offset)
    # bytearray == bytearray is one memcmp; comparing memoryviews goes item by
    # item (100 times slower), hence slices when the chunk is short.
    if got != n or not (back == buf if n == CHUNK else back[:n] == buf[:n]):
        raise EntryFailed(_MISMATCH)


_MISMATCH = ("a staged copy read back different from what was written (a storage or memory "
             "fault?); nothing of this entry was delivered.")


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _changed(rel: str, f: FilePlan) -> str:
    return (f"{printable(join(rel, f.name))} changed while it was being "
            "delivered; upload it again. Nothing of this entry was delivered.")
