"""Run the copying of one entry in several forked processes.

Copying many small files is bound by per-file work: system calls and the
interpreter around them, about 40 us a file. Threads would serialise on the
GIL; forked processes do not, and each one takes its share of the files (see
Shares) with its own buffers and hashing thread. They write their results
into the plan's shared, mmapped state file (plan.State) and report only a
count, or the error that stopped them, through a pipe.

Workers die with the parent (PR_SET_PDEATHSIG): a killed run never leaves
one writing into a staging directory the next run is removing. The first
error wins; the others are stopped before it is raised, so the caller can
remove the staging directory knowing no one writes there any more.
"""

from __future__ import annotations

import errno
import os
import pickle
import signal
from collections.abc import Callable

from . import faults
from .errors import ConfigError, EntryFailed, TemporaryError
from .fsops import die_with_parent
from .plan import FilePlan, Plan

MAX_WORKERS = 4
MIN_FILES = 500  # fewer files are not worth a fork
# A file costs about as much as copying this many bytes, plus its size.
FILE_COST = 64 << 10
# How far a worker may run ahead of the least loaded one before the next
# files go to that one instead: keeps a directory's files together (creates
# in one directory serialise on its lock) while balancing the whole.
SWITCH = 16 << 20


def workers_for(plan: Plan) -> int:
    """How many processes should copy this plan's files."""
    if faults.enabled():
        return 1  # the crash tests' kill points must kill the run itself
    if plan.files < MIN_FILES and plan.nbytes < 2 * SWITCH:
        return 1
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0)), plan.files))


class Shares:
    """Which worker copies which file: the same answer in every worker.

    Each worker replays the same sequence of files, so no list of
    assignments is kept or sent; memory stays flat.
    """

    def __init__(self, workers: int) -> None:
        self.loads = [0] * workers
        self.current = 0

    def worker_of(self, f: FilePlan) -> int:
        loads = self.loads
        if len(loads) > 1:
            least = loads.index(min(loads))
            if loads[self.current] - loads[least] > SWITCH:
                self.current = least
            loads[self.current] += FILE_COST + f.size
        return self.current


def run(workers: int, work: Callable[[int], int]) -> int:
    """work(0..workers-1), share 0 in this process, the others forked; sum their counts."""
    if workers == 1:
        return work(0)
    r, w = os.pipe()
    pids = []
    try:
        for k in range(1, workers):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child
                _child(k, work, r, w)
            pids.append(pid)
        os.close(w)
        w = -1
        try:
            total = work(0)
        except BaseException:
            _stop(pids)
            raise
        with os.fdopen(r, "rb", closefd=False) as pipe:
            reports = _reports(pipe.read())
        errors = [rep for rep in reports if rep[0] != "count"]
        _reap(pids)
        pids = []
        if errors:
            raise _rebuild(errors[0])
        return total + sum(rep[1] for rep in reports if isinstance(rep[1], int))
    finally:
        _stop(pids)
        os.close(r)
        if w >= 0:
            os.close(w)


def _child(k: int, work: Callable[[int], int], r: int, w: int) -> None:  # pragma: no cover
    code = 0
    try:
        os.close(r)
        die_with_parent()
        report: tuple[object, ...] = ("count", work(k))
    except EntryFailed as e:
        report, code = ("failed", e.reason, e.outcome), 1
    except TemporaryError as e:
        report, code = ("temporary", str(e)), 1
    except ConfigError as e:
        report, code = ("config", e.problems), 1
    except OSError as e:
        report, code = ("os", e.errno, e.strerror, e.filename), 1
    except BaseException as e:
        report, code = ("other", repr(e)), 1
    try:
        data = pickle.dumps(report)
        os.write(w, len(data).to_bytes(4, "little") + data)  # one write: atomic below 4 KiB
    finally:
        os._exit(code)


def _reports(data: bytes) -> list[tuple[object, ...]]:
    out = []
    while data:
        n = int.from_bytes(data[:4], "little")
        out.append(pickle.loads(data[4:4 + n]))
        data = data[4 + n:]
    return out


def _rebuild(report: tuple[object, ...]) -> BaseException:
    kind = report[0]
    if kind == "failed":
        return EntryFailed(str(report[1]), str(report[2]))
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
