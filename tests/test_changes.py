"""What a lockdown cannot stop: writes through descriptors opened before the claim.

Whatever a receipt calls delivered must be byte-identical to its source as the
uploader left it. A file still open for writing (or mapped shared and
writable) keeps the entry claimed for a later run (exit 75), nothing of it
published; once the writer is done the entry is delivered whole; an entry
that stays busy past the limit fails, naming the files.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import mmap
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dittohead.errors import EXIT_OK, EXIT_TEMPFAIL

from .conftest import Env, manifest_verifies, no_leftovers, tree


def _claim_record(env: Env) -> Path:
    records = sorted(env.study.processing.glob("*.json"))
    assert len(records) == 1, records
    return records[0]


def _kept_untouched(env: Env) -> None:
    """Nothing published, no staging left, the entry still claimed."""
    assert tree(env.study.destination) == {}
    assert not list(env.study.destination.glob(".incoming-*"))
    assert not env.done_receipts() and not env.failed_receipts()
    assert len([p for p in env.study.processing.iterdir() if not p.name.startswith(".")]) == 2


@pytest.fixture
def writer(env: Env) -> Iterator[tuple[Path, int]]:
    """An entry whose file `log.txt` a program (this test) keeps open for writing."""
    entry = env.drop("session", {"log.txt": b"first line\n", "other.txt": b"x"})
    fd = os.open(entry / "log.txt", os.O_WRONLY | os.O_APPEND)
    try:
        yield entry, fd
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def test_file_open_for_writing_keeps_the_entry_until_the_writer_closes_it(
        env: Env, writer: tuple[Path, int]) -> None:
    _, fd = writer
    r = env.process()
    assert r.returncode == EXIT_TEMPFAIL, r.stderr
    assert "log.txt is still open for writing by a program" in r.stderr
    _kept_untouched(env)
    record = json.loads(_claim_record(env).read_text())
    assert record["busy_files"] == ["log.txt"] and record["busy_since"]

    # The program writes on through its descriptor, then is done with the file.
    os.write(fd, b"second line\n")
    os.close(fd)
    r = env.process()
    assert r.returncode == EXIT_OK, r.stderr
    assert tree(env.study.destination) == {"log.txt": b"first line\nsecond line\n",
                                           "other.txt": b"x"}
    (rc,) = env.done_receipts()
    manifest_verifies(env, rc)
    no_leftovers(env)


def test_entry_busy_for_longer_than_the_limit_fails_naming_the_files(
        env: Env, writer: tuple[Path, int]) -> None:
    assert env.process().returncode == EXIT_TEMPFAIL
    # An hour and more later (the record says when the entry was first found busy):
    path = _claim_record(env)
    record = json.loads(path.read_text())
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    record["busy_since"] = long_ago.strftime("%Y-%m-%dT%H:%M:%SZ")
    path.write_text(json.dumps(record))
    r = env.process()
    assert r.returncode == EXIT_OK, r.stderr
    (rc,) = env.failed_receipts()
    reason = json.loads(rc.read_text())["reason"]
    assert "log.txt" in reason and "60 minutes" in reason, reason
    assert tree(env.study.destination) == {}
    no_leftovers(env)


def test_shared_writable_mapping_counts_as_a_writer(env: Env) -> None:
    entry = env.drop("mapped", {"data.bin": b"\0" * 8192})
    fd = os.open(entry / "data.bin", os.O_RDWR)
    mapping = mmap.mmap(fd, 8192, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(fd)  # the mapping alone keeps the file open for writing
    try:
        mapping[:5] = b"hello"  # a page already dirty: later stores change no timestamp
        r = env.process()
        assert r.returncode == EXIT_TEMPFAIL, r.stderr
        assert "data.bin is still open for writing" in r.stderr
        _kept_untouched(env)
    finally:
        mapping.close()
    assert env.process().returncode == EXIT_OK
    assert tree(env.study.destination)["data.bin"][:5] == b"hello"


def test_file_held_under_a_write_lease_keeps_the_entry(env: Env) -> None:
    entry = env.drop("leased", {"a.txt": b"a"})
    fd = os.open(entry / "a.txt", os.O_RDONLY)
    old = signal.signal(signal.SIGIO, signal.SIG_IGN)  # the lease break signals us
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        r = env.process()
        assert r.returncode == EXIT_TEMPFAIL, r.stderr
        assert "a.txt is held by a program" in r.stderr
        _kept_untouched(env)
    finally:
        os.close(fd)
        signal.signal(signal.SIGIO, old)
    assert env.process().returncode == EXIT_OK
    assert tree(env.study.destination) == {"a.txt": b"a"}


def test_file_rewritten_during_the_delivery_is_never_published_without_leases(
        env: Env) -> None:
    # As on NFS (no leases): only the timestamps can tell. A program rewrites
    # a big file in place, same size, all through the run.
    size = 32 << 20
    entry = env.drop("rewritten", {"big.bin": b"\1" * size})
    fd = os.open(entry / "big.bin", os.O_WRONLY)
    stop = threading.Event()

    def rewrite() -> None:
        n = 0
        while not stop.is_set():
            os.pwrite(fd, bytes([n % 256]) * 4096, (n * 4096) % size)
            n += 1

    t = threading.Thread(target=rewrite)
    t.start()
    try:
        r = env.process(env={"DITTOHEAD_TEST_FAULT": "no-lease"})
    finally:
        stop.set()
        t.join()
        os.close(fd)
    assert r.returncode == EXIT_TEMPFAIL, r.stderr
    assert "big.bin changed" in r.stderr
    _kept_untouched(env)
    r = env.process(env={"DITTOHEAD_TEST_FAULT": "no-lease"})
    assert r.returncode == EXIT_OK, r.stderr
    (rc,) = env.done_receipts()
    manifest_verifies(env, rc)


def test_same_name_already_delivered_is_compared_only_once_no_one_writes_it(
        env: Env) -> None:
    # A re-upload of a file already in the destination is compared by content;
    # that comparison must not read a file a program is still writing.
    env.drop("first", {"same.txt": b"same"})
    assert env.process().returncode == EXIT_OK
    entry = env.drop("again", {"same.txt": b"same"})
    fd = os.open(entry / "same.txt", os.O_WRONLY | os.O_APPEND)
    try:
        r = env.process()
        assert r.returncode == EXIT_TEMPFAIL, r.stderr
        assert "same.txt is still open for writing" in r.stderr
    finally:
        os.close(fd)
    assert env.process().returncode == EXIT_OK
    assert len(env.done_receipts()) == 2


def test_a_writer_found_before_is_checked_first_and_nothing_is_copied_again(
        env: Env, writer: tuple[Path, int]) -> None:
    assert env.process().returncode == EXIT_TEMPFAIL
    r = env.process()
    assert r.returncode == EXIT_TEMPFAIL, r.stderr
    assert "log.txt still open for writing by a program; nothing was copied" in r.stderr
    _kept_untouched(env)


def test_a_big_entry_with_a_file_still_written_copies_nothing(env: Env) -> None:
    entry = env.drop("big", {"a-big.bin": b"\1" * (64 << 20), "z-log.txt": b"log\n"})
    fd = os.open(entry / "z-log.txt", os.O_WRONLY | os.O_APPEND)
    try:
        r = env.process()
    finally:
        os.close(fd)
    assert r.returncode == EXIT_TEMPFAIL, r.stderr
    assert "z-log.txt still open for writing by a program; nothing was copied" in r.stderr
    _kept_untouched(env)
    assert env.process().returncode == EXIT_OK
