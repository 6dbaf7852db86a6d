"""The `dittohead` command: argument parsing and exit codes, nothing else."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from . import log
from .commands import build_parser
from .errors import (
    EXIT_TEMPFAIL,
    EXIT_UNEXPECTED,
    ConfigError,
    DittoheadError,
    TemporaryError,
    UsageError,
)

if TYPE_CHECKING:
    from . import config
    from .rsyncver import RsyncProbe
    from .upload import Before


def _purge(args: argparse.Namespace, cfg: config.Config) -> int:
    """Purge each study (all of them, or one); exit 1 when something was kept by error."""
    from .retention import purge_study, start
    run = start(cfg, args.dry_run, args.abandoned)
    ok = True
    for study in _studies(args, cfg):
        lines, study_ok = purge_study(run, study)
        for line in lines:
            _say(line)
        ok = ok and study_ok
    return 0 if ok else EXIT_UNEXPECTED


def _metrics(args: argparse.Namespace, cfg: config.Config) -> int:
    from .metrics import samples
    from .textfile import render, write_metrics
    studies = _studies(args, cfg)
    if args.stdout:
        import itertools
        now = time.time()
        sys.stdout.write(render(itertools.chain.from_iterable(samples(s, now, args.cache)
                                                              for s in studies)))
        return 0
    for line in write_metrics(cfg, studies, tidy=not args.study, cache_dir=args.cache):
        _say(line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code."""
    try:
        args = build_parser(sys.argv[1:] if argv is None else argv).parse_args(argv)
        return _run(args)
    except ConfigError as e:
        log.send(f"configuration error: {e}", priority=3, tell_person=True,
                 message_id=log.MESSAGE_IDS["config-error"], DITTOHEAD_REASON=str(e))
        return e.exit_code
    except UsageError as e:
        _say(f"{e.prog}: {e}", sys.stderr)
        return e.exit_code
    except DittoheadError as e:
        _say(f"dittohead: {e}", sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        _say(f"dittohead: {e}", sys.stderr)
        return EXIT_UNEXPECTED


def _say(text: str, stream: TextIO | None = None) -> None:
    """Print to a terminal: names in text are escaped already, and nothing raw gets out."""
    print(log.clean(text), file=stream or sys.stdout, flush=stream is sys.stderr)


def _run(args: argparse.Namespace) -> int:
    if args.command == "upload":
        return _upload(args)
    # `where` tells the server's rsync version: asked while the config loads.
    probe = None
    if args.command == "where":
        from .rsyncver import RsyncProbe
        probe = RsyncProbe()
    from . import config  # not for `upload --host`: a lab machine's start-up
    cfg = config.load(config.config_path(args.config))
    if not getattr(args, "mine", False):  # status --mine is for anyone
        from .access import require
        require(args.command, cfg.service_user)
    return _dispatch(args, cfg, probe)


def _studies(args: argparse.Namespace, cfg: config.Config) -> list[config.StudyConfig]:
    """The study the command names, else every study, by name."""
    return [cfg.study(n) for n in ([args.study] if args.study else sorted(cfg.studies))]


def _dispatch(args: argparse.Namespace, cfg: config.Config, probe: RsyncProbe | None) -> int:
    """Run a command that reads the config, once the caller may."""
    if args.command == "process":
        from .process import process
        if args.linger < 0:
            raise UsageError("--linger must not be negative")
        return process(cfg, args.study, linger=args.linger).exit_code
    if args.command == "mail":
        from .errors import EXIT_TEMPFAIL
        from .notify import send_queued
        return EXIT_TEMPFAIL if send_queued(cfg, cfg.study(args.study)) else 0
    if args.command == "setup":
        from .layout import setup, user_folders
        study = cfg.study(args.study)
        done = (user_folders(cfg, study, {_uid(n) for n in args.user}) if args.user
                else setup(cfg, study))
        for line in done or ["nothing to change"]:
            _say(line)
        return 0
    if args.command == "ready":
        from .upload import ready
        study = cfg.study(args.study)
        # Started by `upload --host` as it starts sending: ready by the end of it.
        if args.on_go and sys.stdin.readline().strip() != "go":
            raise DittoheadError(f"not told to go: .{log.printable(args.name)} not renamed")
        ready(study, args.name, check=args.check)
        return 0
    if args.command == "purge":
        return _purge(args, cfg)
    if args.command == "retry":
        from .health import retry
        _say(retry(cfg, cfg.study(args.study), args.id))
        return 0
    if args.command == "undo":
        from .undo import undo
        for line in undo(cfg, cfg.study(args.study), args.id, args.dry_run):
            _say(line)
        return 0
    if args.command == "where" or (args.command == "status" and args.mine):
        return _uploaders_view(args, cfg, probe)
    if args.command == "status":
        return _status(args, cfg)
    if args.command == "metrics":
        return _metrics(args, cfg)
    if args.command == "check":
        from .health import check
        found = check(cfg, _studies(args, cfg))
        for line in found or ["no problems found"]:
            _say(line)
        return 1 if found else 0
    raise UsageError(f"unknown command {args.command}")  # pragma: no cover


def _status(args: argparse.Namespace, cfg: config.Config) -> int:
    """`status [STUDY] [--json]`: one table of the studies (glance.py); details for one."""
    from .glance import status_text, use_colour
    from .health import status
    data = [status(cfg, s) for s in _studies(args, cfg)]
    if args.json:  # JSON escapes every control and non-ASCII character itself
        _say(json.dumps(data, indent=2))
    elif use_colour():  # status_text escapes every piece itself; _say would its colours
        print(status_text(data, colour=True, details=bool(args.study)), flush=True)
    else:
        _say(status_text(data, details=bool(args.study)))
    return 0


def _uid(name: str) -> int:
    import pwd
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise UsageError(f"--user: no such user {log.printable(name)}") from None


def _uploaders_view(args: argparse.Namespace, cfg: config.Config,
                    probe: RsyncProbe | None) -> int:
    """`where` and `status --mine`: what any user may ask about their own uploads."""
    from .outcomes import mine, mine_text, where
    if args.command == "where":
        from .upload import serve_ready, waiting
        study = cfg.study(args.study)
        data = where(cfg, study)
        # What `upload --host` also needs before sending: one start-up on the server.
        data["waiting"] = waiting(study, args.names)
        data["rsync"] = probe.version() if probe else None
        if args.then_ready:
            print(json.dumps(data), flush=True)  # one line: the client reads a line
            serve_ready(study, sys.stdin, sys.stdout)
            return 0
        _say(json.dumps(data, indent=2) if args.json else "\n".join(
            f"{k}: {', '.join(v) if isinstance(v, list) else v}" for k, v in data.items()))
        return 0
    if args.last < 0:
        raise UsageError("--last must not be negative")
    found = [mine(s, args.last) for s in _studies(args, cfg)]
    _say(json.dumps(found, indent=2) if args.json else mine_text(found))
    return 0


def _upload(args: argparse.Namespace) -> int:
    if args.timeout < 0:
        raise UsageError("--timeout must not be negative")
    if args.host is not None:
        from .remote import upload_remote
        return upload_remote(args.host, args.study, args.paths, args.ssh_config,
                             args.wait, args.timeout)
    if args.ssh_config is not None:
        raise UsageError("--ssh-config goes with --host")
    from . import config  # not for `upload --host`: a lab machine's start-up
    from .upload import before, upload
    cfg = config.load(config.config_path(args.config))
    study = cfg.study(args.study)
    then = before(study)
    names = []
    for p in args.paths:
        try:
            os.lstat(p)
        except OSError as e:
            raise UsageError(f"{log.printable(str(p))}: {e.strerror}") from None
    for p in args.paths:
        names.append(upload(study, p))
        _say(f"{log.printable(str(p))} -> {log.printable(str(study.inbox / names[-1]))}")
    if not args.wait:
        return 0
    return _waited(study, names, then, args.timeout)


def _waited(study: config.StudyConfig, names: list[str], then: Before, timeout: float) -> int:
    """Print each upload's outcome; the exit code says the worst (docs/contract.md)."""
    from .outcomes import shown, wait_code, worst
    from .upload import wait
    codes = []
    deadline = time.monotonic() + timeout
    for n in names:
        try:
            note = wait(study, n, then, max(0.0, deadline - time.monotonic()))
        except TemporaryError as e:
            _say(str(e), sys.stderr)
            codes.append(EXIT_TEMPFAIL)
            continue
        _say(shown(note))
        codes.append(wait_code(note))
    return worst(codes)


def entry_point() -> None:
    """console_scripts entry."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
