"""Load and validate config.yaml into frozen dataclasses.

Validation collects every problem, each with its key path
(`studies.nccam3.destination: must be an absolute path`), and raises one
ConfigError (exit 78) naming them all, so an admin fixes the file in one go.
Only the file is checked here; whether users, groups and directories exist
is the business of `dittohead check` and of the run that needs them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from . import DEFAULT_CONFIG_PATH
from .configops import forecast_days, percentages, retention
from .errors import ConfigError
from .log import printable
from .settings import (
    DEFAULT_DROPBOX_WARN_PERCENT,
    DEFAULT_FORECAST_WARN_DAYS,
    DEFAULT_QUIET_PERIOD,
    NOTIFY_EVENTS,
    Config,
    NotifyConfig,
    SmtpConfig,
    StudyConfig,
    StudyNotify,
)

__all__ = ["DEFAULT_CONFIG", "DEFAULT_QUIET_PERIOD", "NOTIFY_EVENTS", "Config", "NotifyConfig",
           "SmtpConfig", "StudyConfig", "StudyNotify", "config_path", "load", "parse"]

DEFAULT_CONFIG = Path(DEFAULT_CONFIG_PATH)
# Every pattern here is used with fullmatch: "$" would accept a trailing newline.
STUDY_RE = re.compile(r"[a-z0-9][a-z0-9_]{0,63}")
# Debian's adduser default NAME_REGEX, plus what groups and sysusers accept.
UNIX_NAME_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}\$?")
# One {user} and no other placeholder: str.format on anything else could
# reach attributes of the user name ("{user.__class__}").
UPLOADER_ADDRESS_RE = re.compile(r"[^{}\s]*\{user\}[^{}\s]*")
# Paths go into generated unit files unquoted (dittohead/generator.py), so
# refuse what would need escaping there: whitespace, quotes, backslashes, "%"
# specifiers, glob characters (PathExistsGlob=) and non-ASCII.
SAFE_PATH_RE = re.compile(r"/[A-Za-z0-9._/+,:=@~-]*")
DEFAULT_IGNORE = (".DS_Store", "Thumbs.db", "desktop.ini", "._*")
MAX_QUIET_PERIOD = 86400.0


def config_path(arg: str | None) -> Path:
    """--config, else $DITTOHEAD_CONFIG, else /etc/dittohead/config.yaml."""
    if arg:
        return Path(arg)
    env = os.environ.get("DITTOHEAD_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG


def load(path: Path) -> Config:
    """Read, parse and validate the file; raise ConfigError with every problem."""
    from .configfile import read_yaml  # here: `upload --host` needs no YAML parser
    return parse(read_yaml(path), path)


def parse(data: Any, path: Path = DEFAULT_CONFIG) -> Config:
    """Validate already-parsed YAML; raise ConfigError with every problem."""
    v = _Validator()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping", printable(str(path)))
    v.known_keys("", data, {"dropbox_root", "service_user", "defaults", "notify", "studies",
                            "dropbox_warn_percent", "metrics_dir"})
    root = v.abspath("dropbox_root", data.get("dropbox_root", "/data-dropbox"))
    user = v.unix_name("service_user", data.get("service_user", "dittohead"))
    notify = _notify(v, data.get("notify"))
    dropbox_warn = percentages(v, "dropbox_warn_percent", data.get(
        "dropbox_warn_percent", list(DEFAULT_DROPBOX_WARN_PERCENT)))

    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        v.error("defaults", "must be a mapping")
        defaults = {}
    v.known_keys("defaults", defaults, _STUDY_KEYS - {"destination"},
                 hint={"destination": "each study needs its own destination"})

    studies: dict[str, StudyConfig] = {}
    raw_studies = data.get("studies") or {}
    if not isinstance(raw_studies, dict):
        v.error("studies", "must be a mapping of study id to settings")
        raw_studies = {}
    for name, raw in raw_studies.items():
        key = f"studies.{name}"
        if not isinstance(name, str) or not STUDY_RE.fullmatch(name):
            v.error(key, "study id must match ^[a-z0-9][a-z0-9_]{0,63}$")
            continue
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            v.error(key, "must be a mapping")
            continue
        v.known_keys(key, raw, _STUDY_KEYS)
        inherited = {k: val for k, val in defaults.items() if k != "destination"}
        study = _study(v, key, name, {**inherited, **raw}, root)
        if study is not None:
            studies[name] = study
    _check_overlaps(v, root, studies)
    metrics_dir = _metrics_dir(v, data.get("metrics_dir"), root, studies)
    if v.problems:
        raise ConfigError(v.problems, printable(str(path)))
    assert root is not None and user is not None
    return Config(path=path, dropbox_root=root, service_user=user, notify=notify,
                  studies=studies, dropbox_warn_percent=dropbox_warn,
                  metrics_dir=metrics_dir)


_STUDY_KEYS = {"destination", "group", "uploaders", "file_mode", "dir_mode", "ignore",
               "disk_warn_percent", "notify", "quiet_period", "forecast_warn_days",
               "keep_done_days", "abandoned_days", "failed_warn_days", "purge_abandoned"}


class _Validator:
    """Collects problems instead of stopping at the first one."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def error(self, key: str, message: str) -> None:
        # Key paths hold the file's own keys, which may hold anything.
        self.problems.append(f"{printable(key)}: {message}" if key else message)

    def known_keys(self, key: str, data: dict[Any, Any], allowed: set[str],
                   hint: dict[str, str] | None = None) -> None:
        for k in data:
            if k not in allowed:
                why = (hint or {}).get(str(k), "unknown key (a typo?)")
                self.error(f"{key}.{k}" if key else str(k), why)

    def abspath(self, key: str, value: Any) -> Path | None:
        if not isinstance(value, str) or not value:
            self.error(key, "must be an absolute path (a string)")
            return None
        p = Path(value)
        if not p.is_absolute():
            self.error(key, "must be an absolute path")
            return None
        if any(part in (".", "..") for part in value.split("/")) or "\n" in value:
            self.error(key, "must be a normalized path (no '.', '..' or newlines)")
            return None
        if not SAFE_PATH_RE.fullmatch(value):
            self.error(key, "may hold only letters, digits and . _ / + , : = @ ~ - (it is "
                       "written into systemd unit files)")
            return None
        if p == Path("/"):
            self.error(key, "must not be /")
            return None
        return Path(os.path.normpath(value))

    def unix_name(self, key: str, value: Any) -> str | None:
        if not isinstance(value, str) or not UNIX_NAME_RE.fullmatch(value):
            self.error(key, "must be a user or group name like 'dittohead'")
            return None
        return value

    def mode(self, key: str, value: Any, allowed_extra: int) -> int | None:
        if not isinstance(value, str) or not re.fullmatch(r"[0-7]{3,4}", value):
            self.error(key, 'must be a quoted octal string like "0640"')
            return None
        mode = int(value, 8)
        if mode & 0o7000 & ~allowed_extra:
            self.error(key, "setuid, setgid and sticky bits are not allowed here"
                       if not allowed_extra else "only the setgid bit (2000) is allowed")
            return None
        return mode

    def str_list(self, key: str, value: Any, check: Any = None) -> tuple[str, ...] | None:
        if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
            self.error(key, "must be a list of non-empty strings")
            return None
        if check is not None:
            for i, x in enumerate(value):
                problem = check(x)
                if problem:
                    self.error(f"{key}[{i}]", problem)
        return tuple(value)


def _notify(v: _Validator, raw: Any) -> NotifyConfig:
    if raw is None:
        return NotifyConfig()
    if not isinstance(raw, dict):
        v.error("notify", "must be a mapping")
        return NotifyConfig()
    v.known_keys("notify", raw, {"from", "smtp", "uploader_address"})
    sender = raw.get("from")
    if sender is not None and not _address_like(sender):
        v.error("notify.from", "must be an email address")
        sender = None
    smtp = SmtpConfig()
    raw_smtp = raw.get("smtp") or {}
    if not isinstance(raw_smtp, dict):
        v.error("notify.smtp", "must be a mapping")
        raw_smtp = {}
    v.known_keys("notify.smtp", raw_smtp, {"host", "port", "starttls", "username",
                                           "password_file"})
    host = raw_smtp.get("host", smtp.host)
    if not isinstance(host, str) or not host:
        v.error("notify.smtp.host", "must be a host name")
        host = smtp.host
    port = raw_smtp.get("port", smtp.port)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        v.error("notify.smtp.port", "must be a port number (1-65535)")
        port = smtp.port
    starttls = raw_smtp.get("starttls", smtp.starttls)
    if not isinstance(starttls, bool):
        v.error("notify.smtp.starttls", "must be true or false")
        starttls = False
    username = raw_smtp.get("username")
    if username is not None and not isinstance(username, str):
        v.error("notify.smtp.username", "must be a string or null")
        username = None
    password_file = None
    if raw_smtp.get("password_file") is not None:
        password_file = v.abspath("notify.smtp.password_file", raw_smtp["password_file"])
    if username and password_file is None:
        v.error("notify.smtp.password_file", "is required when username is set")
    uploader = raw.get("uploader_address")
    if uploader is not None and not (_address_like(uploader)
                                     and UPLOADER_ADDRESS_RE.fullmatch(uploader)):
        v.error("notify.uploader_address",
                'must be an address pattern like "{user}@example.edu" (one {user}, no other '
                "braces or spaces)")
        uploader = None
    return NotifyConfig(sender=sender, smtp=SmtpConfig(host, port, starttls, username,
                                                       password_file),
                        uploader_address=uploader)


def _study(v: _Validator, key: str, name: str, raw: dict[str, Any],
           root: Path | None) -> StudyConfig | None:
    before = len(v.problems)
    if "destination" not in raw:
        v.error(f"{key}.destination", "is required")
        dest = None
    else:
        dest = v.abspath(f"{key}.destination", raw["destination"])
    group = raw.get("group")
    if group is not None:
        group = v.unix_name(f"{key}.group", group)
    uploaders = raw.get("uploaders")
    if uploaders is not None:
        uploaders = v.str_list(f"{key}.uploaders", uploaders,
                               lambda g: None if UNIX_NAME_RE.fullmatch(g) else "not a group name")
    file_mode = v.mode(f"{key}.file_mode", raw.get("file_mode", "0640"), 0)
    if file_mode is not None and not file_mode & 0o400:
        v.error(f"{key}.file_mode", "must let the owner read (the service verifies each file)")
    dir_mode = v.mode(f"{key}.dir_mode", raw.get("dir_mode", "2750"), 0o2000)
    if dir_mode is not None and dir_mode & 0o700 != 0o700:
        v.error(f"{key}.dir_mode", "must give the owner rwx (the service adds to directories)")
    ignore = v.str_list(f"{key}.ignore", raw.get("ignore", list(DEFAULT_IGNORE)),
                        lambda p: "must be a name pattern, without '/'" if "/" in p else None)
    warn = percentages(v, f"{key}.disk_warn_percent", raw.get("disk_warn_percent", [90, 95]))
    notify = _study_notify(v, f"{key}.notify", raw.get("notify"))
    quiet = _quiet_period(v, f"{key}.quiet_period", raw.get("quiet_period",
                                                          DEFAULT_QUIET_PERIOD))
    kept = retention(v, key, raw)
    horizon = forecast_days(v, f"{key}.forecast_warn_days",
                             raw.get("forecast_warn_days", DEFAULT_FORECAST_WARN_DAYS))
    if len(v.problems) != before or root is None:
        return None
    assert dest is not None and file_mode is not None and dir_mode is not None
    return StudyConfig(name=name, root=root / name, destination=dest, group=group,
                       uploaders=uploaders, file_mode=file_mode, dir_mode=dir_mode,
                       ignore=ignore or (), disk_warn_percent=warn,
                       notify=notify, quiet_period=quiet, forecast_warn_days=horizon,
                       **kept)


def _metrics_dir(v: _Validator, value: Any, root: Path | None,
                 studies: dict[str, StudyConfig]) -> Path | None:
    """metrics_dir: writable by the metrics unit only, so apart from every study's paths."""
    if value is None:
        return None
    path = v.abspath("metrics_dir", value)
    if path is None:
        return None
    # Inside a study's tree the study's own service could write the files; around
    # one, the metrics unit (which binds it read-write) could write the study's.
    apart = [("dropbox_root", root)] + [(f"studies.{n}.destination", s.destination)
                                        for n, s in sorted(studies.items())]
    for key, other in apart:
        if other is not None and (_inside(path, other) or _inside(other, path)):
            v.error("metrics_dir", f"must not overlap {key} ({other})")
            return None
    return path


def _quiet_period(v: _Validator, key: str, value: Any) -> float:
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not 0 <= value <= MAX_QUIET_PERIOD):  # (NaN fails this too)
        v.error(key, f"must be a number of seconds from 0 to {MAX_QUIET_PERIOD:.0f}")
        return DEFAULT_QUIET_PERIOD
    return float(value)


def _study_notify(v: _Validator, key: str, raw: Any) -> StudyNotify:
    if raw is None:
        return StudyNotify()
    if not isinstance(raw, dict):
        v.error(key, "must be a mapping")
        return StudyNotify()
    if True in raw and "on" not in raw:
        # YAML 1.1 (PyYAML) reads a bare `on:` key as the boolean true.
        raw = {("on" if k is True else k): val for k, val in raw.items()}
    v.known_keys(key, raw, {"to", "on"})
    to = v.str_list(f"{key}.to", raw.get("to", []),
                    lambda a: None if _address_like(a) else "not an email address") or ()
    on = v.str_list(f"{key}.on", raw.get("on", list(NOTIFY_EVENTS)),
                    lambda e: None if e in NOTIFY_EVENTS
                    else f"unknown event (one of {', '.join(NOTIFY_EVENTS)})") or ()
    return StudyNotify(to=to, on=frozenset(on))


def _address_like(value: Any) -> bool:
    # The mail code checks each address's form; here: text of one line, with "@".
    return isinstance(value, str) and "@" in value and value.isprintable()


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def _check_overlaps(v: _Validator, root: Path | None, studies: dict[str, StudyConfig]) -> None:
    """No study may deliver into another's destination or into the dropbox itself.

    Each study is told of the first (by name) earlier study it overlaps. Each
    destination's parents are looked up instead of comparing every pair, so
    that the largest file allowed (thousands of studies) is checked at once.
    """
    first_at: dict[Path, str] = {}  # destination -> the first study using it
    first_below: dict[Path, str] = {}  # directory -> the first study whose destination is below
    for name in sorted(studies):
        dest = studies[name].destination
        first_at.setdefault(dest, name)
        for parent in dest.parents:
            first_below.setdefault(parent, name)
    for name in sorted(studies):
        s = studies[name]
        if root is not None and (_inside(s.destination, root) or _inside(root, s.destination)):
            v.error(f"studies.{name}.destination",
                    f"must not overlap dropbox_root ({root})")
        found = [first_at.get(d) for d in (s.destination, *s.destination.parents)]
        found.append(first_below.get(s.destination))
        earlier = sorted(other for other in found if other is not None and other < name)
        if earlier:
            v.error(f"studies.{name}.destination", f"overlaps the destination of study "
                    f"{earlier[0]} ({studies[earlier[0]].destination})")
