"""What `dittohead upload` refuses before copying anything, locally or with --host.

Light on imports: `upload --host` runs it on lab machines before it connects.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import UsageError
from .log import printable


def entry_name(path: Path) -> str:
    """The entry name an upload of path gets; a dot name is refused (never delivered)."""
    name = path.resolve().name if path.name in ("", ".", "..") else path.name
    if name.startswith("."):
        raise UsageError(f"{printable(str(path))}: names starting with '.' are never "
                         "delivered; rename it")
    return name


def refuse_special(path: Path) -> None:
    """Refuse a path holding symlinks, FIFOs, sockets or devices: never delivered."""
    bad: list[str] = []
    if stat.S_ISDIR(os.lstat(path).st_mode):
        _specials(str(path), bad)
    elif not stat.S_ISREG(os.lstat(path).st_mode):
        bad.append(str(path))
    if bad:
        raise UsageError(f"{printable(str(path))}: holds symlinks or special files, which "
                         f"are never delivered: {', '.join(printable(b) for b in bad[:10])}")


def _specials(top: str, bad: list[str]) -> None:
    # scandir's types come from the directory itself: no lstat per file (20,000 files:
    # a fifth of the time of os.walk and lstat). A stack, not recursion: any depth.
    todo = [top]
    while todo:
        with os.scandir(todo.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    todo.append(e.path)
                elif not e.is_file(follow_symlinks=False):
                    bad.append(e.path)
