"""Problems found in an entry, by kind, each with a count and the first few names.

A failure reason lists every kind found, so one mail tells the uploader
everything; names are shown escaped (log.printable) and shortened.
"""

from __future__ import annotations

from .log import printable

# How many names a failure reason lists before it says "and N more".
LIST_MAX = 20


class Findings:
    """Problems by kind, each with a count and the first few names."""

    def __init__(self) -> None:
        self.kinds: dict[str, tuple[int, list[str]]] = {}

    def add(self, kind: str, name: str) -> None:
        count, names = self.kinds.get(kind, (0, []))
        if len(names) < LIST_MAX:
            names.append(name)
        self.kinds[kind] = (count + 1, names)

    def text(self, kind: str) -> str:
        count, names = self.kinds[kind]
        more = f" and {count - len(names)} more" if count > len(names) else ""
        return ", ".join(shortened(printable(n)) for n in names) + more

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def merge(self, kinds: dict[str, tuple[int, list[str]]]) -> None:
        """Add another Findings' kinds (a worker's), keeping the first names of each."""
        for kind, (count, names) in kinds.items():
            mine, kept = self.kinds.get(kind, (0, []))
            self.kinds[kind] = (mine + count, (kept + names)[:LIST_MAX])


def shortened(name: str, most: int = 200) -> str:
    """A name a reason can show: the start and the end of a very long path."""
    if len(name) <= most:
        return name
    return f"{name[:most // 2]}...{name[-most // 2:]}"
