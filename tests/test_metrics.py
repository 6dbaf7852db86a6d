"""`dittohead metrics`, dittohead-metrics.service and the sample alert rules.

The metrics come from real deliveries into a real study tree; promtool
(Debian's, extracted into .cache by `make promtool`, never installed) checks
the files and the rules. The booted test runs the units on a throwaway systemd.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dittohead import generator
from dittohead.config import load, parse
from dittohead.errors import EXIT_CONFIG

from .boxes import CONFIG, ROOT, Box, boot_installed
from .conftest import Env, ThrowawayUser, as_service, wait_for
from .test_units import SEES, SEES_PY, probe_in_unit, sees_in_unit

REPO = Path(__file__).resolve().parent.parent
PROMTOOL = REPO / ".cache" / "prometheus" / "usr" / "bin" / "promtool"
SAMPLE_RE = re.compile(r'^(\w+)\{([^}]*)\} (\S+)$')


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    if not PROMTOOL.exists():  # what `make test` does first; fetched once
        r = subprocess.run(["make", "-s", "-C", str(REPO), "promtool"], capture_output=True,
                           text=True, check=False, timeout=600)
        assert r.returncode == 0, f"make promtool failed:\n{r.stdout}\n{r.stderr}"
    return subprocess.run([str(PROMTOOL), *args], input=stdin, capture_output=True, text=True,
                          check=False, timeout=60)


def parsed(text: str) -> dict[tuple[str, str], float]:
    """(metric, labels as written) -> value."""
    out = {}
    for line in text.splitlines():
        m = SAMPLE_RE.match(line)
        if m:
            out[(m.group(1), m.group(2))] = float(m.group(3))
    return out


def with_metrics_dir(env: Env, directory: Path) -> None:
    data = yaml.safe_load(env.config_path.read_text())
    data["metrics_dir"] = str(directory)
    env.config_path.write_text(yaml.safe_dump(data))
    env.cfg = load(env.config_path)


def deliver_and_fail(env: Env) -> None:
    """One delivered entry, one failed (a conflict), one retried failure, one undone."""
    env.drop("good", {"a.txt": b"12345"})
    assert env.process().returncode == 0
    (env.study.destination / "clash.txt").write_bytes(b"other")
    env.drop("clash.txt", b"mine")
    assert env.process().returncode == 0
    [failed] = env.failed_receipts()
    retried = json.loads(failed.read_text())
    retried["id"] += "x"
    (env.study.failed / f"{retried['id']}.retried.json").write_text(json.dumps(retried))
    # What `dittohead undo` files: the delivery's receipt, outcome undone, in failed/.
    undone = json.loads(env.done_receipts()[0].read_text())
    undone.update(id=undone["id"] + "u", outcome="undone", bytes=7,
                  finished="2030-01-01T00:00:00Z")
    (env.study.failed / f"{undone['id']}.json").write_text(json.dumps(undone))
    (env.study.failed / "junk.json").write_text("not json")


def test_counters_come_from_every_receipt_and_undone_counts_as_delivered(env: Env) -> None:
    deliver_and_fail(env)
    env.drop("waiting", b"x")
    (env.study.inbox / ".uploading").mkdir()
    r = env.run("metrics", "--stdout")
    assert r.returncode == 0, r.stderr
    got = parsed(r.stdout)
    s = 'study="s1"'
    assert got[("dittohead_deliveries_total", f'{s},outcome="delivered"')] == 2
    assert got[("dittohead_deliveries_total", f'{s},outcome="failed"')] == 2
    assert got[("dittohead_deliveries_total", f'{s},outcome="rejected"')] == 0
    assert got[("dittohead_undone_total", s)] == 1
    assert got[("dittohead_delivered_bytes_total", s)] == 5 + 7
    assert got[("dittohead_last_delivery_timestamp_seconds", s)] == 1893456000  # 2030-01-01
    assert got[("dittohead_pending_entries", s)] == 1
    assert got[("dittohead_uploading_entries", s)] == 1
    waiting = (env.study.inbox / "waiting").lstat().st_ctime
    assert got[("dittohead_oldest_pending_timestamp_seconds", s)] == int(waiting)
    assert got[("dittohead_failed_entries", s)] == 3  # the failure, the undone one, junk
    assert got[("dittohead_receipts_unreadable", s)] == 1
    assert got[("dittohead_destination_available", s)] == 1
    assert got[("dittohead_destination_avail_bytes", s)] > 0
    assert got[("dittohead_dropbox_size_bytes", s)] > 0
    check = promtool("check", "metrics", stdin=r.stdout)
    assert (check.returncode, check.stdout + check.stderr) == (0, "")


def test_files_are_written_atomically_readable_by_all_and_stale_ones_removed(
        env: Env, tmp_path: Path) -> None:
    out = tmp_path / "textfile"
    out.mkdir()
    with_metrics_dir(env, out)
    (out / "dittohead-gone.prom").write_text("old\n")  # a study no longer configured
    (out / "node-other.prom").write_text("x 1\n")  # someone else's
    deliver_and_fail(env)
    r = env.run("metrics")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["dittohead-s1.prom", "node-other.prom"]
    f = out / "dittohead-s1.prom"
    assert stat.S_IMODE(f.stat().st_mode) == 0o644
    check = promtool("check", "metrics", stdin=f.read_text())
    assert (check.returncode, check.stdout + check.stderr) == (0, "")
    # One study by name touches only its own file.
    (out / "dittohead-gone.prom").write_text("old\n")
    assert env.run("metrics", "s1").returncode == 0
    assert (out / "dittohead-gone.prom").exists()


def test_the_cache_gives_the_same_numbers_and_sees_a_replaced_receipt(
        env: Env, tmp_path: Path) -> None:
    deliver_and_fail(env)
    cache = tmp_path / "cache"
    cache.mkdir()

    def numbers(*extra: str) -> dict[tuple[str, str], float]:
        r = env.run("metrics", "--stdout", *extra)
        assert r.returncode == 0, r.stderr
        return {k: v for k, v in parsed(r.stdout).items() if "timestamp_seconds" not in k[0]
                and "avail" not in k[0]}

    plain = numbers()
    assert numbers("--cache", str(cache)) == plain
    assert (cache / "s1.json").exists()
    assert numbers("--cache", str(cache)) == plain
    # A receipt rewritten the way receipts are (a new file renamed over it).
    receipt = env.done_receipts()[0]
    data = json.loads(receipt.read_text())
    data["bytes"] = 1000
    tmp = receipt.with_name(".new")
    tmp.write_text(json.dumps(data))
    os.rename(tmp, receipt)
    after = numbers("--cache", str(cache))
    assert after[("dittohead_delivered_bytes_total", 'study="s1"')] == 1000 + 7
    assert after == numbers()
    # A damaged cache is only a slower run.
    rows = json.loads((cache / "s1.json").read_text())
    (cache / "s1.json").write_text(json.dumps(dict.fromkeys(rows, "junk")))
    assert numbers("--cache", str(cache)) == after
    (cache / "s1.json").write_text("{not json")
    assert numbers("--cache", str(cache)) == after


def test_without_metrics_dir_it_says_what_to_set(env: Env, tmp_path: Path) -> None:
    r = env.run("metrics")
    assert r.returncode == EXIT_CONFIG
    assert "metrics_dir is not set" in r.stderr and "Traceback" not in r.stderr
    with_metrics_dir(env, tmp_path / "missing")
    r = env.run("metrics")
    assert r.returncode == EXIT_CONFIG
    assert "is not a directory: create it" in r.stderr


def test_metrics_dir_may_not_overlap_a_study() -> None:
    base = {"dropbox_root": "/box", "studies": {"s1": {"destination": "/st/s1"}}}
    for bad in ("/box/prom", "/st/s1/prom", "/st", "relative", "/"):
        with pytest.raises(Exception, match="metrics_dir"):
            parse({**base, "metrics_dir": bad})
    assert parse({**base, "metrics_dir": "/var/lib/prometheus/node-exporter"}).metrics_dir \
        == Path("/var/lib/prometheus/node-exporter")


def test_generator_binds_every_study_read_only_only_when_metrics_are_on() -> None:
    base = {"dropbox_root": "/box", "studies": {"s1": {"destination": "/st/s1"},
                                                "s2": {"destination": "/st/s2"}}}
    assert generator.METRICS_DROPIN not in generator.expected_dropins(parse(base))
    dropin = generator.expected_dropins(parse({**base, "metrics_dir": "/m"}))[
        generator.METRICS_DROPIN]
    body = [line for line in dropin.splitlines() if not line.startswith("#")]
    assert body == ["[Service]", "BindReadOnlyPaths=/etc/dittohead/config.yaml",
                    "BindReadOnlyPaths=-/box/s1 -/st/s1", "BindReadOnlyPaths=-/box/s2 -/st/s2",
                    "BindPaths=-/m"]
    # No study's own service gets metrics_dir.
    study_units = generator.study_dropins(parse({**base, "metrics_dir": "/m"}),
                                          parse({**base, "metrics_dir": "/m"}).study("s1"))
    assert not any("/m" in line.split() for text in study_units.values()
                   for line in text.replace("-/m", "/m").splitlines())


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="SKIPPED: no systemd-analyze")
def test_the_metrics_units_verify_and_are_sandboxed(tmp_path: Path) -> None:
    units, bindir = tmp_path / "units", tmp_path / "bin"
    units.mkdir()
    bindir.mkdir()
    (bindir / "dittohead").write_text("#!/bin/sh\n")
    (bindir / "dittohead").chmod(0o755)
    for name in ("dittohead-metrics.service", "dittohead-metrics.timer"):
        text = (REPO / "units" / name).read_text()
        (units / name).write_text(text.replace("@BINDIR@", str(bindir))
                                  .replace("@LIBDIR@", str(tmp_path)))
    cfg = parse({"dropbox_root": "/box", "metrics_dir": "/m",
                 "studies": {"s1": {"destination": "/st/s1"}}})
    generator.write(units, generator.expected_dropins(cfg))
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:", "SYSTEMD_LOG_COLOR": "0"}
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", "dittohead-metrics.service",
                        "dittohead-metrics.timer"], capture_output=True, text=True, env=env,
                       cwd=units, check=False)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                        "dittohead-metrics.service"], capture_output=True, text=True, env=env,
                       cwd=units, check=False)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    print(f"\nsystemd-analyze security --offline dittohead-metrics.service: {m.group(1)}")
    assert float(m.group(1)) <= 1.0


ALERT_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'dittohead_oldest_pending_timestamp_seconds{{study="s1",instance="dropbox1"}}'
        values: '0x120'
      - series: 'dittohead_metrics_timestamp_seconds{{study="s1",instance="dropbox1"}}'
        values: '0+60x10 600x110'
      - series: 'dittohead_destination_available{{study="s1",instance="dropbox1"}}'
        values: '1x10 0x30'
    alert_rule_test:
      - eval_time: 30m
        alertname: DittoheadPendingTooLong
        exp_alerts: []
      - eval_time: 80m
        alertname: DittoheadPendingTooLong
        exp_alerts:
          - exp_labels: {{severity: warning, study: s1, instance: dropbox1}}
            exp_annotations:
              summary: "dittohead study s1: an upload waits for over an hour"
              description: "The oldest pending entry of study s1 on dropbox1 has waited
                1h 20m 0s. See `dittohead status s1` and `journalctl -u
                dittohead@s1.service`."
      - eval_time: 9m
        alertname: DittoheadMetricsStale
        exp_alerts: []
      - eval_time: 40m
        alertname: DittoheadMetricsStale
        exp_alerts:
          - exp_labels: {{severity: warning, study: s1, instance: dropbox1}}
            exp_annotations:
              summary: "dittohead metrics of s1 are stale"
              description: "Written 30m 0s ago. `systemctl status dittohead-metrics.timer
                dittohead-metrics.service`."
      - eval_time: 30m
        alertname: DittoheadDestinationUnavailable
        exp_alerts:
          - exp_labels: {{severity: critical, study: s1, instance: dropbox1}}
            exp_annotations:
              summary: "dittohead study s1: destination unavailable"
              description: "The destination of study s1 is not there (not mounted?): every
                upload waits. `dittohead check s1`."
"""


def test_sample_alert_rules_pass_promtool_and_fire(tmp_path: Path) -> None:
    rules = REPO / "docs" / "dittohead-alerts.yml"
    r = promtool("check", "rules", str(rules))
    assert r.returncode == 0, r.stdout + r.stderr
    spec = tmp_path / "tests.yml"
    spec.write_text(ALERT_TESTS.format(rules=json.dumps(str(rules))))
    r = promtool("test", "rules", str(spec))
    assert r.returncode == 0, r.stdout + r.stderr


# --- booted --------------------------------------------------------------------

PROM = "/var/lib/prometheus/node-exporter"


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    b = boot_installed(tmp_path_factory.mktemp("metrics-box", numbered=True))
    try:
        b.sh(f"mkdir -p {PROM} && chown dittohead: {PROM}")
        b.box.write_file("/etc/dittohead/config.yaml", CONFIG + f"metrics_dir: {PROM}\n")
        b.sh("systemctl daemon-reload && systemctl enable --now dittohead-metrics.timer")
        yield b
    finally:
        b.box.poweroff()


def prom(box: Box, study: str) -> dict[tuple[str, str], float]:
    r = box.box.run("cat", f"{PROM}/dittohead-{study}.prom", check=False)
    return parsed(r.stdout) if r.returncode == 0 else {}


@pytest.mark.systemd
@pytest.mark.slow
def test_a_run_refreshes_the_metrics_written_by_the_metrics_unit_only(box: Box) -> None:
    box.upload("s1", [("counted", {"a.txt": 100})])
    assert box.wait_delivered("s1", ["counted"]).get("counted") == 1, box.debug("s1")
    key = ("dittohead_deliveries_total", 'study="s1",outcome="delivered"')
    wait_for(lambda: prom(box, "s1").get(key) == 1, 30, "the metrics to count the delivery")
    assert box.prop("dittohead-metrics.service", "Result") == "success"
    ls = box.sh(f"stat -c '%U %a %n' {PROM}/*").stdout.split("\n")
    assert sorted(filter(None, ls)) == [f"dittohead 644 {PROM}/dittohead-{s}.prom"
                                        for s in ("s1", "s2", "s3", "s4")]
    check = promtool("check", "metrics", stdin=box.box.run(
        "cat", f"{PROM}/dittohead-s1.prom").stdout)
    assert (check.returncode, check.stdout + check.stderr) == (0, "")
    # The receipts' cache, in the unit's StateDirectory (studies without receipts need none).
    assert "s1.json" in box.sh("ls /var/lib/dittohead-metrics").stdout.split()
    # The study's service never sees metrics_dir; the metrics unit sees every
    # study, read-only.
    box.box.write_file(SEES, SEES_PY)
    assert sees_in_unit(box, "dittohead@s1.service", [PROM, f"{ROOT}/study/s1"]) == {
        PROM: False, f"{ROOT}/study/s1": True}
    targets = [f"{PROM}/.probe", f"{ROOT}/study/s1/.probe", f"{ROOT}/dropbox/s2/done/.probe",
               f"{ROOT}/dropbox/s1/inbox/.probe"]
    assert writes_in_unit(box, "dittohead-metrics.service", targets) == {
        targets[0]: True, **dict.fromkeys(targets[1:], False)}


# Runs inside a unit's sandbox: which of the paths given it can create.
WRITES_PY = r"""
import json, os, sys
def can(p):
    try:
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        return False
    os.unlink(p)
    return True
print("WRITES " + json.dumps({p: can(p) for p in sys.argv[1:]}), flush=True)
"""


def writes_in_unit(box: Box, unit: str, paths: list[str]) -> dict[str, bool]:
    """Start unit with its ExecStart= replaced by WRITES_PY: which paths it can create."""
    script = "/usr/local/lib/dittohead-test-writes.py"  # under /usr: bound into every unit
    box.box.write_file(script, WRITES_PY)
    return probe_in_unit(box, unit, script, "WRITES", paths)


def test_check_names_a_metrics_dir_the_service_user_cannot_use(env: Env, tmp_path: Path) -> None:
    with_metrics_dir(env, tmp_path / "missing")
    r = env.run("check")
    assert f"metrics_dir {tmp_path / 'missing'}: No such file or directory" in r.stdout
    (tmp_path / "missing").mkdir()
    r = env.run("check")
    assert "metrics_dir" not in r.stdout, r.stdout


@pytest.mark.root
def test_the_service_user_writes_metrics_without_capabilities_once_it_may(
        service_env: Env, svc: ThrowawayUser) -> None:
    env = service_env
    out = env.base / "textfile"
    out.mkdir(mode=0o755)  # root's, as node_exporter's package makes it
    with_metrics_dir(env, out)
    env.drop("entry", b"data")
    assert as_service(env, svc, "process", "s1").returncode == 0
    assert f"metrics_dir {out} is not writable by {svc.name}" in env.run("check").stdout
    r = as_service(env, svc, "metrics", caps=None)
    assert r.returncode == EXIT_CONFIG and "cannot write in metrics_dir" in r.stderr, r.stderr
    os.chown(out, svc.uid, -1)
    assert "metrics_dir" not in env.run("check").stdout
    r = as_service(env, svc, "metrics", caps=None)  # what the unit grants: nothing
    assert r.returncode == 0, r.stderr
    got = parsed((out / "dittohead-s1.prom").read_text())
    assert got[("dittohead_deliveries_total", 'study="s1",outcome="delivered"')] == 1
    assert (out / "dittohead-s1.prom").stat().st_uid == svc.uid


def test_check_sees_the_metrics_dropin_drift(tmp_path: Path) -> None:
    base = {"dropbox_root": "/box", "studies": {"s1": {"destination": "/st/s1"}}}
    on = parse({**base, "metrics_dir": "/m"})
    generator.write(tmp_path, generator.expected_dropins(on))
    assert generator.drift(on, tmp_path) == []
    assert generator.drift(parse(base), tmp_path) == [
        "dittohead-metrics.service: has generated settings but metrics_dir is no longer in "
        "the config (systemctl daemon-reload)"]
    moved = parse({**base, "metrics_dir": "/elsewhere"})
    assert generator.drift(moved, tmp_path) == [
        "dittohead-metrics.service: generated settings differ from the config "
        "(systemctl daemon-reload)"]


def test_the_metrics_unit_builds_its_root_from_an_allowlist_and_has_no_capability() -> None:
    text = (REPO / "units" / "dittohead-metrics.service").read_text()
    settings = re.findall(r"^(\w+)=(.*)$", text, re.M)
    for wanted in (("TemporaryFileSystem", "/:ro"), ("RootDirectory", "/run/dittohead/root"),
                   ("ProtectSystem", "yes"), ("CapabilityBoundingSet", ""),
                   ("PrivateNetwork", "yes"), ("User", "dittohead")):
        assert wanted in settings
    assert not [k for k, _ in settings if k in ("ReadWritePaths", "ReadOnlyPaths", "BindPaths",
                                                "AmbientCapabilities")]
    study_unit = (REPO / "units" / "dittohead@.service").read_text()
    assert re.findall(r"^On(Success|Failure)=dittohead-metrics\.service$", study_unit, re.M) \
        == ["Failure", "Success"]


@pytest.mark.systemd
@pytest.mark.slow
def test_the_timer_runs_it_and_without_metrics_dir_it_is_skipped(box: Box) -> None:
    assert box.prop("dittohead-metrics.timer", "ActiveState") == "active"
    box.box.run("systemctl", "start", "dittohead-metrics.service")
    start = int(box.prop("dittohead-metrics.service", "ExecMainStartTimestampMonotonic"))
    end = int(box.prop("dittohead-metrics.service", "ExecMainExitTimestampMonotonic"))
    print(f"\ndittohead-metrics.service, 4 studies, in the box: {(end - start) / 1e6:.2f} s")
    box.box.write_file("/etc/dittohead/config.yaml", CONFIG)
    try:
        box.sh("systemctl daemon-reload")
        box.box.run("systemctl", "start", "dittohead-metrics.service")
        assert box.prop("dittohead-metrics.service", "ConditionResult") == "no"
    finally:
        box.box.write_file("/etc/dittohead/config.yaml", CONFIG + f"metrics_dir: {PROM}\n")
        box.sh("systemctl daemon-reload")


@pytest.mark.systemd
@pytest.mark.slow
def test_many_runs_ending_together_never_fail_it_on_a_start_limit(box: Box) -> None:
    # Every study's run starts it as it ends: 50 studies under load, many a second. The
    # default start limit (5 in 10 s) failed it with "start-limit-hit".
    started = time.monotonic()
    for _ in range(8):
        box.box.run("systemctl", "start", "dittohead-metrics.service", check=False)
    assert time.monotonic() - started < 10  # else the default limit would not be reached
    assert box.prop("dittohead-metrics.service", "Result") == "success"
    assert box.prop("dittohead-metrics.service", "StartLimitIntervalUSec") == "0"
