"""The owner, group and modes every delivered inode gets, and how they are given."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, replace

from .errors import ConfigError
from .plan import FilePlan


@dataclass(frozen=True)
class Ownership:
    """Owner, group and modes every delivered inode gets."""

    uid: int  # the service user
    gid: int  # the study's group; -1: the destination's (see for_destination)
    file_mode: int
    dir_mode: int
    # The service user's own group: a claimed entry gets it at lockdown, so
    # admins in it can read what is in processing/, done/ and failed/.
    service_gid: int = -1

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

    def for_destination(self, dest_fd: int) -> Ownership:
        """With the destination's group where the study names none (gid -1)."""
        return self if self.gid >= 0 else replace(self, gid=os.fstat(dest_fd).st_gid)

    def mode_for(self, f: FilePlan) -> int:
        if f.executable:
            # An executable keeps x where the configured mode grants r.
            return self.file_mode | ((self.file_mode & 0o444) >> 2)
        return self.file_mode
