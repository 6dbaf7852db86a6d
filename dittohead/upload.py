"""`dittohead upload`: the user's side, done right.

Copies each PATH into the inbox as `.<name>` (a dot name never triggers a
delivery), makes it readable to its owner, fsyncs every file, then renames
it to `<name>` without replacing anything already waiting there. Symlinks,
FIFOs, sockets and devices are refused before anything is copied: the
service would fail the entry for them anyway.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from pathlib import Path

from .config import StudyConfig
from .errors import DittoheadError, UsageError
from .fsops import rename_noreplace
from .log import printable
from .record import Receipt, ReceiptError, read_receipt


def entry_name(path: Path) -> str:
    """The entry name an upload of path gets; a dot name is refused (never delivered)."""
    name = path.resolve().name if path.name in ("", ".", "..") else path.name
    if name.startswith("."):
        raise UsageError(f"{printable(str(path))}: names starting with '.' are never "
                         "delivered; rename it")
    return name


def refuse_special(path: Path) -> None:
    """Refuse a path holding symlinks, FIFOs, sockets or devices: never delivered."""
    bad = []
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        for top, dirs, files in os.walk(path):
            for n in dirs + files:
                m = os.lstat(os.path.join(top, n)).st_mode
                if not (stat.S_ISDIR(m) or stat.S_ISREG(m)):
                    bad.append(os.path.join(top, n))
    elif not stat.S_ISREG(st.st_mode):
        bad.append(str(path))
    if bad:
        raise UsageError(f"{printable(str(path))}: holds symlinks or special files, which "
                         f"are never delivered: {', '.join(printable(b) for b in bad[:10])}")


def _copy(src: str, dst: str) -> None:
    shutil.copy2(src, dst, follow_symlinks=False)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | stat.S_IRUSR)
        os.fsync(fd)
    finally:
        os.close(fd)


def upload(study: StudyConfig, path: Path) -> str:
    """Copy one file or directory into the inbox and make it ready; return its name."""
    name = entry_name(path)
    refuse_special(path)
    final = study.inbox / name
    if os.path.lexists(final):
        raise DittoheadError(f"{printable(str(final))} already waits in the inbox; try again "
                             "when it has been delivered")
    tmp = study.inbox / f".{name}.{os.getpid()}"
    try:
        if path.is_dir():
            shutil.copytree(path, tmp, symlinks=True, copy_function=_copy)
            for top, dirs, _ in os.walk(tmp):
                for d in [top, *[os.path.join(top, x) for x in dirs]]:
                    os.chmod(d, stat.S_IMODE(os.lstat(d).st_mode) | 0o700)
            # Private until claimed: it may wait in the inbox a quiet period,
            # and a group-writable directory copied from a shared project
            # folder would let others move files out of it or into it.
            os.chmod(tmp, 0o700)
        else:
            _copy(str(path), str(tmp))
        rename_noreplace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    return name


def wait(study: StudyConfig, name: str, since: float, timeout: float) -> Receipt | None:
    """Wait until the entry has left the inbox and its receipt can be read; None if unreadable."""
    deadline = time.monotonic() + timeout
    while os.path.lexists(study.inbox / name):
        if time.monotonic() > deadline:
            raise DittoheadError(f"{printable(name)} is still in the inbox after "
                                 f"{timeout:.0f}s: is dittohead@{study.name}.path running?")
        time.sleep(0.2)
    while time.monotonic() < deadline:
        for d in (study.done, study.failed):
            if not os.access(d, os.R_OK | os.X_OK):
                return None  # receipts are for the service group; delivery went on
            try:
                receipts = sorted(d.glob("*.json"), key=lambda p: p.stat().st_mtime)
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EPERM):
                    return None
                raise
            for r in reversed(receipts):
                if r.stat().st_mtime < since:
                    break
                try:
                    receipt = read_receipt(r)
                except (OSError, ReceiptError):
                    continue
                if receipt.entry == name:
                    return receipt
        time.sleep(0.2)
    raise DittoheadError(f"no receipt for {printable(name)} after {timeout:.0f}s")


def ready(study: StudyConfig, name: str, check: bool = False) -> None:
    """Rename the caller's `.NAME` in the inbox to NAME, never replacing (`upload --host`).

    check: only say whether NAME is free. The inbox (1733) cannot be listed,
    but a name in it can be looked up.
    """
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        raise UsageError(f"{printable(name)}: not an entry name")
    final = study.inbox / name
    if os.path.lexists(final):
        raise DittoheadError(f"{printable(name)} already waits in the inbox; try again "
                             "when it has been delivered")
    if check:
        return
    tmp = study.inbox / f".{name}"
    try:
        st = os.lstat(tmp)
    except FileNotFoundError:
        raise DittoheadError(f".{printable(name)} is not in the inbox: nothing to "
                             "rename") from None
    if st.st_uid != os.geteuid():
        raise DittoheadError(f".{printable(name)} in the inbox is not yours")
    try:
        rename_noreplace(tmp, final)
    except FileExistsError:
        raise DittoheadError(f"{printable(name)} already waits in the inbox; try again "
                             "when it has been delivered") from None
