"""Signals at the command line (issue 20 items 2 and 10): real daemons, real signals.

Once the outputs are committed, nothing that arrives changes the outcome: exit 0
and the summary printed. Before that, every signal whose default action would end
the process stops the migration as SIGTERM does: cancelled, temporary files and
sockets removed, exit 128+N.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import qemu_source as qs
from cli_helpers import TRACEBACK, Daemon, one_device_daemon, part_files, send_to, wait_for
from helpers import IDSTR, random_bytes

from vfio_multifd.cli import main
from vfio_multifd.daemon_signals import STOPPING_SIGNALS, signal_name
from vfio_multifd.status_client import query


class SignalStorm:
    """A thread that, once ``path`` exists, sends ``signum`` to ``daemon`` every
    ``interval`` seconds until it exits (or ``limit`` seconds pass)."""

    def __init__(
        self, daemon: Daemon, path: Path, signum: int, interval: float = 0.0005, limit: float = 30
    ) -> None:
        self.sent = 0
        self.sent_after_exit_began = 0
        self._daemon, self._path, self._signum = daemon, path, signum
        self._interval, self._limit = interval, limit
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self._limit
        while not self._path.exists():  # the rename into place: the commit has begun
            if time.monotonic() > deadline or self._daemon.proc.poll() is not None:
                return
            time.sleep(0.0002)
        while time.monotonic() < deadline:
            # send_signal reaps first, and sends nothing to an exited (reused) pid
            if self._daemon.proc.poll() is not None:
                return
            self._daemon.proc.send_signal(self._signum)
            self.sent += 1
            time.sleep(self._interval)

    def join(self) -> None:
        self._thread.join(timeout=self._limit + 5)
        assert not self._thread.is_alive(), "the signal thread did not stop"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signals_after_the_commit_change_nothing(
    tmp_path: Path, daemons: list[Daemon], signum: int
) -> None:
    """Issue 20 item 2: a stream of signals from the moment the first output is renamed
    into place until the process is gone. The migration completed: exit 0, the summary
    printed, the outputs in place. (Before the fix, the handlers were removed on the way
    out: a signal then ended the process by its default action, 143 or 130.)"""
    data = random_bytes(1_000_000, 7)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    daemon, path = one_device_daemon(tmp_path, daemons, 2)
    storm = SignalStorm(daemon, path, signum)
    sent = send_to(daemon.address, 2, f"idstr={IDSTR},source={source}")
    code, summary, stderr = daemon.finish()
    storm.join()
    assert storm.sent > 0, "no signal was sent: the test proves nothing"
    assert code == 0, (storm.sent, stderr[-2000:])
    assert sent.returncode == 0, sent.stderr
    assert path.read_bytes() == data
    assert summary.splitlines()[-1].startswith("received 1000000 bytes in "), summary
    assert TRACEBACK not in stderr
    assert sorted(os.listdir(path.parent)) == ["a.bin", "a.bin.config"]


def test_main_in_process_gives_the_signals_back(tmp_path: Path) -> None:
    """``receive`` ignores its signals once the outcome is decided, until the process
    exits; ``main()`` called in-process (not the console script) gives them back."""
    code = main(
        ["receive", "--event-loop", "asyncio", "--listen", "tcp:127.0.0.1:0", "--accept-timeout",
         "0.05", "--log-format", "json", "--device", f"idstr={IDSTR},data={tmp_path / 'a.bin'}"]
    )  # fmt: skip
    assert code == 1  # nobody connected
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


@pytest.mark.parametrize(
    "signum",
    [signal.SIGVTALRM, signal.SIGPROF, signal.SIGIO, signal.SIGRTMIN + 1],
    ids=["SIGVTALRM", "SIGPROF", "SIGIO", "SIGRTMIN+1"],
)
def test_every_signal_that_would_end_the_process_stops_the_migration(
    tmp_path: Path, short_dir: Path, daemons: list[Daemon], signum: int
) -> None:
    """Issue 20 item 10: signals outside the list SIGTERM's handling once named (their
    default action ends the process: before the fix they killed the daemon with its
    temporary files and sockets left behind) stop the migration as SIGTERM does."""
    assert signum in STOPPING_SIGNALS
    out = tmp_path / "out"
    out.mkdir()
    listen, status_socket = short_dir / "channels.sock", short_dir / "status.sock"
    daemon = Daemon(
        tmp_path, "--listen", f"unix:{listen}", "--channels", "2",
        "--status-socket", str(status_socket), "--device", f"idstr={IDSTR},data={out / 'a.bin'}",
    )  # fmt: skip
    daemons.append(daemon)
    socks = []
    try:
        for channel in range(2):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(sock)
            sock.settimeout(10)
            sock.connect(str(listen))
            sock.sendall(qs.handshake(channel))
        for idx in range(3):
            socks[0].sendall(qs.device_packet(IDSTR, 0, idx, random_bytes(65536, idx)))
        wait_for(
            lambda: query(str(status_socket))["return"]["devices"][0]["bytes-written"] == 3 * 65536,
            what="the first chunks to be written",
        )
        assert len(part_files(out)) == 2  # mid-migration: data and config, both temporary
        daemon.proc.send_signal(signum)
        daemon.proc.wait(timeout=30)
    finally:
        for sock in socks:
            sock.close()
    code, summary, stderr = daemon.finish()
    name = signal_name(signum)
    assert code == 128 + signum, stderr[-2000:]
    assert stderr.splitlines()[-1] == f"vfio-multifd: cancelled by {name}"
    assert TRACEBACK not in stderr and summary == ""
    assert os.listdir(out) == []  # no .part left, nothing at the final path
    assert not listen.exists() and not status_socket.exists()
    states = [e["new"] for e in daemon.events() if e["event"] == "state_change"]
    assert states == ["active", "cancelling", "cancelled"]
