"""Split the walk and the copy of one big entry across forked processes.

Walking and copying many small files is bound by per-file work: system
calls and the interpreter around them, 50-60 us a file here. Threads would
serialise on the GIL; forked processes do not. The walk gives each worker
every n-th top-level directory (examine.py joins their parts of the plan in
walk order). The copy gives each worker a contiguous run of the files of
about equal cost (stage.py), with its own buffers and hashing thread; the
workers write digests into the plan's shared, mmapped state file
(plan.State) and their shares' manifest lines into part files, joined in
order afterwards. Each reports a result (a count, a walk's summary) or the
error that stopped it through a pipe of its own.

Workers die with the parent (PR_SET_PDEATHSIG): a killed run never leaves
one writing into a staging directory the next run is removing. The first
error wins; the others are stopped before it is raised, so the caller can
remove the staging directory knowing no one writes there any more.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable
from typing import Any, TypeVar

from . import faults
from .errors import ConfigError, EntryBusy, EntryFailed, Outcome, TemporaryError
from .fsops import die_with_parent
from .plan import Plan

T = TypeVar("T")
MAX_WORKERS = 4
MIN_FILES = 500  # fewer files are not worth a fork
# A file costs about as much as copying this many bytes, plus its size.
FILE_COST = 64 << 10
BIG_ENTRY = 32 << 20  # bytes that are worth splitting even across few files


def workers_for(plan: Plan) -> int:
    """How many processes should copy this plan's files."""
    if faults.enabled():
        return 1  # the crash tests' kill points must kill the run itself
    if plan.files < MIN_FILES and plan.nbytes < BIG_ENTRY:
        return 1
    return _processes(plan.files)


def walkers_for(subdirs: int) -> int:
    """How many processes should walk an entry whose top has this many directories."""
    if subdirs < 2:
        return 1
    return _processes(subdirs)


def _processes(shares: int) -> int:
    """One per CPU this process may use, at most MAX_WORKERS, no more than the shares."""
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0)), shares))


def run(workers: int, work: Callable[[int], T]) -> list[T]:
    """[work(0), ..., work(workers - 1)]: share 0 in this process, the others forked."""
    if workers == 1:
        return [work(0)]
    import pickle  # here: a delivery that forks nothing does not load it
    pipes: list[int] = []
    pids: list[int] = []
    local = [0]  # the shares done here: 0, and any no process could be forked for
    parent = os.getpid()
    try:
        for k in range(1, workers):
            r, w = os.pipe()
            try:
                pid = os.fork()
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.ENOMEM):
                    raise
                # TasksMax= or memory: slower, but not a reason to stop a delivery.
                os.close(r)
                os.close(w)
                local += range(k, workers)
                break
            if pid == 0:  # pragma: no cover - runs in the child
                _child(k, work, w, parent)
            pipes.append(r)
            os.close(w)
            pids.append(pid)
        try:
            done_here = {k: work(k) for k in local}
        except BaseException:
            _stop(pids)
            raise
        # A pipe each: a report may be bigger than the pipe's atomic write.
        reports: list[tuple[Any, ...]] = []
        for r in pipes:
            with os.fdopen(r, "rb", closefd=False) as pipe:
                data = pipe.read()
            reports.append(pickle.loads(data) if data else ("other", "no report"))
        _reap(pids)
        pids = []
        for report in reports:
            if report[0] != "ok":
                raise _rebuild(report)
        forked = iter(report[1] for report in reports)
        return [done_here[k] if k in done_here else next(forked) for k in range(workers)]
    finally:
        _stop(pids)
        for r in pipes:
            os.close(r)


def _child(k: int, work: Callable[[int], T], w: int, parent: int) -> None:  # pragma: no cover
    code = 0
    try:
        die_with_parent(parent)
        report: tuple[object, ...] = ("ok", work(k))
    except EntryFailed as e:
        report, code = ("failed", e.reason, e.outcome), 1
    except EntryBusy as e:
        report, code = ("busy", e.files, str(e)), 1
    except TemporaryError as e:
        report, code = ("temporary", str(e)), 1
    except ConfigError as e:
        report, code = ("config", e.problems), 1
    except OSError as e:
        report, code = ("os", e.errno, e.strerror, e.filename), 1
    except BaseException as e:
        report, code = ("other", repr(e)), 1
    try:  # whatever happens, this process ends here: it must never return
        import pickle  # (the parent loaded it before it forked)

        data = memoryview(pickle.dumps(report))
        while data:
            data = data[os.write(w, data):]
    finally:
        os._exit(code)


def _rebuild(report: tuple[object, ...]) -> BaseException:
    kind = report[0]
    if kind == "failed":
        return EntryFailed(str(report[1]), Outcome(str(report[2])))
    if kind == "busy":
        files = report[1]
        assert isinstance(files, list)
        return EntryBusy(files, str(report[2]))
    if kind == "temporary":
        return TemporaryError(str(report[1]))
    if kind == "config":
        problems = report[1]
        assert isinstance(problems, list)
        return ConfigError(problems)
    if kind == "os":
        e, strerror, filename = report[1:4]
        return OSError(int(e) if isinstance(e, int) else errno.EIO, strerror, filename)
    return RuntimeError(f"a copying worker failed: {report[1]}")


def _stop(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap(pids)


def _reap(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
