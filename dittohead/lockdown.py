"""Take a claimed entry from its uploader, inode by inode, as it is examined.

From the claim on, nobody but the service may add, remove, rename or replace
anything in an entry, through any path or directory held open. So each
directory is taken over (owner and group the service's, no write bit for
group or others) before its listing is read, and each file before it is
planned: parents first, a directory's contents are frozen before they are
looked at, and whatever is in a frozen directory stays there. An inode owned
by neither the uploader nor the service (already taken over by a killed run)
is never taken: the entry fails naming it. docs/design.md, "Lockdown".

What a lockdown cannot stop (writes through descriptors opened before it)
is a matter for the copy, which compares each file with what was planned.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import NoReturn

from .errors import ConfigError

# A taken file keeps its read and execute bits (x decides the delivered mode)
# and loses every write, set-id and sticky bit but the owner's; the owner (the
# service) can always read it. A directory: the same, and the owner's rwx.
_KEEP = 0o755


@dataclass(frozen=True)
class Lockdown:
    """Who an entry is taken from, and who takes it."""

    uploader: int  # uid, from the claim
    uid: int  # the service user
    gid: int  # the service user's group (admins in it read done/ and failed/)

    def owned(self, st: os.stat_result) -> bool:
        """Whether the inode may be in the entry: the uploader's, or already taken over.

        Root too delivers only its own files: a root-owned directory left
        where users may write could be filled with other users' files and
        moved into the inbox by anyone (the entry's owner is not who dropped it).
        """
        return st.st_uid in (self.uploader, self.uid)

    def take_dir(self, fd: int, st: os.stat_result) -> None:
        """Take over an open directory (st: its fstat)."""
        try:
            taken = (st.st_uid, st.st_gid) != (self.uid, self.gid)
            if taken:
                os.fchown(fd, self.uid, self.gid)
            mode = _mode(st, 0o700, taken)
            if mode is not None:
                os.fchmod(fd, mode)
        except OSError as e:
            _raise_why(e)

    def take_file(self, dir_fd: int, name: str, st: os.stat_result) -> None:
        """Take over a regular file by name in a directory already taken over.

        By name is safe there: nobody else can rename or replace anything in it.
        """
        try:
            taken = (st.st_uid, st.st_gid) != (self.uid, self.gid)
            if taken:
                os.chown(name, self.uid, self.gid, dir_fd=dir_fd, follow_symlinks=False)
            mode = _mode(st, 0o400, taken)
            if mode is not None:
                os.chmod(name, mode, dir_fd=dir_fd)  # a regular file: nothing to follow
        except OSError as e:
            _raise_why(e)


def _mode(st: os.stat_result, owner_bits: int, chowned: bool) -> int | None:
    """The mode a taken inode gets, or None where it has it already.

    Right after a chown it is always set: until the chown the uploader could
    chmod the inode (777, an ACL mask), so `st`, from before, proves nothing
    about the mode now. Computed from st all the same, every write bit for
    group and others goes; a chmod also narrows an ACL's mask to those bits.
    """
    mode = (stat.S_IMODE(st.st_mode) & _KEEP) | owner_bits
    return None if mode == stat.S_IMODE(st.st_mode) and not chowned else mode


def _raise_why(e: OSError) -> NoReturn:
    if e.errno in (errno.EPERM, errno.EACCES):
        raise ConfigError(
            f"cannot take a claimed entry over from its uploader ({e.strerror}): the "
            "service needs CAP_CHOWN (see dittohead@.service). The entry stays claimed "
            "in processing/.") from None
    raise e
