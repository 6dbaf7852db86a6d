"""The run's peak memory in the journal events of filed entries (DITTOHEAD_MAXRSS_KIB)."""

from __future__ import annotations

import re

from .conftest import Env


def maxrss_fields(stderr: str) -> list[int]:
    return [int(m) for m in re.findall(r"DITTOHEAD_MAXRSS_KIB=(\d+)", stderr)]


def test_delivered_and_failed_events_carry_the_runs_peak_memory(env: Env) -> None:
    env.drop("ok", {"a.txt": b"a" * 5000})
    (env.study.destination / "clash.txt").write_bytes(b"theirs")
    env.drop("clash", {"clash.txt": b"ours"})
    r = env.process()
    assert r.returncode == 0, r.stderr
    peaks = maxrss_fields(r.stderr)
    assert len(peaks) == 2, r.stderr  # one per filed entry, the delivered and the failed
    # A Python run with its imports: megabytes, not bytes and not gigabytes.
    assert all(5_000 < kib < 500_000 for kib in peaks), peaks
    assert peaks == sorted(peaks)  # a peak "so far" never goes down within a run


def test_kept_entry_event_has_no_peak_memory(env: Env) -> None:
    env.drop("later", {"a.txt": b"a"})
    env.study.destination.rmdir()  # not there: kept for a later run (75)
    r = env.process()
    assert r.returncode == 75, r.stderr
    assert "DITTOHEAD_MAXRSS_KIB" not in r.stderr
