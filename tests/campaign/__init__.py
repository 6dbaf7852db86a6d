"""The proof campaign: seeded trials of hostile inputs and faults, and the report they make.

Each case names what it does and the one outcome it must have; every trial's observed
outcome is counted. A trial with any other outcome fails the test, naming the seed and
the trial. `DITTOHEAD_CAMPAIGN=full` runs the full counts and rewrites
docs/reliability.md (report.py); unset, the reduced counts run (what `make test` does).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field

DELIVERED = "delivered once"
KEPT = "kept for retry"
FAILED = "failed"
REJECTED = "rejected"
OTHER = "other"

MODE = os.environ.get("DITTOHEAD_CAMPAIGN", "reduced")
FULL = MODE == "full"


def campaign_seed() -> int:
    """The run's seed: DITTOHEAD_CAMPAIGN_SEED to replay one, else a fresh one."""
    given = os.environ.get("DITTOHEAD_CAMPAIGN_SEED")
    return int(given) if given else random.SystemRandom().randrange(1 << 32)


SEED = campaign_seed()


def trials(reduced: int, full: int) -> int:
    """How many trials a case runs in this mode."""
    return full if FULL else reduced


@dataclass(frozen=True)
class Expect:
    """The one outcome a case must have; for failed, a regex its reason must match."""

    outcome: str
    reason: str = ""

    def describe(self) -> str:
        return f"{self.outcome}, reason matching `{self.reason}`" if self.reason \
            else self.outcome


@dataclass(frozen=True)
class Observed:
    """What one trial did: the outcome, the reason if any, and its figures."""

    outcome: str
    reason: str = ""
    seconds: float = 0.0
    bytes: int = 0
    files: int = 0


@dataclass
class Tally:
    """A case's counts over its trials, as the report shows them."""

    table: str
    case: str
    does: str
    expect: str
    seed: int
    counts: dict[str, int] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    bytes: int = 0
    files: int = 0
    note: str = ""  # a figure of the case's own (the kills: how many hit a run)

    def add(self, seen: Observed) -> None:
        self.counts[seen.outcome] = self.counts.get(seen.outcome, 0) + 1
        if seen.reason and seen.reason not in self.reasons and len(self.reasons) < 3:
            self.reasons.append(seen.reason)
        self.seconds.append(seen.seconds)
        self.bytes += seen.bytes
        self.files += seen.files


class CampaignFailure(AssertionError):
    """A trial whose outcome was not the expected one (or whose checks failed)."""


def trial_rng(case: str, index: int) -> random.Random:
    """The generator of one trial: the run's seed, the case and the trial's index."""
    return random.Random(f"{SEED}:{case}:{index}")


def timed() -> float:
    return time.monotonic()
