"""node_exporter textfiles: the exposition format, atomic writing, and what `check` says.

`dittohead metrics` gathers each study's samples (metrics.py) and writes them
here as `<metrics_dir>/dittohead-<study>.prom`: a temporary name starting with
"." (node_exporter reads only *.prom), fsync, rename, mode 0644 (the exporter
runs as another user).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from .config import STUDY_RE, Config, StudyConfig
from .errors import EXIT_CONFIG, DittoheadError
from .log import printable
from .metrics import METRICS, samples

FILE_PREFIX = "dittohead-"
FILE_SUFFIX = ".prom"
STALE_TEMP = 3600  # seconds: a temporary file this old is a killed run's


class MetricsOff(DittoheadError):
    """metrics_dir is not set or not usable: a configuration matter."""

    exit_code = EXIT_CONFIG


def render(found: Iterable[tuple[str, dict[str, str], float]]) -> str:
    """The text exposition format: HELP and TYPE once per metric, then its samples."""
    by_metric: dict[str, list[str]] = {}
    for name, labels, value in found:
        shown = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        number = str(int(value)) if float(value).is_integer() else repr(float(value))
        by_metric.setdefault(name, []).append(f"{name}{{{shown}}} {number}")
    lines = []
    for name, rows in by_metric.items():
        kind, text = METRICS[name]
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *rows]
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def write_file(directory: Path, name: str, text: str, mode: int = 0o644) -> None:
    """Atomically: a temporary dot name (node_exporter reads *.prom only), fsync, rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)  # 0644: the exporter runs as another user
        view = memoryview(text.encode())
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, directory / name)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.unlink(tmp)
        raise


def file_name(study: str) -> str:
    return f"{FILE_PREFIX}{study}{FILE_SUFFIX}"


def write_metrics(cfg: Config, studies: list[StudyConfig], tidy: bool,
                  cache_dir: Path | None = None) -> list[str]:
    """Write each study's file; with tidy, also remove the files (and killed runs'
    temporary files) of studies the config no longer has. Returns what it did."""
    directory = cfg.metrics_dir
    if directory is None:
        raise MetricsOff(f"metrics_dir is not set in {printable(str(cfg.path))}: nothing to "
                         "write (set it, or use --stdout)")
    if not os.path.isdir(directory):
        raise MetricsOff(f"metrics_dir {printable(str(directory))} is not a directory: create "
                         "it (node_exporter's --collector.textfile.directory), writable by "
                         f"{cfg.service_user}, then systemctl daemon-reload")
    now = time.time()
    for study in studies:
        text = render(samples(study, now, cache_dir))
        try:
            write_file(directory, file_name(study.name), text)
        except PermissionError as e:
            raise MetricsOff(f"cannot write in metrics_dir {printable(str(directory))} "
                             f"({e.strerror}): let {cfg.service_user} write there (e.g. "
                             f"setfacl -m u:{cfg.service_user}:rwx {printable(str(directory))})"
                             ) from None
    done = [f"wrote {len(studies)} file(s) in {printable(str(directory))}"]
    if tidy:
        done += _tidy(directory, set(cfg.studies), now)
    return done


_OURS = re.compile(rf"{FILE_PREFIX}(.+){re.escape(FILE_SUFFIX)}")


def _tidy(directory: Path, studies: set[str], now: float) -> list[str]:
    """Remove the files of studies no longer configured, and stale temporary files."""
    done = []
    for name in _listdir(directory):
        m = _OURS.fullmatch(name)
        stale_study = m is not None and STUDY_RE.fullmatch(m.group(1)) is not None \
            and m.group(1) not in studies
        temp = name.startswith(f".{FILE_PREFIX}") and name.endswith(".tmp")
        try:
            if stale_study or (temp and now - os.lstat(directory / name).st_mtime > STALE_TEMP):
                os.unlink(directory / name)
                done.append(f"removed {printable(str(directory / name))}")
        except FileNotFoundError:
            continue
    return done


def findings(cfg: Config) -> list[str]:
    """What `check` says about metrics: metrics_dir missing or closed to the service user,
    and the timer not enabled or the unit failed."""
    if cfg.metrics_dir is None:
        return []
    import pwd
    import subprocess

    from .health import _systemd_booted, may_add
    d = printable(str(cfg.metrics_dir))
    try:
        st = os.stat(cfg.metrics_dir)
    except OSError as e:
        return [f"metrics_dir {d}: {e.strerror} (create it, writable by {cfg.service_user})"]
    svc = pwd.getpwnam(cfg.service_user)  # check() made sure it exists
    groups = set(os.getgrouplist(svc.pw_name, svc.pw_gid))
    found = []
    # An ACL may grant what the mode bits do not: then the bits are not the answer.
    acl = "system.posix_acl_access" in _xattrs(cfg.metrics_dir)
    if not acl and not may_add(st, svc.pw_uid, groups):
        found.append(f"metrics_dir {d} is not writable by {cfg.service_user}: no metrics are "
                     f"written (chown {cfg.service_user} {d}, or setfacl -m "
                     f"u:{cfg.service_user}:rwx {d})")
    if _systemd_booted():
        def state(verb: str, unit: str) -> str:
            return subprocess.run(["systemctl", verb, unit], capture_output=True, text=True,
                                  check=False).stdout.strip() or "unknown"
        timer, service = "dittohead-metrics.timer", "dittohead-metrics.service"
        if (s := state("is-enabled", timer)) != "enabled":
            found.append(f"{timer} is {s} while metrics_dir is set: metrics are written only "
                         f"after runs (systemctl enable --now {timer})")
        if state("is-failed", service) == "failed":
            found.append(f"{service} has failed: metrics are not written (systemctl status "
                         f"{service})")
    return found


def _xattrs(path: Path) -> list[str]:
    try:
        return os.listxattr(path)
    except OSError:
        return []


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []
