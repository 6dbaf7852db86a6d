"""The campaign's network table: a destination on sshfs, served by sshd in a booted box.

Deliveries refuse sshfs (dittohead/fstype.py, measured in docs/field-notes.md, "sshfs"):
each case checks the refusal, that nothing on the NAS changed and nothing was lost, and
that the next run after the admin's fix delivers every entry once (tests/campaign/sshfs.py).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import pytest

from tests.campaign import OTHER, SEED, CampaignFailure, Tally, report
from tests.campaign.sshfs import CASES, Case, prepare, trial

from .boxes import Box, boot_installed

# The seed line, and docs/reliability.md rewritten at the module's end (DITTOHEAD_CAMPAIGN).
from .test_campaign import _report  # noqa: F401

pytestmark = [pytest.mark.campaign, pytest.mark.root, pytest.mark.systemd, pytest.mark.slow]


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    if shutil.which("sshfs") is None:
        pytest.skip("NEEDS sshfs (`make test` installs it)")
    started = time.monotonic()
    b = boot_installed(tmp_path_factory.mktemp("sshfs-box", numbered=True))
    try:
        prepare(b)
        report.add_time("network", time.monotonic() - started)
        yield b
    finally:
        b.box.poweroff()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_destination_on_sshfs_is_refused_nothing_lost_and_delivered_once_after(
        box: Box, case: Case) -> None:
    started = time.monotonic()
    expect = ("refused (exit 78, `is on fuse.sshfs`)" if case.exit == 78 else
              f"kept (exit 75, `{case.says}`), refused (78) once mounted again")
    expect += ", entries kept, the NAS unchanged; delivered once after the fix"
    tally = Tally("network", case.name, case.does, expect, SEED)
    try:
        for i in range(case.trials):
            seen = trial(box, case, i)
            tally.add(seen)
            if seen.outcome == OTHER:
                raise CampaignFailure(f"{case.name} trial {i} (seed {SEED}): {seen.reason}")
    finally:
        if tally.reasons:
            tally.note = tally.reasons[0].replace("|", "/")
        report.save(tally)
        report.add_time("network", time.monotonic() - started)
