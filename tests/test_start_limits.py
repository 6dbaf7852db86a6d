"""Units started by every run of a study's service must not fail on a start limit."""

from __future__ import annotations

import re
from pathlib import Path

UNITS = Path(__file__).resolve().parent.parent / "units"


def test_units_every_run_starts_have_no_start_limit() -> None:
    # Runs end every ~0.7 s while an admin adds accounts (each run ends when /etc/passwd
    # is replaced), and 50 studies end theirs within seconds: the default limit (5 in
    # 10 s) failed the mailer and the metrics unit (the load campaign found both).
    study = (UNITS / "dittohead@.service").read_text()
    started = set(re.findall(r"^On(?:Success|Failure)=(dittohead-(?:mail@|metrics)\S*)$",
                             study, re.M))
    assert started == {"dittohead-mail@%i.service", "dittohead-metrics.service"}
    for unit in ("dittohead-mail@.service", "dittohead-metrics.service"):
        text = (UNITS / unit).read_text()
        assert re.search(r"^StartLimitIntervalSec=0$", text, re.M), unit
