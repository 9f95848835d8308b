"""The benchmarks (``benchmarks/``) run end to end on tiny workloads over 127.0.0.1.

No time is asserted: only that every run succeeded and produced its figures,
that the digest the daemon reported for each device is the digest of the data
the replay sender sent (recomputed here by parsing the very bytes sent), and
that the plain copy's sink holds exactly the bytes of the stream sent.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

import counters
import downtime
import memory
import plain_copy
import record_cost
import throughput
from counters import SYSCALLS, perf_command, tracepoints_held
from daemon import run_receiver
from vfio_multifd.config import Digest
from vfio_multifd.digest import digest_of
from workload import Workload, build_workload, idstr_of

pytestmark = pytest.mark.slow

HEADER = struct.Struct(">III256sII")  # magic, version, flags, idstr, instance_id, size
VFIO = struct.Struct(">III")  # version, idx, flags


@pytest.fixture(autouse=True)
def _first_byte_once_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """A settled receiver gets its first byte once idle for 20 ms (two CPU clock
    ticks), without first listening half a second (a destination's wait before its
    stop-copy, which ``make bench`` keeps, as its 50 ms): settling is still run, and
    these runs would be mostly that wait otherwise."""
    monkeypatch.setattr(counters, "LISTEN_FOR", 0.0)
    monkeypatch.setattr(counters, "IDLE_FOR", 0.02)


def returns_of(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[Any]:
    """What ``module.name`` returns from now on, each call's in turn (it still runs):
    a benchmark's ``main`` is run once, and its results checked as they left it."""
    returned: list[Any] = []
    real = getattr(module, name)

    def recorded(*args: Any, **kwargs: Any) -> Any:
        returned.append(real(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(module, name, recorded)
    return returned


def packets_of(stream: bytes, channel: int) -> list[tuple[str, int, bool, bytes]]:
    """One channel's stream as sent, parsed: (idstr, idx, config state?, data) per packet."""
    magic, version, _uuid, channel_id = struct.unpack_from(">II16sB", stream, 0)
    assert (magic, version, channel_id) == (0x11223344, 1, channel)
    packets = []
    offset = 64
    while offset < len(stream):
        magic, version, flags, raw_idstr, _instance, size = HEADER.unpack_from(stream, offset)
        assert (magic, version, flags) == (0x11223344, 1, 0x40)
        offset += HEADER.size
        _vversion, idx, vflags = VFIO.unpack_from(stream, offset)
        data = stream[offset + VFIO.size : offset + size]
        offset += size
        packets.append((raw_idstr.rstrip(b"\0").decode(), idx, bool(vflags & 1), data))
    return packets


def digests_of_streams(workload: Workload) -> dict[str, str]:
    """Each device's digest of its data in idx order, parsed from the bytes of every channel."""
    chunks: dict[str, dict[int, bytes]] = {}
    configs: dict[str, int] = {}
    for channel in range(workload.channels):
        for idstr, idx, config, data in packets_of(workload.stream_bytes(channel), channel):
            if config:
                configs[idstr] = idx
            else:
                assert idx not in chunks.setdefault(idstr, {})
                chunks[idstr][idx] = data
    result = {}
    for idstr, by_idx in chunks.items():
        assert sorted(by_idx) == list(range(configs[idstr]))
        result[idstr] = digest_of(Digest.XXH3_128, [by_idx[idx] for idx in sorted(by_idx)])
    return result


def test_throughput_tiny_run(tmp_path: Path) -> None:
    workload = build_workload([5 << 20, (3 << 20) + 12345], channels=2)
    sent = digests_of_streams(workload)
    assert sent == workload.expected_digests
    assert sorted(sent) == [idstr_of(0), idstr_of(1)]

    results = [
        throughput.run_config(workload, sink, reps=2, out_dir=tmp_path) for sink in ("null", "file")
    ]
    for config in results:
        assert (config.devices, config.channels, config.size) == (2, 2, workload.size)
        for run in (*config.baseline, *config.daemon):
            assert run.ok, run.error
            assert run.mb_per_s > 0 and run.cpu_per_gb > 0 and run.peak_rss > 0
        for run in config.daemon:
            assert run.daemon is not None
            assert run.daemon.digests == sent
            assert run.daemon.bytes == workload.size
        assert len(config.ratios()) == 2 and all(ratio > 0 for ratio in config.ratios())
        assert config.ok_runs("daemon") == config.ok_runs("baseline") == 2
    assert list(tmp_path.iterdir()) == []  # every run's outputs are removed

    lines = throughput.format_table(results).splitlines()
    assert len(lines) == 2 + len(results)
    assert [line.split()[:4] for line in lines[2:]] == [
        ["null", "2", "2", "defaults"],
        ["file", "2", "2", "defaults"],
    ]
    assert all(line.endswith("2/2") for line in lines[2:])
    for config in results:
        assert len(config.cpu_ratios()) == 2 and all(r > 0 for r in config.cpu_ratios())
    targets = throughput.assess_targets(results)
    # 2 devices, 2 channels: not the headline configuration, so nothing is judged.
    assert [line.split()[0] for line in targets[:4]] == ["n/a"] * 4
    assert targets[-1].startswith("met") and "(0 failed, not counted)" in targets[-1]


def test_a_wrong_digest_is_a_failed_run(tmp_path: Path) -> None:
    workload = build_workload([2 << 20], channels=1)
    workload.expected_digests[idstr_of(0)] = "xxh3-128:" + "0" * 32
    config = throughput.run_config(workload, "null", reps=1, out_dir=tmp_path)
    (run,) = config.daemon
    assert not run.ok and "digest differs" in run.error
    assert config.ratios() == [] and config.median("daemon", "mb_per_s") is None
    assert config.baseline[0].ok


def test_throughput_main_prints_table_and_judges_the_headline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One run of ``main`` serves both promises: its table, and the headline it judges
    (the headline is the slowest part, so it is run once, by ``main``, and its results
    are checked as they left ``run_headline``)."""
    headlines: list[tuple[list[throughput.ConfigResult], list[Path]]] = []
    real_run_headline = throughput.run_headline

    def recorded_run_headline(**kwargs: Any) -> list[throughput.ConfigResult]:
        assert kwargs["null_size"] == kwargs["file_size"] == 4 << 20 and kwargs["reps"] == 1
        results = real_run_headline(**kwargs)
        headlines.append((results, list(kwargs["work_dir"].iterdir())))
        return results

    monkeypatch.setattr(throughput, "run_headline", recorded_run_headline)
    raw = tmp_path / "raw.json"
    argv = ["--size", "4M", "--null-size", "4M", "--reps", "1", "--headline-reps", "1"]
    argv += ["--channels", "1", "--devices", "1", "--sinks", "null"]
    with tracepoints_held():  # each headline run's perf lets go at once
        code = throughput.main([*argv, "--no-tls", "--tmpdir", str(tmp_path), "--json", str(raw)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "daemon MB/s" in out and "took" in out
    assert "Headline: the throughput issue's targets" in out and "Matrix" in out
    assert "CPU s/GB ratio, /dev/null <= 1.5" in out
    assert "per GB (medians)" in out and "daemon/baseline" in out
    assert raw.stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir()] == ["raw.json"]

    ((results, left_in_work_dir),) = headlines
    labels = [(r.sink, r.label) for r in results]
    assert labels == [
        ("null", "defaults"),
        ("null", "--digest none"),
        ("null", "--reader-threads 0"),
        ("null", "--reader-threads 1"),
        ("null", "--reader-threads 2"),
        ("file", "defaults"),
    ]
    for config in results:
        assert config.channels == 4 and config.devices == 1
        assert config.ok_runs("daemon") == config.ok_runs("baseline") == 1
        (run,) = config.daemon
        assert run.daemon is not None
        threads = config.options[1] if config.options[:1] == ("--reader-threads",) else None
        expected = int(threads) if threads is not None else run.daemon.reader_threads
        assert run.daemon.reader_threads == expected
        for counts in (run.counts, config.baseline[0].counts):
            assert counts.faults > 0 and counts.ctx_switches > 0 and counts.sender is not None
            assert 0 < counts.startup < counts.cpu
            if perf_command() is not None:  # perf counted each receiver's reads
                assert counts.syscalls["reads"] > 0 and set(counts.syscalls) == set(SYSCALLS)
    targets = throughput.assess_targets(results)
    assert [line.split()[0] for line in targets[:4]] != ["n/a"] * 4
    assert all(("met" in line or "NOT MET" in line) for line in targets[:4])
    assert left_in_work_dir == []  # run_headline removed its outputs


def test_downtime_tiny_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both cases, both sinks, one pair each: every run exact, its phases in order
    (checked on the runs as ``run_downtime`` returned them inside ``main``)."""
    returned = returns_of(monkeypatch, downtime, "run_downtime")
    argv = ["--size", "6M", "--reps", "1", "--tmpdir", str(tmp_path), "--json", str(tmp_path / "r")]
    assert downtime.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if "MiB, 4 ch" in line and not line.startswith(("met", "NOT"))]
    assert [row.split("  ")[0].strip() for row in rows[::3]] == [
        "4 x 1 MiB, 4 ch, file", "4 x 1 MiB, 4 ch, null",
        "1 x 6 MiB, 4 ch, file", "1 x 6 MiB, 4 ch, null",
    ]  # fmt: skip
    assert all(row.endswith("1/1") for i, row in enumerate(rows) if i % 3 != 2)
    verdicts = [line for line in out if line.startswith(("met", "NOT MET"))]
    assert len(verdicts) == 5 and verdicts[-1].startswith("met") and "(0 failed" in verdicts[-1]
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # every output removed

    cases: list[downtime.Case]
    (cases,) = returned
    assert [(case.name, case.sink) for case in cases] == [
        ("4x", "file"), ("4x", "null"), ("1x", "file"), ("1x", "null"),
    ]  # fmt: skip
    for case in cases:
        (plain,), (daemon,) = case.runs["plain"], case.runs["daemon"]
        for run in (plain, daemon):
            assert run.ok, run.error
            ends = [run.ends[phase] for phase in downtime.PHASES]
            assert ends[0] > 0 and ends == sorted(ends), (run.kind, run.ends)
        assert "commit" not in plain.durations() and "commit" in daemon.durations()


def test_record_cost_tiny_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--size", "4M", "--reps", "1", "--channels", "2", "--tmpdir", str(tmp_path)]
    code = record_cost.main(argv)
    out = capsys.readouterr().out.splitlines()
    assert code == 0, out
    assert [line.split()[:2] for line in out[3:]] == [
        ["null", "plain"], ["null", "--record"], ["null", "recorded/plain"],
        ["file", "plain"], ["file", "--record"], ["file", "recorded/plain"],
    ]  # fmt: skip
    assert all(
        line.endswith("exact in size: 1/1 (holding 100% of the bytes sent)")
        for line in out
        if "recorded/plain" in line
    )
    assert list(tmp_path.iterdir()) == []  # outputs and recordings removed


def test_tls_row_tiny_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``main --tls-only`` runs the TLS row and nothing else; its comparison is checked
    as ``run_tls_comparison`` returned it."""
    returned = returns_of(monkeypatch, throughput, "run_tls_comparison")
    argv = ["--tls-only", "--size", "6M", "--reps", "2", "--tmpdir", str(tmp_path)]
    code = throughput.main(argv)
    out = capsys.readouterr().out
    assert code == 0 and "TLS against plaintext: 4 channels" in out and "base MB/s" not in out
    assert list(tmp_path.iterdir()) == []  # credentials removed with the rest

    comparison: throughput.TlsComparison
    (comparison,) = returned
    assert (comparison.channels, comparison.size) == (throughput.TLS_CHANNELS, 6 << 20)
    for run in (*comparison.plain, *comparison.tls):
        assert run.ok, run.error
        assert run.mb_per_s > 0 and run.cpu_per_gb > 0
        assert run.daemon is not None and run.daemon.bytes == 6 << 20
    assert len(comparison.ratios("mb_per_s")) == 2 and len(comparison.sender_cpu["tls"]) == 2
    lines = throughput.format_tls(comparison)
    assert lines[0].startswith(f"TLS against plaintext: {throughput.TLS_CHANNELS} channels")
    assert [line.split()[0] for line in lines[3:]] == ["plain", "tls", "tls/plain"]


def test_memory_tiny_run(tmp_path: Path) -> None:
    mib = 1 << 20
    report = memory.run_memory(
        size=24 * mib, bound=8 * mib, reps=1, workdir=tmp_path, stall_channels=32, stall_settle=0.2
    )
    assert report.ok(), [case.outcome for case in report.cases]
    reverse, crossing, odd600k, odd100003, small, stalled = report.cases
    assert (reverse.size, crossing.size) == (24 * mib, 12 * mib)
    assert odd600k.size == odd100003.size == 6 * mib
    assert small.size == 2343 * 1024  # 100,000 chunks per GiB
    for case in (reverse, crossing, odd600k, odd100003, small):
        assert case.run.ok and case.completed and case.outcome == "digests match"
        assert case.run.bytes == case.size
        assert case.bound is not None and 0 < case.run.peak_queued_bytes <= case.bound
        assert case.run.peak_rss >= case.run.idle_rss > 0 and case.wall > 0
    assert reverse.run.spilled_bytes > 0  # first chunk last: most of it cannot stay in memory
    # Announced payloads are charged when announced: the stall holds no more than the bound.
    assert not stalled.completed and stalled.outcome == "failed as expected (packet-truncated)"
    assert stalled.bound == 64 * mib and 0 < stalled.run.idle_rss < stalled.run.peak_rss
    assert stalled.above_idle <= stalled.bound
    assert len(report.ratios()) == 1
    unbounded, bounded = report.in_order["unbounded"][0].run, report.in_order["bounded"][0].run
    assert bounded.peak_queued_bytes <= 8 * mib  # (it may spill a little on a loaded machine)
    assert unbounded.spilled_bytes == 0  # no bound: nothing to spill for
    lines = memory.format_report(report)
    rows = lines[2 : 2 + len(report.rows())]
    assert len(rows) == 8 and all("NOT" not in row and "FAILED" not in row for row in rows)
    assert sum(line.startswith("  ") for line in lines) == 8  # a target line per row
    assert "in-order runs failed (not counted): 0" in lines


def test_crossing_plan() -> None:
    workload = memory.crossing(3 << 20, seed=2)  # idx 0, 1, 2 and the config packet 3
    assert digests_of_streams(workload) == workload.expected_digests
    a, b = idstr_of(0), idstr_of(1)
    order = [
        [(idstr, idx) for idstr, idx, _, _ in packets_of(workload.stream_bytes(c), c)]
        for c in range(2)
    ]
    assert order == [[(a, 2), (a, 3), (b, 0), (b, 1)], [(b, 2), (b, 3), (a, 0), (a, 1)]]


@pytest.mark.parametrize("connections", [1, 2])
def test_plain_copy_writes_the_stream(tmp_path: Path, connections: int) -> None:
    workload = build_workload([3 << 20], channels=connections)
    sink = tmp_path / "sink.bin"
    finished = run_receiver(plain_copy.command(connections, str(sink)), workload, timeout=30)
    assert finished.error == "" and finished.exit_code == 0
    assert finished.replay is not None
    assert finished.replay.channel_bytes == workload.channel_bytes
    (done,) = finished.named(plain_copy.DONE)
    assert done["bytes"] == sum(workload.channel_bytes) and done["errors"] == []
    assert done["seconds"] > 0 and finished.cpu > 0
    written = sink.read_bytes()
    if connections == 1:
        assert written == workload.stream_bytes(0)
    else:  # the connections' writes interleave
        assert len(written) == sum(workload.channel_bytes)


def test_diagnostic_scripts_run(capsys: pytest.CaptureFixture[str]) -> None:
    """The scripts docs/benchmarks.md quotes for the throughput account run and check bytes."""
    import baselines
    import decoder_cost

    assert decoder_cost.main(["--packets", "300", "--reps", "1"]) == 0
    assert baselines.main(["--size", "8M", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "us per packet" in out
    assert [line.split()[0] for line in out.splitlines()[-3:]] == ["recv_into", "splice", "loop"]
