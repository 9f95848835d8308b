"""The command line as a user runs it: real processes, loopback sockets, exit codes.

The daemon is started on port 0 with ``--ready-fd``; its address comes from
the JSON ``listening`` log line, written before the ready byte. Every wait is
bounded.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import qemu_source as qs
import xxhash
from helpers import IDSTR, IDSTR_B, random_bytes

from vfio_multifd.status import query

TOOL = [sys.executable, "-m", "vfio_multifd"]
TRACEBACK = "Traceback (most recent call last)"


class Daemon:
    """``vfio-multifd receive`` in a subprocess, listening and ready."""

    def __init__(
        self,
        workdir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        ready_timeout: float = 20.0,
    ) -> None:
        self.stderr_path = workdir / "daemon.stderr"
        read_end, write_end = os.pipe()
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                [
                    *TOOL,
                    "receive",
                    "--listen",
                    "tcp:127.0.0.1:0",
                    "--ready-fd",
                    str(write_end),
                    "--log-format",
                    "json",
                    "--no-fsync",
                    *args,
                ],
                stdout=subprocess.PIPE,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                pass_fds=(write_end,),
                env=env,
                text=True,
            )
        os.close(write_end)
        try:
            readable, _, _ = select.select([read_end], [], [], ready_timeout)
            self.ready_byte = os.read(read_end, 16) if readable else None
        finally:
            os.close(read_end)
        if not self.ready_byte:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"daemon not ready: {self.stderr()}")
        self.address = next(
            str(event["address"]) for event in self.events() if event["event"] == "listening"
        )

    def events(self) -> list[dict[str, object]]:
        """The JSON log lines so far."""
        events = []
        text = self.stderr()
        for line in text[: text.rfind("\n") + 1].splitlines():  # whole lines only
            if line.startswith("{"):
                events.append(json.loads(line))
        return events

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def finish(self, timeout: float = 30.0) -> tuple[int, str, str]:
        """Exit code, stdout and stderr once the daemon exits."""
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, self.stderr()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons started by a test; killed afterwards if still running."""
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.kill()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory: a unix socket path must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="vfio-cli-") as directory:
        yield Path(directory)


def run(args: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TOOL, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def digests(summary: str) -> dict[str, str]:
    return dict(re.findall(r"^device (\S+): .*?(xxh3-128:[0-9a-f]{32})", summary, re.MULTILINE))


def partial_stream(
    address: str, *, channels: int, chunks: int, chunk_size: int
) -> list[socket.socket]:
    """Open every channel and send ``chunks`` data chunks of IDSTR, never the rest."""
    host, _, port = address.removeprefix("tcp:").rpartition(":")
    socks = [socket.create_connection((host, int(port)), timeout=10) for _ in range(channels)]
    for n, sock in enumerate(socks):
        sock.sendall(qs.handshake(n))
    data = random_bytes(chunk_size, 5)
    for idx in range(chunks):
        socks[0].sendall(qs.device_packet(IDSTR, 0, idx, data))
    return socks


def wait_for(predicate: object, timeout: float = 10.0, what: str = "condition") -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def part_files(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".part"))


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


@pytest.mark.parametrize(
    "args",
    [
        ["receive", "--device", "bogus"],
        ["receive", "--device", "idstr=a,data=/nonexistent/dir/x", "--bogus-option"],
        ["receive", "--device", "idstr=a,instance=x,data=/tmp/x"],
        ["receive", "--device", "idstr=a,data=/tmp/x", "--channels", "0"],
        ["receive", "--device", "idstr=a,data=/tmp/x", "--listen", "udp:1"],
        ["receive", "--device", "idstr=a,data=/tmp/x", "--ready-fd", "987"],
        ["send", "--connect", "tcp:127.0.0.1:9", "--device", "idstr=a"],
        ["send", "--connect", "tcp:127.0.0.1:9", "--device", "idstr=a,size=1M", "--inject", "x"],
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


def test_listen_failure_is_a_usage_error_and_leaves_no_file(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    with taken:
        port = taken.getsockname()[1]
        result = run(
            [
                "receive",
                "--listen",
                f"tcp:127.0.0.1:{port}",
                "--device",
                f"idstr=a,data={tmp_path / 'a.bin'}",
                "--log-format",
                "json",
            ],
            timeout=20,
        )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith(
        f"vfio-multifd: error: cannot listen on tcp:127.0.0.1:{port}"
    )
    assert TRACEBACK not in result.stderr
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
def test_signal_mid_transfer_exits_fast_and_leaves_no_file(
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
        signalled = time.monotonic()
        daemon.proc.send_signal(signum)
        daemon.proc.wait(timeout=5)
        elapsed = time.monotonic() - signalled
    finally:
        for sock in socks:
            sock.close()
    exit_code, summary, stderr = daemon.finish()
    assert exit_code == code, stderr
    assert elapsed < 1.0, f"took {elapsed:.2f} s to stop"
    assert stderr.splitlines()[-1] == f"vfio-multifd: cancelled by {signal.Signals(signum).name}"
    assert TRACEBACK not in stderr
    assert summary == ""
    assert not data_path.exists()
    assert os.listdir(out) == ["keep.txt"]  # temporary files removed, others untouched
    states = [e["new"] for e in daemon.events() if e["event"] == "state_change"]
    assert states == ["active", "cancelling", "cancelled"]
