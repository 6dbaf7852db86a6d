"""A hostile uploader at a lab PC against the per-uploader folders (users/<user>/).

Each attack is made by a real unprivileged user (a throwaway one, through
setpriv) against the service run as its own user with exactly the unit's
capabilities (conftest.service_argv): nothing here may make the service
exit 1 or 78 for everybody, misroute or lose an entry, or tell one uploader
about another's uploads.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from dittohead.outcomes import outcomes_dir

from .conftest import IS_ROOT, REPO, Env, ThrowawayUser, add_user, as_service, service_argv

root = pytest.mark.root
needs_root = pytest.mark.skipif(not IS_ROOT, reason="NEEDS ROOT: real uploaders and ACLs")

# Swaps two names of a directory for ever (RENAME_EXCHANGE), as fast as it can:
# an uploader's own inbox is theirs to write, so they may do this to their entries.
SWAPPER = r"""
import ctypes, errno, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
a, b = (os.fsencode(x) for x in sys.argv[1:3])
AT_FDCWD, RENAME_EXCHANGE = -100, 2
end = time.monotonic() + float(sys.argv[3])
print("go", flush=True)
while time.monotonic() < end:
    for _ in range(1000):
        if libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) != 0:
            if ctypes.get_errno() == errno.ENOENT:
                sys.exit(0)
"""


@pytest.fixture
def other() -> ThrowawayUser:
    return add_user("dh-test-ra2")


def as_user(user: ThrowawayUser, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*user.prefix(), *argv], capture_output=True, text=True,
                          timeout=120, cwd="/")


def setup_user(env: Env, user: ThrowawayUser) -> Path:
    """`dittohead setup s1 --user NAME`, as root does it; the user's own inbox."""
    subprocess.run(["python3", "-m", "dittohead", "--config", str(env.config_path), "setup",
                    "s1", "--user", user.name], capture_output=True, cwd=REPO, check=True)
    return outcomes_dir(env.study, user.uid).parent / "inbox"


@root
@needs_root
def test_swapping_entries_in_an_own_inbox_during_claims_never_ends_a_run_with_1(
        service_env: Env, svc: ThrowawayUser, ra: ThrowawayUser) -> None:
    """Once the claim has taken a directory over, its uploader can no longer rename it:
    the own inbox is sticky like the shared one, so the claim's rename moves the very
    inode it took over."""
    env = service_env
    inbox = setup_user(env, ra)
    argv = service_argv(env, svc, "process", "s1")
    for i in range(8):
        a, b = inbox / f"e{i}", inbox / f"f{i}"
        for d in (a, b):
            assert as_user(ra, "sh", "-c", f"mkdir {d} && echo {d.name} > {d}/{d.name}.txt"
                           ).returncode == 0
        swapper = subprocess.Popen([*ra.prefix(), "/usr/bin/python3", "-c", SWAPPER, str(a),
                                    str(b), "20"], stdout=subprocess.PIPE, text=True, cwd="/")
        assert swapper.stdout is not None and swapper.stdout.readline() == "go\n"
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd="/")
        swapper.kill()
        swapper.wait()
        assert r.returncode == 0, r.stderr
        assert os.listdir(inbox) == []
    delivered = sorted(os.listdir(env.study.destination))
    assert delivered == sorted(f"{x}{i}.txt" for i in range(8) for x in "ef")
    for p in env.done_receipts():
        assert json.loads(p.read_text())["uploader_uid"] == ra.uid


def run_as_service(env: Env, svc: ThrowawayUser) -> subprocess.CompletedProcess[str]:
    return as_service(env, svc, "process", "s1")
