"""The command line's words: each command's arguments and help (cli.py runs them).

Only the parsers of the commands a command line names are built (build_parser):
`upload --host` waits on the server's `where` start-up, of which each parser
was about 1 ms.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import DEFAULT_CONFIG_PATH, __version__
from .errors import UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse's own way (usage, then "prog: error: ..."), but as an
        # exception main() turns into exit 2.
        self.print_usage(sys.stderr)
        raise UsageError(message, prog=f"{self.prog}: error")


STUDY_HELP = "the study's id, as in the config (e.g. nccam3)"


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command line's parser; with argv, only the parsers of the commands it names
    (every one when it names none): each costs about 1 ms, and a server's `where` for
    `upload --host` waits on its start-up."""
    p = _Parser(prog="dittohead", description="A data dropbox for research studies.")
    p.add_argument("--version", action="version", version=f"dittohead {__version__}")
    p.add_argument("--config", metavar="PATH",
                   help="config file (default: $DITTOHEAD_CONFIG, else "
                        f"{DEFAULT_CONFIG_PATH})")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    named = set(argv or ()) & _COMMANDS.keys()
    for name, build in _COMMANDS.items():
        if not named or name in named:
            build(sub)
    return p


def _build_process(sub: argparse._SubParsersAction[_Parser]) -> None:
    s = sub.add_parser("process", help="drain a study's inbox once (what the service runs)")
    s.add_argument("study", help=STUDY_HELP)
    s.add_argument("--linger", type=float, default=0.0, metavar="SECONDS",
                   help="keep watching until no entry has been ready for this long, and "
                        "wait for entries still being written (default 0)")


def _build_mail(sub: argparse._SubParsersAction[_Parser]) -> None:
    s = sub.add_parser("mail", help="send a study's queued mail (what dittohead-mail@ runs)")
    s.add_argument("study", help=STUDY_HELP)


def _build_check(sub: argparse._SubParsersAction[_Parser]) -> None:
    s = sub.add_parser("check", help="check config, layout, units and free space")
    s.add_argument("study", nargs="?", help="the study to check (default: every study)")


def _build_setup(sub: argparse._SubParsersAction[_Parser]) -> None:
    s = sub.add_parser("setup", help="create or repair a study's layout (root)")
    s.add_argument("study", help=STUDY_HELP)
    s.add_argument("--user", action="append", default=[], metavar="NAME",
                   help="only make this user's own folder (inbox and outcomes); repeatable")


def _build_status(sub: argparse._SubParsersAction[_Parser]) -> None:
    s = sub.add_parser("status", help="pending, processing and failed entries; disk use")
    s.add_argument("study", nargs="?", help="one study (default: every study)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--mine", action="store_true",
                   help="your own recent uploads and their outcomes (any user)")
    s.add_argument("--last", type=int, default=10, metavar="N",
                   help="with --mine: how many uploads per study (default 10; 0: all)")


def _build_retry(sub: argparse._SubParsersAction[_Parser]) -> None:
    s = sub.add_parser("retry", help="put a failed delivery back in the inbox")
    s.add_argument("study", help=STUDY_HELP)
    s.add_argument("id", help="the delivery id, as in failed/<ID>.json "
                              "(e.g. 20261127T204655Z-s01-session1-9f3a0c)")


def _build_purge(sub: argparse._SubParsersAction[_Parser]) -> None:
    s = sub.add_parser("purge", help="remove done/ copies older than keep_done_days (and "
                                     "abandoned .name uploads); what the daily timer runs")
    s.add_argument("study", nargs="?", help="only this study (default: every study)")
    s.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    s.add_argument("--abandoned", action="store_true",
                   help="also remove .name uploads unchanged for more than abandoned_days")


def _build_metrics(sub: argparse._SubParsersAction[_Parser]) -> None:
    s = sub.add_parser("metrics", help="write each study's metrics for node_exporter into "
                                       "metrics_dir (what dittohead-metrics.service runs)")
    s.add_argument("study", nargs="?",
                   help="only this study (default: every study, and remove the files of "
                        "studies no longer in the config)")
    s.add_argument("--stdout", action="store_true",
                   help="print the metrics instead of writing files (metrics_dir not needed)")
    s.add_argument("--cache", metavar="DIR", type=Path,
                   help="remember what each receipt holds in DIR, so that only new receipts "
                        "are read (the unit's StateDirectory)")


def _build_undo(sub: argparse._SubParsersAction[_Parser]) -> None:
    """`undo`: remove a delivery's files from the destination again (root or the service)."""
    s = sub.add_parser("undo", help="remove exactly the files a delivery created from the "
                                    "destination, and file it in failed/ (root or the "
                                    "service user)")
    s.add_argument("study", help="the study, as named in the config")
    s.add_argument("id", help="the delivery id, as in done/<ID>.json (see `dittohead status`)")
    s.add_argument("--dry-run", action="store_true",
                   help="only list what would be removed and kept; change nothing")


def _build_where(sub: argparse._SubParsersAction[_Parser]) -> None:
    """`where`: any user, and what `upload --host` runs on the server."""
    s = sub.add_parser("where", help="where a study's inbox and your outcomes are (any user)")
    s.add_argument("study", help=STUDY_HELP)
    s.add_argument("names", nargs="*", metavar="NAME",
                   help="also say which of these names already wait in the inbox")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--then-ready", action="store_true",
                   help="print the JSON on one line, then rename each .NAME named on stdin "
                        "(what upload --host runs on the server: one start-up for both)")


def _build_upload(sub: argparse._SubParsersAction[_Parser]) -> None:
    s = sub.add_parser("upload", help="copy files or directories into a study's inbox")
    s.add_argument("study", help=STUDY_HELP)
    s.add_argument("paths", nargs="+", metavar="PATH", type=Path,
                   help="a file or directory to upload; its name becomes the entry's")
    s.add_argument("--wait", action="store_true",
                   help="wait for each upload's outcome and exit by it")
    s.add_argument("--timeout", type=float, default=3600, metavar="SECONDS",
                   help="how long --wait waits (default 3600)")
    s.add_argument("--host", metavar="[USER@]HOST",
                   help="upload over ssh to this server (your ssh config applies)")
    s.add_argument("--ssh-config", metavar="FILE",
                   help="with --host: this ssh config file instead of yours (ssh -F)")


def _build_ready(sub: argparse._SubParsersAction[_Parser]) -> None:
    """`ready`: what an older `upload --host` runs on the server."""
    s = sub.add_parser("ready", help="rename your .NAME in a study's inbox to NAME, never "
                                     "replacing (what upload --host runs on the server)")
    s.add_argument("study", help=STUDY_HELP)
    s.add_argument("name", help="the entry's name, without the leading dot")
    s.add_argument("--check", action="store_true",
                   help="only say whether NAME is free (exit 1 when it waits already)")
    s.add_argument("--on-go", action="store_true",
                   help="rename once a line 'go' comes on stdin (nothing without it)")


# In the order `dittohead --help` lists them.
_COMMANDS = {"process": _build_process, "mail": _build_mail, "check": _build_check,
             "setup": _build_setup, "status": _build_status, "retry": _build_retry,
             "undo": _build_undo, "where": _build_where, "upload": _build_upload,
             "ready": _build_ready, "purge": _build_purge, "metrics": _build_metrics}
