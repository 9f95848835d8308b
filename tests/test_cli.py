"""The command line as a user runs it: real processes, loopback sockets, exit codes.

The daemon is started on port 0 with ``--ready-fd``; its address comes from
the JSON ``listening`` log line, written before the ready byte. Every wait is
bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import qemu_source as qs
import xxhash
from cli_helpers import (
    TOOL,
    TRACEBACK,
    Daemon,
    digests,
    part_files,
    partial_stream,
    receive_usage_error,
    run,
    wait_for,
)
from helpers import IDSTR, IDSTR_B, random_bytes

from vfio_multifd.status_client import query

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
    result = run(args, timeout=20)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vfio-multifd: error: ")
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
    # The sender may or may not see the reset, but it never dies with a traceback.
    assert sent.returncode in (0, 1)
    assert TRACEBACK not in sent.stderr
    assert os.listdir(out) == []


# -- signals -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
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
    assert stderr.splitlines()[-1] == f"vfio-multifd: cancelled by {signal.Signals(signum).name}"
    assert TRACEBACK not in stderr
    assert summary == ""
    assert not data_path.exists()
    assert os.listdir(out) == ["keep.txt"]  # temporary files removed, others untouched
    states = [e["new"] for e in daemon.events() if e["event"] == "state_change"]
    assert states == ["active", "cancelling", "cancelled"]
    assert not [e for e in daemon.events() if e["event"] == "writer_abandoned"]


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
