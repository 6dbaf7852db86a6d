"""The configuration as typed, frozen dataclasses: what config.py builds from the file.

Kept apart from the loading and validation so that every stage can import
the types without the validator, and `upload --host` (on a lab machine)
without a YAML parser.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .log import printable

NOTIFY_EVENTS = ("delivered", "failed", "rejected", "disk")
# Seconds an entry must go unchanged before it is taken (dittohead/readiness.py):
# longer than a Windows SMB client's 60 s session timeout on a stalled
# connection. config.yaml and docs/contract.md say why.
DEFAULT_QUIET_PERIOD = 120.0
# done/ is a second copy, kept while the study checks what arrived: a month
# covers a monthly data review (docs/contract.md, "Retention").
DEFAULT_KEEP_DONE_DAYS = 30.0
DEFAULT_ABANDONED_DAYS = 7.0
DEFAULT_FAILED_WARN_DAYS = 14.0
# Days: a month's warning leaves time to order and mount more storage.
DEFAULT_FORECAST_WARN_DAYS = 30
# The dropbox's own filesystem: percentages at which each study's run warns.
DEFAULT_DROPBOX_WARN_PERCENT = (90, 95)


@dataclass(frozen=True)
class SmtpConfig:
    host: str = "localhost"
    port: int = 25
    starttls: bool = False
    username: str | None = None
    password_file: Path | None = None


@dataclass(frozen=True)
class NotifyConfig:
    sender: str | None = None  # `from:` in the file
    smtp: SmtpConfig = SmtpConfig()
    uploader_address: str | None = None  # a format string with {user}


@dataclass(frozen=True)
class StudyNotify:
    to: tuple[str, ...] = ()
    on: frozenset[str] = frozenset(NOTIFY_EVENTS)


@dataclass(frozen=True)
class StudyConfig:
    name: str
    root: Path  # <dropbox_root>/<study>
    destination: Path
    group: str | None  # None: the destination's group
    uploaders: tuple[str, ...] | None  # None: any local user
    file_mode: int
    dir_mode: int
    ignore: tuple[str, ...]
    disk_warn_percent: tuple[int, ...]
    notify: StudyNotify
    quiet_period: float = DEFAULT_QUIET_PERIOD
    # Retention (dittohead/purge.py): days done/<id>/ is kept after its receipt's
    # `finished` (None: for ever); days a .name upload may go unchanged before it
    # is abandoned; days a failed entry may wait before `check` names it.
    keep_done_days: float | None = DEFAULT_KEEP_DONE_DAYS
    abandoned_days: float = DEFAULT_ABANDONED_DAYS
    failed_warn_days: float = DEFAULT_FAILED_WARN_DAYS
    purge_abandoned: bool = False
    # Warn when the destination is forecast to fill within this many days (None: never).
    forecast_warn_days: int | None = DEFAULT_FORECAST_WARN_DAYS

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def users(self) -> Path:
        return self.root / "users"

    @property
    def processing(self) -> Path:
        return self.root / "processing"

    @property
    def done(self) -> Path:
        return self.root / "done"

    @property
    def failed(self) -> Path:
        return self.root / "failed"


@dataclass(frozen=True)
class Config:
    path: Path
    dropbox_root: Path
    service_user: str
    notify: NotifyConfig
    studies: Mapping[str, StudyConfig]
    dropbox_warn_percent: tuple[int, ...] = DEFAULT_DROPBOX_WARN_PERCENT

    def study(self, name: str) -> StudyConfig:
        """The named study, or a ConfigError listing the known ones."""
        try:
            return self.studies[name]
        except KeyError:
            known = ", ".join(sorted(self.studies)) or "none"
            raise ConfigError(
                f"studies.{printable(name)}: no such study in the config (known: {known})",
                printable(str(self.path)),
            ) from None
