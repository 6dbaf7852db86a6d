#!/usr/bin/env python3
"""Benchmark a dittohead delivery against `cp -a` and `rsync -a` on one filesystem.

Cases (each tool gets a fresh destination per run; the median of --runs is kept):
  big    one file of --big-mib MiB of random data (default 1024)
  small  --small-files files of 4 KiB in --small-dirs directories (default 20000 in 100)
  huge   with --huge: --huge-files files of 4 KiB (default 200000), one run per tool,
         mainly to show that dittohead's peak RSS does not grow with the file count

Commands timed:
  cp         cp -a SRC DST && sync -f DST
  rsync      rsync -a SRC/ DST && sync -f DST
  dittohead  python -m dittohead --config CFG process STUDY (claim, check, copy +
             sha256, syncfs, publish, verify, receipt), the entry already in the inbox
  dittohead:LABEL  the same with PYTHONPATH=DIR, for each --variant LABEL=DIR: compare
             a modified copy of the package side by side, interleaved, on the same data

Fairness: the source tree is written once per case and synced, so every tool reads
the same page-cache-warm data. The dittohead entry is a copy of that tree (`cp -a`,
written just before, so equally warm; not hard links: dittohead refuses files with
names outside the entry, and its lockdown would take the source's inodes over), made
in the inbox under a dot name, synced and renamed to ready, untimed. Before every
timed command the filesystem is synced (untimed) so no tool pays for another's
dirty pages; `sync -f` and dittohead's syncfs() then flush the same thing: what
the tool wrote. Tools run interleaved (cp,
rsync, dittohead, cp, ...) so slow drifts hit them alike, and each run waits (up to
--quiet-wait s) for the machine to be idle; the table gives the median and the
minimum (the least disturbed run) and ratios of both.

Freed inodes: ext4 without a journal (VM scratch disks, for one) avoids reusing an
inode freed less than 60 s ago, 360 s while its inode table block is dirty
(recently_deleted() in fs/ext4/ialloc.c), and checks each candidate with a buffer
lookup: creating 20,000 files next to 20,000 just deleted costs seconds of system
time, and cp's time swung 1x-10x from run to run. So the bench frees no inodes while
it measures: outputs of many-file cases are moved to a trash directory removed at the
very end (an output of few, big files is deleted right after its run, which frees
space and page cache but hardly any inodes). Disk use peaks at about 2 GB for the big
case and 1 GB (5 GB with --huge) of trash. Before each case a probe times 2,000 file
creations and warns when the allocator is slow (another program deleting many files
nearby: wait, or use a --dir on another filesystem or a fresh top-level directory).

Memory: in a VM, writing into guest pages the host has not backed yet is several times
slower than into recycled ones (copy_folio_from_iter_atomic took 31-51% of a slow
1 GiB delivery's profile samples, 10% of a good one's), and with free page reporting
(virtio-balloon) pages free for ~2 s go back to the host (docs/field-notes.md, "Memory
in a VM"). So just before each timed command the bench touches and frees twice the
case's size of memory (prefault()): every tool writes into backed pages. Outputs of
big files are freed after each run too.

Peak RSS and CPU time come from wait4() on each child (ru_maxrss, KiB on Linux). A
child's ru_maxrss is never below the spawner's own peak RSS, so the table marks
values at that floor with "<=" (cp's and rsync's real peak is a few MB).

Repeatable numbers: a filesystem that has freed many inodes lately (a test run) or
that holds previous benches' trash makes creates slow and noisy. The steadiest
small-file numbers came from a fresh ext4 image, loop-mounted (as root):
  truncate -s 12G /var/tmp/b.img && mkfs.ext4 -q -F -N 3000000 /var/tmp/b.img
  mkdir -p /mnt/b && mount -o loop /var/tmp/b.img /mnt/b   # then --dir /mnt/b

Everything lives in a fresh directory under --dir (default /var/tmp), removed at the
end. Standard library only. Example:  .venv/bin/python bench/bench_delivery.py
Quick run:  .venv/bin/python bench/bench_delivery.py --big-mib 64 --small-files 2000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import platform
import pwd
import resource
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
STUDY = "bench"
SMALL_SIZE = 4096
TOOLS = ("cp", "rsync", "dittohead")
DITTOHEAD = "dittohead"
# The targets the headlines check.
TARGET_BIG_VS_CP = 1.15
TARGET_SMALL_VS_CP = 1.3
TARGET_RSS_MB = 100.0


@dataclass
class Run:
    seconds: float  # wall clock of the whole command (and its sync)
    cpu_seconds: float  # user + system of the child processes
    maxrss_kib: int  # largest ru_maxrss of the child processes
    # A child's ru_maxrss is never below the spawner's own peak RSS (Linux records the
    # parent's address space at the child's exec), so values at or under this floor only
    # say "at most this much". The bench keeps itself small so the floor stays low.
    floor_kib: int = 0
    busy_before: float = 0.0  # share of CPU time others used just before the run


@dataclass
class ToolResult:
    tool: str
    runs: list[Run] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def best(self) -> float:
        return min(r.seconds for r in self.runs)

    @property
    def cpu(self) -> float:
        return statistics.median(r.cpu_seconds for r in self.runs)

    @property
    def maxrss_kib(self) -> int:
        return max(r.maxrss_kib for r in self.runs)

    @property
    def rss_is_floor(self) -> bool:
        """True when the peak is not above the spawner's floor (an upper bound only)."""
        return self.maxrss_kib <= max(r.floor_kib for r in self.runs) + 1024


@dataclass
class CaseResult:
    name: str
    files: int
    dirs: int
    bytes: int
    tools: dict[str, ToolResult] = field(default_factory=dict)
    create_us: float = 0.0  # the file creation probe before the case

    def ratio(self, tool: str, ref: str, best: bool = False) -> float | None:
        """tool's time over ref's time (medians, or minimums with best=True)."""
        if tool not in self.tools or ref not in self.tools:
            return None
        a, b = self.tools[tool], self.tools[ref]
        return a.best / b.best if best else a.median / b.median


class BenchError(Exception):
    pass


# --- running children -----------------------------------------------------------------

def spawn(argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Run:
    """Run argv (stdout and stderr to log), wait4() it; fail on a non-zero exit."""
    actions = [
        (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    pid = os.posix_spawnp(argv[0], list(argv), env if env is not None else dict(os.environ),
                          file_actions=actions)
    _, status, ru = os.wait4(pid, 0)
    elapsed = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise BenchError(f"{' '.join(argv)} exited {code}:\n{tail}")
    return Run(seconds=elapsed, cpu_seconds=ru.ru_utime + ru.ru_stime, maxrss_kib=ru.ru_maxrss,
               floor_kib=floor)


def sequence(*runs: Callable[[], Run]) -> Run:
    """Run commands one after the other (cmd && sync) and add them up."""
    start = time.perf_counter()
    parts = [r() for r in runs]
    return Run(seconds=time.perf_counter() - start,
               cpu_seconds=sum(p.cpu_seconds for p in parts),
               maxrss_kib=max(p.maxrss_kib for p in parts),
               floor_kib=max(p.floor_kib for p in parts))


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs; iowait and steal count as not busy."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    idle = values[3] + values[4] + (values[7] if len(values) > 7 else 0)
    return sum(values) - idle, sum(values)


def busy_share(seconds: float) -> float:
    b0, t0 = _cpu_ticks()
    time.sleep(seconds)
    b1, t1 = _cpu_ticks()
    return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


class Settle:
    """What happens before every timed run: sync, wait for a quiet machine, prefault."""

    def __init__(self, quiet_wait: float, quiet_share: float) -> None:
        self.quiet_wait = quiet_wait
        self.quiet_share = quiet_share
        self.prefault = 0  # bytes; set per case

    def __call__(self) -> float:
        """Flush and wait; return the share of CPU others still used just before."""
        os.sync()
        deadline = time.monotonic() + self.quiet_wait
        while True:
            busy = busy_share(0.5)
            if busy <= self.quiet_share or time.monotonic() >= deadline:
                os.sync()
                prefault(self.prefault)
                return busy


def prefault(nbytes: int) -> None:
    """Touch and free nbytes of memory, so the next command's page cache is backed.

    A VM with free page reporting (virtio-balloon here) hands pages that stayed
    free for about 2 s back to the host; the next writer into them takes a host
    fault per page (copy_folio_from_iter_atomic: up to half of a delivery's CPU),
    so whichever tool ran after a quiet wait paid seconds more for the same
    1 GiB. Touching them just before each timed command gives every tool the
    same, backed, pages (reporting waits 2 s; the command starts at once).
    """
    if nbytes <= 0:
        return
    pid = os.fork()  # in a child: the bench's own peak RSS is every child's RSS floor
    if pid == 0:  # pragma: no cover
        with mmap.mmap(-1, nbytes) as m:
            m[::mmap.PAGESIZE] = b"\1" * ((nbytes + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
        os._exit(0)
    os.waitpid(pid, 0)


def prefault_size(case_bytes: int) -> int:
    """Enough for a tool's output and some: twice the case, at most half the free memory."""
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f
                     if line.startswith("MemAvailable:"))
    return min(2 * case_bytes + (256 << 20), avail // 2)


PROBE_FILES = 2000
PROBE_SLOW_US = 100.0  # an unloaded ext4 creates an empty file in 15-40 us


def create_probe(where: Path) -> float:
    """Microseconds per empty-file creation in a fresh directory (kept: see docstring)."""
    where.mkdir()
    fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY)
    try:
        start = time.perf_counter()
        for i in range(PROBE_FILES):
            os.close(os.open(str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=fd))
        return (time.perf_counter() - start) / PROBE_FILES * 1e6
    finally:
        os.close(fd)


# --- data -----------------------------------------------------------------------------

def make_big(src: Path, mib: int) -> tuple[int, int, int]:
    src.mkdir()
    chunk = 1 << 20  # small buffers keep the bench's own RSS (the floor) low
    left = mib << 20
    with open(src / "big.bin", "wb") as f:
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
    return 1, 1, mib << 20


def make_small(src: Path, files: int, dirs: int) -> tuple[int, int, int]:
    src.mkdir()
    per_dir = -(-files // dirs)
    made = 0
    for d in range(dirs):
        sub = src / f"d{d:04d}"
        sub.mkdir()
        for i in range(min(per_dir, files - made)):
            (sub / f"f{i:05d}.dat").write_bytes(os.urandom(SMALL_SIZE))
            made += 1
        if made >= files:
            break
    return made, len(os.listdir(src)) + 1, made * SMALL_SIZE


def tree_stats(top: Path) -> tuple[int, int]:
    """(regular files, bytes) under top."""
    files = size = 0
    for dirpath, _dirs, names in os.walk(top):
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            files += 1
            size += st.st_size
    return files, size


def rmtree(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


# --- dittohead's side -----------------------------------------------------------------

@dataclass
class Dropbox:
    root: Path  # dropbox_root
    dest: Path
    config: Path
    python: str

    @property
    def study_dir(self) -> Path:
        return self.root / STUDY

    def sub(self, name: str) -> Path:
        return self.study_dir / name


def make_dropbox(base: Path, python: str) -> Dropbox:
    """A throwaway config and the layout `dittohead setup` would make (owner: us)."""
    root = base / "dropbox"
    dest = base / "dest"
    root.mkdir(mode=0o755)
    (root / STUDY).mkdir(mode=0o755)
    for name, mode in (("inbox", 0o1733), ("processing", 0o750), ("done", 0o750),
                       ("failed", 0o750)):
        p = root / STUDY / name
        p.mkdir()
        os.chmod(p, mode)
    user = pwd.getpwuid(os.geteuid()).pw_name
    cfg = base / "config.yaml"
    # JSON strings are valid YAML scalars: no quoting surprises in the paths.
    cfg.write_text(f"dropbox_root: {json.dumps(str(root))}\n"
                   f"service_user: {json.dumps(user)}\n"
                   # The entry is made before the run: ready at once.
                   "defaults: {quiet_period: 0}\n"
                   "studies:\n"
                   f"  {STUDY}:\n"
                   f"    destination: {json.dumps(str(dest))}\n")
    return Dropbox(root=root, dest=dest, config=cfg, python=python)


def dittohead_env(pythonpath: str | None) -> dict[str, str]:
    # PYTHONSAFEPATH: `python -m` would otherwise put the working directory first
    # on sys.path, and run from the repository it would shadow PYTHONPATH.
    env = dict(os.environ, DITTOHEAD_LOG="stderr", PYTHONSAFEPATH="1")
    for k in ("DITTOHEAD_TEST_FAULT", "DITTOHEAD_CONFIG", "PYTHONPATH"):
        env.pop(k, None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def drop_entry(box: Dropbox, src: Path, name: str, log: Path) -> None:
    """Put a copy of src in the inbox as .name, then rename it to name."""
    hidden = box.sub("inbox") / f".{name}"
    spawn(["cp", "-a", str(src), str(hidden)], log)
    spawn(["sync", "-f", str(hidden)], log)
    os.rename(hidden, box.sub("inbox") / name)


def dittohead_argv(box: Dropbox, profile: Path | None = None) -> list[str]:
    prof = ["-m", "cProfile", "-o", str(profile)] if profile else []
    return [box.python, *prof, "-m", "dittohead", "--config", str(box.config), "process",
            STUDY]


def check_delivered(box: Dropbox) -> None:
    """Exactly one receipt in done/, saying delivered; nothing left elsewhere."""
    receipts = sorted(box.sub("done").glob("*.json"))
    failed = sorted(box.sub("failed").glob("*.json"))
    if failed or len(receipts) != 1:
        reasons = [json.loads(p.read_text()).get("reason") for p in failed]
        raise BenchError(f"dittohead did not deliver: done={receipts} failed={reasons}")
    data = json.loads(receipts[0].read_text())
    if data.get("outcome") != "delivered":
        raise BenchError(f"dittohead receipt: {data}")
    left = [p.name for p in box.sub("inbox").iterdir()]
    left += [p.name for p in box.sub("processing").iterdir() if not p.name.startswith(".")]
    if left:
        raise BenchError(f"dittohead left entries behind: {left}")


def keep_delivery(box: Dropbox, kept: Path, label: str) -> None:
    """Move the delivered tree and done/ aside (deleting now would slow the next run)."""
    os.rename(box.dest, kept / label)
    os.rename(box.sub("done"), kept / f"{label}-done")
    box.sub("done").mkdir()
    os.chmod(box.sub("done"), 0o750)


# --- one case -------------------------------------------------------------------------

@dataclass
class Setup:
    base: Path
    box: Dropbox
    tools: list[str]  # cp, rsync, dittohead, dittohead:LABEL ...
    pythonpaths: dict[str, str | None]  # per dittohead tool
    runs: int
    profile_dir: Path | None
    settle: Settle
    trash: Path  # removed at the very end only (see the module docstring)


def run_case(name: str, src: Path, shape: tuple[int, int, int], runs: int,
             s: Setup) -> CaseResult:
    files, dirs, size = shape
    case = CaseResult(name=name, files=files, dirs=dirs, bytes=size)
    logs = s.base / "logs"
    kept = s.base / "kept"  # every output of this case, deleted when the case ends
    kept.mkdir()
    # An output of a few big files is deleted right after its run: that frees
    # hardly any inodes, and it returns its page cache, so the next tool writes
    # into recycled pages like this one did (in a VM, first-touch pages cost).
    few_inodes = files < 1000
    s.settle.prefault = prefault_size(size)
    for t in s.tools:
        case.tools[t] = ToolResult(t)

    def timed_copy(tool: str, out: Path) -> Run:
        argv = (["cp", "-a", str(src), str(out)] if tool == "cp"
                else ["rsync", "-a", f"{src}/", str(out)])
        busy = s.settle()
        r = sequence(lambda: spawn(argv, logs / f"{tool}.log"),
                     lambda: spawn(["sync", "-f", str(out)], logs / f"{tool}.log"))
        r.busy_before = busy
        got = tree_stats(out)
        if got != (files, size):
            raise BenchError(f"{tool} copied {got}, expected {(files, size)}")
        if few_inodes:
            rmtree(out)
        return r

    def timed_dittohead(tool: str, label: str, profile: Path | None = None) -> Run:
        box = s.box
        box.dest.mkdir()
        drop_entry(box, src, f"{name}-entry", logs / "prepare.log")
        busy = s.settle()
        r = spawn(dittohead_argv(box, profile), logs / f"{label}.log",
                  env=dittohead_env(s.pythonpaths[tool]))
        r.busy_before = busy
        check_delivered(box)
        got = tree_stats(box.dest)
        if got != (files, size):
            raise BenchError(f"{tool} delivered {got}, expected {(files, size)}")
        keep_delivery(box, kept, label)
        if few_inodes:
            rmtree(kept / label)
            rmtree(kept / f"{label}-done")
        return r

    probe = create_probe(s.trash / f"probe-{name}")
    case.create_us = probe
    print(f"  {name:5} file creation probe: {probe:.0f} us per file"
          + (" -- SLOW: many inodes freed nearby lately? results will be noisy"
             if probe > PROBE_SLOW_US else ""), flush=True)
    try:
        for i in range(runs):
            for t in s.tools:
                label = f"{t.replace(':', '-')}-{i}"
                r = (timed_dittohead(t, label) if t.startswith(DITTOHEAD)
                     else timed_copy(t, kept / label))
                case.tools[t].runs.append(r)
                print(f"  {name:5} run {i + 1}/{runs} {t:16} {r.seconds:8.3f} s  "
                      f"cpu {r.cpu_seconds:7.3f} s  maxrss {mb(r.maxrss_kib):6.1f} MB"
                      + (" (<= floor)" if r.maxrss_kib <= r.floor_kib + 1024 else "")
                      + (f"  [others used {r.busy_before:.0%} CPU before]"
                         if r.busy_before > 0.1 else ""),
                      flush=True)
        if s.profile_dir is not None:
            for t in s.tools:
                if t.startswith(DITTOHEAD):
                    label = t.replace(":", "-")
                    prof = s.profile_dir / f"{label}-{name}.prof"
                    r = timed_dittohead(t, f"{label}-prof", prof)
                    print(f"  {name:5} cProfile {t:16} {r.seconds:8.3f} s -> {prof}",
                          flush=True)
    finally:
        if few_inodes:
            rmtree(kept)
        else:
            os.rename(kept, s.trash / f"kept-{name}")
    return case


# --- report ---------------------------------------------------------------------------

def mb(kib: int) -> float:
    return kib * 1024 / 1e6


def _x(v: float | None, width: int) -> str:
    return f"{v:{width - 1}.2f}x" if v is not None else " " * width


def table(cases: Sequence[CaseResult]) -> str:
    head = (f"{'case':6} {'tool':16} {'median s':>9} {'min s':>8} {'max s':>8} {'MB/s':>7} "
            f"{'files/s':>8} {'cpu s':>7} {'maxRSS MB':>9} | {'vs cp':>6} {'vs rsync':>8}"
            f" | {'min/min cp':>10} {'rsync':>6}")
    lines = [head, "-" * len(head)]
    for c in cases:
        for t, r in c.tools.items():
            d = t.startswith(DITTOHEAD)
            rss = ("<=" if r.rss_is_floor else "") + f"{mb(r.maxrss_kib):.1f}"
            lines.append(
                f"{c.name:6} {t:16} {r.median:9.3f} {r.best:8.3f} "
                f"{max(x.seconds for x in r.runs):8.3f} {c.bytes / 1e6 / r.median:7.1f} "
                f"{c.files / r.median:8.0f} {r.cpu:7.2f} {rss:>9} | "
                f"{_x(c.ratio(t, 'cp') if d else None, 6)} "
                f"{_x(c.ratio(t, 'rsync') if d else None, 8)} | "
                f"{_x(c.ratio(t, 'cp', best=True) if d else None, 10)} "
                f"{_x(c.ratio(t, 'rsync', best=True) if d else None, 6)}")
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


def headlines(cases: dict[str, CaseResult], tools: Sequence[str]) -> list[str]:
    out = []
    for tool in (t for t in tools if t.startswith(DITTOHEAD)):
        for key, target in (("big", TARGET_BIG_VS_CP), ("small", TARGET_SMALL_VS_CP)):
            c = cases.get(key)
            if c is None:
                continue
            what = (f"1 file of {c.bytes >> 20} MiB" if key == "big"
                    else f"{c.files} files of 4 KiB")
            parts = [f"{tool} {key} ({what}):"]
            vs_cp, vs_rs = c.ratio(tool, "cp"), c.ratio(tool, "rsync")
            if vs_cp is not None:
                best = c.ratio(tool, "cp", best=True)
                parts.append(f"vs cp {vs_cp:.2f}x (best runs {best:.2f}x; target <= "
                             f"{target}x: {verdict(vs_cp <= target)})")
            if vs_rs is not None:
                best = c.ratio(tool, "rsync", best=True)
                parts.append(f"vs rsync {vs_rs:.2f}x (best runs {best:.2f}x; target < 1x: "
                             f"{verdict(vs_rs < 1)})")
            out.append("  ".join(parts))
        rss = {k: mb(c.tools[tool].maxrss_kib) for k, c in cases.items() if tool in c.tools}
        if rss:
            worst = max(rss.values())
            out.append(f"{tool} peak RSS: "
                       + ", ".join(f"{k} {v:.1f} MB" for k, v in rss.items())
                       + f" (target < {TARGET_RSS_MB:.0f} MB: "
                       f"{verdict(worst < TARGET_RSS_MB)})")
    return out


def package_digest(python: str, pythonpath: str | None, log: Path) -> str:
    """Where the dittohead package that will run is (byte-compiled now), and its checksum."""
    spawn([python, "-c", "import dittohead, sys; print(dittohead.__file__, file=sys.stderr)"],
          log, env=dittohead_env(pythonpath))
    pkg = Path(log.read_text().splitlines()[-1]).parent
    # Installed copies are byte-compiled (`make install` runs compileall, the
    # .deb py3compile): so is the one measured here, or every run would
    # compile ~20 modules first (80 ms here; PYTHONDONTWRITEBYTECODE=1 in
    # this environment keeps Python from caching them on its own).
    spawn([python, "-m", "compileall", "-q", str(pkg)], log, env=dittohead_env(pythonpath))
    crc = 0  # crc32, not sha256: importing hashlib would add 4 MB to the RSS floor
    for p in sorted(pkg.glob("*.py")):
        crc = zlib.crc32(p.name.encode() + b"\0" + p.read_bytes(), crc)
    return f"{pkg} (crc32 {crc:08x})"


# --- main -----------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                   help="make the bench's scratch directory in here (default /var/tmp); "
                        "it is removed at the end")
    p.add_argument("--big-mib", type=int, default=1024, help="size of the big file (MiB)")
    p.add_argument("--small-files", type=int, default=20000, help="files in the small case")
    p.add_argument("--small-dirs", type=int, default=100, help="directories in the small case")
    p.add_argument("--huge", action="store_true",
                   help="also deliver a --huge-files entry (one run per tool) for peak RSS")
    p.add_argument("--huge-files", type=int, default=200000)
    p.add_argument("--runs", type=int, default=3, help="runs per tool and case (median)")
    p.add_argument("--cases", default="big,small", help="comma list of big, small")
    p.add_argument("--tools", default=",".join(TOOLS), help="comma list of cp, rsync, dittohead")
    p.add_argument("--python", default=str(VENV_PYTHON),
                   help="python that runs `-m dittohead` (default the project's venv)")
    p.add_argument("--pythonpath", metavar="DIR",
                   help="PYTHONPATH for the `dittohead` tool (default: the project's package)")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=DIR",
                   help="also time dittohead with PYTHONPATH=DIR as tool dittohead:LABEL "
                        "(DIR holds a dittohead/ package); may be repeated")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="after the timed runs, one more run of each dittohead tool per case "
                        "under cProfile, written to DIR/<tool>-<case>.prof")
    p.add_argument("--quiet-wait", type=float, default=30.0, metavar="SECONDS",
                   help="before each run wait up to this long for other processes to use "
                        "at most --quiet-share of the CPUs (default 30)")
    p.add_argument("--quiet-share", type=float, default=0.15)
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    args = p.parse_args(argv)
    args.case_list = [c for c in args.cases.split(",") if c]
    args.tool_list = [t for t in args.tools.split(",") if t]
    if not set(args.case_list) <= {"big", "small"} or not set(args.tool_list) <= set(TOOLS):
        p.error("unknown case or tool")
    if args.runs < 1 or args.big_mib < 1 or args.small_files < 1 or args.small_dirs < 1:
        p.error("sizes and --runs must be positive")
    args.pythonpaths = {DITTOHEAD: args.pythonpath}
    for v in args.variant:
        label, sep, path = v.partition("=")
        if not sep or not label or not (Path(path) / "dittohead" / "__init__.py").is_file():
            p.error(f"--variant {v}: want LABEL=DIR with DIR/dittohead/__init__.py")
        args.pythonpaths[f"{DITTOHEAD}:{label}"] = str(Path(path).resolve())
        args.tool_list.append(f"{DITTOHEAD}:{label}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("cp", "rsync", "sync"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found", file=sys.stderr)
            return 2
    made = [d for d in (args.dir, *args.dir.parents) if not d.exists()]  # deepest first
    args.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="dittohead-bench-", dir=args.dir)).resolve()
    if args.profile is not None:
        args.profile = args.profile.resolve()
        args.profile.mkdir(parents=True, exist_ok=True)
    results: dict[str, CaseResult] = {}
    digests: dict[str, str] = {}
    try:
        (base / "logs").mkdir()
        for t in args.tool_list:
            if t.startswith(DITTOHEAD):
                digests[t] = package_digest(args.python, args.pythonpaths[t],
                                            base / "logs" / "which.log")
        print(f"bench dir {base} ({shutil.disk_usage(base).free >> 30} GiB free), "
              f"{os.cpu_count()} CPUs, {platform.platform()}")
        for t, d in digests.items():
            print(f"{t}: {d}")
        setup = Setup(base=base, box=make_dropbox(base, args.python), tools=args.tool_list,
                      pythonpaths=args.pythonpaths, runs=args.runs, profile_dir=args.profile,
                      settle=Settle(args.quiet_wait, args.quiet_share), trash=base / "trash")
        setup.trash.mkdir()
        plan: list[tuple[str, Callable[[Path], tuple[int, int, int]], int]] = []
        if "big" in args.case_list:
            plan.append(("big", lambda s: make_big(s, args.big_mib), args.runs))
        if "small" in args.case_list:
            plan.append(("small", lambda s: make_small(s, args.small_files, args.small_dirs),
                         args.runs))
        if args.huge:
            plan.append(("huge", lambda s: make_small(s, args.huge_files,
                                                      -(-args.huge_files // 200)), 1))
        for name, make, runs in plan:
            src = base / f"src-{name}"
            t0 = time.perf_counter()
            shape = make(src)
            os.sync()
            print(f"{name}: {shape[0]} files, {shape[1]} dirs, {shape[2] / 1e6:.0f} MB "
                  f"(made in {time.perf_counter() - t0:.1f} s)", flush=True)
            try:
                results[name] = run_case(name, src, shape, runs, setup)
            finally:
                if shape[0] < 1000:
                    rmtree(src)
                else:
                    os.rename(src, setup.trash / src.name)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(base, ignore_errors=True)
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()
    print()
    print(table(list(results.values())))
    print()
    lines = headlines(results, args.tool_list)
    for line in lines:
        print(line)
    if args.json is not None:
        data = {
            "packages": digests,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "cases": {k: {**asdict(c),
                          "median_seconds": {t: r.median for t, r in c.tools.items()},
                          "min_seconds": {t: r.best for t, r in c.tools.items()},
                          "maxrss_kib": {t: r.maxrss_kib for t, r in c.tools.items()},
                          "ratios": {t: {"vs_cp": c.ratio(t, "cp"),
                                         "vs_rsync": c.ratio(t, "rsync"),
                                         "best_vs_cp": c.ratio(t, "cp", best=True),
                                         "best_vs_rsync": c.ratio(t, "rsync", best=True)}
                                     for t in c.tools if t.startswith(DITTOHEAD)}}
                      for k, c in results.items()},
            "headlines": lines,
        }
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
