"""Copy one file into staging: read, write, read back, compare and hash in one pass.

The manifest's digest is that of the staged copy as the filesystem returns
it, and that copy is proven equal to the source as read. Big files are hashed
on a second thread while this one copies; a background syncfs starts
writeback every WRITEBACK_EVERY bytes. docs/design.md, "Copy".

What was read must be the file as its uploader left it. The lockdown stops
new writers, not one that opened the file before the claim: a read lease is
refused while anyone has the file open for writing (or mapped shared and
writable), so a lease taken and dropped right after opening proves there is
no such writer, and none can come. Size, mtime and ctime are compared again
after reading, for filesystems without leases (NFS); there a write in the
same clock tick as the one before reading would not move the ctime, so a
file changed within the current tick is only read once the tick is over.
docs/design.md, "Change detection".
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections import deque
from collections.abc import Iterable
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING

from . import faults
from .errors import EntryBusy, EntryFailed
from .fsops import CHUNK, FILE_FLAGS, Source, hash_fd, join, syncfs
from .log import printable
from .ownership import Ownership
from .plan import FilePlan

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

# Files at least this big are hashed on a second thread while the main one
# copies (hashlib, read and write all release the GIL); smaller ones are not
# worth the hand-off.
OVERLAP_MIN = 4 * CHUNK
RING = 4  # read-back buffers in flight between the copying and the hashing thread
# After this much is staged, a background syncfs starts writing it back, so
# the disk works while the CPU copies and the syncfs before publishing has
# little left to do.
WRITEBACK_EVERY = 16 * CHUNK


class Copier:
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

    def __enter__(self) -> Copier:
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
        src = _open_source(src_dir, src_name, rel, f)
        try:
            st = _unwritten(src, rel, f)
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
                if copied != f.size or _moved(st, os.fstat(src)):
                    raise _changed(rel, f, "changed while it was being read")
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


_SWAPPED = ("a file of the entry is not the one taken over from its uploader (replaced "
            "during the delivery); nothing of this entry was delivered")
_MISMATCH = ("a staged copy read back different from what was written (a storage or memory "
             "fault?); nothing of this entry was delivered.")


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def hash_source(src_dir: int, name: str, rel: str, f: FilePlan) -> bytes:
    """The sha256 of a source file, proven unchanged while read (as copy() does)."""
    src = _open_source(src_dir, name, rel, f)
    try:
        st = _unwritten(src, rel, f)
        digest = hash_fd(src, f.size)
        if _moved(st, os.fstat(src)):
            raise _changed(rel, f, "changed while it was being read")
        return digest
    finally:
        os.close(src)


def still_written(processing: Path, claim_id: str, plain_file: bool,
                  names: Iterable[str]) -> list[str]:
    """Which of these files of a claimed entry (found busy before) a program still writes.

    Checked before anything is copied, so an entry kept for a writer does not
    copy gigabytes on every retry only to find the same file busy again.
    """
    busy = []
    with Source(processing, claim_id, plain_file) as src:
        for rel in names:
            where, _, name = rel.rpartition("/")
            try:
                fd = os.open(claim_id if plain_file else name, FILE_FLAGS,
                             dir_fd=src.dir_fd(where))
            except BlockingIOError:  # a write lease
                busy.append(rel)
                continue
            except OSError:
                continue  # gone or no longer a file: the copy will tell
            try:
                if _writers(fd):
                    busy.append(rel)
            finally:
                os.close(fd)
    return busy


def _open_source(src_dir: int, name: str, rel: str, f: FilePlan) -> int:
    try:
        return os.open(name, FILE_FLAGS, dir_fd=src_dir)
    except BlockingIOError:
        # Someone holds a write lease on it (taken before the claim): a
        # program still at work on the file. O_NONBLOCK keeps us from waiting.
        raise _changed(rel, f, "is held by a program (a lease)") from None


def _unwritten(src: int, rel: str, f: FilePlan) -> os.stat_result:
    """fstat of the open source once it is proven that nobody writes to it; else EntryBusy."""
    st = os.fstat(src)
    if st.st_uid != os.geteuid():
        raise EntryFailed(_SWAPPED)  # the lockdown gave every planned file to us
    if not stat.S_ISREG(st.st_mode) or st.st_size != f.size or st.st_mtime_ns != f.mtime_ns:
        raise _changed(rel, f, "changed after the entry was claimed")
    writers = _writers(src)
    if writers:
        raise _changed(rel, f, "is still open for writing by a program")
    if writers is None and st.st_ctime_ns >= _tick_start():
        # No lease here: a write in this same tick would leave the ctime as
        # it is. Wait for the next tick, then the ctime tells.
        _next_tick()
        st = os.fstat(src)
        if st.st_size != f.size or st.st_mtime_ns != f.mtime_ns:
            raise _changed(rel, f, "changed after the entry was claimed")
    return st


def _writers(fd: int) -> bool | None:
    """Whether anyone has the file open for writing; None where the filesystem cannot tell."""
    if faults.no_leases():
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as e:
        if e.errno == errno.EAGAIN:
            return True
        if e.errno in (errno.EINVAL, errno.ENOSYS, errno.ENOLCK):
            return None  # NFS, FUSE, fs.leases-enable=0: timestamps only
        if e.errno == errno.EACCES:
            # Leases need the file's owner; after the lockdown that is us. A
            # file that is not ours was swapped in: never read it as the entry's.
            raise EntryFailed(_SWAPPED) from None
        raise
    # Kept until the file is closed, which drops it (one system call less a
    # file; `process` ignores the SIGIO a writer's open() would send).
    return False


# The clock the kernel stamps inodes with (current_time()); Python has no name for it.
_CLOCK_REALTIME_COARSE = 5  # <linux/time.h>


def _tick_start() -> int:
    """When the current tick of the clock the kernel stamps files with began (ns)."""
    return time.clock_gettime_ns(_CLOCK_REALTIME_COARSE)


def _next_tick() -> None:
    now = _tick_start()
    while _tick_start() == now:
        time.sleep(0.001)


def _moved(before: os.stat_result, after: os.stat_result) -> bool:
    return (before.st_size, before.st_mtime_ns, before.st_ctime_ns) != \
        (after.st_size, after.st_mtime_ns, after.st_ctime_ns)


def _changed(rel: str, f: FilePlan, how: str) -> EntryBusy:
    name = join(rel, f.name)
    return EntryBusy([name], f"{printable(name)} {how}; nothing of this entry was "
                     "published, it is kept for a later run")
