"""Capacity: out-of-space mail once per kept entry, the dropbox's thresholds, the forecast,
and `status` as one table."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dittohead import capacity
from dittohead.errors import EXIT_OK, EXIT_TEMPFAIL

from .conftest import Env, Inbox, mail_env, mount_tmpfs, tree
from .test_notify import body

DAY = 86400.0
MB = 1_000_000


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _receipt(done: Path, finished: float, nbytes: int, n: int = 0) -> None:
    """A delivered receipt, named like claim.new_id names them (the claim's time first)."""
    rid = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(finished - 60)) + f"-e{n}-abcdef"
    (done / f"{rid}.json").write_text(json.dumps({
        "study": "s1", "id": rid, "entry": f"e{n}", "uploader": "u", "outcome": "delivered",
        "files": 1, "bytes": nbytes, "finished": _iso(finished)}))


def test_forecast_divides_available_space_by_the_last_14_days_rate() -> None:
    now = 100 * DAY
    fc = capacity.forecast([(now - DAY, 7 * MB), (now - 2 * DAY, 7 * MB)], now - 60 * DAY,
                           available=23 * MB, now=now)
    assert fc is not None
    assert (fc.rate_bytes_per_day, fc.window_days, fc.days_to_full) == (MB, 14, 23)
    assert fc.text() == "at the last 14 days' rate (1.0 MB a day), full in about 23 days"


def test_forecast_of_a_young_study_counts_only_the_days_since_its_first_delivery() -> None:
    now = 100 * DAY
    fc = capacity.forecast([(now - DAY, 4 * MB)], now - 2 * DAY, available=10 * MB, now=now)
    assert fc is not None and (fc.window_days, fc.rate_bytes_per_day) == (2, 2 * MB)
    # A first delivery an hour ago is taken as a day's worth, not 24 days'.
    fc = capacity.forecast([(now - 3600, MB)], now - 3600, available=MB, now=now)
    assert fc is not None and fc.window_days == 1


def test_no_delivery_in_the_window_means_no_forecast() -> None:
    assert capacity.forecast([], 0.0, available=MB, now=DAY) is None


def test_forecast_reads_only_receipts_finished_in_the_window(tmp_path: Path) -> None:
    now = time.time()
    _receipt(tmp_path, now - 40 * DAY, 999 * MB, 1)  # too old: not counted, but the first
    _receipt(tmp_path, now - 3 * DAY, 5 * MB, 2)
    _receipt(tmp_path, now - 13 * DAY, 9 * MB, 3)
    (tmp_path / "not-a-receipt.json").write_text("{")
    found, first = capacity.recent_deliveries(tmp_path, now)
    assert sorted(b for _, b in found) == [5 * MB, 9 * MB]
    assert first is not None and first < now - 40 * DAY


def test_a_year_of_10k_receipts_is_read_in_well_under_a_second(tmp_path: Path) -> None:
    now = time.time()
    for n in range(10_000):
        _receipt(tmp_path, now - (n % 365) * DAY - 120, MB, n)
    started = time.perf_counter()
    found, _ = capacity.recent_deliveries(tmp_path, now)
    took = time.perf_counter() - started
    assert len(found) == sum(1 for n in range(10_000) if n % 365 < 14)
    assert took < 1.0, f"{took:.2f} s"


def test_forecast_warning_once_when_it_drops_under_forecast_warn_days(
        shared_base: Path, smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    env = mail_env(shared_base, port)
    env.reload(disk_warn_percent=[])  # thresholds apart: only the forecast speaks
    # A rate the real disk cannot take for long: 10 PB in the last days.
    _receipt(env.study.done, time.time() - DAY, 10**16, 1)
    env.drop("e", {"a.txt": b"a"})
    r = env.process()
    assert r.returncode == EXIT_OK, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "MESSAGE_ID=6640f08a" in line]
    assert len(warnings) == 1 and "full in about 0 days at the last" in warnings[0]
    assert "DITTOHEAD_PATH=" in warnings[0] and "DITTOHEAD_DESTINATION=" in warnings[0]
    subjects = [" ".join(str(m["Subject"]).split()) for _, m in inbox.messages]
    assert any("fills: full in about 0 days" in s for s in subjects), subjects
    env.drop("f", {"b.txt": b"b"})
    r = env.process()
    assert "MESSAGE_ID=6640f08a" not in r.stderr  # once per crossing, not per delivery
    assert "full in about 0 days: make room or grow it" in env.run("check", "s1").stdout
    data = json.loads(env.run("status", "s1", "--json", check=True).stdout)[0]
    assert data["forecast"]["days_to_full"] < 1 and data["forecast"]["window_days"] >= 1


def test_config_refuses_bad_capacity_keys(env: Env) -> None:
    env.config_path.write_text(env.config_path.read_text().replace(
        "quiet_period: 0", "quiet_period: 0\n    forecast_warn_days: 0"))
    r = env.run("check", "s1")
    assert "studies.s1.forecast_warn_days: must be a whole number of days" in r.stderr
    env.config_path.write_text(env.config_path.read_text().replace(
        "forecast_warn_days: 0", "forecast_warn_days: null") + "dropbox_warn_percent: [120]\n")
    r = env.run("check", "s1")
    assert "dropbox_warn_percent: must be a list of whole percentages" in r.stderr
    assert "forecast_warn_days" not in r.stderr


def test_status_is_one_table_with_ages_fill_and_forecast(env: Env) -> None:
    env.drop("e", {"a.txt": b"a"})
    assert env.process().returncode == EXIT_OK
    env.drop("g", {"b.txt": b"b"})
    out = env.run("status", check=True).stdout.splitlines()
    assert out[0].split() == ["STUDY", "PENDING", "OLDEST", "FAILED", "LAST", "DELIVERY",
                              "FILL", "FULL", "IN", "UNITS"]
    cells = out[1].split()
    assert cells[:4] == ["s1", "1", cells[2], "0"] and cells[2].endswith("s")
    assert cells[5].endswith("%") and cells[6].endswith("d")
    assert out[2].startswith(f"dropbox {env.cfg.dropbox_root}: ")
    assert "\033[" not in "\n".join(out)  # not a terminal: no colour
    one = env.run("status", "s1", check=True).stdout
    assert "1 pending, 0 waiting to be quiet" in one and "  forecast: at the last " in one
    [data] = json.loads(env.run("status", "--json", check=True).stdout)
    for key in ("pending", "waiting", "uploading", "processing", "failed", "delivered",
                "last_delivery", "destination", "disk", "units", "oldest_pending",
                "oldest_pending_age_seconds", "last_delivery_age_seconds", "dropbox",
                "forecast", "unit_state"):
        assert key in data, key
    assert set(data["forecast"]) == {"days_to_full", "rate_bytes_per_day", "window_days"}


def test_status_colours_only_on_a_terminal_without_no_color(env: Env) -> None:
    (env.study.failed / "x.json").write_text("{}")  # one failed entry: red
    cmd = (f"cd {Path(__file__).parent.parent} && DITTOHEAD_LOG=stderr {sys.executable} "
           f"-m dittohead --config {env.config_path} status")
    script = ["script", "-qec", cmd, "/dev/null"]
    coloured = subprocess.run(script, capture_output=True, text=True, check=True).stdout
    assert "\033[31m1\033[0m" in coloured
    plain = subprocess.run(["env", "NO_COLOR=1", *script], capture_output=True, text=True,
                           check=True).stdout
    assert "\033[" not in plain and " 1 " in plain


# --- a destination and a dropbox that fill: small filesystems of their own (root) ----------

def _fill(path: Path, leave: int = 0) -> Path:
    """Fill the filesystem of path, leaving about `leave` bytes free; the hog file."""
    hog = path / "hog"
    subprocess.run(["dd", "if=/dev/zero", f"of={hog}", "bs=4k"], capture_output=True,
                   check=False)
    if leave:
        size = hog.stat().st_size
        subprocess.run(["truncate", "-s", str(max(0, size - leave)), str(hog)], check=True)
    return hog


@pytest.fixture
def small_destination(shared_base: Path, smtp: tuple[Inbox, int]) -> Iterator[
        tuple[Env, Inbox]]:
    inbox, port = smtp
    env = mail_env(shared_base, port, on=["failed", "disk"])
    mount_tmpfs(env.study.destination, "size=4m")
    try:
        yield env, inbox
    finally:
        subprocess.run(["umount", "-l", str(env.study.destination)], check=False)


@pytest.mark.root
def test_out_of_space_is_told_once_and_again_when_delivered(
        small_destination: tuple[Env, Inbox]) -> None:
    env, inbox = small_destination
    hog = _fill(env.study.destination, leave=1 << 20)
    env.drop("s01-session1", {"big.dat": b"x" * (2 << 20)})
    r = env.process()
    assert r.returncode == EXIT_TEMPFAIL, r.stderr
    [(rcpt, m)] = inbox.messages
    uploader = r.stderr.split("DITTOHEAD_UPLOADER=")[1].split()[0].rstrip("]")
    assert rcpt == ["pi@example.edu", f"{uploader}@example.edu"]
    assert m["Subject"] == "[dittohead s1] out of space: s01-session1 waits"
    text = body(m)
    assert (f"Study s1 is out of space: s01-session1 (2.1 MB) waits, 1.0 MB free on "
            f"{env.study.destination}; it will be delivered when space is freed") in text
    assert r.stderr.count("MESSAGE_ID=9f00b37b") == 1
    [record] = [p for p in env.study.processing.glob("*.json") if p.name[0] != "."]
    assert json.loads(record.read_text())["space_told"]
    r = env.process()  # the timer's retry: kept again, not told again
    assert r.returncode == EXIT_TEMPFAIL and "MESSAGE_ID=9f00b37b" not in r.stderr
    assert len(inbox.messages) == 1
    hog.unlink()
    r = env.process()
    assert r.returncode == EXIT_OK, r.stderr
    assert tree(env.study.destination) == {"big.dat": b"x" * (2 << 20)}
    (rcpt, m) = inbox.messages[1]
    # `delivered` is not in notify.on: the contacts hear of it as they heard of the wait.
    assert rcpt == ["pi@example.edu", f"{uploader}@example.edu"]
    assert "after waiting for space" in str(m["Subject"])
    assert "Waited:      for space in" in body(m)


@pytest.mark.root
def test_a_delivery_that_never_waited_is_not_told_to_contacts_without_delivered(
        small_destination: tuple[Env, Inbox]) -> None:
    env, inbox = small_destination
    env.drop("e", {"a.txt": b"a"})
    assert env.process().returncode == EXIT_OK
    [(rcpt, _)] = inbox.messages
    assert "pi@example.edu" not in rcpt


@pytest.fixture
def small_dropbox(shared_base: Path, smtp: tuple[Inbox, int]) -> Iterator[tuple[Env, Inbox]]:
    inbox, port = smtp
    box = shared_base / "box"
    box.mkdir()
    mount_tmpfs(box, "size=4m")
    try:
        yield mail_env(shared_base, port, on=["disk"]), inbox
    finally:
        subprocess.run(["umount", "-l", str(box)], check=False)


@pytest.mark.root
def test_dropbox_filling_past_a_threshold_warns_and_mails_once(
        small_dropbox: tuple[Env, Inbox]) -> None:
    env, inbox = small_dropbox
    hog = _fill(env.study.root, leave=300 << 10)  # about 93% used
    r = env.process()
    warnings = [line for line in r.stderr.splitlines() if "MESSAGE_ID=6640f08a" in line]
    assert len(warnings) == 1, r.stderr
    assert f"DITTOHEAD_PATH={env.study.root}" in warnings[0]
    assert "DITTOHEAD_DESTINATION" not in warnings[0] and "crossed 90%" in warnings[0]
    [(rcpt, m)] = inbox.messages
    assert rcpt == ["pi@example.edu"] and "the dropbox" in str(m["Subject"])
    r = env.process()
    assert "MESSAGE_ID=6640f08a" not in r.stderr and len(inbox.messages) == 1
    assert "the dropbox's filesystem" in env.run("check", "s1").stdout
    hog.unlink()
    env.process()  # below again: the next crossing is told again
    _fill(env.study.root, leave=300 << 10)
    assert "MESSAGE_ID=6640f08a" in env.process().stderr


@pytest.mark.root
def test_dropbox_too_full_to_claim_is_told_once_in_the_journal(
        small_dropbox: tuple[Env, Inbox]) -> None:
    env, _ = small_dropbox
    env.drop("e", {"a.txt": b"a"})
    hog = _fill(env.study.root)
    r = env.process()
    assert r.returncode == EXIT_TEMPFAIL, r.stderr
    assert "the dropbox" in r.stderr and "is full: uploads wait in the inbox" in r.stderr
    hog.unlink()
    assert env.process().returncode == EXIT_OK
