"""Read config.yaml safely: a bounded regular file, UTF-8, YAML of bounded depth and size.

What comes out is plain data for config.parse() to validate. Every way the
file itself can be wrong is a ConfigError (exit 78), never a traceback or a
hang: the same file is read by every command and by the generator at boot.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .log import printable

# Bounds of the file, so that no config (a typo, a generated file gone wrong,
# a YAML alias bomb) can exhaust memory or recursion in every command and in
# the generator at boot. A real config is a few KiB, 6 levels deep.
MAX_BYTES = 1 << 20  # 1 MiB
MAX_DEPTH = 32  # nested mappings and lists
MAX_NODES = 50_000  # values, keys and collections, each alias counted as what it stands for


def read_yaml(path: Path) -> Any:
    """The file's YAML as plain data; ConfigError for anything wrong with the file itself."""
    shown = printable(str(path))
    text = _read(path, shown)
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader, bounded
    except _TooBig as e:
        raise ConfigError(str(e), shown) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", shown) from None
    except Exception as e:  # PyYAML's constructors raise ValueError and more for bad values
        raise ConfigError(f"not valid YAML: {type(e).__name__}: {e}", shown) from None


def _read(path: Path, shown: str) -> str:
    """The file's text: a regular file of at most MAX_BYTES, UTF-8; else ConfigError."""
    try:
        # O_NONBLOCK: a FIFO given as the config must not hang the command.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", shown) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError("not a regular file", shown)
        chunks, size = [], 0
        while size <= MAX_BYTES and (chunk := os.read(fd, MAX_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", shown) from None
    finally:
        os.close(fd)
    if size > MAX_BYTES:
        raise ConfigError(f"larger than {MAX_BYTES} bytes: not a dittohead config", shown)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8: {e}", shown) from None


class _TooBig(Exception):
    """The YAML is nested too deep or expands to too many values."""


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that counts depth and values while composing, before anything is built.

    Composing recurses once per level, so a deep file would end in
    RecursionError; aliases are shared, so a few lines can stand for
    billions of values that validation or a dump would walk.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0
        self._sizes: dict[str, int] = {}  # anchor -> values its node stands for

    def compose_node(self, parent: Any, index: Any) -> Any:
        event: yaml.NodeEvent = self.peek_event()  # type: ignore[no-untyped-call]
        where = f"line {event.start_mark.line + 1}" if event.start_mark else "?"
        if isinstance(event, yaml.AliasEvent):
            size = self._sizes.get(event.anchor or "")
            if size is None and event.anchor in self.anchors:
                raise _TooBig(f"{where}: alias *{printable(event.anchor or '')} is inside "
                              "the node it refers to")
            self._count(size or 1)  # an undefined alias: the composer says so
            return super().compose_node(parent, index)
        if self._depth >= MAX_DEPTH:
            raise _TooBig(f"{where}: nested deeper than {MAX_DEPTH} levels")
        self._depth += 1
        before = self._nodes
        self._count(1)
        node = super().compose_node(parent, index)
        self._depth -= 1
        if event.anchor is not None:
            self._sizes[event.anchor] = self._nodes - before
        return node

    def _count(self, n: int) -> None:
        self._nodes += n
        if self._nodes > MAX_NODES:
            raise _TooBig(f"more than {MAX_NODES} values (each use of an alias counts "
                          "as the values it stands for)")
