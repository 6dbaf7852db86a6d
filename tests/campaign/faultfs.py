"""A FUSE filesystem that passes through to a backing directory and fails chosen operations.

Run by Debian's python3 (python3-pyfuse3, which passes rename flags through):
    python3 faultfs.py BACKING MOUNTPOINT CONTROL
CONTROL is a JSON list of rules, re-read whenever it changes: {"op": "write", "path":
"<regex on the path in the mount>", "after": N, "errno": "EIO"} fails the op's calls on
matching paths after the first N with that error. Each injected failure is appended to
CONTROL.hits (op, path), so a test knows its fault was reached. Runs as root with
allow_other and default_permissions: the kernel checks permissions (and capabilities)
on the attributes passed through, this process creates as the caller (uid, group).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import stat
import sys
from typing import Any

import pyfuse3
import trio

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
AT_FDCWD = -100


class Faults:
    """The rules of CONTROL, their call counts, and the record of what was injected."""

    def __init__(self, control: str) -> None:
        self.control = control
        self.stamp: tuple[int, int] = (0, 0)
        self.rules: list[dict[str, Any]] = []
        self.calls: list[int] = []

    def _reload(self) -> None:
        try:
            st = os.stat(self.control)
        except FileNotFoundError:
            self.rules, self.calls, self.stamp = [], [], (0, 0)
            return
        if (st.st_mtime_ns, st.st_size) != self.stamp:
            with open(self.control) as f:
                self.rules = json.load(f)
            self.calls = [0] * len(self.rules)
            self.stamp = (st.st_mtime_ns, st.st_size)

    def check(self, op: str, path: bytes) -> None:
        """Raise the rule's error when a rule for op and path has had its N calls."""
        self._reload()
        text = os.fsdecode(path)
        for i, rule in enumerate(self.rules):
            if rule["op"] != op or not re.search(rule.get("path", ""), text):
                continue
            self.calls[i] += 1
            if self.calls[i] > int(rule.get("after", 0)):
                with open(self.control + ".hits", "a") as f:
                    f.write(json.dumps({"op": op, "path": text}) + "\n")
                raise pyfuse3.FUSEError(getattr(errno, rule["errno"]))


def _os_error(e: OSError) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(e.errno or errno.EIO)


class FaultFS(pyfuse3.Operations):  # type: ignore[misc]  # pyfuse3: Debian's, no stubs
    """Passthrough by path: FUSE inodes are numbered as (st_dev, st_ino) are first seen."""

    enable_writeback_cache = False

    def __init__(self, backing: str, faults: Faults) -> None:
        super().__init__()
        self.backing = os.fsencode(backing)
        self.faults = faults
        self.paths: dict[int, bytes] = {pyfuse3.ROOT_INODE: b""}
        self.inos: dict[tuple[int, int], int] = {}
        st = os.lstat(self.backing)
        self.inos[(st.st_dev, st.st_ino)] = pyfuse3.ROOT_INODE
        self.next_ino = pyfuse3.ROOT_INODE + 1
        self.fds: dict[int, bytes] = {}  # open backing descriptors, by their path

    def real(self, rel: bytes) -> bytes:
        return self.backing + (b"/" + rel if rel else b"")

    def rel(self, parent: int, name: bytes) -> bytes:
        base = self.paths[parent]
        return base + b"/" + name if base else name

    def _ino(self, st: os.stat_result, rel: bytes) -> int:
        key = (st.st_dev, st.st_ino)
        ino = self.inos.get(key)
        if ino is None:
            ino = self.inos[key] = self.next_ino
            self.next_ino += 1
        self.paths[ino] = rel
        return ino

    def _attr(self, st: os.stat_result, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = 0
        a.attr_timeout = 0
        for k in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                  "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(a, k, getattr(st, k))
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        return a

    def _entry(self, rel: bytes) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(self.real(rel))
        except OSError as e:
            raise _os_error(e) from None
        return self._attr(st, self._ino(st, rel))

    def _owned(self, rel: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """Give a new inode the caller's uid, and its gid unless the parent is setgid."""
        parent = os.path.dirname(self.real(rel))
        gid = -1 if os.stat(parent).st_mode & stat.S_ISGID else ctx.gid
        os.lchown(self.real(rel), ctx.uid, gid)
        return self._entry(rel)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self.rel(parent_inode, name))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self.paths[inode])

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        rel = self.paths[inode]
        path = self.real(rel)
        self.faults.check("setattr", rel)
        try:
            if fields.update_size:
                if fh is not None:
                    os.ftruncate(fh, attr.st_size)
                else:
                    os.truncate(path, attr.st_size)
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                os.lchown(path, attr.st_uid if fields.update_uid else -1,
                          attr.st_gid if fields.update_gid else -1)
            if fields.update_atime or fields.update_mtime:
                st = os.lstat(path)
                os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                   attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns),
                         follow_symlinks=False)
        except OSError as e:
            raise _os_error(e) from None
        return self._entry(rel)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.readlink(self.real(self.paths[inode]))

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        rel = self.paths[fh]
        try:
            names = sorted(os.listdir(self.real(rel)))
        except OSError as e:
            raise _os_error(e) from None
        for i, name in enumerate(names[start_id:], start_id):
            child = rel + b"/" + os.fsencode(name) if rel else os.fsencode(name)
            try:
                attr = self._entry(child)
            except pyfuse3.FUSEError:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.faults.check("fsync", self.paths[fh])

    async def _make(self, op: str, rel: bytes, ctx: pyfuse3.RequestContext,
                    do: Any) -> pyfuse3.EntryAttributes:
        self.faults.check(op, rel)
        try:
            do(self.real(rel))
            return self._owned(rel, ctx)
        except OSError as e:
            raise _os_error(e) from None

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._make("mkdir", self.rel(parent_inode, name), ctx,
                                lambda p: os.mkdir(p, stat.S_IMODE(mode)))

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._make("mknod", self.rel(parent_inode, name), ctx,
                                lambda p: os.mknod(p, mode, rdev))

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._make("symlink", self.rel(parent_inode, name), ctx,
                                lambda p: os.symlink(target, p))

    async def _remove(self, op: str, parent_inode: int, name: bytes) -> None:
        rel = self.rel(parent_inode, name)
        self.faults.check(op, rel)
        try:
            (os.rmdir if op == "rmdir" else os.unlink)(self.real(rel))
        except OSError as e:
            raise _os_error(e) from None

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove("unlink", parent_inode, name)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove("rmdir", parent_inode, name)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        old, new = self.rel(parent_inode_old, name_old), self.rel(parent_inode_new, name_new)
        self.faults.check("rename2" if flags else "rename", new)
        if _libc.renameat2(AT_FDCWD, self.real(old), AT_FDCWD, self.real(new), flags) != 0:
            raise pyfuse3.FUSEError(ctypes.get_errno())
        # A renamed directory moves every path under it.
        for ino, rel in list(self.paths.items()):
            if rel == old or rel.startswith(old + b"/"):
                self.paths[ino] = new + rel[len(old):]

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        rel = self.rel(new_parent_inode, new_name)
        self.faults.check("link", rel)
        try:
            os.link(self.real(self.paths[inode]), self.real(rel), follow_symlinks=False)
        except OSError as e:
            raise _os_error(e) from None
        return self._entry(rel)

    async def open(self, inode: int, flags: int,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        rel = self.paths[inode]
        self.faults.check("open", rel)
        try:
            fd = os.open(self.real(rel), flags & ~os.O_CREAT)
        except OSError as e:
            raise _os_error(e) from None
        self.fds[fd] = rel
        return pyfuse3.FileInfo(fh=fd)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                            pyfuse3.EntryAttributes]:
        rel = self.rel(parent_inode, name)
        self.faults.check("create", rel)
        try:
            fd = os.open(self.real(rel), flags | os.O_CREAT, stat.S_IMODE(mode))
            attr = self._owned(rel, ctx)
        except OSError as e:
            raise _os_error(e) from None
        self.fds[fd] = rel
        return pyfuse3.FileInfo(fh=fd), attr

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.faults.check("read", self.fds[fh])
        try:
            return os.pread(fh, size, off)
        except OSError as e:
            raise _os_error(e) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self.faults.check("write", self.fds[fh])
        try:
            return os.pwrite(fh, buf, off)
        except OSError as e:
            raise _os_error(e) from None

    async def flush(self, fh: int) -> None:
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        self.faults.check("fsync", self.fds[fh])
        try:
            (os.fdatasync if datasync else os.fsync)(fh)
        except OSError as e:
            raise _os_error(e) from None

    async def release(self, fh: int) -> None:
        self.fds.pop(fh, None)
        os.close(fh)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        self.faults.check("statfs", b"")
        st = os.statvfs(self.backing)
        out = pyfuse3.StatvfsData()
        for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                  "f_ffree", "f_favail", "f_namemax"):
            setattr(out, k, getattr(st, k))
        return out

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            return os.getxattr(self.real(self.paths[inode]), name, follow_symlinks=False)
        except OSError as e:
            raise _os_error(e) from None

    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        try:
            os.setxattr(self.real(self.paths[inode]), name, value, follow_symlinks=False)
        except OSError as e:
            raise _os_error(e) from None

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        try:
            return [os.fsencode(n) for n in
                    os.listxattr(self.real(self.paths[inode]), follow_symlinks=False)]
        except OSError as e:
            raise _os_error(e) from None

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        try:
            os.removexattr(self.real(self.paths[inode]), name, follow_symlinks=False)
        except OSError as e:
            raise _os_error(e) from None


def main() -> None:
    backing, mountpoint, control = sys.argv[1:4]
    os.umask(0)  # the kernel applied the caller's umask to the modes it passes
    fs = FaultFS(backing, Faults(control))
    options = set(pyfuse3.default_options)
    options |= {"fsname=dittohead-faultfs", "allow_other", "default_permissions"}
    pyfuse3.init(fs, mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
