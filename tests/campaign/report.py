"""Keep each case's tally, and write docs/reliability.md from every tally of this mode.

Tallies are kept as JSON under .cache/campaign/<mode>/ so a campaign split over several
pytest runs (one root run at a time on a shared machine) still makes one report.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

from . import FULL, MODE, Tally

REPO = Path(__file__).resolve().parents[2]
STORE = REPO / ".cache" / "campaign" / MODE
REPORT = REPO / "docs" / "reliability.md"
COLUMNS = ("delivered once", "kept for retry", "failed", "rejected")

INTRO = {
    "hostile": "Entries an uploader can make, each run through `dittohead process` as the "
               "service user with exactly the unit's capabilities (setpriv), on real files "
               "owned by a throwaway uploader. Checked after each trial: the expected "
               "outcome, the destination holds exactly what was delivered and nothing else "
               "changed, a failed entry's reason names the file, nothing left in the inbox "
               "or processing.",
    "storage": "The storage failing under `dittohead process` (run as the service user "
               "with the unit's capabilities): a filesystem mounted over the destination or "
               "the dropbox root. `faultfs` is a FUSE passthrough (tests/campaign/faultfs.py, "
               "pyfuse3) failing the chosen operation on the chosen paths after a seeded "
               "number of calls; `tmpfs-full` a real tmpfs filled to the last byte; `ext4` a "
               "real ext4 on a loop device remounted read-only (before the run, or while the "
               "run is held at a fault point). Checked after each: the exit code (75 kept "
               "for retry, 74 the storage failed), the message, the entry whole in the inbox "
               "or processing, no receipt, no file visible in the destination that is not "
               "whole; then the fault is lifted and the next run must deliver it exactly "
               "once (one receipt, manifest verifying, nothing left). The figures column "
               "quotes the message. faultfs's `dest-no-rename-noreplace` is a filesystem "
               "without RENAME_NOREPLACE (as NFS); sshfs is the network table's.",
    "network": "A study's destination on sshfs (tests/campaign/sshfs.py): a booted "
               "systemd with the checkout installed runs Debian's sshd on 127.0.0.1, a NAS "
               "account there exports a directory, root mounts it with `sshfs -o "
               "allow_other` where the destination is, and `systemctl start "
               "dittohead@s2.service` runs. Deliveries refuse sshfs (exit 78, before "
               "anything is claimed: it has no RENAME_NOREPLACE, a hard link shows as "
               "another inode, times lose their nanoseconds, syncfs never reaches the "
               "server; docs/field-notes.md, \"sshfs\"). Checked after each: the exit code "
               "and message, the NAS's export exactly as before (sha256, mode, owner and "
               "mtime of every file), no receipt; then the admin's fix (the mount gone, "
               "`dittohead setup` making the destination on the local disk) and the next "
               "run must deliver every entry exactly once, byte-identical, its manifest "
               "verifying, nothing left in the inbox or processing. The figures quote the "
               "refused run's first sentence.",
    "upgrade": "The Debian package (`make deb DEB_VERSION=<version>+up1` and `+up2`, the "
               "same checkout) installed with `dpkg -i` on a booted systemd, study s1 "
               "delivering and study s2 paused with an entry waiting; then `dpkg -i` of the "
               "other version, up and down again in turn, while s1's run is held at a fault "
               "point (`DITTOHEAD_TEST_FAULT=<point>=wait:<file>`) with three entries waiting "
               "in the inbox, or (`stream`) while an uploader drops an entry every 0.1 s. "
               "Checked: dpkg succeeds; the held run is neither stopped nor restarted (same "
               "PID, still held); the admin's config, the claims in processing/, the units' "
               "states and enablement and the paused study's inbox unchanged; `dittohead "
               "--version` is the new one and nothing of the upgrade left behind (no runtime "
               "mask, no state file). Then, the run let go: every entry delivered exactly "
               "once, byte-identical, its manifest verifying, nothing left over; the held "
               "entry by the version that claimed it, every waiting entry by the new one "
               "(`DITTOHEAD_VERSION` of its `delivered` event), and the last of the stream; "
               "every receipt (of both versions) read by the installed version and counted "
               "by `dittohead status --json`; no unit failed and no failure told; s1's path "
               "unit and timer active and enabled, s2's still stopped. At the end s2, "
               "resumed, delivers its entry. The `+up0` row: the package built from the "
               "commit before upgrades were handled (its scripts pause nothing, its runs "
               "go on with the code they started with, its events carry no version), "
               "downgraded to and upgraded from: nothing lost either way. The figures: how "
               "long `dpkg -i` took.",
    "load": "Many studies at once on a booted systemd with the checkout installed, set up "
            "as an admin would (a group and a destination each, one config with "
            "`metrics_dir` set and every 10th study mailing its contact, one `systemctl "
            "daemon-reload`, the path and timer units enabled): one non-root uploader "
            "builds every entry (3 files of 1-64 KiB) as a dot name, then renames them all "
            "at once, the studies interleaved, or one by one at seeded moments (the "
            "trickle), or at once while the admin adds uploader accounts "
            "(`useradd`). Checked after each burst: every entry delivered exactly once (one "
            "receipt in `done/`, one `delivered` event), its manifest listing what the "
            "uploader wrote and verifying with `sha256sum -c` in the destination, nothing "
            "in the inbox, `processing/`, the mail queue or `.incoming-*`, no unit failed "
            "(`systemctl --failed`, each unit's `Result`, no start or trigger limit, no "
            "message dropped by journald, no notify-failure, retry-later, failed or "
            "rejected event), and in the trickle each entry delivered within a minute of "
            "its rename. Figures: each entry's time from its rename to its `delivered` "
            "event (median, max); the wall time from the first rename to the last "
            "delivery, entries per second, the units started, and the peak memory of a "
            "run: the largest `DITTOHEAD_MAXRSS_KIB` of the burst's events (getrusage "
            "`ru_maxrss` of the run and its largest worker). The dropbox and destinations "
            "are on a tmpfs: syncs cost nothing, so the times are a floor.",
    "kills": "SIGKILL of `dittohead@s1.service` (`systemctl kill -s KILL`) on a booted "
             "systemd with the checkout installed, held at a fault point "
             "(`DITTOHEAD_TEST_FAULT=<point>=wait:<file>`) or after a random delay. Then "
             "the next run (`systemctl start`) finishes. Checked after each: the entry "
             "delivered exactly once with one receipt, byte-identical to what the uploader "
             "wrote, the manifest verifies (`sha256sum -c` in the destination), no "
             "`.incoming-*` left, nothing in the inbox or processing. Cases named `mail: …` "
             "kill `dittohead@s4.service`, which mails its contacts, at the mail's fault "
             "points (`mailing`, `mail-queued`) and at `filed`, and also check that the "
             "SMTP sink in the box got the entry's mail exactly once; `single file: …` "
             "upload an entry that is one file; `ext4: …` deliver into a destination on "
             "an ext4 on a loop device mounted in the box (the others: a tmpfs).",
    "sandbox": "What the services' sandboxes leave open, on a booted systemd with the "
               "checkout installed. `security UNIT` rows: `systemd-analyze security` of "
               "every service dittohead ships; its checks are the trials, `rejected` "
               "counts those the unit passes, `failed` those it still flags (the figures "
               "column names each, its exposure and why it stays); the test fails if a "
               "score rises above the one measured. `write: …` rows: from inside "
               "`dittohead@s1.service` (a probe as its `ExecStart=`, with its user, "
               "capabilities and namespace), each attempt to change a place outside "
               "study s1 is a trial and must be refused (`rejected`; the figures give "
               "each errno); the `(control)` rows try the same in s1's own paths, where "
               "each must work (`delivered once`). `other` counts attempts that did "
               "what they must not.",
}


PART = os.environ.get("DITTOHEAD_CAMPAIGN_PART", "")  # "k/n": this run does part k of n


def part(index: int) -> bool:
    """Whether trial `index` belongs to this run's part (every trial without a part).

    The parts of one campaign must share DITTOHEAD_CAMPAIGN_SEED: it draws the schedule."""
    if not PART:
        return True
    if "DITTOHEAD_CAMPAIGN_SEED" not in os.environ:
        raise RuntimeError("DITTOHEAD_CAMPAIGN_PART needs DITTOHEAD_CAMPAIGN_SEED")
    k, n = (int(x) for x in PART.split("/"))
    return index % n == k


def save(tally: Tally) -> None:
    """Keep one case's tally (of this part) for the report."""
    suffix = "." + PART.replace("/", "of") if PART else ""
    path = STORE / tally.table / f"{tally.case}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(tally)))


def add_time(table: str, seconds: float) -> None:
    """Add to a table's wall-clock time (kept with the tallies)."""
    path = STORE / f"{table}.seconds"
    path.parent.mkdir(parents=True, exist_ok=True)
    before = float(path.read_text()) if path.exists() else 0.0
    path.write_text(f"{before + seconds:.3f}")


def plan(table: str, trials: int) -> None:
    """Say how many trials the table's campaign has in all (its parts may run apart)."""
    STORE.mkdir(parents=True, exist_ok=True)
    (STORE / f"{table}.planned").write_text(str(trials))


def reset() -> None:
    """Forget the kept tallies of this mode (a new campaign starts)."""
    for path in [*STORE.glob("*/*.json"), *STORE.glob("*.seconds"), *STORE.glob("*.planned")]:
        path.unlink()


def load_all() -> dict[str, list[Tally]]:
    """Every kept tally by table, the parts of one case added up."""
    merged: dict[tuple[str, str], Tally] = {}
    for path in sorted(STORE.glob("*/*.json")):
        t = Tally(**json.loads(path.read_text()))
        have = merged.setdefault((t.table, t.case), Tally(
            t.table, t.case, t.does, t.expect, t.seed))
        for outcome, count in t.counts.items():
            have.counts[outcome] = have.counts.get(outcome, 0) + count
        have.reasons += [r for r in t.reasons if r not in have.reasons][:3 - len(have.reasons)]
        have.seconds += t.seconds
        have.bytes += t.bytes
        have.files += t.files
        if t.note:
            have.note = _add_notes(have.note, t.note) if have.note else t.note
    tables: dict[str, list[Tally]] = {}
    for t in merged.values():
        tables.setdefault(t.table, []).append(t)
    return tables


def _add_notes(a: str, b: str) -> str:
    """'... in X of Y' + '... in U of V' -> '... in X+U of Y+V' (the kills' hit counts)."""
    head, _, nums = a.rpartition(" in ")
    (x, y), (u, v) = (map(int, n.split(" of ")) for n in (nums, b.rpartition(" in ")[2]))
    return f"{head} in {x + u} of {y + v}"


def _sh(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    return r.stdout.strip().splitlines()[0] if r.stdout.strip() else "?"


def _row(t: Tally) -> str:
    n = sum(t.counts.values())
    other = n - sum(t.counts.get(c, 0) for c in COLUMNS)
    failed = str(t.counts.get("failed", 0))
    if t.reasons and t.counts.get("failed"):
        failed += " (" + "; ".join(r.replace("|", "\\|")[:90] for r in t.reasons) + ")"
    secs = (f"median {statistics.median(t.seconds):.2f} s, max {max(t.seconds):.2f} s"
            if t.seconds else "")
    size = f", {t.files} files, {t.bytes / 1e6:.1f} MB in all" if t.files else ""
    size += ("; " if secs or size else "") + t.note if t.note else ""
    cells = [f"`{t.case}`", t.does, t.expect.replace("|", "\\|"), str(n),
             str(t.counts.get("delivered once", 0)),
             str(t.counts.get("kept for retry", 0)), failed,
             str(t.counts.get("rejected", 0)), str(other), secs + size]
    return "| " + " | ".join(c.replace("\n", " ") for c in cells) + " |"


def write() -> Path:
    """Rewrite docs/reliability.md from every kept tally of this mode."""
    tables = load_all()
    seconds_by_table = {p.name.removesuffix(".seconds"): float(p.read_text())
                        for p in STORE.glob("*.seconds")}
    kind = "FULL run" if FULL else "REDUCED run (the counts `make test` uses; see each case)"
    lines = [
        "# Reliability: the proof campaign's figures",
        "",
        "GENERATED by `tests/campaign/report.py`: do not edit by hand. Regenerate with",
        "`make campaign` (as root: `DITTOHEAD_CAMPAIGN=full pytest -m campaign "
        "tests/test_campaign*.py`); replay a run with `DITTOHEAD_CAMPAIGN_SEED=<seed>`.",
        "",
        f"- This is a {kind}, written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"- Machine: {platform.machine()}, kernel {platform.release()}, "
        f"{_sh('/usr/lib/systemd/systemd', '--version')}, "
        f"{_sh('nproc')} CPUs; hostile-input entries on `/var/tmp` "
        f"({_sh('findmnt', '-no', 'FSTYPE', '-T', '/var/tmp')}), kills on a tmpfs in the "
        "booted box, storage faults on the filesystem each case names, mounted under "
        "`/var/tmp`. Each table names its seed: tables may come from separate runs.",
        "- Columns: the trials, then how many ended each way. `other` is anything but the "
        "four outcomes; every trial must have its case's expected outcome, or the campaign "
        "fails naming the seed and the trial.",
        "",
    ]
    for name, tallies in sorted(tables.items()):
        seeds = sorted({t.seed for t in tallies})
        took = seconds_by_table.get(name)
        done = sum(sum(t.counts.values()) for t in tallies)
        planned_path = STORE / f"{name}.planned"
        planned = int(planned_path.read_text()) if planned_path.exists() else done
        lines += [f"## {name}", "", INTRO.get(name, ""), "",
                  f"{len(tallies)} cases, {done} trials"
                  + (f" (INCOMPLETE: {planned} planned; the parts not run are missing)"
                     if done < planned else "")
                  + f", seed(s) {', '.join(map(str, seeds))}"
                  + (f", {took:.0f} s in all." if took else "."), "",
                  "| case | what it does | expected | trials | delivered once | kept for "
                  "retry | failed (reason) | rejected | other | figures |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [_row(t) for t in tallies]
        lines.append("")
    REPORT.write_text("\n".join(lines))
    return REPORT
