"""Stage an entry's files in `<destination>/.incoming-<id>`, on the destination's filesystem.

A directory the destination lacks is staged whole, under its final names,
to be published by one rename; the files of one it has go into a bucket
each, to be renamed one by one. Staged inodes get their final owner, mode
and mtime, so publishing changes nothing but names. docs/design.md, "Stage".
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from . import faults, parallel
from .copier import Copier
from .errors import ConfigError
from .faults import point
from .fsops import DIR_FLAGS, DirCache
from .manifest import Manifest, dir_line, published_part, published_paths
from .ownership import Ownership
from .plan import PRESENT, DirPlan, FilePlan, Plan, State

STAGING_PREFIX = ".incoming-"


class Staging:
    """The staging directory of one delivery: made on entering, removed with all in it on exit.

    Whatever happens inside, nothing staged outlives the block: before
    publishing, removing it undoes everything; after, it holds only
    leftovers (emptied buckets, names the link() fallback left).
    """

    def __init__(self, dest_fd: int, claim_id: str, destination: Path) -> None:
        self.dest_fd = dest_fd
        self.claim_id = claim_id
        self.name = staging_name(claim_id)
        self.destination = str(destination)  # to check it still leads to dest_fd
        self.fd = -1

    def __enter__(self) -> Staging:
        os.mkdir(self.name, 0o700, dir_fd=self.dest_fd)
        self.fd = os.open(self.name, DIR_FLAGS, dir_fd=self.dest_fd)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
        self.fd = -1
        remove_staging(self.dest_fd, self.claim_id)


def staging_name(claim_id: str) -> str:
    return STAGING_PREFIX + claim_id


def remove_staging(dest_fd: int, claim_id: str) -> bool:
    """Remove a (possibly half-built) staging directory; True if one was there."""
    name = staging_name(claim_id)
    try:
        st = os.stat(name, dir_fd=dest_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o777 != 0o700:
        # Not one we made (each is a directory rwx------, setgid in a setgid
        # destination; its owner is whoever ran the killed attempt, the
        # service or an admin by hand): someone's data under our name. Never
        # remove it; an admin must move it away.
        raise ConfigError(f"{name} in the destination is not a staging directory of "
                          "dittohead, but its name is reserved for one: move it away")
    # shutil's fd-based walk never follows a symlink (not that any could be
    # in there: the directory is the service's own, mode 0700).
    shutil.rmtree(name, dir_fd=dest_fd)
    return True


def stage(plan: Plan, staging: Staging, owner: Ownership) -> None:
    """Copy, hash and verify every file not yet in the destination into staging.

    Also writes the manifest to plan.manifest_path: a line for every file,
    those already delivered included, in plan order (the copying workers
    write their shares' lines as they go); and the published record: the
    lines of the files copied now and the directories made now
    (manifest.published_paths()), which is what `undo` may remove.
    """
    fd = staging.fd
    with plan.state() as state:
        n = parallel.workers_for(plan)
        published, dirs_path = published_paths(plan.path)
        with open(dirs_path, "wb") as dirs:
            bounds = _make_dirs(plan, state, fd, owner, n, dirs)
        parallel.run(n, lambda k: _copy_share(plan, state, fd, owner, bounds[k],
                                              bounds[k + 1], k))
    _join_parts(n, plan.manifest_part, plan.manifest_path)
    _join_parts(n, lambda k: published_part(plan.path, k), published)


def _make_dirs(plan: Plan, state: State, staging_fd: int, owner: Ownership,
               shares: int, dirs: BinaryIO) -> list[int]:
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
                dirs.write(dir_line(os.fsencode(d.rel)))
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


def _copy_share(plan: Plan, state: State, staging_fd: int, owner: Ownership, lo: int, hi: int,
                share: int) -> None:
    """Copy the files whose record numbers are in [lo, hi); write their manifest lines.

    The lines of files already delivered are written too, so the parts of
    all shares, joined in order, are the whole manifest in plan order; the
    published part gets the lines of the files copied now only.
    """
    copied = 0
    with plan.source() as src, DirCache(staging_fd) as staged, \
            Copier(staging_fd) as copier, Manifest(plan.manifest_part(share)) as manifest, \
            Manifest(published_part(plan.path, share)) as published:
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
            published.write(manifest.add(d.rel, r.name, digest))
            copied += 1
            if faults.enabled():
                point(f"staged:{copied}")


def _join_parts(parts: int, part_path: Callable[[int], Path], path: Path) -> None:
    """Put the shares' parts (of the manifest or published record) together, in order."""
    if parts == 1:
        part_path(0).rename(path)
        return
    with open(path, "wb") as out:
        for k in range(parts):
            part = part_path(k)
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


