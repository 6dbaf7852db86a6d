"""The sandbox campaign (tests/campaign/sandbox.py) on one booted box: what
systemd-analyze security still flags in each service, the writes dittohead@s1.service
must not be able to do, and the kill campaign's additions (the mail, single-file
entries, a destination on ext4; tests/campaign/kills.py)."""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.campaign import DELIVERED, SEED, Tally, report, trials
from tests.campaign.kills import POINTS, STAGES, Where, kill_trial, prepare
from tests.campaign.sandbox import PROM, SERVICES, TARGETS, WHY_KEPT, probe, refused, security

from .boxes import CONFIG, ROOT, Box, boot_installed, start_smtp_sink

# The seed line, and docs/reliability.md rewritten at the module's end (DITTOHEAD_CAMPAIGN).
from .test_campaign import _report  # noqa: F401

pytestmark = [pytest.mark.campaign, pytest.mark.root, pytest.mark.systemd, pytest.mark.slow]

# The regression guard: each service's exposure as measured (systemd 252, Debian 12),
# which it may never exceed.
EXPOSURE = {
    "dittohead@s1.service": 1.1,
    "dittohead-purge.service": 1.0,
    "dittohead-metrics.service": 0.2,
    "dittohead-mail@s4.service": 1.0,
    "dittohead-notify@dittohead@s1.service.service": 0.2,
}


EXT4 = f"{ROOT}/ext4"  # an ext4 on a loop device, mounted in the box
S5 = f"""  s5:
    # destination on a real disk filesystem (ext4 on a loop device)
    destination: {EXT4}/s5
    group: sbxs1
"""


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    work = tmp_path_factory.mktemp("sandbox-box", numbered=True)
    image = work / "ext4.img"
    subprocess.run(["truncate", "-s", "768M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    loop = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        b = boot_installed(work / "box")
        try:
            n = int(loop.removeprefix("/dev/loop"))
            b.sh(f"""set -e
mknod {loop} b 7 {n} && mkdir -p {EXT4} && mount {loop} {EXT4}
mkdir -p {PROM} && chown dittohead: {PROM}""")
            b.box.write_file("/etc/dittohead/config.yaml",
                             CONFIG + S5 + f"metrics_dir: {PROM}\n")
            b.sh("dittohead setup s5 >/dev/null && systemctl daemon-reload && "
                 "systemctl enable --now dittohead@s4.path dittohead@s5.path")
            yield b
        finally:
            b.box.poweroff()
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


def test_each_service_is_exposed_at_most_as_measured(box: Box) -> None:
    started = time.monotonic()
    worse = []
    for unit in SERVICES:
        s = security(box, unit)
        flagged = ", ".join(f"{n} ({e:g}{': ' + WHY_KEPT[n] if WHY_KEPT.get(n) else ''})"
                            for n, e, _ in s.flagged)
        print(f"\n{unit}: {s.score} of {s.checks} checks; flagged: {flagged}")
        t = Tally("sandbox", f"security {unit}", f"`systemd-analyze security {unit}`: "
                  f"exposure {s.score:g} ({s.checks} checks)",
                  f"exposure at most {EXPOSURE[unit]:g}", SEED,
                  counts={"rejected": s.checks - len(s.flagged), "failed": len(s.flagged)},
                  reasons=[", ".join(n for n, _, _ in s.flagged)],
                  note="still flagged: " + flagged)
        report.save(t)
        if s.score > EXPOSURE[unit]:
            worse.append((unit, s.score, EXPOSURE[unit]))
    report.add_time("sandbox", time.monotonic() - started)
    assert worse == []


def test_the_service_cannot_write_outside_its_study(box: Box) -> None:
    started = time.monotonic()
    seen = probe(box)
    wrong = {}
    for t in TARGETS:
        results = seen[t.label]
        ok = [op for op, res in results.items() if refused(t, res)]
        # (A case's name is its tally's file name: no "/" in it.)
        case = "write: " + t.label.strip("/").replace("/", " ")
        tally = Tally("sandbox", case, t.does(),
                      "every attempt works" if t.control else
                      "every attempt refused (" + ("EAFNOSUPPORT, ENETUNREACH, " if t.kind ==
                                                   "net" else "") + "EROFS, EACCES, EPERM, ENOENT)",
                      SEED, counts={("delivered once" if t.control else "rejected"): len(ok),
                                    "other": len(results) - len(ok)},
                      note=", ".join(f"{op} {res}" for op, res in results.items()))
        report.save(tally)
        if len(ok) != len(results):
            wrong[t.label] = results
        print(f"{t.label}: {results}")
    report.add_time("sandbox", time.monotonic() - started)
    assert wrong == {}


MAIL_DOES = {
    "mailing": "the delivered entry's mail made, about to be queued (note written, event "
               "not yet)",
    "mail-queued": "the mail is in processing/.mail/, event and claim release not yet",
}
SINGLE_POINTS = ("claimed", "checked", "staged:1", "synced", "published:1", "verified",
                 "receipt", "filed", "random")
# (label, where, points, trials per point): the additions to the kill campaign.
ADDITIONS = (
    ("mail", Where("s4", f"{ROOT}/study/s4", mail=True), ("filed", "mailing", "mail-queued"),
     trials(1, 10)),
    ("single file", Where(single=True), SINGLE_POINTS, trials(1, 5)),
    ("ext4", Where("s5", f"{EXT4}/s5"), POINTS, trials(1, 8)),
)


def test_sigkill_while_mailing_in_single_file_entries_and_on_ext4_then_delivered_once(
        box: Box) -> None:
    started = time.monotonic()
    schedule = [(label, where, p) for label, where, points, n in ADDITIONS
                for p in points for _ in range(n)]
    random.Random(f"{SEED}:kills+").shuffle(schedule)
    tallies: dict[str, Tally] = {}
    hits: dict[str, int] = {}
    start_smtp_sink(box)
    for _, where, _, _ in ADDITIONS:
        prepare(box, where)
    try:
        for i, (label, where, point) in enumerate(schedule):
            if not report.part(i):
                continue
            case = f"{label}: kill at {point}"
            does = {**STAGES, **MAIL_DOES}[point.partition(":")[0]]
            t = tallies.setdefault(case, Tally(
                "kills", case, f"{label}: {does}", f"{DELIVERED}, byte-identical, nothing "
                "left" + (", mailed exactly once" if where.mail else ""), SEED))
            seen, at, hit = kill_trial(box, 5000 + i, point, where)
            t.add(seen)
            hits[case] = hits.get(case, 0) + hit
            print(f"kills trial {5000 + i}: {label} {at}: {seen.outcome}, killed a run: {hit}")
    finally:
        for case, t in tallies.items():
            if t.counts:
                t.note = (f"the kill hit a running delivery in {hits[case]} of "
                          f"{sum(t.counts.values())}")
                report.save(t)
        report.add_time("kills", time.monotonic() - started)
