"""The benchmark runs end to end on a tiny workload and reports what the daemon received.

No timing is asserted: only that every figure was produced and is positive, and
that the digest the daemon printed for each device is the digest of the data
the replay sender sent (recomputed here by parsing the very bytes sent).
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import xxhash

from vfio_multifd import benchmark

HEADER = struct.Struct(">III256sII")  # magic, version, flags, idstr, instance_id, size
VFIO = struct.Struct(">III")  # version, idx, flags


def digests_of_streams(workload: benchmark.Workload) -> dict[str, str]:
    """Parse every channel's stream as sent; xxh3-128 of each device's data in idx order."""
    chunks: dict[str, dict[int, bytes]] = {}
    configs: dict[str, int] = {}
    for channel in range(workload.channels):
        stream = workload.stream_bytes(channel)
        magic, version, _uuid, channel_id = struct.unpack_from(">II16sB", stream, 0)
        assert (magic, version, channel_id) == (0x11223344, 1, channel)
        offset = 64
        while offset < len(stream):
            magic, version, flags, raw_idstr, _instance, size = HEADER.unpack_from(stream, offset)
            assert (magic, version, flags) == (0x11223344, 1, 0x40)
            offset += HEADER.size
            _vversion, idx, vflags = VFIO.unpack_from(stream, offset)
            data = stream[offset + VFIO.size : offset + size]
            offset += size
            idstr = raw_idstr.rstrip(b"\0").decode()
            if vflags & 1:
                configs[idstr] = idx
            else:
                assert idx not in chunks.setdefault(idstr, {})
                chunks[idstr][idx] = data
    result = {}
    for idstr, by_idx in chunks.items():
        assert sorted(by_idx) == list(range(configs[idstr]))
        hasher = xxhash.xxh3_128()
        for idx in range(configs[idstr]):
            hasher.update(by_idx[idx])
        result[idstr] = f"xxh3-128:{hasher.hexdigest()}"
    return result


def test_benchmark_tiny_run(tmp_path: Path) -> None:
    size = 16 << 20
    results = benchmark.run_benchmark(
        channels=[2], devices=[2], sinks=["null", "file"], size=size, reps=1, work_dir=tmp_path
    )
    assert [(r.sink, r.devices, r.channels) for r in results] == [("null", 2, 2), ("file", 2, 2)]

    workload = benchmark.build_workload(channels=2, devices=2, size=size)
    sent = digests_of_streams(workload)
    expected = [sent[benchmark.idstr_of(d)] for d in range(2)]
    assert workload.expected_digests() == expected

    for config in results:
        for run in (*config.baseline, *config.daemon):
            assert run.ok, run.error
            assert run.mb_per_s > 0 and run.seconds > 0 and run.cpu > 0 and run.maxrss > 0
        (daemon,) = config.daemon
        assert daemon.digests == expected
        assert daemon.digest_ok
        assert config.ratio() is not None and config.ratio() > 0

    table = benchmark.format_table(results)
    lines = table.splitlines()
    assert len(lines) == 2 + len(results)
    for line in lines[2:]:
        fields = line.split()
        numbers = [float(x) for x in fields[3:10]]  # MB/s .. lag
        assert all(x >= 0 for x in numbers), line
        assert numbers[0] > 0 and numbers[1] > 0 and numbers[2] > 0 and numbers[6] > 0, line
        assert fields[-1] == "ok"
    assert any("digests equal" in line for line in benchmark.assess_targets(results))
    assert list(tmp_path.iterdir()) == []  # outputs are removed after each configuration


def test_main_prints_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = benchmark.main(
        [
            "--size",
            "16M",
            "--reps",
            "1",
            "--channels",
            "1",
            "--devices",
            "1",
            "--sinks",
            "null",
            "--tmpdir",
            str(tmp_path),
            "--json",
            str(tmp_path / "raw.json"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "daemon MB/s" in out and "took" in out
    assert (tmp_path / "raw.json").stat().st_size > 0
