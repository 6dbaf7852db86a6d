"""The study's lock: one run (or undo) at a time changes a study's dropbox tree."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import TemporaryError
from .settings import StudyConfig


class StudyLock:
    """Exclusive per-study lock held for a whole run (flock on processing/)."""

    def __init__(self, study: StudyConfig) -> None:
        self.study = study
        self.fd = -1

    def __enter__(self) -> StudyLock:
        try:
            self.fd = os.open(self.study.processing, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise TemporaryError(
                f"{self.study.processing} does not exist: run `dittohead setup "
                f"{self.study.name}` (or is {self.study.root} not mounted?)") from None
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # releases the flock

    @contextmanager
    def released(self) -> Iterator[None]:
        """Let another run (an admin's) take the lock meanwhile, e.g. while waiting."""
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
