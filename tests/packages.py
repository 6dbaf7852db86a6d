"""Building the packages for tests: `make deb` (test_deb.py), `make rpm` (test_rpm.py)."""

from __future__ import annotations

import subprocess
import time
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VERSION: str = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
# Where packaging/deb.mk and packaging/rpm.mk put them.
DEB = REPO / "dist" / f"dittohead_{VERSION}_all.deb"
RPM = REPO / "dist" / f"dittohead-{VERSION}-1.noarch.rpm"


def run(*argv: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run in the checkout; with check, a failure shows the end of both outputs."""
    r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {r.returncode}:\n"
                             f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def build(target: str, package: Path, tools: str) -> Path:
    """`make <target>-deps` (skipped loudly when its Debian packages cannot be
    installed: `tools` names them), then `make <target>`, timed."""
    deps = run("make", "-s", f"{target}-deps", check=False)
    if deps.returncode != 0:
        pytest.skip(f"SKIPPED LOUDLY: cannot install {tools} "
                    f"(make {target}-deps): {(deps.stdout + deps.stderr).strip()[-1000:]}")
    package.unlink(missing_ok=True)
    start = time.monotonic()
    run("make", target)
    print(f"\nmake {target}: {time.monotonic() - start:.1f} s")
    assert package.is_file()
    return package
