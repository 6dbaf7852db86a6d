"""The proof campaign (tests/campaign/): seeded hostile-input and kill trials, counted.

Reduced counts in `make test`; `DITTOHEAD_CAMPAIGN=full` (`make campaign`) runs the full
counts and rewrites docs/reliability.md. A trial whose outcome is not its case's expected
one fails the test, naming the seed (`DITTOHEAD_CAMPAIGN_SEED` replays it) and the trial.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator

import pytest

from tests.campaign import DELIVERED, MODE, OTHER, SEED, CampaignFailure, Tally, report, trials
from tests.campaign.hostile import trial
from tests.campaign.hostile_cases import CASES, Case
from tests.campaign.kills import POINTS, STAGES, kill_trial, prepare
from tests.campaign.mounts import fuse_available, quota_available
from tests.campaign.storage import CASES as STORAGE_CASES
from tests.campaign.storage import Case as StorageCase
from tests.campaign.storage import trial as storage_trial

from .boxes import boot_installed
from .conftest import ThrowawayUser

pytestmark = [pytest.mark.campaign, pytest.mark.root]


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    print(f"\ncampaign seed {SEED} ({MODE}); replay with DITTOHEAD_CAMPAIGN_SEED={SEED}")
    yield
    if "DITTOHEAD_CAMPAIGN" in os.environ:
        print(f"wrote {report.write()}")


def run_case(table: str, case: Case, svc: ThrowawayUser, ra: ThrowawayUser) -> Tally:
    tally = Tally(table, case.name, case.does, case.expect.describe(), SEED)
    try:
        for i in range(case.trials):
            seen = trial(case, i, svc, ra)
            tally.add(seen)
            if seen.outcome != case.expect.outcome:
                raise CampaignFailure(
                    f"{case.name} trial {i} (seed {SEED}): expected {case.expect.describe()}, "
                    f"got {seen.outcome}: {seen.reason}")
    finally:
        report.save(tally)
    return tally


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_has_its_expected_outcome(case: Case, svc: ThrowawayUser,
                                                ra: ThrowawayUser) -> None:
    started = time.monotonic()
    tally = run_case("hostile", case, svc, ra)
    report.add_time("hostile", time.monotonic() - started)
    assert tally.counts.get(OTHER, 0) == 0


def test_there_are_at_least_forty_hostile_cases() -> None:
    assert len({c.name for c in CASES}) == len(CASES) >= 40


@pytest.mark.slow
@pytest.mark.parametrize("case", STORAGE_CASES, ids=[c.name for c in STORAGE_CASES])
def test_storage_fault_loses_nothing_and_the_entry_is_delivered_once_after(
        case: StorageCase, svc: ThrowawayUser, ra: ThrowawayUser) -> None:
    if case.fs == "faultfs" and (why := fuse_available()):
        pytest.skip(f"faultfs cannot run: {why}")
    if case.fs == "tmpfs-quota" and (why := quota_available()):
        report.save(Tally("storage", case.name, case.does, case.expect(), SEED,
                          note=f"NOT RUN: {why}"))
        pytest.skip(f"NOT RUN: {why}")
    started = time.monotonic()
    tally = Tally("storage", case.name, case.does, case.expect(), SEED)
    try:
        for i in range(case.trials):
            seen = storage_trial(case, i, svc, ra)
            tally.add(seen)
            if seen.outcome == OTHER:
                raise CampaignFailure(f"{case.name} trial {i} (seed {SEED}): expected "
                                      f"{case.expect()}, got {seen.reason}")
    finally:
        if tally.reasons:
            tally.note = "; ".join(tally.reasons[:2]).replace("|", "/")
        report.save(tally)
        report.add_time("storage", time.monotonic() - started)


@pytest.mark.systemd
@pytest.mark.slow
def test_sigkill_of_the_service_at_any_stage_then_the_next_run_delivers_once(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    started = time.monotonic()
    n = trials(2, 20) * len(POINTS)
    schedule = [POINTS[i % len(POINTS)] for i in range(n)]
    random.Random(f"{SEED}:kills").shuffle(schedule)
    tallies = {p: Tally("kills", f"kill at {p}", STAGES[p.partition(":")[0]],
                        f"{DELIVERED}, byte-identical, nothing left", SEED) for p in POINTS}
    hits = dict.fromkeys(POINTS, 0)
    report.plan("kills", n)
    box = boot_installed(tmp_path_factory.mktemp("campaign-box", numbered=True))
    try:
        prepare(box)
        for i, point in enumerate(schedule):
            if not report.part(i):
                continue
            seen, at, hit = kill_trial(box, i, point)
            tallies[point].add(seen)
            hits[point] += hit
            print(f"kills trial {i}: {at}: {seen.outcome}, killed a run: {hit}")
    finally:
        box.box.poweroff()
        for p, t in tallies.items():
            if not t.counts:
                continue
            t.note = f"the kill hit a running delivery in {hits[p]} of {sum(t.counts.values())}"
            report.save(t)
        report.add_time("kills", time.monotonic() - started)
