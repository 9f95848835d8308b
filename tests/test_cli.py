"""The command line as a user runs it: real processes, loopback sockets, exit codes.

The daemon is started on port 0 with ``--ready-fd``; its address comes from
the JSON ``listening`` log line, written before the ready byte. Every wait is
bounded.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import qemu_source as qs
import xxhash
from cli_helpers import (
    SENDER_RESET,
    TOOL,
    TRACEBACK,
    Daemon,
    digests,
    one_device_daemon,
    part_files,
    partial_stream,
    receive_usage_error,
    receiver,
    run,
    run_in_process,
    run_process,
    send_to,
    wait_for,
)
from helpers import IDSTR, IDSTR_B, connect, random_bytes

from vfio_multifd.cli.signals import signal_name
from vfio_multifd.ops.status_client import query

# -- end to end ------------------------------------------------------------------


def test_receive_and_send_end_to_end(tmp_path: Path, daemons: list[Daemon]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    sources = {IDSTR: random_bytes(3 * 65536 + 777, 1), IDSTR_B: random_bytes(2 * 65536, 2)}
    for n, data in enumerate(sources.values()):
        (tmp_path / f"src{n}.bin").write_bytes(data)
    daemon = Daemon(
        tmp_path,
        "--channels",
        "3",
        "--device",
        f"idstr={IDSTR},data={out / 'dev0.bin'}",
        "--device",
        f"idstr={IDSTR_B},data={out / 'dev1.bin'}",
    )
    daemons.append(daemon)
    assert daemon.ready_byte == b"\n"
    sent = run(
        [
            "send",
            "--connect",
            daemon.address,
            "--channels",
            "3",
            "--chunk-size",
            "64K",
            "--order",
            "random",
            "--device",
            f"idstr={IDSTR},source={tmp_path / 'src0.bin'}",
            "--device",
            f"idstr={IDSTR_B},source={tmp_path / 'src1.bin'}",
        ]
    )
    assert sent.returncode == 0, sent.stderr
    code, summary, stderr = daemon.finish()
    assert code == 0, stderr
    assert (out / "dev0.bin").read_bytes() == sources[IDSTR]
    assert (out / "dev1.bin").read_bytes() == sources[IDSTR_B]
    expected = {k: "xxh3-128:" + xxhash.xxh3_128(v).hexdigest() for k, v in sources.items()}
    assert digests(sent.stdout) == expected
    assert digests(summary) == expected
    assert sorted(os.listdir(out)) == ["dev0.bin", "dev0.bin.config", "dev1.bin", "dev1.bin.config"]
    assert TRACEBACK not in stderr + sent.stderr
    # One summary line at the end, in the log too.
    assert [e["event"] for e in daemon.events()].count("migration_completed") == 1


def test_digest_none_receives_and_hashes_nothing(tmp_path: Path, daemons: list[Daemon]) -> None:
    """``--digest none`` (the measured upper bound of the digest's cost): the data is
    written exactly, and both summaries say none."""
    data = random_bytes(3 * 65536 + 5, 3)
    (tmp_path / "src.bin").write_bytes(data)
    daemon, written = one_device_daemon(tmp_path, daemons, 2, "--digest", "none")
    device = f"idstr={IDSTR},source={tmp_path / 'src.bin'}"
    sent = send_to(daemon.address, 2, device, "--chunk-size", "64K", "--digest", "none")
    assert sent.returncode == 0, sent.stderr
    code, summary, stderr = daemon.finish()
    assert code == 0, stderr
    assert written.read_bytes() == data
    assert re.search(rf"^device {re.escape(IDSTR)}: .* none ", summary, re.MULTILINE), summary
    assert digests(summary) == {} and digests(sent.stdout) == {}
    (end,) = [e for e in daemon.events() if e["event"] == "load_thread_end"]
    assert end["digest"] == "none"


def test_digest_none_is_refused_with_record(tmp_path: Path) -> None:
    line = receive_usage_error(tmp_path, "--digest", "none", "--record", str(tmp_path / "rec"))
    assert "--digest none cannot be used with --record" in line
    assert not (tmp_path / "rec").exists() and not (tmp_path / "a.bin").exists()


def test_the_summary_says_why_it_spilled(tmp_path: Path, one_loop_daemons: list[Daemon]) -> None:
    daemon, _ = receiver(
        tmp_path, one_loop_daemons, "--channels", "1", "--max-packet-size", "65548",
        "--max-queued-bytes", "200K",
    )  # fmt: skip
    sent = run(
        ["send", "--connect", daemon.address, "--channels", "1", "--chunk-size", "64K",
         "--order", "reverse", "--device", f"idstr={IDSTR},size=1M"]
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    code, summary, stderr = daemon.finish()
    assert code == 0, stderr
    last = summary.splitlines()[-1]
    assert re.fullmatch(
        r"received 1048576 bytes in [\d.]+ s \([\d.]+ MB/s\); peak queued \d+ bytes, "
        r"spilled [1-9]\d* bytes \(chunks that came early went to disk and were read back in "
        r"their turn, to keep queued memory under --max-queued-bytes 204800\), paused [\d.]+ s",
        last,
    ), last


# -- usage errors ------------------------------------------------------------------


@pytest.mark.parametrize("order", ["round-robin", "reverse", "random"])
def test_cli_daemon_with_the_independent_source(
    tmp_path: Path, daemons: list[Daemon], order: str
) -> None:
    """`vfio-multifd receive` driven by tests/qemu_source.py (written from PROTOCOL.md alone)."""
    out, sent_dir = tmp_path / "out", tmp_path / "sent"
    out.mkdir()
    devices = [(IDSTR, 0, 300_000), (IDSTR_B, 0, 200_001), (IDSTR, 1, 65_536)]
    args = ["--channels", "4"]
    for n, (idstr, instance, _) in enumerate(devices):
        args += ["--device", f"idstr={idstr},instance={instance},data={out / f'{n}.bin'}"]
    daemon = Daemon(tmp_path, *args)
    daemons.append(daemon)
    source = [
        sys.executable,
        str(Path(qs.__file__)),
        "--connect",
        daemon.address,
        "--channels",
        "4",
        "--order",
        order,
        "--seed",
        "3",
        "--chunk-size",
        "65536",
        "--out-dir",
        str(sent_dir),
    ]
    for idstr, instance, size in devices:
        source += ["--device", f"{idstr},{instance},{size}"]
    sent = subprocess.run(source, capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    code, _, stderr = daemon.finish()
    assert code == 0, stderr
    for n in range(len(devices)):
        assert (out / f"{n}.bin").read_bytes() == (sent_dir / f"{n}.bin").read_bytes()
        config = (sent_dir / f"{n}.config.bin").read_bytes()
        assert (out / f"{n}.bin.config").read_bytes() == qs.config_blob(config)


@pytest.mark.parametrize(
    "args",
    [
        ["receive", "--device", "bogus"],
        ["receive", "--device", "idstr=a,data=/nonexistent/dir/x", "--bogus-option"],
        ["receive", "--device", "idstr=a,instance=x,data=/tmp/x"],
        ["receive", "--device", "idstr=a,data=/tmp/x", "--channels", "0"],
        ["receive", "--device", "idstr=a,data=/tmp/x", "--handshake-timeout", "0"],
        ["receive", "--device", "idstr=a,data=/tmp/x", "--progress-timeout", "nan"],
        ["receive", "--device", "idstr=a,data=/tmp/x", "--listen", "udp:1"],
        ["receive", "--device", "idstr=a,data=/tmp/x", "--ready-fd", "987"],
        ["send", "--connect", "tcp:127.0.0.1:9", "--device", "idstr=a"],
        ["send", "--connect", "tcp:127.0.0.1:9", "--device", "idstr=a,size=1M", "--inject", "x"],
        ["send", "--connect", "tcp:127.0.0.1:9", "--device", "idstr=a,size=1M", "--channels", "257"],
        ["status", "--socket", "/nonexistent", "--timeout", "-1"],
        ["status"],
        [],
    ],
    ids=lambda args: " ".join(args) or "no-command",
)
def test_usage_error_exits_2_with_one_line(args: list[str]) -> None:
    """In this process: each is decided while parsing (the process adds nothing, see
    the next test)."""
    result = run_in_process(args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vfio-multifd: error: ")
    assert result.stdout == ""


@pytest.mark.parametrize("args", [["receive", "--device", "bogus"], []], ids=["receive", "none"])
def test_a_usage_error_exits_2_with_one_line_from_a_process(args: list[str]) -> None:
    """As a user runs it: exit 2 from ``main`` reaches the shell through ``console_main``."""
    result = run_process(args, timeout=20)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vfio-multifd: error: "), result.stderr
    assert result.stdout == ""


def test_listen_failure_is_a_usage_error_and_leaves_no_file(tmp_path: Path, cli_loop: str) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    with taken:
        port = taken.getsockname()[1]
        last_line = receive_usage_error(tmp_path, "--listen", f"tcp:127.0.0.1:{port}")
    assert last_line.startswith(f"vfio-multifd: error: cannot listen on tcp:127.0.0.1:{port}")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("command", "device", "expected"),
    [
        (
            "receive",
            "idstr=a,data={out}/a.bin,instnace=0",
            "unknown field 'instnace' in 'instnace=0' (fields: config, data, idstr, instance); "
            "did you mean instance=?",
        ),
        (
            "receive",
            "idstr=a,data={out}/a,b.bin",
            "'b.bin' is not a field (fields are KEY=VALUE: config, data, idstr, instance; "
            "a comma inside a value is written twice, as in data=a,,b.bin)",
        ),
        (
            "send",
            "idstr=a,size=1M,sede=1",
            "unknown field 'sede' in 'sede=1' (fields: idstr, instance, seed, size, source); "
            "did you mean seed=?",
        ),
    ],
)
def test_every_device_field_is_checked_wherever_it_is(
    tmp_path: Path, command: str, device: str, expected: str
) -> None:
    """A misspelled field after data= used to become part of the file name (exit 0)."""
    out = tmp_path / "out"
    out.mkdir()
    device = device.format(out=out)
    target = ["--connect", "tcp:127.0.0.1:9"] if command == "send" else []
    result = run_in_process([command, *target, "--device", device])
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"vfio-multifd: error: argument --device: device {device!r}: {expected}\n"
    assert os.listdir(out) == []


def test_a_comma_in_a_path_is_written_twice(tmp_path: Path, one_loop_daemons: list[Daemon]) -> None:
    out = tmp_path / "out,dir"
    out.mkdir()
    data = random_bytes(100_000, 4)
    (tmp_path / "state,0.bin").write_bytes(data)
    escaped = str(out).replace(",", ",,")
    daemon = Daemon(
        tmp_path, "--channels", "1", "--device", f"idstr={IDSTR},data={escaped}/a,,b.bin"
    )
    one_loop_daemons.append(daemon)
    source = str(tmp_path / "state,,0.bin")
    sent = run(
        ["send", "--connect", daemon.address, "--channels", "1", "--device",
         f"idstr={IDSTR},source={source}"]
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    code, _, stderr = daemon.finish()
    assert code == 0, stderr
    assert sorted(os.listdir(out)) == ["a,b.bin", "a,b.bin.config"]
    assert (out / "a,b.bin").read_bytes() == data


# -- a migration that fails --------------------------------------------------------


def test_send_inject_duplicate_fails_the_daemon_with_one_line(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    daemon = Daemon(tmp_path, "--channels", "2", "--device", f"idstr={IDSTR},data={out / 'a.bin'}")
    daemons.append(daemon)
    sent = run(
        [
            "send",
            "--connect",
            daemon.address,
            "--channels",
            "2",
            "--device",
            f"idstr={IDSTR},size=4M",
            "--chunk-size",
            "256K",
            "--inject",
            "duplicate",
        ]
    )
    code, summary, stderr = daemon.finish()
    assert code == 1, stderr
    assert summary == ""
    assert stderr.splitlines()[-1] == (
        f"vfio-multifd: error: channel 0: device {IDSTR}: state buffer 0 already filled"
    )
    failed = [e for e in daemon.events() if e["event"] == "migration_failed"]
    assert failed and failed[0]["reason"] == "vfio-already-filled"
    assert TRACEBACK not in stderr
    # The daemon resets its channels: the sender knows the migration failed.
    assert sent.returncode == 1, sent.stderr
    assert TRACEBACK not in sent.stderr
    assert os.listdir(out) == []


def test_a_missing_config_packet_says_what_is_known_missing(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Was "missing idx the config state packet (after idx 2)"."""
    daemon, out = receiver(tmp_path, daemons, "--channels", "2")
    for sock in partial_stream(daemon.address, channels=2, chunks=3, chunk_size=65536):
        sock.shutdown(socket.SHUT_WR)  # a clean end of stream at a packet boundary
        sock.close()
    code, summary, stderr = daemon.finish()
    assert (code, summary) == (1, ""), stderr
    assert stderr.splitlines()[-1] == (
        f"vfio-multifd: error: all 2 channels closed with 1 device(s) incomplete: device {IDSTR}: "
        "the config state packet never came, nor anything after idx 2 "
        "(the highest received; every chunk up to it came)"
    )
    assert os.listdir(out) == []


def test_the_final_error_adds_the_refusals_that_explain_it(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """A source started with --channels 3 against a daemon expecting 2: the reason was
    only in the JSON channel_refused lines."""
    daemon, _ = receiver(tmp_path, daemons, "--channels", "2")
    strays = [connect(daemon.address) for _ in range(2)]
    for sock in strays:
        sock.sendall(qs.handshake(2))
    refused = lambda: [e for e in daemon.events() if e["event"] == "channel_refused"]  # noqa: E731
    wait_for(lambda: len(refused()) == 2, what="both refusals")
    for sock in partial_stream(daemon.address, channels=2, chunks=1, chunk_size=4096):
        sock.shutdown(socket.SHUT_WR)
        sock.close()
    code, _, stderr = daemon.finish()
    for sock in strays:
        sock.close()
    assert code == 1, stderr
    assert stderr.splitlines()[-1] == (
        f"vfio-multifd: error: all 2 channels closed with 1 device(s) incomplete: device {IDSTR}: "
        "the config state packet never came, nor anything after idx 0 "
        "(the highest received; every chunk up to it came); "
        "2 connections refused: handshake channel id 2 is not below the 2 expected channels"
    )
    failed = [e for e in daemon.events() if e["event"] == "migration_failed"]
    assert failed[0]["error"] == stderr.splitlines()[-1].removeprefix("vfio-multifd: error: ")


# -- a migration needs all its channels ----------------------------------------------


def channel_streams(data: bytes, channels: int) -> list[bytes]:
    return qs.build_streams([(IDSTR, 0, data, b"cfg")], channels, "round-robin", chunk_size=65536)


def test_a_migration_waits_for_all_its_channels_even_once_the_data_is_complete(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """As QEMU's destination, which loads only once every multifd channel exists."""
    data = random_bytes(5 * 65536 + 3, 8)
    daemon, out = receiver(tmp_path, daemons, "--channels", "3")
    qs.send_streams(daemon.address, channel_streams(data, 2))  # channels 0 and 1 bring it all
    waiting = lambda: [e for e in daemon.events() if e["event"] == "waiting_for_channels"]  # noqa: E731
    wait_for(lambda: bool(waiting()), what="the daemon to wait for channel 2")
    assert waiting()[0]["missing"] == [2] and waiting()[0]["connected"] == 2
    assert not (out / "a.bin").exists()  # nothing in place yet
    with connect(daemon.address) as late:  # a channel with nothing to send
        late.sendall(qs.handshake(2))
        late.shutdown(socket.SHUT_WR)
        code, _, stderr = daemon.finish()
    assert code == 0, stderr
    assert (out / "a.bin").read_bytes() == data


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (
            ["--accept-timeout", "1"],
            r"only 2 of 4 channels connected within 1 s \(missing channel ids 2, 3\)",
        ),
        (
            ["--progress-timeout", "1"],
            r"no progress for 1 s \(\d+ bytes received; waiting for channel ids 2, 3 to connect\)",
        ),
    ],
    ids=["accept-timeout", "progress-timeout"],
)
@pytest.mark.parametrize("source", ["qemu_source", "vfio-multifd send"])
def test_fewer_channels_than_expected_fail_even_if_they_brought_all_the_data(
    tmp_path: Path, daemons: list[Daemon], limit: list[str], expected: str, source: str
) -> None:
    """With --accept-timeout 5 it completed, exit 0, when 2 of 4 channels brought everything."""
    daemon, out = receiver(tmp_path, daemons, "--channels", "4", *limit)
    if source == "qemu_source":
        qs.send_streams(daemon.address, channel_streams(random_bytes(4 * 65536, 9), 2))
    else:
        sent = run(["send", "--connect", daemon.address, "--channels", "2",
                    "--device", f"idstr={IDSTR},size=1M"])  # fmt: skip
        # The daemon reset the channels: the sender knows it failed.
        assert sent.returncode == 1, sent.stderr
        assert re.fullmatch(SENDER_RESET.format(address=re.escape(daemon.address)),
                            sent.stderr.splitlines()[-1])  # fmt: skip
    code, summary, stderr = daemon.finish()
    assert (code, summary) == (1, ""), stderr
    assert re.fullmatch(f"vfio-multifd: error: {expected}", stderr.splitlines()[-1]), stderr
    assert os.listdir(out) == []


def test_a_channels_mismatch_fails_in_seconds_naming_the_option(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Daemon 4 channels, sender 2: it took the 150 s progress timeout, and the sender
    printed rate-0 send_progress lines all along."""
    daemon, out = receiver(tmp_path, daemons, "--channels", "4", "--missing-channels-grace", "1")
    started = time.monotonic()
    sent = run(["send", "--connect", daemon.address, "--channels", "2",
                "--device", f"idstr={IDSTR},size=1M", "--log-format", "json"])  # fmt: skip
    code, summary, stderr = daemon.finish()
    assert time.monotonic() - started < 15  # 1 s of grace, and starting two processes
    assert (code, summary) == (1, ""), stderr
    # The last: channel 1 may be accepted only after channel 0 has ended.
    warning = [e for e in daemon.events() if e["event"] == "missing_channels"][-1]
    assert (warning["missing"], warning["channels"], warning["fail_in"]) == ([2, 3], 4, 1.0)
    assert "--channels 4" in str(warning["why"])
    assert stderr.splitlines()[-1] == (
        "vfio-multifd: error: only 2 of 4 channels connected, and they ended 1 s ago "
        "(--missing-channels-grace): every channel that connected has ended, and channel ids "
        "2, 3 never came: does the source use --channels 4 (QEMU's multifd-channels) too?"
    )
    assert os.listdir(out) == []
    assert sent.returncode == 1, sent.stderr
    last = sent.stderr.splitlines()[-1]
    assert re.fullmatch(SENDER_RESET.format(address=re.escape(daemon.address)), last), last
    assert "a daemon whose --channels is not 2, as here, does either" in last


# -- signals -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "code"),
    [
        (signal.SIGTERM, 143),
        (signal.SIGINT, 130),
        (signal.SIGHUP, 129),
        (signal.SIGQUIT, 131),
        (signal.SIGUSR2, 140),
        (signal.SIGALRM, 142),
        # issue 20 item 10: these used to kill the daemon, leaving .part files and sockets
        (signal.SIGVTALRM, 154),
        (signal.SIGPROF, 155),
        (signal.SIGIO, 157),
        (signal.SIGRTMIN + 1, 163),
    ],
    ids=[
        "SIGTERM",
        "SIGINT",
        "SIGHUP",
        "SIGQUIT",
        "SIGUSR2",
        "SIGALRM",
        "SIGVTALRM",
        "SIGPROF",
        "SIGIO",
        "SIGRTMIN+1",
    ],
)
def test_signal_mid_transfer_stops_without_the_peer_and_leaves_no_file(
    tmp_path: Path, short_dir: Path, daemons: list[Daemon], signum: int, code: int
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    data_path = out / "a.bin"
    (out / "keep.txt").write_text("not ours")
    status_socket = str(short_dir / "status.sock")
    daemon = Daemon(
        tmp_path,
        "--channels",
        "2",
        "--status-socket",
        status_socket,
        "--device",
        f"idstr={IDSTR},data={data_path}",
    )
    daemons.append(daemon)
    socks = partial_stream(daemon.address, channels=2, chunks=3, chunk_size=65536)
    try:
        # Mid-transfer: the loader wrote chunks 0-2 to the temporary data file
        # (asked of the daemon: the file's size may include blocks reserved ahead).
        wait_for(
            lambda: query(status_socket)["return"]["devices"][0]["bytes-written"] == 3 * 65536,
            what="the first chunks to be written",
        )
        assert len(part_files(out)) == 2  # data and config, both temporary
        socks[1].sendall(qs.device_packet(IDSTR, 0, 3, bytes(65536))[:1000])  # mid-packet
        daemon.proc.send_signal(signum)
        # It stops while the source still holds every connection open, one of them
        # mid-packet: it waits for nobody. (How fast is not asserted: a loaded machine
        # may take its time; the bound here only keeps a hang from lasting.)
        daemon.proc.wait(timeout=30)
    finally:
        for sock in socks:
            sock.close()
    exit_code, summary, stderr = daemon.finish()
    assert exit_code == code, stderr
    assert stderr.splitlines()[-1] == f"vfio-multifd: cancelled by {signal_name(signum)}"
    assert TRACEBACK not in stderr
    assert summary == ""
    assert not data_path.exists()
    assert os.listdir(out) == ["keep.txt"]  # temporary files removed, others untouched
    assert not os.path.exists(status_socket)
    states = [e["new"] for e in daemon.events() if e["event"] == "state_change"]
    assert states == ["active", "cancelling", "cancelled"]
    assert not [e for e in daemon.events() if e["event"] == "writer_abandoned"]


def test_sigusr1_logs_a_status_line_and_the_migration_goes_on(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon, _ = one_device_daemon(tmp_path, daemons, 1)
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_for(
        lambda: any(e["event"] == "status_report" for e in daemon.events()),
        what="a status_report line",
    )
    [report] = [e for e in daemon.events() if e["event"] == "status_report"]
    assert report["status"] == "setup" and report["why"] == "SIGUSR1"
    assert daemon.proc.poll() is None
    sent = send_to(daemon.address, 1, f"idstr={IDSTR},size=100000")
    assert sent.returncode == 0, sent.stderr
    code, _, stderr = daemon.finish()
    assert code == 0, stderr



# -- --event-loop --------------------------------------------------------------------


def test_event_loop_asyncio_runs_without_uvloop(tmp_path: Path) -> None:
    """With a uvloop that cannot be imported, ``--event-loop asyncio`` still runs the
    daemon (here to its accept timeout), and ``uvloop`` is a one-line usage error."""
    poison = tmp_path / "poison"
    poison.mkdir()
    (poison / "uvloop.py").write_text('raise ImportError("not installed here")\n')
    env = {**os.environ, "PYTHONPATH": str(poison)}
    base = [
        *TOOL,
        "receive",
        "--listen",
        "tcp:127.0.0.1:0",
        "--device",
        f"idstr=a,data={tmp_path / 'a.bin'}",
        "--accept-timeout",
        "0.1",
        "--log-format",
        "json",
    ]
    results = {
        loop: subprocess.run(
            [*base, "--event-loop", loop],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        for loop in ("asyncio", "uvloop")
    }
    ran = results["asyncio"]
    assert ran.returncode == 1, ran.stderr
    assert ran.stderr.splitlines()[-1].startswith(
        "vfio-multifd: error: only 0 of 2 channels connected within 0.1 s"
    )
    refused = results["uvloop"]
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        "vfio-multifd: error: --event-loop uvloop: cannot import uvloop (not installed here); "
        "--event-loop asyncio needs nothing"
    ]
