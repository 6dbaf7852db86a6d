"""The spooled plan: exact round trip of names and numbers, cached or streamed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dittohead import plan as planmod
from dittohead.plan import COPIED, PRESENT, DirPlan, FilePlan, Plan, remove_spool, spool_files


def make(tmp_path: Path, n: int) -> Plan:
    p = Plan(claim_id="x", uploader_uid=0, uploader="root",
             path=spool_files(tmp_path, "x")[0])
    p.open_for_writing()
    p.add_dir("", 1, 2)
    for i in range(n):
        if i % 50 == 0:
            p.add_dir(f"d{i}/\udcff\n", -5, 2**62)
        p.add_file(os.fsdecode(b"f\xe9" + str(i).encode() + b"x" * (i % 255)),
                   i * 1000, -(10**18), 10**18 + i, i % 2 == 0)
        if i % 97 == 0:
            p.add_skipped(f"skip{i}")
    p.close_writing()
    return p


@pytest.mark.parametrize("cache_max", [0, 10**6], ids=["streamed", "cached"])
def test_records_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            cache_max: int) -> None:
    monkeypatch.setattr(planmod, "CACHE_MAX", cache_max)
    p = make(tmp_path, 8000)  # about 1.3 MB: more than one read window of the parser
    assert p.path.stat().st_size > 1 << 20
    files = list(p.iter_files())
    assert len(files) == p.files == 8000
    assert all(r.index == i for i, r in enumerate(p.records()) if not isinstance(r, str))
    d, f = files[1234]
    assert isinstance(d, DirPlan) and isinstance(f, FilePlan)
    assert d.rel == "d1200/\udcff\n" and d.atime_ns == -5 and d.mtime_ns == 2**62
    assert os.fsencode(f.name) == b"f\xe91234" + b"x" * (1234 % 255)
    assert (f.size, f.atime_ns, f.mtime_ns, f.executable) == (1234000, -(10**18),
                                                              10**18 + 1234, True)
    assert list(p.iter_skipped())[:2] == ["skip0", "skip97"]
    assert p.nbytes == sum(i * 1000 for i in range(8000))
    with p.state() as s:
        s.set(f.index, COPIED, b"\1" * 32)
        s.add_flag(f.index, PRESENT)
    with p.state() as s:
        assert s.flags(f.index) == COPIED | PRESENT and s.digest(f.index) == b"\1" * 32
    remove_spool(tmp_path, "x")
    assert list(tmp_path.iterdir()) == []


def test_removing_a_spool_takes_the_workers_parts_and_nothing_else(tmp_path: Path) -> None:
    ours = [".x.plan", ".x.state", ".x.sha256", ".x.0.plan", ".x.3.plan", ".x.1.sha256"]
    others = [".x.0.y-abc.plan", ".xy.0.plan", ".x.plan.tmp", "x.json", ".x.a.sha256"]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"")
    remove_spool(tmp_path, "x")
    assert sorted(os.listdir(tmp_path)) == sorted(others)
