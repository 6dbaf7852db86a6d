"""Hostile names and configs: what a terminal, a log line and a mail show; what is refused.

An uploader chooses entry and file names (any bytes but "/" and NUL); an admin's config
may be a typo, a generated file gone wrong or a YAML bomb. Names are shown escaped
(log.printable), never raw; a config is refused with exit 78, never a traceback; the
generator always exits 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dittohead.config import load, parse
from dittohead.configfile import MAX_BYTES, MAX_DEPTH, MAX_NODES
from dittohead.errors import ConfigError
from dittohead.log import clean, printable

from .conftest import REPO, Env, Inbox, mail_env

HOSTILE = "red\x1b[31mname\rover\nline\u202eevil"
# What every output must never carry raw: ESC, CR, a newline inside a name, bidi override.
RAW = ("\x1b", "\r", "\u202e")


def one_line_per_event(stderr: str) -> list[str]:
    """The run's stderr lines; each must start like an event (no name split one)."""
    lines = stderr.splitlines()
    assert all(line.startswith("dittohead: ") for line in lines), lines
    return lines


def assert_no_raw(text: str) -> None:
    for c in RAW:
        assert c not in text, f"raw {c!r} in {text!r}"


# --- the rule ------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "shown"), [
    ("plain-name_1.txt", "plain-name_1.txt"),
    ("café 北京", "café 北京"),
    ("a\nb\rc\td", "a\\nb\\rc\\td"),
    ("esc\x1b[2J", "esc\\x1b[2J"),
    ("del\x7f", "del\\x7f"),
    ("c1\x9b31m", "c1\\u009b31m"),
    ("bidi\u202eexe.txt\u2066", "bidi\\u202eexe.txt\\u2066"),
    ("line\u2028sep", "line\\u2028sep"),
    (os.fsdecode(b"caf\xe9"), "caf\\xe9"),
    ("back\\slash", "back\\\\slash"),
    ("looks\\x1b", "looks\\\\x1b"),  # a name's own backslash is not an escape
])
def test_names_are_escaped_by_one_unambiguous_rule(name: str, shown: str) -> None:
    assert printable(name) == shown
    assert clean(shown) == shown  # text made of escaped names is not escaped twice
    assert shown.isprintable()


def test_different_names_are_shown_differently() -> None:
    names = ["a\nb", "a\\nb", os.fsdecode(b"a\x1bb"), "a\x1bb", "a\\x1bb",
             os.fsdecode(b"\xc2\x9b"), os.fsdecode(b"\x9b")]
    assert len({printable(n) for n in names}) == len(set(names))


def test_clean_keeps_lines_and_backslashes_but_no_controls() -> None:
    assert clean("2 problems:\n  a\\nb\x1b\r") == "2 problems:\n  a\\nb\\x1b\\r"


# --- a hostile entry name, as an admin meets it ----------------------------------------------

def test_escape_in_entry_name_is_shown_escaped_in_status(env: Env) -> None:
    env.drop(HOSTILE, {"a.txt": b"1"})
    r = env.process()
    assert r.returncode == 0, r.stderr
    assert_no_raw(r.stderr)
    [line] = one_line_per_event(r.stderr)
    assert "delivered red\\x1b[31mname\\rover\\nline\\u202eevil from" in line
    status = env.run("status", "s1")
    assert status.returncode == 0, status.stderr
    assert_no_raw(status.stdout)
    assert "(red\\x1b[31mname\\rover\\nline\\u202eevil, 1 files" in status.stdout
    as_json = env.run("status", "s1", "--json")
    assert_no_raw(as_json.stdout)
    assert json.loads(as_json.stdout)[0]["last_delivery"]["entry"] == printable(HOSTILE)


def test_receipt_keeps_the_exact_name_and_shows_it_escaped(env: Env) -> None:
    name = HOSTILE + os.fsdecode(b"\xff")
    env.drop(name, {"a.txt": b"1"})
    assert env.process().returncode == 0
    [receipt] = env.done_receipts()
    data = json.loads(receipt.read_bytes())
    assert bytes.fromhex(data["entry_hex"]) == os.fsencode(name)
    assert data["entry"] == printable(name)
    assert_no_raw(receipt.read_text())


def test_cr_in_entry_name_still_mails_and_files_it(shared_base: Path,
                                                   smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    env = mail_env(shared_base, port)
    env.drop(HOSTILE, {"a.txt": b"1"})
    env.drop("after", {"b.txt": b"2"})  # the run goes on to the next entry
    r = env.process()
    assert r.returncode == 0, r.stderr
    assert "kept" not in r.stderr and "unexpected" not in r.stderr
    assert len(env.done_receipts()) == 2
    assert os.listdir(env.study.processing) in ([".mail", ".disk-usage.json"],
                                               [".disk-usage.json", ".mail"])
    # RFC 5322 unfolding: a long subject is folded onto more lines.
    subjects = sorted(str(m["Subject"]).replace("\r\n", "").strip() for _, m in inbox.messages)
    assert subjects == ["[dittohead s1] delivered after (1 files)",
                        "[dittohead s1] delivered red\\x1b[31mname\\rover\\nline\\u202eevil "
                        "(1 files)"]
    for _, m in inbox.messages:
        payload = m.get_payload(decode=True)
        assert isinstance(payload, bytes)
        assert_no_raw(payload.decode().replace("\r\n", "\n"))  # SMTP ends lines in CRLF
        assert set(m.keys()) == {"From", "To", "Subject", "Date", "Message-ID",
                                 "Auto-Submitted", "Content-Type",
                                 "Content-Transfer-Encoding", "MIME-Version"}


def test_a_mail_that_cannot_be_made_is_a_warning_and_the_entry_is_filed(
        shared_base: Path, smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    env = mail_env(shared_base, port)
    data = yaml.safe_load(env.config_path.read_text())
    data["notify"]["from"] = "not an@address"  # passes validation, the mail policy refuses it
    env.config_path.write_text(yaml.safe_dump(data))
    env.drop("e", {"a.txt": b"1"})
    r = env.process()
    assert r.returncode == 0, r.stderr
    assert "could not make the mail about delivered" in r.stderr
    assert "kept" not in r.stderr and "unexpected" not in r.stderr
    assert (env.study.destination / "a.txt").read_bytes() == b"1"
    assert len(env.done_receipts()) == 1 and inbox.messages == []


def test_an_uploader_address_that_is_not_one_address_is_not_mailed(
        shared_base: Path, smtp: tuple[Inbox, int]) -> None:
    from dittohead import notify
    inbox, port = smtp
    env = mail_env(shared_base, port)
    cfg = load(env.config_path)
    assert notify.recipients(cfg, env.study, "delivered", "x@evil.example,y") == [
        "pi@example.edu", "x@evil.example,y@example.edu"]
    notify.send(cfg, env.study, "delivered", "s", "b", "x@evil.example,y")
    assert env.run("mail", "s1").returncode == 0
    [(rcpt, m)] = inbox.messages
    assert rcpt == ["pi@example.edu"] and m["To"] == "pi@example.edu"


def test_check_shows_a_hostile_leftover_name_escaped(env: Env) -> None:
    (env.study.destination / ".incoming-\x1b[2Jx").mkdir()
    r = env.run("check", "s1")
    assert "\\x1b[2Jx belongs to no claim" in r.stdout
    assert_no_raw(r.stdout + r.stderr)


def test_upload_shows_a_hostile_path_escaped(env: Env, tmp_path: Path) -> None:
    src = tmp_path / "data\x1b[31m\rx"
    src.write_bytes(b"1")
    r = env.run("upload", "s1", str(src))
    assert r.returncode == 0, r.stderr
    assert_no_raw(r.stdout + r.stderr)
    assert "data\\x1b[31m\\rx ->" in r.stdout
    assert (env.study.inbox / "data\x1b[31m\rx").read_bytes() == b"1"


# --- full-match validation --------------------------------------------------------------------

def test_study_id_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text('studies:\n  "s1\\n": {destination: /study/s1}\n')
    r = run_cli(p, "check")
    assert r.returncode == 78
    assert "studies.s1\\n: study id must match" in r.stderr
    with pytest.raises(ConfigError):
        parse({"studies": {"s1\n": {"destination": "/study/s1"}}})


@pytest.mark.parametrize(("key", "value"), [
    ("service_user", "dittohead\n"),
    ("dropbox_root", "/data-dropbox\n"),
])
def test_names_and_paths_with_a_trailing_newline_are_refused(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse({key: value, "studies": {"s1": {"destination": "/study/s1",
                                              "uploaders": ["lab\n"]}}})
    assert f"{key}: " in str(e.value) and "studies.s1.uploaders[0]: not a group name" in str(
        e.value)


def test_a_study_named_with_a_newline_on_the_command_line_is_unknown(env: Env) -> None:
    r = env.run("status", "s1\n")
    assert r.returncode == 78
    assert "studies.s1\\n: no such study" in r.stderr


def failed_delivery(env: Env) -> str:
    (env.study.destination / "a.txt").write_bytes(b"original")
    env.drop("e", {"a.txt": b"other"})
    assert env.process().returncode == 0
    [receipt] = env.failed_receipts()
    return receipt.stem


@pytest.mark.parametrize("suffix", ["\n", "/../x", "/"])
def test_retry_refuses_an_id_with_a_newline_or_a_slash(env: Env, suffix: str) -> None:
    delivery = failed_delivery(env)
    r = env.run("retry", "s1", delivery + suffix)
    assert r.returncode == 1
    assert "not a delivery id" in r.stderr
    assert_no_raw(r.stderr)
    assert (env.study.failed / delivery).is_dir() and os.listdir(env.study.inbox) == []
    for bad in ("../failed/" + delivery, ".hidden", ""):
        assert "not a delivery id" in env.run("retry", "s1", bad).stderr
    assert env.run("retry", "s1", delivery).returncode == 0  # the id itself still works


# --- config bounds ------------------------------------------------------------------------------

def run_cli(config: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DITTOHEAD_LOG": "stderr"}
    return subprocess.run([sys.executable, "-m", "dittohead", "--config", str(config), *args],
                          capture_output=True, text=True, env=env, cwd=str(REPO),
                          timeout=timeout, check=False)


def deep(levels: int) -> str:
    return "a: " + "[" * levels + "]" * levels + "\n"


def alias_bomb() -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        prev = f"*l{i - 1}"
        lines.append(f"l{i}: &l{i} [{', '.join([prev] * 9)}]")
    return "\n".join(lines) + "\n"


BAD_CONFIGS: dict[str, tuple[str | bytes, str]] = {
    "nested": (deep(100_000), f"nested deeper than {MAX_DEPTH} levels"),
    "nested a little": (deep(MAX_DEPTH + 1), "nested deeper than"),
    "alias bomb": (alias_bomb(), f"more than {MAX_NODES} values"),
    "recursive alias": ("a: &a [1, *a]\n", "inside the node it refers to"),
    "huge": ("# " + "x" * MAX_BYTES + "\n", f"larger than {MAX_BYTES} bytes"),
    "bad date": ("studies: {s1: {destination: 2026-13-45}}\n", "not valid YAML"),
    "huge integer": ("a: " + "1" * 5000 + "\n", "not valid YAML"),
    "bad float": ("a: !!float x\n", "not valid YAML"),
    "bad timestamp": ("a: !!timestamp x\n", "not valid YAML"),
    "python tag": ("a: !!python/object/apply:os.system [id]\n", "not valid YAML"),
    "not UTF-8": (b"studies: \xff\n", "not UTF-8"),
    "control character": ("a: \x1b[2J\n", "not valid YAML"),
    "study id with a newline": ('studies: {"s1\\n": {destination: /study/s1}}\n',
                                "studies.s1\\n: study id must match"),
    "attribute placeholder": ('notify: {uploader_address: "{user.__class__}@x.edu"}\n',
                              "notify.uploader_address: must be an address pattern"),
    "header in an address": ('studies: {s1: {destination: /s, notify: {to: ["a@b\\nBcc: '
                             'c@d"]}}}\n', "studies.s1.notify.to[0]: not an email address"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CONFIGS))
def test_nested_config_is_a_config_error_78(tmp_path: Path, kind: str) -> None:
    text, why = BAD_CONFIGS[kind]
    p = tmp_path / "config.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    started = time.monotonic()
    r = run_cli(p, "check")
    assert (r.returncode, "Traceback" in r.stderr) == (78, False), r.stderr[-2000:]
    assert why in r.stderr
    assert_no_raw(r.stderr)
    assert time.monotonic() - started < 20


def test_a_config_of_many_studies_still_loads(tmp_path: Path) -> None:
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump({"defaults": {"notify": {"to": ["pi@example.edu"]}},
                                 "studies": {f"s{i}": {"destination": f"/study/s{i}"}
                                             for i in range(500)}}))
    assert len(load(p).studies) == 500


def test_a_fifo_or_directory_as_config_is_a_config_error_without_hanging(
        tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    r = run_cli(fifo, "check", timeout=20)
    assert r.returncode == 78 and "not a regular file" in r.stderr
    r = run_cli(tmp_path, "check")
    assert r.returncode == 78 and "not a regular file" in r.stderr
    r = run_cli(tmp_path / "missing.yaml", "check")
    assert r.returncode == 78 and "cannot read: No such file or directory" in r.stderr


def test_a_config_path_with_controls_is_shown_escaped(tmp_path: Path) -> None:
    r = run_cli(tmp_path / "c\x1b[2J.yaml", "check")
    assert r.returncode == 78 and "c\\x1b[2J.yaml: cannot read" in r.stderr
    assert_no_raw(r.stderr)


# --- the generator never fails ----------------------------------------------------------------

def generate(tmp_path: Path, config: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path / "normal"
    out.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "SYSTEMD_SCOPE"}
    env["DITTOHEAD_CONFIG"] = str(config)
    r = subprocess.run([sys.executable, "-m", "dittohead.generator", str(out),
                        str(tmp_path / "early"), str(tmp_path / "late")],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=30,
                       check=False)
    return r, out


@pytest.mark.parametrize("kind", sorted(BAD_CONFIGS))
def test_generator_exits_0_and_says_why_for_every_bad_config(tmp_path: Path,
                                                              kind: str) -> None:
    text, why = BAD_CONFIGS[kind]
    p = tmp_path / "config.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    r, out = generate(tmp_path, p)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.startswith("dittohead-generator: ") and why in r.stderr
    assert "daemon-reload" in r.stderr
    assert_no_raw(r.stderr)
    assert list(out.iterdir()) == []


def test_generator_exits_0_for_a_fifo_a_directory_or_a_dangling_link(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    dangling = tmp_path / "dangling.yaml"
    dangling.symlink_to(tmp_path / "nowhere")
    subdir = tmp_path / "dir.yaml"
    subdir.mkdir()
    for config, why in ((fifo, "not a regular file"), (subdir, "not a regular file"),
                        (dangling, "cannot read")):
        r, out = generate(tmp_path, config)
        assert (r.returncode, why in r.stderr) == (0, True), r.stderr
        assert list(out.iterdir()) == []


def test_overlaps_of_ten_thousand_studies_are_checked_in_seconds() -> None:
    # Comparing every pair took minutes for the thousands of studies 1 MiB can hold.
    studies = {f"s{i}": {"destination": f"/study/s{i}"} for i in range(10_000)}
    studies["z"] = {"destination": "/study/s5/sub"}
    started = time.monotonic()
    with pytest.raises(ConfigError) as e:
        parse({"studies": studies})
    assert time.monotonic() - started < 30
    assert str(e.value).endswith("studies.z.destination: overlaps the destination of study s5 "
                                 "(/study/s5)")
