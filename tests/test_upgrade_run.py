"""A run across an upgrade of the installed program (what `dpkg -i` of a new version does
under a running delivery; tests/test_campaign_upgrade.py does it with the real package).

The run finishes the entry in hand with the code it started with, having loaded all of it
before claiming anything, then claims nothing more and ends: the next run, with the new
program, takes the entries left. Every journal event names the version that made it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .conftest import REPO, Env, no_leftovers, wait_for

VERSION_LINE = '__version__ = "0.1.0"\n'


def installed_copy(tmp_path: Path) -> Path:
    """A copy of the package, as an installation (the checkout is never changed)."""
    lib = tmp_path / "lib"
    shutil.copytree(REPO / "dittohead", lib / "dittohead",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return lib


def start(env: Env, lib: Path, *args: str, fault: str = "") -> subprocess.Popen[str]:
    """`python -m dittohead --config CFG ARGS` running the package in lib."""
    extra = {"DITTOHEAD_TEST_FAULT": fault} if fault else {}
    return subprocess.Popen(
        [sys.executable, "-m", "dittohead", "--config", str(env.config_path), *args],
        cwd=lib, env={**os.environ, "DITTOHEAD_LOG": "stderr", **extra},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def upgrade(lib: Path, version: str) -> None:
    """Replace the package's files the way dpkg does: a new file renamed over each."""
    for path in sorted((lib / "dittohead").glob("*.py")):
        text = path.read_text()
        if path.name == "__init__.py":
            text = text.replace('__version__ = "', f'__version__ = "{version}+was-')
        new = path.with_name(path.name + ".dpkg-new")
        new.write_text(text)
        os.rename(new, path)


def delivered_versions(stderr: str) -> dict[str, str]:
    """Entry name -> DITTOHEAD_VERSION of its `delivered` event, from DITTOHEAD_LOG=stderr."""
    out = {}
    for line in stderr.splitlines():
        if "MESSAGE_ID=38a8638a6c0e47ae85e1afdd33a44e53" in line:
            fields = dict(f.split("=", 1) for f in line.rsplit("[", 1)[1].rstrip("]").split())
            out[fields["DITTOHEAD_ENTRY"]] = fields["DITTOHEAD_VERSION"]
    return out


def test_a_run_ends_after_the_entry_in_hand_once_the_program_is_upgraded(
        env: Env, tmp_path: Path) -> None:
    lib = installed_copy(tmp_path)
    go = tmp_path / "go"
    for name in ("a1", "a2", "a3"):
        env.drop(name, {f"{name}/x.bin": name.encode() * 100})
        time.sleep(0.01)  # oldest (by mtime) first: a1 is the one held
    run = start(env, lib, "process", "s1", "--linger", "1", fault=f"claimed=wait:{go}")
    wait_for(lambda: any(env.study.processing.iterdir()), 30, "the run to claim a1")
    upgrade(lib, "9.9")
    go.touch()
    _, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert "dittohead 0.1.0 was upgraded or reinstalled since this run started: this run " \
           "ends, and the next one takes the entries left" in err
    # The entry in hand is delivered whole, by the program that claimed it; no other.
    assert delivered_versions(err) == {"a1": "0.1.0"}
    assert sorted(p.name for p in env.study.inbox.iterdir()) == ["a2", "a3"]

    after = start(env, lib, "process", "s1")
    _, err = after.communicate(timeout=60)
    assert after.returncode == 0, err
    assert delivered_versions(err) == {"a2": "9.9+was-0.1.0", "a3": "9.9+was-0.1.0"}
    assert len(env.done_receipts()) == 3
    for name in ("a1", "a2", "a3"):
        assert (env.study.destination / name / "x.bin").read_bytes() == name.encode() * 100
    no_leftovers(env)


# Runs `dittohead process` and prints the dittohead modules imported once process() began.
LATE_IMPORTS_PY = r"""
import json, sys
import dittohead.process as p
real = p.process
def watched(*args, **kwargs):
    before = {m for m in sys.modules if m.startswith("dittohead")}
    try:
        return real(*args, **kwargs)
    finally:
        late = sorted(m for m in sys.modules if m.startswith("dittohead") and m not in before)
        print(json.dumps(late), file=sys.stderr)
p.process = watched
from dittohead.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_loads_all_of_its_code_before_it_claims_anything(env: Env) -> None:
    """An upgrade replaces the files under a running delivery: what it has not imported
    by then would come from the new version, mixed with the old."""
    env.reload(notify={"to": ["pi@example.edu"]})  # queued mail too
    env.drop("good", {"good/a.txt": b"a", "good/sub/b.txt": b"b"})
    env.drop("single.txt", b"one file")
    (env.study.destination / "clash").mkdir()
    (env.study.destination / "clash" / "c.txt").write_bytes(b"already there")
    env.drop("conflict", {"clash/c.txt": b"other"})  # fails: never overwritten
    r = subprocess.run([sys.executable, "-c", LATE_IMPORTS_PY, "--config", str(env.config_path),
                        "process", "s1"], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "DITTOHEAD_LOG": "stderr",
                            "DITTOHEAD_MAIL": "queue"}, timeout=120)
    assert len(env.done_receipts()) == 2 and len(env.failed_receipts()) == 1, r.stderr
    assert json.loads(r.stderr.strip().splitlines()[-1]) == [], r.stderr


def test_every_event_names_the_version_that_made_it(env: Env) -> None:
    env.drop("v", {"v/a.txt": b"a"})
    r = env.process()
    assert r.returncode == 0, r.stderr
    from dittohead import __version__
    assert delivered_versions(r.stderr) == {"v": __version__}
