"""The upgrade campaign (tests/campaign/upgrade.py): `dpkg -i` of another version of the
package while a delivery is held and entries wait, up and down again, on a booted systemd.

Two packages are built from this checkout, `make deb DEB_VERSION=<version>+up1` and `+up2`:
the same code, told apart by `dittohead --version` and the `DITTOHEAD_VERSION` of each
journal event. Reduced: one trial per point of REDUCED_POINTS, alternately up and down;
full: each point of FULL_POINTS up and down.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.campaign import DELIVERED, FULL, SEED, Tally, report
from tests.campaign.upgrade import (
    FULL_POINTS,
    REDUCED_POINTS,
    prepare,
    resume_paused,
    upgrade_trial,
)

from .boxes import Box
from .packages import REPO, VERSION, installed_box, run

pytestmark = [pytest.mark.campaign, pytest.mark.root, pytest.mark.systemd, pytest.mark.slow]

OLD, NEW = f"{VERSION}+up1", f"{VERSION}+up2"
DOES = {
    "chowned": "claim: entry taken over, not yet renamed out of the inbox",
    "taking": "lockdown: the walk holds a directory between its fstat and its takeover",
    "claimed": "claimed: destination open, nothing examined",
    "checked": "check: examined and planned, nothing staged",
    "staged": "stage: after the N-th file copied into the staging directory",
    "synced": "sync: staged files synced, no final name yet",
    "published": "publish: after the N-th rename into the destination",
    "verified": "verify: published, checked and synced, nothing filed",
    "receipt": "record: manifest and receipt written, entry still in processing",
    "filed": "record: entry filed, claim record and journal event not yet",
    "stream": "no run held: an uploader drops an entry every 0.1 s all through dpkg -i",
}


@pytest.fixture(scope="module")
def debs() -> dict[str, str]:
    """Both packages, built once (`make deb DEB_VERSION=...`), by version."""
    deps = run("make", "-s", "deb-deps", check=False)
    if deps.returncode != 0:
        pytest.skip("SKIPPED LOUDLY: cannot install dpkg-buildpackage/debhelper/dh-python "
                    f"(make deb-deps): {(deps.stdout + deps.stderr).strip()[-1000:]}")
    built = {}
    for version in (OLD, NEW):
        deb = REPO / "dist" / f"dittohead_{version}_all.deb"
        deb.unlink(missing_ok=True)
        run("make", "deb", f"DEB_VERSION={version}")
        assert deb.is_file(), deb
        built[version] = str(deb)
    return built


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    """A booted box with nothing installed yet (no policy-rc.d: a real host has none)."""
    with installed_box(tmp_path_factory, "upgrade", [("rm", "-f", "/usr/sbin/policy-rc.d")],
                       ("true",)) as b:
        yield Box(b)


def schedule() -> list[tuple[str, str, str]]:
    """(point, from, to) of each trial: up and down alternately; full: each point both ways."""
    points = [p for p in FULL_POINTS for _ in range(2)] if FULL else list(REDUCED_POINTS)
    return [(p, *((OLD, NEW) if i % 2 == 0 else (NEW, OLD))) for i, p in enumerate(points)]


def test_upgrade_and_downgrade_under_a_held_delivery_lose_nothing(
        debs: dict[str, str], box: Box) -> None:
    started = time.monotonic()
    trials = schedule()
    report.plan("upgrade", len(trials))
    tallies: dict[str, Tally] = {}
    try:
        prepare(box, debs[OLD])
        for i, (point, frm, to) in enumerate(trials):
            if not report.part(i):
                continue
            if box.box.run("dpkg-query", "-W", "-f=${Version}", "dittohead").stdout != frm:
                box.box.run("dpkg", "-i", debs[frm], timeout=600)  # a part's first trial
            seen, at = upgrade_trial(box, i, point, frm, to, debs)
            kind = point.partition(":")[0]
            case = f"{point} {'up' if to == NEW else 'down'}"
            tally = tallies.setdefault(case, Tally(
                "upgrade", case, DOES[kind] + f"; dpkg -i {'up' if to == NEW else 'down'}"
                f" to {to}", f"{DELIVERED}, nothing lost, the new version after", SEED))
            tally.add(seen)
            print(f"upgrade trial {i}: {at} {frm} -> {to}: dpkg -i {seen.seconds:.1f} s, "
                  f"{seen.files} entries delivered once")
        resume_paused(box)
    finally:
        for t in tallies.values():
            t.note = f"{t.files} entries delivered once; dpkg -i time in the figures"
            report.save(t)
        report.add_time("upgrade", time.monotonic() - started)
