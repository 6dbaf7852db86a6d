"""The delivery plan, spooled to disk so memory stays flat whatever the file count.

One record per directory (parents first, a subtree contiguous), file and
skipped name in `processing/.<id>.plan`; what later passes learn about each
record lives in a fixed-size slot of the mmapped `.<id>.state`, shared with
forked workers. docs/design.md, "The plan spool".
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .fsops import Source

_DIR = struct.Struct("<cHqq")  # kind, name length, atime_ns, mtime_ns
_FILE = struct.Struct("<cHQqq?")  # kind, name length, size, atime_ns, mtime_ns, executable
_SKIP = struct.Struct("<cH")
_D, _F, _S = b"DFS"  # record kinds, as the ints bytes indexing gives
_MAX_RECORD = _FILE.size + 65536  # the longest record: a header and a u16-long name
# A record's state slot: a flag byte, a sha256 digest and, for a staged file,
# its inode number (how publish, finish and rollback know a final name is ours).
_SLOT = struct.Struct("<B32sQ")
SLOT = _SLOT.size
CACHE_MAX = 100_000  # records kept parsed in memory (about 20 MB at most)

# Flags in a record's state slot.
PRESENT = 1  # a file already in the destination with the same content
COPIED = 2  # a file staged by this delivery (its digest is of the staged copy, read back)
EXISTS = 4  # a directory already in the destination
CREATED = 8  # a directory this delivery created


def spool_files(processing: Path, claim_id: str) -> tuple[Path, Path, Path]:
    """The plan, state and manifest-to-be of one claim in processing/ (hidden: not claims)."""
    plan = processing / f".{claim_id}.plan"
    return plan, plan.with_suffix(".state"), plan.with_suffix(".sha256")


def remove_spool(processing: Path, claim_id: str) -> None:
    """Remove the claim's spool files, and the part files workers write (`.<id>.<k>.*`)."""
    for p in spool_files(processing, claim_id):
        p.unlink(missing_ok=True)
    # (and the published record, manifest.published_paths(), spooled whole or in parts)
    part = re.compile(re.escape(f".{claim_id}.")
                      + r"([0-9]+\.(plan|sha256|published)|published|dirs)")
    with os.scandir(processing) as it:
        parts = [e.name for e in it if part.fullmatch(e.name)]
    for name in parts:
        (processing / name).unlink(missing_ok=True)


def keep_killed(processing: Path, claim_id: str) -> None:
    """Keep a killed attempt's plan and state (`.<id>.killed-<k>.*`) instead of removing them.

    They name what it may have published: should a later attempt fail, that
    is removed again (publish.undo_killed), so a failed entry leaves nothing
    in the destination.
    """
    plan, state, _ = spool_files(processing, claim_id)
    for half in _killed_states_alone(processing, claim_id):
        # A kill between the two renames below: finish that keep first.
        if plan.exists():
            plan.rename(half.with_suffix(".plan"))
        else:
            half.unlink()
    if not (plan.exists() and state.exists()):
        return
    kept = killed_plans(processing, claim_id)
    k = 1 + max((int(p.stem.rpartition("-")[2]) for p in kept), default=-1)
    target = processing / f".{claim_id}.killed-{k}.plan"
    state.rename(target.with_suffix(".state"))
    plan.rename(target)


def _killed_states_alone(processing: Path, claim_id: str) -> list[Path]:
    found = re.compile(re.escape(f".{claim_id}.killed-") + r"[0-9]+\.state")
    with os.scandir(processing) as it:
        states = [processing / e.name for e in it if found.fullmatch(e.name)]
    return [st for st in states if not st.with_suffix(".plan").exists()]


def killed_plans(processing: Path, claim_id: str) -> list[Path]:
    """The plans keep_killed() kept for this claim, oldest first."""
    found = re.compile(re.escape(f".{claim_id}.killed-") + r"([0-9]+)\.plan")
    with os.scandir(processing) as it:
        kept = [(int(m.group(1)), e.name) for e in it if (m := found.fullmatch(e.name))]
    return [processing / name for _, name in sorted(kept)]


def remove_killed(processing: Path, claim_id: str) -> None:
    """Forget what keep_killed() kept (the entry was delivered, or filed)."""
    for plan in killed_plans(processing, claim_id):
        plan.unlink(missing_ok=True)  # first: a plan never stays without its state
        plan.with_suffix(".state").unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class DirPlan:
    """A directory record; placed() yields copies with where it is staged filled in."""

    index: int  # record number (its state slot)
    rel: str  # relative to the destination and to the entry's top; "" for the top
    atime_ns: int
    mtime_ns: int
    # Where it is staged, relative to the staging directory (see place()):
    staged: str = ""
    new: bool = False  # not in the destination: staged as a directory, files by their names
    root: bool = False  # new, and its parent is not: published by renaming it into place

    def staged_name(self, f: FilePlan) -> str:
        """The name of one of its files in its staging directory."""
        return f.name if self.new else str(f.index)


@dataclass(slots=True)
class FilePlan:
    """A file record. Not frozen only because it is made once per file per pass (a frozen
    dataclass's __init__ costs twice as much); nothing changes one after parsing."""

    index: int
    name: str  # in the destination directory
    size: int
    atime_ns: int
    mtime_ns: int
    executable: bool

    def src_name(self, plan: Plan) -> str:
        """Its name in the source directory (a plain-file entry sits in processing/<id>)."""
        return plan.claim_id if plan.plain_file else self.name


@dataclass
class Plan:
    """The spooled plan of one claimed entry, and its running totals."""

    claim_id: str
    uploader_uid: int
    uploader: str
    path: Path  # processing/.<id>.plan
    plain_file: bool = False
    files: int = 0
    nbytes: int = 0
    dirs: int = 0
    skipped: int = 0
    skipped_sample: list[str] = field(default_factory=list)
    _out: BinaryIO | None = None
    _records: int = 0
    _cache: list[DirPlan | FilePlan | str] | None = None

    # --- writing (the walk) -------------------------------------------------

    def open_for_writing(self) -> BinaryIO:
        self._cache = None
        self._records = 0
        out = open(self.path, "wb")  # noqa: SIM115 - closed by close_writing()
        self._out = out
        return out

    @property
    def records_written(self) -> int:
        return self._records

    def part_path(self, worker: int) -> Path:
        """The part file a walking worker writes (examine.py puts the parts together)."""
        return self.path.with_suffix(f".{worker}.plan")

    def manifest_part(self, worker: int) -> Path:
        """The manifest lines of one copying worker's share (stage.py puts them together)."""
        return self.path.with_suffix(f".{worker}.sha256")

    def append_raw(self, data: bytes) -> None:
        """Append records another Plan wrote (count them with add_totals)."""
        assert self._out is not None
        self._out.write(data)

    def add_totals(self, records: int, files: int, nbytes: int, dirs: int, skipped: int,
                   skipped_sample: list[str]) -> None:
        self._records += records
        self.files += files
        self.nbytes += nbytes
        self.dirs += dirs
        self.skipped += skipped
        self.skipped_sample.extend(skipped_sample[:20 - len(self.skipped_sample)])

    def close_writing(self) -> None:
        assert self._out is not None
        self._out.close()
        self._out = None
        with open(self.state_path, "wb") as f:
            f.truncate(self._records * SLOT)

    def _write(self, data: bytes) -> None:
        assert self._out is not None
        self._out.write(data)
        self._records += 1

    def add_dir(self, rel: str, atime_ns: int, mtime_ns: int) -> None:
        raw = os.fsencode(rel)
        self._write(_DIR.pack(b"D", len(raw), atime_ns, mtime_ns) + raw)
        self.dirs += 1

    def add_file(self, name: str, size: int, atime_ns: int, mtime_ns: int,
                 executable: bool) -> None:
        raw = os.fsencode(name)
        self._write(_FILE.pack(b"F", len(raw), size, atime_ns, mtime_ns, executable) + raw)
        self.files += 1
        self.nbytes += size

    def add_skipped(self, rel: str) -> None:
        raw = os.fsencode(rel)
        self._write(_SKIP.pack(b"S", len(raw)) + raw)
        self.skipped += 1
        if len(self.skipped_sample) < 20:
            self.skipped_sample.append(rel)

    # --- reading (every later pass) -----------------------------------------

    @property
    def state_path(self) -> Path:
        return self.path.with_suffix(".state")

    @property
    def manifest_path(self) -> Path:
        """Where stage() puts the manifest together; record.py files it in done/."""
        return self.path.with_suffix(".sha256")

    def file_paths(self) -> Iterator[str]:
        """Every planned file's path relative to the entry's top, in plan order."""
        rel = ""
        for r in self.records():
            if isinstance(r, DirPlan):
                rel = r.rel
            elif isinstance(r, FilePlan):
                yield f"{rel}/{r.name}" if rel else r.name

    def records(self) -> Iterator[DirPlan | FilePlan | str]:
        """Every record in walk order: directories, their files, skipped paths (str)."""
        if self._cache is None and self._records <= CACHE_MAX:
            # Small plans are parsed once and kept: a bounded cost in memory
            # that saves re-reading the file in each of the passes.
            self._cache = list(self._parse())
        if self._cache is not None:
            yield from self._cache
        else:
            yield from self._parse()

    def _parse(self) -> Iterator[DirPlan | FilePlan | str]:
        # Runs once per record of every plan: kinds compared as ints and names
        # decoded directly (os.fsdecode's checks cost as much as the decoding).
        unpack_dir, unpack_file, unpack_skip = _DIR.unpack_from, _FILE.unpack_from, \
            _SKIP.unpack_from
        dir_size, file_size, skip_size = _DIR.size, _FILE.size, _SKIP.size
        enc = sys.getfilesystemencoding()
        with open(self.path, "rb") as f:
            buf = b""
            pos = 0
            index = 0
            eof = False
            while True:
                # Parse from an in-memory window; refill when a record may straddle
                # it, until the end of the file (not again for each record after).
                if not eof and len(buf) - pos < _MAX_RECORD:
                    more = f.read(1 << 20)
                    eof = not more
                    buf = buf[pos:] + more
                    pos = 0
                if pos >= len(buf):
                    return
                kind = buf[pos]
                if kind == _F:
                    _, n, size, atime, mtime, ex = unpack_file(buf, pos)
                    pos += file_size
                    yield FilePlan(index, buf[pos:pos + n].decode(enc, "surrogateescape"),
                                   size, atime, mtime, ex)
                elif kind == _D:
                    _, n, atime, mtime = unpack_dir(buf, pos)
                    pos += dir_size
                    yield DirPlan(index, buf[pos:pos + n].decode(enc, "surrogateescape"),
                                  atime, mtime)
                elif kind == _S:
                    _, n = unpack_skip(buf, pos)
                    pos += skip_size
                    yield buf[pos:pos + n].decode(enc, "surrogateescape")
                else:
                    raise ValueError(f"{self.path}: corrupt plan record {kind!r}")
                pos += n
                index += 1

    def placed(self, state: State) -> Iterator[DirPlan | FilePlan | str]:
        """records(), each directory as a copy with its place in staging set (see place())."""
        root: DirPlan | None = None
        for r in self.records():
            if isinstance(r, DirPlan):
                r, root = place(r, state, root)
            yield r

    def iter_dirs(self) -> Iterator[DirPlan]:
        for r in self.records():
            if isinstance(r, DirPlan):
                yield r

    def iter_files(self) -> Iterator[tuple[DirPlan, FilePlan]]:
        """Each file with its directory (the DirPlan object is shared by its files)."""
        d: DirPlan | None = None
        for r in self.records():
            if isinstance(r, DirPlan):
                d = r
            elif isinstance(r, FilePlan):
                assert d is not None
                yield d, r

    def iter_skipped(self) -> Iterator[str]:
        for r in self.records():
            if isinstance(r, str):
                yield r

    def state(self) -> State:
        return State(self.state_path)

    def source(self) -> Source:
        """The entry's directories, as the claim left them in processing/."""
        return Source(self.path.parent, self.claim_id, self.plain_file)


def place(d: DirPlan, state: State, root: DirPlan | None) -> tuple[DirPlan, DirPlan | None]:
    """d with where it is staged, and the new directory its subtree is staged under, if any.

    A directory already in the destination gets a bucket `<index>` whose files
    are named by their record numbers and published one by one. A new one
    whose parent exists is staged as `<index>` holding its whole subtree under
    the final names, and published by one rename. Records come parents first
    and a subtree is contiguous, so the last such root is the only one needed.
    """
    i, rel, atime, mtime = d.index, d.rel, d.atime_ns, d.mtime_ns
    if not rel or state.flags(i) & EXISTS:
        return DirPlan(i, rel, atime, mtime, str(i), False, False), None
    if root is not None and rel.startswith(root.rel + "/"):
        return DirPlan(i, rel, atime, mtime, root.staged + rel[len(root.rel):], True, False), root
    placed = DirPlan(i, rel, atime, mtime, str(i), True, True)
    return placed, placed


class State:
    """Random access to the per-record slots (flags and a sha256 digest), mmapped."""

    def __init__(self, path: Path) -> None:
        with open(path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            # mmap refuses an empty file; a plan with no records has no slots.
            self.map = mmap.mmap(f.fileno(), size) if size else None

    def flags(self, index: int) -> int:
        assert self.map is not None
        return self.map[index * SLOT]

    def digest(self, index: int) -> bytes:
        assert self.map is not None
        return self.map[index * SLOT + 1:index * SLOT + 33]

    def inode(self, index: int) -> int:
        """The inode number stage() recorded for a COPIED file."""
        assert self.map is not None
        return int.from_bytes(self.map[index * SLOT + 33:(index + 1) * SLOT], "little")

    def set(self, index: int, flags: int, digest: bytes | None = None) -> None:
        assert self.map is not None
        self.map[index * SLOT] = flags
        if digest is not None:
            self.map[index * SLOT + 1:index * SLOT + 33] = digest

    def set_inode(self, index: int, inode: int) -> None:
        """Record the inode number of a staged new directory."""
        assert self.map is not None
        self.map[index * SLOT + 33:(index + 1) * SLOT] = inode.to_bytes(8, "little")

    def set_copied(self, index: int, digest: bytes, inode: int) -> None:
        assert self.map is not None
        _SLOT.pack_into(self.map, index * SLOT, COPIED, digest, inode)

    def add_flag(self, index: int, flag: int) -> None:
        self.set(index, self.flags(index) | flag)

    def close(self) -> None:
        if self.map is not None:
            self.map.close()

    def __enter__(self) -> State:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
