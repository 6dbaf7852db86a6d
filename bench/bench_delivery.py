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
  dittohead  dittohead --config CFG process STUDY   (claim, check, copy + sha256,
             syncfs, publish, verify, receipt), the entry already in the inbox

Fairness: the source tree is written once per case and synced, so every tool reads
the same page-cache-warm data. The dittohead entry is a hard-linked copy of that tree
(`cp -al`, the same inodes, so equally warm), made in the inbox under a dot name and
renamed to ready, untimed. Before every timed command the filesystem is synced
(untimed) so no tool pays for another's dirty pages; `sync -f` and dittohead's
syncfs() then flush the same thing: what the tool wrote. Peak RSS and CPU time come
from wait4() on each child (ru_maxrss, KiB on Linux).

Everything lives in a fresh directory under --dir (default /var/tmp), removed at the
end. Standard library only. Example:  .venv/bin/python bench/bench_delivery.py
Quick run:  .venv/bin/python bench/bench_delivery.py --big-mib 64 --small-files 2000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import pwd
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
STUDY = "bench"
SMALL_SIZE = 4096
TOOLS = ("cp", "rsync", "dittohead")
# Targets from the issue.
TARGET_BIG_VS_CP = 1.3
TARGET_SMALL_VS_CP = 1.5
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


@dataclass
class ToolResult:
    tool: str
    runs: list[Run] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def cpu(self) -> float:
        return statistics.median(r.cpu_seconds for r in self.runs)

    @property
    def maxrss_kib(self) -> int:
        return max(r.maxrss_kib for r in self.runs)

    @property
    def rss_is_floor(self) -> bool:
        """True when the peak is not above the spawner's floor (an upper bound only)."""
        return self.maxrss_kib <= max(r.floor_kib for r in self.runs)


@dataclass
class CaseResult:
    name: str
    files: int
    dirs: int
    bytes: int
    tools: dict[str, ToolResult] = field(default_factory=dict)

    def ratio(self, tool: str) -> float | None:
        if "dittohead" not in self.tools or tool not in self.tools:
            return None
        return self.tools["dittohead"].median / self.tools[tool].median


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


def settle() -> None:
    """Flush everything outside the timed section, so no tool pays for another's writes."""
    os.sync()
    time.sleep(0.5)
    os.sync()


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
    env: dict[str, str]

    @property
    def study_dir(self) -> Path:
        return self.root / STUDY

    def sub(self, name: str) -> Path:
        return self.study_dir / name


def make_dropbox(base: Path, pythonpath: str | None, python: str) -> Dropbox:
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
                   "studies:\n"
                   f"  {STUDY}:\n"
                   f"    destination: {json.dumps(str(dest))}\n")
    env = dict(os.environ, DITTOHEAD_LOG="stderr")
    env.pop("DITTOHEAD_TEST_FAULT", None)
    env.pop("DITTOHEAD_CONFIG", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return Dropbox(root=root, dest=dest, config=cfg, python=python, env=env)


def drop_entry(box: Dropbox, src: Path, name: str) -> None:
    """Put a hard-linked copy of src in the inbox as .name, then rename it to name."""
    hidden = box.sub("inbox") / f".{name}"
    spawn(["cp", "-al", str(src), str(hidden)], box.root.parent / "logs" / "prepare.log")
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


def clear_dropbox(box: Dropbox) -> None:
    for name in ("inbox", "processing", "done", "failed"):
        for p in box.sub(name).iterdir():
            rmtree(p)
    rmtree(box.dest)


# --- one case -------------------------------------------------------------------------

def run_case(name: str, src: Path, box: Dropbox, base: Path, runs: int, tools: Sequence[str],
             shape: tuple[int, int, int], profile_dir: Path | None) -> CaseResult:
    files, dirs, size = shape
    case = CaseResult(name=name, files=files, dirs=dirs, bytes=size)
    logs = base / "logs"
    out = base / "out"
    for t in tools:
        case.tools[t] = ToolResult(t)

    def timed_cp() -> Run:
        return sequence(lambda: spawn(["cp", "-a", str(src), str(out)], logs / "cp.log"),
                        lambda: spawn(["sync", "-f", str(out)], logs / "cp.log"))

    def timed_rsync() -> Run:
        return sequence(lambda: spawn(["rsync", "-a", f"{src}/", str(out)], logs / "rsync.log"),
                        lambda: spawn(["sync", "-f", str(out)], logs / "rsync.log"))

    def timed_dittohead(profile: Path | None = None) -> Run:
        box.dest.mkdir()
        drop_entry(box, src, f"{name}-entry")
        settle()
        r = spawn(dittohead_argv(box, profile), logs / "dittohead.log", env=box.env)
        check_delivered(box)
        got = tree_stats(box.dest)
        if got != (files, size):
            raise BenchError(f"dittohead delivered {got}, expected {(files, size)}")
        return r

    for i in range(runs):
        for t in tools:
            if t == "dittohead":
                r = timed_dittohead()
                clear_dropbox(box)
            else:
                settle()
                r = timed_cp() if t == "cp" else timed_rsync()
                got = tree_stats(out)
                if got != (files, size):
                    raise BenchError(f"{t} copied {got}, expected {(files, size)}")
                rmtree(out)
            case.tools[t].runs.append(r)
            print(f"  {name:5} run {i + 1}/{runs} {t:9} {r.seconds:8.3f} s  "
                  f"cpu {r.cpu_seconds:7.3f} s  maxrss {mb(r.maxrss_kib):7.1f} MB"
                  + (" (<= floor)" if r.maxrss_kib <= r.floor_kib else ""),
                  flush=True)
            settle()
    if profile_dir is not None and "dittohead" in tools:
        prof = profile_dir / f"dittohead-{name}.prof"
        r = timed_dittohead(prof)
        clear_dropbox(box)
        settle()
        print(f"  {name:5} cProfile run   {r.seconds:8.3f} s -> {prof}", flush=True)
    return case


# --- report ---------------------------------------------------------------------------

def mb(kib: int) -> float:
    return kib * 1024 / 1e6


def table(cases: Sequence[CaseResult]) -> str:
    head = (f"{'case':6} {'tool':9} {'median s':>9} {'min s':>8} {'max s':>8} {'MB/s':>8} "
            f"{'files/s':>9} {'cpu s':>7} {'maxRSS MB':>9} {'vs cp':>6} {'vs rsync':>8}")
    lines = [head, "-" * len(head)]
    for c in cases:
        for t, r in c.tools.items():
            secs = [x.seconds for x in r.runs]
            ratio_cp = c.ratio("cp") if t == "dittohead" else None
            ratio_rs = c.ratio("rsync") if t == "dittohead" else None
            rss = ("<=" if r.rss_is_floor else "") + f"{mb(r.maxrss_kib):.1f}"
            lines.append(
                f"{c.name:6} {t:9} {r.median:9.3f} {min(secs):8.3f} {max(secs):8.3f} "
                f"{c.bytes / 1e6 / r.median:8.1f} {c.files / r.median:9.0f} {r.cpu:7.2f} "
                f"{rss:>9} "
                + (f"{ratio_cp:5.2f}x" if ratio_cp is not None else f"{'':6}")
                + (f" {ratio_rs:7.2f}x" if ratio_rs is not None else ""))
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


def headlines(cases: dict[str, CaseResult]) -> list[str]:
    out = []
    for key, target in (("big", TARGET_BIG_VS_CP), ("small", TARGET_SMALL_VS_CP)):
        c = cases.get(key)
        if c is None:
            continue
        vs_cp, vs_rs = c.ratio("cp"), c.ratio("rsync")
        what = (f"1 file of {c.bytes >> 20} MiB" if key == "big"
                else f"{c.files} files of 4 KiB")
        parts = [f"{key:5} ({what}):"]
        if vs_cp is not None:
            parts.append(f"dittohead/cp = {vs_cp:.2f}x (target <= {target}x: "
                         f"{verdict(vs_cp <= target)})")
        if vs_rs is not None:
            parts.append(f"dittohead/rsync = {vs_rs:.2f}x (target < 1x: "
                         f"{verdict(vs_rs < 1)})")
        out.append("  ".join(parts))
    rss = {k: mb(c.tools["dittohead"].maxrss_kib) for k, c in cases.items()
           if "dittohead" in c.tools}
    if rss:
        worst = max(rss.values())
        out.append("peak RSS of dittohead: "
                   + ", ".join(f"{k} {v:.1f} MB" for k, v in rss.items())
                   + f" (target < {TARGET_RSS_MB:.0f} MB: {verdict(worst < TARGET_RSS_MB)})")
    return out


def package_digest(pythonpath: str | None) -> str:
    """sha256 over the dittohead package that will run (it may be edited meanwhile)."""
    pkg = Path(pythonpath) / "dittohead" if pythonpath else REPO / "dittohead"
    h = hashlib.sha256()
    for p in sorted(pkg.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return f"{pkg}: {h.hexdigest()[:16]}"


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
                   help="PYTHONPATH for dittohead: benchmark a copy of the package in DIR")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="after the timed runs, one more dittohead run per case under "
                        "cProfile, written to DIR/dittohead-<case>.prof")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    args = p.parse_args(argv)
    args.case_list = [c for c in args.cases.split(",") if c]
    args.tool_list = [t for t in args.tools.split(",") if t]
    if not set(args.case_list) <= {"big", "small"} or not set(args.tool_list) <= set(TOOLS):
        p.error("unknown case or tool")
    if args.runs < 1 or args.big_mib < 1 or args.small_files < 1 or args.small_dirs < 1:
        p.error("sizes and --runs must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("cp", "rsync", "sync"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found", file=sys.stderr)
            return 2
    args.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="dittohead-bench-", dir=args.dir)).resolve()
    if args.profile is not None:
        args.profile = args.profile.resolve()
        args.profile.mkdir(parents=True, exist_ok=True)
    digest = package_digest(args.pythonpath)
    print(f"bench dir {base} ({shutil.disk_usage(base).free >> 30} GiB free), "
          f"{os.cpu_count()} CPUs, {platform.platform()}")
    print(f"dittohead package {digest}")
    results: dict[str, CaseResult] = {}
    try:
        (base / "logs").mkdir()
        box = make_dropbox(base, args.pythonpath, args.python)
        plan: list[tuple[str, Callable[[Path], tuple[int, int, int]], int, list[str]]] = []
        if "big" in args.case_list:
            plan.append(("big", lambda s: make_big(s, args.big_mib), args.runs, args.tool_list))
        if "small" in args.case_list:
            plan.append(("small", lambda s: make_small(s, args.small_files, args.small_dirs),
                         args.runs, args.tool_list))
        if args.huge:
            plan.append(("huge", lambda s: make_small(s, args.huge_files,
                                                      -(-args.huge_files // 200)),
                         1, args.tool_list))
        for name, make, runs, tools in plan:
            src = base / f"src-{name}"
            t0 = time.perf_counter()
            shape = make(src)
            settle()
            print(f"{name}: {shape[0]} files, {shape[1]} dirs, {shape[2] / 1e6:.0f} MB "
                  f"(made in {time.perf_counter() - t0:.1f} s)", flush=True)
            try:
                results[name] = run_case(name, src, box, base, runs, tools, shape,
                                         args.profile)
            finally:
                rmtree(src)
                settle()
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print()
    print(table(list(results.values())))
    print()
    for line in headlines(results):
        print(line)
    if args.json is not None:
        data = {
            "package": digest,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "cases": {k: {**asdict(c),
                          "median_seconds": {t: r.median for t, r in c.tools.items()},
                          "maxrss_kib": {t: r.maxrss_kib for t, r in c.tools.items()},
                          "ratio_vs_cp": c.ratio("cp"), "ratio_vs_rsync": c.ratio("rsync")}
                      for k, c in results.items()},
            "headlines": headlines(results),
        }
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
