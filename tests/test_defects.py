"""Small behaviours a person meets at a terminal or after a crash: each one a defect once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dittohead.cli import main
from dittohead.errors import Outcome
from dittohead.record import Receipt, ReceiptError, read_receipt

from .conftest import REPO, Env


def test_argparse_errors_name_the_program_once(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["upload"]) == 2
    err = capsys.readouterr().err
    assert "dittohead upload: error: the following arguments are required" in err
    assert "dittohead: dittohead" not in err
    assert err.startswith("usage: dittohead upload")


def test_config_errors_are_plain_sentences_with_every_key_path(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"studies": {"Bad": {}, "ok": {"destination": "rel"}}}))
    # As a person runs it: no DITTOHEAD_LOG, and (here) no journal socket.
    env = {k: v for k, v in os.environ.items() if k != "DITTOHEAD_LOG"}
    r = subprocess.run([sys.executable, "-m", "dittohead", "--config", str(p), "check"],
                       capture_output=True, text=True, env=env, cwd=str(REPO), check=False)
    assert r.returncode == 78
    assert "studies.Bad: study id must match" in r.stderr
    assert "studies.ok.destination: must be an absolute path" in r.stderr
    if not os.path.exists("/run/systemd/journal/socket"):
        assert "MESSAGE_ID=" not in r.stderr and "DITTOHEAD_REASON" not in r.stderr


def test_an_unreadable_receipt_is_not_a_config_error(env: Env) -> None:
    (env.study.failed / "20260101T000000Z-e-000000.json").write_text("{not json")
    (env.study.failed / "20260101T000000Z-e-000000").mkdir()
    r = env.run("retry", "s1", "20260101T000000Z-e-000000")
    assert r.returncode == 1, r.stderr
    assert "cannot read the receipt" in r.stderr and "configuration error" not in r.stderr


def test_receipts_without_a_format_are_read_as_format_1(tmp_path: Path) -> None:
    old = {"study": "s1", "entry": "caf\\xe9", "entry_hex": "636166e9", "id": "x",
           "uploader": "ra", "outcome": "failed", "reason": "conflict", "files": 2,
           "bytes": 7, "skipped": [".DS_Store"], "destination": "/d",
           "started": "2026-01-01T00:00:00Z", "finished": "2026-01-01T00:00:01Z",
           "some_later_key": [1, 2]}
    (tmp_path / "x.json").write_text(json.dumps(old))
    r = read_receipt(tmp_path / "x.json")
    assert (r.format, r.outcome, r.entry, r.nbytes) == (1, Outcome.FAILED,
                                                        os.fsdecode(b"caf\xe9"), 7)
    assert Receipt.from_json(r.to_json()) == r
    with pytest.raises(ReceiptError):
        Receipt.from_json(b'{"study": "s1"}')


def test_a_disk_check_that_fails_after_filing_is_a_warning_not_a_kept_entry(env: Env) -> None:
    # The disk-usage state cannot be written: the entry is delivered and filed
    # all the same, and nothing claims it was kept.
    (env.study.processing / ".disk-usage.json").mkdir()
    env.drop("e", {"a": b"1"})
    r = env.process()
    assert r.returncode == 0, r.stderr
    assert (env.study.destination / "a").read_bytes() == b"1"
    assert len(env.done_receipts()) == 1
    assert "could not measure the fill" in r.stderr
    assert "kept" not in r.stderr and "unexpected" not in r.stderr


def test_receipts_and_claim_records_carry_their_format(env: Env) -> None:
    env.drop("e", {"a": b"1"})
    assert env.run("process", "s1", env={"DITTOHEAD_TEST_FAULT": "checked"}).returncode != 0
    record = next(env.study.processing.glob("*.json"))
    assert json.loads(record.read_text())["format"] == 1
    assert env.process().returncode == 0
    assert json.loads(env.done_receipts()[0].read_text())["format"] == 1


def test_the_python_floor_is_declared_once_and_tested() -> None:
    import tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    floor = project["project"]["requires-python"]
    assert floor == ">=3.11"
    assert project["tool"]["mypy"]["python_version"] == "3.11"
    assert project["tool"]["ruff"]["target-version"] == "py311"
    assert sys.version_info >= (3, 11)


def test_a_symlinked_destination_is_a_config_error_that_check_names(env: Env,
                                                                    tmp_path: Path) -> None:
    real = tmp_path / "real-dest"
    env.study.destination.rename(real)
    env.study.destination.symlink_to(real)
    env.drop("s01", {"a.txt": b"x"})
    r = env.process()
    assert r.returncode == 78, r.stderr
    assert "is a symbolic link" in r.stderr and str(real) in r.stderr
    assert list(real.iterdir()) == []  # nothing went through the link
    out = env.run("check", "s1").stdout
    assert f"is a symbolic link (to {real})" in out
