"""dittohead(8) describes the command line that `dittohead --help` shows, and every config
key; the contract's key tables match the code's keys; SEE ALSO names installed files."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import typing
from pathlib import Path

import pytest

from dittohead import config, settings
from dittohead.commands import build_parser
from dittohead.log import MESSAGE_IDS

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


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_positional_argument_is_described_in_help() -> None:
    # Whatever command is added: `dittohead CMD --help` says what each argument is.
    missing = [f"{name} {a.dest}" for name, p in _subparsers().items() for a in p._actions
               if not a.option_strings and not (a.help or "").strip()]
    assert not missing, f"positional arguments without help: {missing}"


# --- the config keys: code, contract and manual page agree ----------------------------------

CONTRACT = REPO / "docs" / "contract.md"
KEY_ROW = re.compile(r"^\| `([a-z_][a-z0-9_.]*)` \|", re.M)


def _section(text: str, start: str, level: str) -> str:
    """From the heading `start` to the next heading of the same level."""
    i = text.index(start)
    j = text.find("\n" + level + " ", i + len(start))
    return text[i:] if j < 0 else text[i:j]


def contract_keys() -> tuple[set[str], set[str]]:
    """The top-level and per-study keys the contract's two key tables name."""
    section = _section(CONTRACT.read_text(), "\n## Configuration", "##")
    tables = [t for t in re.split(r"\n\n", section) if t.startswith("| key | default |")]
    assert len(tables) == 2, "expected the top-level and the per-study key tables"
    top, study = ({m for m in KEY_ROW.findall(t)} for t in tables)
    return top, study


def _dataclass_keys(cls: type, prefix: str = "") -> set[str]:
    """Config keys of a settings dataclass, nested ones dotted (notify.smtp.host)."""
    rename = {"sender": "from"}  # the file's `from:` is a keyword in Python
    hints = typing.get_type_hints(cls)
    keys = set()
    for f in dataclasses.fields(cls):
        name = prefix + rename.get(f.name, f.name)
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            keys |= _dataclass_keys(typing.cast(type, kind), name + ".")
        else:
            keys.add(name)
    return keys


def code_keys() -> tuple[set[str], set[str]]:
    """The keys settings.py holds and config.py accepts: top level, and per study."""
    top = _dataclass_keys(settings.Config) - {"path"} | {"defaults"}
    study = _dataclass_keys(settings.StudyConfig) - {"name", "root"}
    # What the validator accepts for a study (a key without a field would show here).
    study |= {k for k in config._STUDY_KEYS if k != "notify"}
    return top, study


def test_every_config_key_is_in_the_contract() -> None:
    top, study = contract_keys()
    code_top, code_study = code_keys()
    assert (code_top - top, code_study - study) == (set(), set()), \
        "keys of settings.py / config.py missing from docs/contract.md's key tables"
    assert (top - code_top, study - code_study) == (set(), set()), \
        "keys in docs/contract.md's tables that the code does not know"


def test_every_config_key_is_in_the_manual_pages_configuration_section() -> None:
    text = MANPAGE.read_text().replace("\\-", "-")
    section = _section(text, "\n.SH CONFIGURATION", ".SH")
    top, study = contract_keys()
    missing = sorted(k for k in top | study if not re.search(rf"\b{re.escape(k)}\b", section))
    assert not missing, f"keys missing from {MANPAGE.name}'s CONFIGURATION section: {missing}"


def test_every_message_id_is_in_the_contract() -> None:
    text = CONTRACT.read_text()
    missing = [kind for kind, mid in MESSAGE_IDS.items() if f"`{mid}`" not in text]
    assert not missing, f"message ids missing from docs/contract.md: {missing}"


def test_every_message_id_is_in_the_man_pages_journal_section() -> None:
    journal = _section(MANPAGE.read_text().replace("\\-", "-"), "\n.SH JOURNAL", ".SH")
    missing = [kind for kind, mid in MESSAGE_IDS.items()
               if f"{kind} \" ({mid})\"" not in journal]
    assert not missing, f"events missing from the man page's JOURNAL section: {missing}"


def test_see_also_names_only_installed_documents(tmp_path: Path) -> None:
    r = subprocess.run(["make", "-s", "-f", "packaging/install.mk", "install-files",
                        f"DESTDIR={tmp_path}", "PREFIX=/usr"],
                       cwd=REPO, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    text = MANPAGE.read_text().replace("\\-", "-")
    see_also = _section(text, "\n.SH SEE ALSO", ".SH")
    assert "/usr/share/doc/dittohead/" in see_also
    named = set(re.findall(r"^\.I ([\w.-]+\.(?:md|example))$", see_also, re.M))
    assert {"admin.md", "contract.md", "upload.md", "config.yaml.example"} <= named
    doc = tmp_path / "usr/share/doc/dittohead"
    assert sorted(n for n in named if not (doc / n).is_file()) == []
