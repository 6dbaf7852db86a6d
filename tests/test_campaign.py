"""The proof campaign (tests/campaign/): seeded hostile-input and kill trials, counted.

Reduced counts in `make test`; `DITTOHEAD_CAMPAIGN=full` (`make campaign`) runs the full
counts and rewrites docs/reliability.md. A trial whose outcome is not its case's expected
one fails the test, naming the seed (`DITTOHEAD_CAMPAIGN_SEED` replays it) and the trial.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from tests.campaign import MODE, OTHER, SEED, CampaignFailure, Tally, report
from tests.campaign.hostile import trial
from tests.campaign.hostile_cases import CASES, Case

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
