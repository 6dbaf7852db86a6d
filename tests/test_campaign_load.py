"""The load campaign (tests/campaign/load.py): many studies at once, and a big burst.

Reduced counts in `make test` (5 studies x 20 entries, one study x 100, a trickle of
5 x 5); with `DITTOHEAD_CAMPAIGN=full`, 50 studies x 100, one study x 1,000 and a
trickle of 50 x 20, and the report's "load" table is rewritten from the tallies.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.campaign import DELIVERED, SEED, Tally, report, trial_rng, trials
from tests.campaign.load import Load, add_studies, run_load

from .boxes import Box, boot_installed

# The seed line, and docs/reliability.md rewritten at the module's end (DITTOHEAD_CAMPAIGN).
from .test_campaign import _report  # noqa: F401

pytestmark = [pytest.mark.campaign, pytest.mark.root, pytest.mark.systemd, pytest.mark.slow]

STUDIES = Load("many-studies", f"{trials(5, 50)} studies enabled at once (every "
               "10th mails its contact), a burst of "
               f"{trials(20, 100)} entries of 3 files (1-64 KiB) into each, interleaved",
               "ld", trials(5, 50), trials(20, 100))
BIG = Load("one-big-burst", f"one study, a burst of {trials(100, 1000)} entries of 3 files "
           "(1-64 KiB)", "big", 1, trials(100, 1000))
TRICKLE = Load("trickle", f"the same {trials(5, 50)} studies, {trials(5, 20)} entries each "
               "arriving one by one, 0-6 s apart (around the runs' 3 s linger), every "
               "entry delivered within a minute (else its path unit missed it)",
               "ld", trials(5, 50), trials(5, 20), gap=6.0)
ACCOUNTS = Load("accounts-added", f"the same {trials(5, 50)} studies, a burst of "
                f"{trials(20, 100)} entries each; as it drains, the admin adds "
                f"{trials(10, 30)} uploader accounts (`useradd`), one every 0.5 s: each "
                "replaces /etc/passwd, and every run then ends for the next to see it",
                "ld", trials(5, 50), trials(20, 100),
                admin=f"for i in $(seq {trials(10, 30)}); do useradd -M lx$i; sleep 0.5; done")
LOADS = (STUDIES, BIG, TRICKLE, ACCOUNTS)
TIMEOUT = 1800.0  # seconds for one burst to drain, even in the full run


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    started = time.monotonic()
    b = boot_installed(tmp_path_factory.mktemp("load-box", numbered=True))
    try:
        add_studies(b, list(LOADS))
        report.add_time("load", time.monotonic() - started)
        yield b
    finally:
        b.box.poweroff()


# accounts-added found a run started while useradd replaces /etc/passwd failing to set
# up its sandbox (226/NAMESPACE): dittohead@.service now restarts for that alone.
@pytest.mark.parametrize("load", LOADS, ids=[ld.name for ld in LOADS])
def test_burst_is_delivered_exactly_once_and_no_unit_fails(box: Box, load: Load) -> None:
    started = time.monotonic()
    tally = Tally("load", load.name, load.does,
                  f"{DELIVERED}, manifests verify, no unit failed, nothing left", SEED)
    try:
        result = run_load(box, load, trial_rng("load", LOADS.index(load)).random(), TIMEOUT)
        for seen in result.seen:
            tally.add(seen)
        tally.bytes = result.nbytes
        tally.note = result.figures.note()
        if result.problems:  # the report says what went wrong, not only the counts
            tally.note += "; PROBLEMS: " + "; ".join(result.problems)[:300]
        print(f"{load.name}: {tally.note}")
    finally:
        if tally.counts:
            report.save(tally)
        report.add_time("load", time.monotonic() - started)
    assert not result.problems, "\n".join(result.problems)
    assert tally.counts == {DELIVERED: load.studies * load.entries}, tally.counts
