"""Exceptions that carry the exit code the command ends with (borg style), and outcomes.

An entry's attempt ends in an Outcome; EntryFailed and EntryRejected carry
theirs, TemporaryError means RETRY_LATER.
"""

from __future__ import annotations

from enum import StrEnum

# Exit codes of `dittohead process`, fixed by the contract; sysexits.h values
# where one fits, so systemd and admins read them the usual way.
EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
# `upload --wait`: how the uploads ended, when not all were delivered.
EXIT_DATAERR = 65  # EX_DATAERR: an upload failed (a conflict, a symlink...)
# EX_NOPERM: an upload was rejected (not an uploader of the study); a command run by
# someone who may not run it (access.py).
EXIT_NOPERM = 77
EXIT_IOERR = 74  # EX_IOERR: the storage failed (EIO, read-only): an admin must look
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: entries were left for a later run
EXIT_CONFIG = 78  # EX_CONFIG


class Outcome(StrEnum):
    """How one attempt at an entry ended (the value is what receipts and the journal say)."""

    DELIVERED = "delivered"
    FAILED = "failed"  # can never be delivered as it is (a conflict, a symlink, ...)
    REJECTED = "rejected"  # its uploader may not deliver to the study
    RETRY_LATER = "retry-later"  # kept in processing/ for a later run (no space, ...)
    # The storage failed (EIO, a filesystem gone read-only): kept, the run exits 74.
    IO_ERROR = "io-error"
    ERROR = "error"  # unexpected (a bug): kept in processing/, the run exits 1
    # Delivered, then removed from the destination again by `dittohead undo`;
    # filed in failed/ (only receipts say it, never an attempt).
    UNDONE = "undone"


class DittoheadError(Exception):
    """Base class: the message is for humans, `exit_code` for the shell."""

    exit_code = EXIT_UNEXPECTED


class UsageError(DittoheadError):
    """The command line itself is wrong."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, prog: str = "dittohead") -> None:
        super().__init__(message)
        self.prog = prog  # what the message is printed after


class NotPermitted(DittoheadError):
    """The caller may not run this command (access.py says who may)."""

    exit_code = EXIT_NOPERM


class ConfigError(DittoheadError):
    """config.yaml (or the system state it names) is wrong; every problem in one message."""

    exit_code = EXIT_CONFIG

    def __init__(self, problems: list[str] | str, path: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        head = f"{path}: " if path else ""
        if len(self.problems) == 1:
            text = head + self.problems[0]
        else:
            text = head + f"{len(self.problems)} problems:\n" + "\n".join(
                "  " + p for p in self.problems
            )
        super().__init__(text)


class TemporaryError(DittoheadError):
    """A problem that a later run may not have (no space, destination not mounted)."""

    exit_code = EXIT_TEMPFAIL


class NoSpace(TemporaryError):
    """No room (space or inodes) for an entry: in its destination, or in the dropbox to
    claim it. Kept for later like any temporary problem, and told of (capacity.py)."""


class StorageError(DittoheadError):
    """The storage under the dropbox or a destination failed: an admin must look."""

    exit_code = EXIT_IOERR


class EntryBusy(TemporaryError):
    """Files of a claimed entry were written to after the claim, or still may be.

    Nothing of it is published; it is kept for a later run, and fails once it
    has been busy for longer than process.BUSY_LIMIT (`files` name them).
    """

    def __init__(self, files: list[str], why: str) -> None:
        super().__init__(why)
        self.files = files


class EntryFailed(DittoheadError):
    """The entry can never be delivered as it is; it goes to failed/ with this reason."""

    def __init__(self, reason: str, outcome: Outcome = Outcome.FAILED) -> None:
        super().__init__(reason)
        self.reason = reason
        self.outcome = outcome  # FAILED or REJECTED


class EntryRejected(EntryFailed):
    """The uploader may not deliver to this study."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, outcome=Outcome.REJECTED)
