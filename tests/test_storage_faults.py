"""Storage that fails under a run keeps the entry and ends with the right exit code.

Regression tests for what the storage campaign (tests/campaign/storage.py) found: each
runs one trial of its case on a real faulty mount (faultfs over FUSE, ext4 on loop).
"""

from __future__ import annotations

import pytest

from tests.campaign import KEPT
from tests.campaign.mounts import fuse_available
from tests.campaign.storage import CASES, trial

from .conftest import ThrowawayUser

pytestmark = [pytest.mark.root, pytest.mark.slow]
BY_NAME = {c.name: c for c in CASES}


def _one(name: str, svc: ThrowawayUser, ra: ThrowawayUser) -> None:
    case = BY_NAME[name]
    if case.fs == "faultfs" and (why := fuse_available()):
        pytest.skip(f"faultfs cannot run: {why}")
    assert trial(case, 0, svc, ra).outcome == KEPT


def test_full_dropbox_while_the_receipt_is_written_keeps_the_entry_exit_75(
        svc: ThrowawayUser, ra: ThrowawayUser) -> None:
    _one("dropbox-receipt-enospc", svc, ra)  # was exit 1, "unexpected error"


def test_dropbox_gone_read_only_before_filing_exits_74_not_1(
        svc: ThrowawayUser, ra: ThrowawayUser) -> None:
    _one("dropbox-ext4-ro-checked", svc, ra)  # removing the spool raised EROFS again


def test_eio_renaming_into_the_destination_is_a_storage_failure_exit_74(
        svc: ThrowawayUser, ra: ThrowawayUser) -> None:
    _one("dest-publish-eio", svc, ra)  # was exit 75, "the destination went away"


def test_eio_without_a_file_name_names_the_two_filesystems_not_an_entry_file(
        svc: ThrowawayUser, ra: ThrowawayUser) -> None:
    _one("dest-statfs-eio", svc, ra)  # said "a file of the entry" for the destination's statfs
