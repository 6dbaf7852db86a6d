"""The upgrade campaign (tests/campaign/upgrade.py): `dpkg -i` of another version of the
package while a delivery is held and entries wait, up and down again, on a booted systemd.

Two packages are built from this checkout, `make deb DEB_VERSION=<version>+up1` and `+up2`:
the same code, told apart by `dittohead --version` and the `DITTOHEAD_VERSION` of each
journal event. Reduced: one trial per point of REDUCED_POINTS, alternately up and down;
full: each point of FULL_POINTS up and down. Then, from BASE_COMMIT (the code before
upgrades were handled: its scripts pause nothing, its runs go on with the old code, its
events carry no version), a package `+up0`: a downgrade to it and an upgrade from it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import pytest

from tests.campaign import DELIVERED, FULL, SEED, Tally, report
from tests.campaign.kills import STAGES
from tests.campaign.upgrade import (
    FULL_POINTS,
    REDUCED_POINTS,
    Release,
    prepare,
    resume_paused,
    upgrade_trial,
)

from .boxes import Box
from .packages import REPO, VERSION, installed_box, run

# The seed line, and docs/reliability.md rewritten at the module's end (DITTOHEAD_CAMPAIGN).
from .test_campaign import _report  # noqa: F401

pytestmark = [pytest.mark.campaign, pytest.mark.root, pytest.mark.systemd, pytest.mark.slow]

OLD, NEW = Release(f"{VERSION}+up1", f"{VERSION}+up1", f"{VERSION}+up1"), \
    Release(f"{VERSION}+up2", f"{VERSION}+up2", f"{VERSION}+up2")
# The last commit before the packages and runs handled upgrades.
BASE_COMMIT = "8af2f3b16cb0a065de9fdf98892393e6e580e09c"
BASE = Release(f"{VERSION}+up0", VERSION, None, ends_on_upgrade=False)
BASE_POINT = "published:1"
DOES = {**STAGES,
        "stream": "no run held: an uploader drops an entry every 0.1 s throughout"}


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The packages by version, built once (`make deb DEB_VERSION=...`); BASE's from a
    copy of BASE_COMMIT, when this clone has it."""
    deps = run("make", "-s", "deb-deps", check=False)
    if deps.returncode != 0:
        pytest.skip("SKIPPED LOUDLY: cannot install dpkg-buildpackage/debhelper/dh-python "
                    f"(make deb-deps): {(deps.stdout + deps.stderr).strip()[-1000:]}")
    built = {}
    for release in (OLD, NEW):
        deb = REPO / "dist" / f"dittohead_{release.package}_all.deb"
        deb.unlink(missing_ok=True)
        run("make", "deb", f"DEB_VERSION={release.package}")
        assert deb.is_file(), deb
        built[release.package] = str(deb)
    if run("git", "cat-file", "-e", f"{BASE_COMMIT}^{{commit}}", check=False).returncode:
        print(f"\nNOT RUN: the trials from and to {BASE.package}: this clone has no "
              f"{BASE_COMMIT} (a shallow clone?)")
        return built
    src = tmp_path_factory.mktemp("upgrade-base")
    run("/bin/sh", "-c", f'git archive {BASE_COMMIT} | tar -x -C "$0"', str(src))
    run("make", "-C", str(src), "deb", f"DEB_VERSION={BASE.package}")
    deb = REPO / "dist" / f"dittohead_{BASE.package}_all.deb"  # where the box sees it
    shutil.copyfile(src / "dist" / deb.name, deb)
    built[BASE.package] = str(deb)
    return built


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    """A booted box with nothing installed yet (no policy-rc.d: a real host has none)."""
    with installed_box(tmp_path_factory, "upgrade", [("rm", "-f", "/usr/sbin/policy-rc.d")],
                       ("true",)) as b:
        yield Box(b)


def schedule(base: bool) -> list[tuple[str, Release, Release]]:
    """(point, from, to) of each trial: up and down alternately; full: each point both ways;
    with base, then down to BASE and up from it again."""
    points = [p for p in FULL_POINTS for _ in range(2)] if FULL else list(REDUCED_POINTS)
    trials = [(p, *((OLD, NEW) if i % 2 == 0 else (NEW, OLD))) for i, p in enumerate(points)]
    if base:
        trials += [(BASE_POINT, trials[-1][2], BASE), (BASE_POINT, BASE, NEW)]
    return trials


def case_of(point: str, frm: Release, to: Release) -> tuple[str, str, str]:
    """The report's case (a point, or the base's trials), what its trials do and expect."""
    if BASE in (frm, to):
        return (f"{point} {BASE.package}", DOES[point.partition(":")[0]] + "; `dpkg -i` "
                f"down to {BASE.package} (the code before upgrades were handled, commit "
                f"{BASE_COMMIT[:7]}), and up from it to {NEW.package}",
                f"{DELIVERED}, nothing lost; what waited by the new version after the "
                f"downgrade, by either after the upgrade (a run of {BASE.package} goes on "
                "with its code)")
    ways = {"up" if t == NEW else "down" for p, _, t in schedule(False) if p == point}
    return point, (DOES[point.partition(":")[0]] + "; `dpkg -i` " + " and ".join(
        f"{w} (to {(NEW if w == 'up' else OLD).package})" for w in sorted(ways, reverse=True))
    ), f"{DELIVERED}, nothing lost, what waited by the new version"


def test_upgrade_and_downgrade_under_a_held_delivery_lose_nothing(
        debs: dict[str, str], box: Box) -> None:
    started = time.monotonic()
    trials = schedule(BASE.package in debs)
    report.plan("upgrade", len(trials))
    tallies: dict[str, Tally] = {}
    entries: dict[str, int] = {}
    try:
        prepare(box, debs[OLD.package])
        for i, (point, frm, to) in enumerate(trials):
            if not report.part(i):
                continue
            if box.box.run("dpkg-query", "-W", "-f=${Version}", "dittohead"
                           ).stdout != frm.package:
                box.box.run("dpkg", "-i", debs[frm.package], timeout=600)  # a part's first
            seen, at = upgrade_trial(box, i, point, frm, to, debs)
            case, does, expect = case_of(point, frm, to)
            tally = tallies.setdefault(case, Tally("upgrade", case, does, expect, SEED))
            tally.add(seen)
            entries[case] = entries.get(case, 0) + seen.files
            print(f"upgrade trial {i}: {at} {frm.package} -> {to.package}: dpkg -i "
                  f"{seen.seconds:.1f} s, {seen.files} entries delivered once")
        resume_paused(box)
    finally:
        for case, t in tallies.items():
            t.files = 0  # entries, not files: in the note
            t.note = (f"the figures: dpkg -i; entries (held and waiting) delivered once in "
                      f"{entries[case]} of {entries[case]}")
            report.save(t)
        report.add_time("upgrade", time.monotonic() - started)
