"""The hostile-input cases: what an uploader can put in an entry, and what must happen.

Each builder makes one entry in the inbox as the throwaway uploader `ra` would leave it
and says what a delivery must give: the files (delivered) or the name the reason names.
"""

from __future__ import annotations

import os
import socket
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from random import Random

from ..conftest import Env, ThrowawayUser, add_user, mount_tmpfs
from . import DELIVERED, FAILED, KEPT, REJECTED, Expect, trials


@dataclass(frozen=True)
class Race:
    """An uploader's shell, in the entry's top from before the claim, acting after it.

    `script` runs as the uploader once the service is held at `point`; each of `ops`
    that succeeds is a breach of the lockdown.
    """

    point: str
    ops: tuple[str, ...] = ()
    may_act: bool = False  # ops before the takeover may succeed; nothing may stay writable
    script: str = ""
    release: bool = False  # the shell holds something until the first run ends


@dataclass(frozen=True)
class Built:
    """What a delivery of the entry must give."""

    files: dict[str, bytes] = field(default_factory=dict)
    names: str = ""  # a failed entry's reason must name this
    dirs: tuple[str, ...] = ()  # directories the delivery must create
    race: Race | None = None
    then: dict[str, bytes] | None = None  # kept first, then delivered with these files


@dataclass(frozen=True)
class Ctx:
    env: Env
    svc: ThrowawayUser
    ra: ThrowawayUser
    rnd: Random
    base: Path


Builder = Callable[[Ctx], Built]


@dataclass(frozen=True)
class Case:
    name: str
    does: str
    expect: Expect
    build: Builder
    reduced: int = 1
    full: int = 3

    @property
    def trials(self) -> int:
        return trials(self.reduced, self.full)


def data(ctx: Ctx, lo: int = 0, hi: int = 4096) -> bytes:
    return ctx.rnd.randbytes(ctx.rnd.randint(lo, hi))


def own(ctx: Ctx, top: Path) -> None:
    for p in [top, *top.rglob("*")]:
        os.lchown(p, ctx.ra.uid, ctx.ra.gid)


def drop(ctx: Ctx, files: dict[str, bytes], extra: Callable[[Path], object] | None = None,
         name: str = "e", reown: bool = False) -> Path:
    """Build the entry as `.name`, the uploader's, add `extra` (its own owners), rename."""
    tmp = ctx.env.study.inbox / ("." + name)
    tmp.mkdir()
    for rel, content in files.items():
        p = tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
    own(ctx, tmp)
    if extra is not None:
        extra(tmp)
        if reown:  # what extra made is the uploader's too
            own(ctx, tmp)
    final = ctx.env.study.inbox / name
    os.rename(tmp, final)
    return final


def delivered(files: dict[str, bytes]) -> Callable[[Ctx], Built]:
    """A case whose files (fixed names, seeded content) must be delivered as they are."""
    def build(ctx: Ctx) -> Built:
        got = {rel: data(ctx) for rel in files}
        drop(ctx, got)
        return Built(got)
    return build


def chain(top: Path, name: str, levels: int, owner: ThrowawayUser,
          leaf: str = "f.txt") -> str:
    """top/name/... `levels` deep with a file at the bottom, owner's, made by fds (no
    PATH_MAX, no recursion)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.fchown(sub, owner.uid, owner.gid)
            os.close(fd)
            fd = sub
        out = os.open(leaf, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, b"bottom")
        os.fchown(out, owner.uid, owner.gid)
        os.close(out)
    finally:
        os.close(fd)
    return "/".join([name] * levels + [leaf])


def chained(name: str, levels: int, leaf: str = "f.txt", ok: bool = False) -> Builder:
    def build(ctx: Ctx) -> Built:
        rel: list[str] = []
        drop(ctx, {}, lambda t: rel.append(chain(t, name, levels, ctx.ra, leaf)))
        return Built({rel[0]: b"bottom"} if ok else {}, names="")
    return build


def past_path_max_with_destination(ctx: Ctx) -> Built:
    # Fits Linux's limit on its own, not below the destination's path.
    room = 4095 - 2 - len(os.fsencode(str(ctx.env.study.destination)))
    levels = room // 201
    leaf = "z" * min(255, room - levels * 201 + 40)
    drop(ctx, {}, lambda t: chain(t, "b" * 200, levels, ctx.ra, leaf))
    return Built()


def special(kind: str, where: str = "inside") -> Builder:
    """An entry holding (or being) a FIFO, socket, device node or symlink."""
    def make(path: Path, ctx: Ctx) -> None:
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "socket":
            s = socket.socket(socket.AF_UNIX)
            s.bind(str(path))
            s.close()
        elif kind == "device":
            os.mknod(path, 0o666 | 0o020000, os.makedev(1, 3))
        elif kind == "symlink-out":
            path.symlink_to("/etc/passwd")
        elif kind == "symlink-in":
            path.symlink_to("a.txt")
        else:
            path.symlink_to("nowhere/at/all")
        os.lchown(path, ctx.ra.uid, ctx.ra.gid)

    def build(ctx: Ctx) -> Built:
        if where == "entry":
            tmp = ctx.env.study.inbox / ".e"
            make(tmp, ctx)
            os.rename(tmp, ctx.env.study.inbox / "e")
            return Built(names="e")
        drop(ctx, {"a.txt": data(ctx)}, lambda t: make(t / "sub-node", ctx))
        return Built(names="sub-node")
    return build


def names_case(names: list[bytes]) -> Builder:
    def build(ctx: Ctx) -> Built:
        got = {os.fsdecode(n): data(ctx) for n in names}
        drop(ctx, got)
        return Built(got)
    return build


def hostile_entry_name(ctx: Ctx) -> Built:
    files = {"a.txt": data(ctx)}
    drop(ctx, files, name="red\x1b[31m\rover\nline\u202eevil" + os.fsdecode(b"\xff"))
    return Built(files)


def normalization(ctx: Ctx) -> Built:
    nfc = unicodedata.normalize("NFC", "café.txt")
    nfd = unicodedata.normalize("NFD", "café.txt")
    files = {nfc: data(ctx), nfd: data(ctx), "Data.txt": data(ctx), "data.txt": data(ctx),
             "DATA.TXT": data(ctx)}
    drop(ctx, files)
    return Built(files)


def hard_link_outside(ctx: Ctx) -> Built:
    outside = ctx.base / "ra-file"
    outside.write_bytes(b"elsewhere")
    os.chown(outside, ctx.ra.uid, ctx.ra.gid)
    drop(ctx, {"b.txt": data(ctx)}, lambda t: os.link(outside, t / "linked.txt"))
    return Built(names="linked.txt")


def hard_link_inside(ctx: Ctx) -> Built:
    drop(ctx, {"a.txt": data(ctx)}, lambda t: os.link(t / "a.txt", t / "twin.txt"))
    return Built(names="twin.txt")


def moded(mode: int, rel: str = "f.bin", dir_mode: int | None = None,
          fails: bool = False) -> Builder:
    def build(ctx: Ctx) -> Built:
        files = {rel: data(ctx, 1)}
        def chmod(t: Path) -> None:
            os.chmod(t / rel, mode)
            if dir_mode is not None:
                os.chmod((t / rel).parent, dir_mode)
        drop(ctx, files, chmod)
        return Built(names=rel) if fails else Built(files)
    return build


def set_id_entry(ctx: Ctx) -> Built:
    tmp = ctx.env.study.inbox / ".tool"
    tmp.write_bytes(data(ctx, 1))
    os.chown(tmp, ctx.ra.uid, ctx.ra.gid)
    os.chmod(tmp, 0o4755)
    os.rename(tmp, ctx.env.study.inbox / "tool")
    return Built(names="tool")


def other_users_file(ctx: Ctx) -> Built:
    stranger = add_user("dh-test-rb")
    drop(ctx, {"mine.txt": data(ctx), "theirs.txt": data(ctx)},
         lambda t: os.chown(t / "theirs.txt", stranger.uid, stranger.gid))
    return Built(names="theirs.txt")


def entry_of_a_non_uploader(ctx: Ctx) -> Built:
    ctx.env.reload(uploaders=["dh-test-uploaders"])  # ra is a member, dh-test-rb is not
    stranger = add_user("dh-test-rb")
    def theirs(t: Path) -> None:
        for p in [t, *t.rglob("*")]:
            os.lchown(p, stranger.uid, stranger.gid)
    drop(ctx, {"a.txt": data(ctx)}, theirs)
    return Built(names="dh-test-rb")


def small_destination(ctx: Ctx, mib: int = 16) -> None:
    dest = ctx.env.study.destination
    mount_tmpfs(dest, f"size={mib}m")
    os.chown(dest, ctx.svc.uid, ctx.svc.gid)


def sparse_huge(ctx: Ctx) -> Built:
    small_destination(ctx)
    def extra(t: Path) -> None:
        with open(t / "huge.img", "wb") as f:
            f.truncate(1 << 40)  # 1 TiB of holes on a 16 MiB destination
        os.chown(t / "huge.img", ctx.ra.uid, ctx.ra.gid)
    drop(ctx, {"a.txt": data(ctx)}, extra)
    return Built()


def no_room_now(ctx: Ctx) -> Built:
    small_destination(ctx)
    filler = ctx.env.study.destination / "filler.bin"
    filler.write_bytes(b"\0" * (12 << 20))
    files = {"big.bin": ctx.rnd.randbytes(6 << 20)}
    drop(ctx, files)
    return Built({"filler.bin": b"\0" * (12 << 20)}, then=None)


def sparse_fits(ctx: Ctx) -> Built:
    small_destination(ctx)
    content = b"\0" * (4 << 20) + b"end"
    drop(ctx, {"holes.img": content})
    return Built({"holes.img": content})


def empty_file_entry(ctx: Ctx) -> Built:
    tmp = ctx.env.study.inbox / ".empty.dat"
    tmp.write_bytes(b"")
    os.chown(tmp, ctx.ra.uid, ctx.ra.gid)
    os.rename(tmp, ctx.env.study.inbox / "empty.dat")
    return Built({"empty.dat": b""})


def empty_dirs(ctx: Ctx) -> Built:
    def dirs(t: Path) -> None:
        for d in ("x/y/z", "w"):
            (t / d).mkdir(parents=True)
    drop(ctx, {"a.txt": b""}, dirs, reown=True)
    return Built({"a.txt": b""}, dirs=("x/y/z", "w"))


def many_files(count: int) -> Builder:
    def build(ctx: Ctx) -> Built:
        files = {f"d{i % 100:02d}/f{i:06d}": b"%d\n" % i for i in range(count)}
        drop(ctx, files)
        return Built(files)
    return build


def future_date(ctx: Ctx) -> Built:
    drop(ctx, {"old.txt": data(ctx)}, lambda t: os.utime(t / "old.txt", (0, 10_500_000_000),
                                                         follow_symlinks=False))
    return Built(names="old.txt")


def conflict(ctx: Ctx) -> Built:
    (ctx.env.study.destination / "a.txt").write_bytes(b"already there")
    drop(ctx, {"a.txt": b"other", "b.txt": data(ctx)})
    return Built({"a.txt": b"already there"}, names="a.txt")


def incoming_top(ctx: Ctx) -> Built:
    drop(ctx, {".incoming-x/f.txt": data(ctx)})
    return Built(names=".incoming-x")


def raced(ops: tuple[str, ...], point: str = "checked") -> Builder:
    """The uploader's shell, held in the entry, tries ops after the lockdown: all refused.

    At a `taking:` point the walk holds a directory not yet taken: ops may succeed there,
    but nothing may be left writable once it is."""
    def build(ctx: Ctx) -> Built:
        files = {"a.txt": b"original\n", "sub/b.txt": data(ctx)}
        drop(ctx, files, name=".e-held")  # renamed into place by the driver, shell inside
        return Built(files, race=Race(point, ops=ops, may_act=point.startswith("taking:")))
    return build


def writer_after_claim(ctx: Ctx) -> Built:
    files = {"a.txt": b"first\n", "b.txt": data(ctx)}
    drop(ctx, files, name=".e-held")
    script = "exec 3>>a.txt; wait_act; echo more >&3; acted; wait_release; exec 3>&-"
    return Built(files, race=Race("checked", script=script, release=True),
                 then={**files, "a.txt": b"first\nmore\n"})


OUT = "{out}"  # a directory the uploader may write, outside the entry (the driver fills it in)
CASES: list[Case] = [
    Case("name-control-chars", "file names with ESC, CR, tab, DEL, C1 and bidi controls",
         Expect(DELIVERED), names_case([b"a\x01b\x1b[2Jc\x7f", b"tab\there\r",
                                        "c1\x9b31m\u202etxt.exe".encode()])),
    Case("name-newline", "a file name holding newlines (escaped in the manifest)",
         Expect(DELIVERED), names_case([b"line1\nline2.txt", b"\n", b"back\\slash\n"])),
    Case("name-invalid-utf8", "names that are not UTF-8", Expect(DELIVERED),
         names_case([b"caf\xe9.bin", b"\xff\xfe", b"\xc3\x28"])),
    Case("entry-name-hostile", "the entry's own name with controls and invalid UTF-8",
         Expect(DELIVERED), hostile_entry_name),
    Case("name-255-bytes", "a 255-byte name, ASCII and 3-byte UTF-8", Expect(DELIVERED),
         names_case([b"n" * 255, "€".encode() * 85])),
    Case("name-shell-meta", "names like options, quotes, $(...), globs, spaces",
         Expect(DELIVERED), names_case([b"-rf ", b" lead", b"trail ", b"$(id)`id`;|&",
                                        b"*?[a]", b"'\"", b"...", b"%n%s"])),
    Case("name-normalization-case", "names differing only by Unicode normalization or case",
         Expect(DELIVERED), normalization),
    Case("path-past-path-max", "a path of 20 x 250-byte directories (past PATH_MAX)",
         Expect(FAILED, "paths longer than Linux allows"), chained("a" * 250, 20)),
    Case("path-max-with-destination", "a path that fits alone, not below the destination",
         Expect(FAILED, "paths longer than Linux allows"), past_path_max_with_destination),
    Case("top-named-incoming", "a top-level directory named .incoming-x",
         Expect(FAILED, r"\.incoming-"), incoming_top),
    Case("fifo-inside", "a FIFO in the entry", Expect(FAILED, "sub-node"), special("fifo")),
    Case("socket-inside", "a Unix socket in the entry", Expect(FAILED, "sub-node"),
         special("socket")),
    Case("device-inside", "a character device (1,3) in the entry",
         Expect(FAILED, "sub-node"), special("device")),
    Case("symlink-outside", "a symlink to /etc/passwd in the entry",
         Expect(FAILED, "symlinks.*sub-node"), special("symlink-out")),
    Case("symlink-inside", "a symlink to a sibling file", Expect(FAILED, "symlinks.*sub-node"),
         special("symlink-in")),
    Case("symlink-dangling", "a dangling symlink", Expect(FAILED, "symlinks.*sub-node"),
         special("symlink-dangling")),
    Case("symlink-as-entry", "the entry itself is a symlink to /etc/passwd",
         Expect(FAILED, "symlink"), special("symlink-out", "entry")),
    Case("fifo-as-entry", "the entry itself is a FIFO", Expect(FAILED, "FIFO|fifo"),
         special("fifo", "entry")),
    Case("socket-as-entry", "the entry itself is a socket", Expect(FAILED, "socket"),
         special("socket", "entry")),
    Case("hard-link-outside", "a file hard-linked to the uploader's file outside",
         Expect(FAILED, "hard links"), hard_link_outside),
    Case("hard-link-inside", "two names of one file inside the entry",
         Expect(FAILED, "hard links"), hard_link_inside),
    Case("file-mode-0000", "a file of mode 0000", Expect(DELIVERED), moded(0o000)),
    Case("dir-mode-0000", "a directory of mode 0000 holding a file", Expect(DELIVERED),
         moded(0o644, "locked/f.bin", 0o000)),
    Case("setuid-file", "a setuid executable (the service cannot take it over)",
         Expect(FAILED, "setuid or setgid"), moded(0o4755, fails=True)),
    Case("setgid-exec-file", "a setgid, group-executable file",
         Expect(FAILED, "setuid or setgid"), moded(0o2750, fails=True)),
    Case("setgid-no-exec-file", "a setgid file without group x",
         Expect(FAILED, "setuid or setgid"), moded(0o2644, fails=True)),
    Case("setuid-as-entry", "the entry itself a setuid file",
         Expect(FAILED, "setuid or setgid"), set_id_entry),
    Case("sticky-setgid-dir", "a sticky, setgid, world-writable directory",
         Expect(DELIVERED), moded(0o644, "open/f.bin", 0o3777)),
    Case("other-users-file", "a file of another user inside the entry",
         Expect(FAILED, "owned by another user.*theirs.txt"), other_users_file),
    Case("non-uploader-entry", "an entry owned by a user outside the study's uploaders",
         Expect(REJECTED, "dh-test-rb|not"), entry_of_a_non_uploader),
    Case("sparse-far-larger", "a 1 TiB sparse file, destination a 16 MiB tmpfs",
         Expect(FAILED, "can never fit.*largest file, huge.img, is 1.1 TB"), sparse_huge),
    Case("sparse-fits", "a 4 MiB file of zeros (holes) to a 16 MiB tmpfs",
         Expect(DELIVERED), sparse_fits),
    Case("no-room-now", "6 MiB to a 16 MiB tmpfs holding 12 MiB",
         Expect(KEPT), no_room_now),
    Case("zero-byte-file", "a 0-byte file in an entry", Expect(DELIVERED),
         delivered({"zero": b"", "sub/zero2": b""})),
    Case("zero-byte-entry", "the entry itself a 0-byte file", Expect(DELIVERED),
         empty_file_entry),
    Case("empty-directories", "empty directories in the entry", Expect(DELIVERED), empty_dirs),
    Case("many-files", "an entry of 2,000 files (full run: 200,000)", Expect(DELIVERED),
         many_files(trials(2000, 200_000)), 1, 1),
    Case("depth-100", "directories 100 levels deep", Expect(DELIVERED),
         chained("d", 100, ok=True)),
    Case("depth-101", "directories 101 levels deep", Expect(FAILED, "nested deeper than 100"),
         chained("d", 101)),
    Case("depth-1200", "directories 1,200 levels deep",
         Expect(FAILED, "nested deeper than 100"), chained("d", 1200)),
    Case("dated-2302", "a file dated 2302", Expect(FAILED, "dated.*old.txt"), future_date),
    Case("conflict-in-destination", "a file whose name holds other content in the destination",
         Expect(FAILED, "a.txt"), conflict),
    Case("race-write-held-dir", "after the claim, the uploader's shell in the entry adds, "
         "removes and rewrites files", Expect(DELIVERED),
         raced(("touch new", "rm a.txt", "sh -c 'echo evil > a.txt'", "mkdir d",
                "sh -c 'echo x >> sub/b.txt'"))),
    Case("race-rename-after-claim", "after the claim, renames inside the held entry",
         Expect(DELIVERED), raced(("mv a.txt c.txt", "mv sub sub2", "mv sub/b.txt b2"))),
    Case("race-hard-link-after-claim", "after the claim, hard links to its files from outside",
         Expect(DELIVERED), raced((f"ln a.txt {OUT}/a", f"ln sub/b.txt {OUT}/b"))),
    Case("race-symlink-swap", "between walk and copy, a file replaced by a symlink",
         Expect(DELIVERED), raced(("sh -c 'rm -f a.txt && ln -s /etc/shadow a.txt'",
                                   "ln -sf /etc/shadow sub/b.txt"))),
    Case("race-chmod-during-takeover", "a chmod 777 while the walk holds a directory",
         Expect(DELIVERED), raced(("chmod 0777 sub", "chmod 0777 ."), "taking:sub")),
    Case("race-descriptor-writing", "a descriptor opened before the claim writes after it",
         Expect(KEPT), writer_after_claim),
]
