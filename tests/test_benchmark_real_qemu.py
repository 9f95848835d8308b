"""``benchmarks/real_qemu.py`` end to end on one pair of one case, and without any QEMU.

No time is asserted: that both runs counted (the daemon's ``pc.ram`` equal to
the source's RAM is the benchmark's own condition), that the table has the
case's three rows, and that the daemon received exactly the bytes the raw
capture did (a paused VM's migration is the same bytes every time).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from qemu.harness import find_qemus

import real_qemu


def test_one_pair_of_a_paused_qemu_10_0(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path = short_dir  # the VM's QMP socket path must fit in 108 bytes
    if "10.0" not in find_qemus():
        pytest.skip("no QEMU 10.0: run tests/qemu/get-qemu.sh (or set QEMU_10_0)")
    raw = tmp_path / "raw.json"
    argv = ["--reps", "1", "--cases", "10.0", "--json", str(raw), "--tmpdir", str(tmp_path)]
    assert real_qemu.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("QEMU 10.0, paused ")]
    assert [row[3] for row in rows] == ["capture", "daemon", "daemon/capture"]
    assert rows[0][-1] == rows[1][-1] == "1/1"
    (result,) = json.loads(raw.read_text())["results"]
    (capture,) = result["runs"]["capture"]
    (daemon,) = result["runs"]["daemon"]
    assert capture["ok"] and daemon["ok"], (capture, daemon)
    assert daemon["received"] == capture["received"] > 64 << 10
    assert daemon["duration"] > 0 and daemon["cpu"] > 0
    assert 0 < capture["total_time"] <= capture["wall"]
    assert list(tmp_path.iterdir()) == [raw]  # every run's directory removed


def test_no_qemu_skips_each_case_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(real_qemu, "find_qemus", dict)
    assert real_qemu.main(["--reps", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "real_qemu: no QEMU 7.2 (make qemu, or set QEMU_7_2): its cases skipped",
        "real_qemu: no QEMU 10.0 (make qemu, or set QEMU_10_0): its cases skipped",
    ]
