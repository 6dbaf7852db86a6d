"""dittohead(8) describes the command line that `dittohead --help` shows, and renders cleanly."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess

import pytest

from dittohead.cli import build_parser

from .conftest import REPO

MANPAGE = REPO / "packaging" / "dittohead.8"


def _options(p: argparse.ArgumentParser) -> set[str]:
    return {o for a in p._actions for o in a.option_strings if o.startswith("--")}


def test_every_subcommand_and_option_is_in_the_manual_page() -> None:
    text = MANPAGE.read_text().replace("\\-", "-")
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [o for o in _options(parser) if o not in text]
    for name, p in sub.choices.items():
        if f".B dittohead {name}\n" not in text:  # its SYNOPSIS line
            missing.append(name)
        missing += [f"{name} {o}" for o in _options(p) if o not in text]
    assert not missing, f"not described in {MANPAGE.name}: {missing}"


@pytest.mark.skipif(shutil.which("man") is None,
                    reason="SKIPPED LOUDLY: man is not installed (apt-get install man-db)")
def test_the_manual_page_renders_without_warnings() -> None:
    r = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(MANPAGE)],
                       capture_output=True, text=True,
                       env={**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "80"})
    assert r.returncode == 0 and not r.stderr, r.stderr
