"""Resident memory stays under --max-queued-bytes whatever peers send (issue 10 items 1-3).

Each case runs the daemon as its own process and reads its peak resident set
(``VmHWM``) from /proc: the bound must hold in memory the kernel really gave
the process, not only in the daemon's own accounting. What an idle daemon
already holds (the interpreter, its imports) is measured first and allowed
for; anything above it must fit in the bound plus a small slack.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import qemu_source as qs
from cli_helpers import Daemon, wait_for
from helpers import IDSTR, random_bytes

MiB = 1 << 20
#: Above bound + idle: thread stacks, the spill read-back of one chunk, allocator slack.
SLACK = 12 * MiB

pytestmark = [
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc"),
    pytest.mark.slow,
]


def resident(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_announced_payloads_are_charged_before_they_take_memory(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """256 channels each announce a 4 MiB chunk and send 3 MiB of it, then stall: the
    daemon receives only what fits under the bound (it allocated every announced
    buffer at once, zero-filled: about 1 GiB)."""
    bound = 32 * MiB
    daemon = Daemon(
        tmp_path,
        "--channels",
        "256",
        "--max-queued-bytes",
        str(bound),
        # 4 MiB chunks, over the default (QEMU's 1 MiB chunk and its VFIO header)
        "--max-packet-size",
        str(4 * MiB + 12),
        "--device",
        f"idstr={IDSTR},data={tmp_path / 'd.bin'}",
    )
    daemons.append(daemon)
    idle = resident(daemon.proc.pid, "VmRSS")
    payload = random_bytes((4 * MiB) - 12, 1)
    socks: list[socket.socket] = []
    try:
        for channel in range(256):
            host, _, port = daemon.address.removeprefix("tcp:").rpartition(":")
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.setblocking(False)
            socks.append(sock)
            packet = qs.device_packet(IDSTR, 0, channel, payload)
            pending = memoryview(qs.handshake(channel) + packet[: 288 + 3 * MiB])
            # Send what the daemon takes without blocking: paused channels take little.
            deadline = time.monotonic() + 0.2
            while pending and time.monotonic() < deadline:
                try:
                    pending = pending[sock.send(pending) :]
                except BlockingIOError:
                    time.sleep(0.005)
        wait_for(
            lambda: sum(e["event"] == "channel_accepted" for e in daemon.events()) == 256,
            timeout=30,
            what="256 channels accepted",
        )
        time.sleep(0.5)  # let every granted buffer fill
        peak = resident(daemon.proc.pid, "VmHWM")
        assert peak - idle <= bound + SLACK, (
            f"peak RSS {peak / MiB:.0f} MiB, idle {idle / MiB:.0f} MiB, bound {bound / MiB:.0f} MiB"
        )
        assert daemon.proc.poll() is None
    finally:
        for sock in socks:
            sock.close()


def test_odd_chunk_sizes_are_charged_what_their_buffers_take(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """600 KiB chunks in reverse order: buffers were rounded up to 1 MiB but charged
    600 KiB, so resident memory reached 1.7x the bound. The bytes must still be right."""
    bound = 32 * MiB
    data = random_bytes(120 * MiB, 2)
    daemon = Daemon(
        tmp_path,
        "--channels",
        "4",
        "--max-queued-bytes",
        str(bound),
        "--max-packet-size",
        str(600 * 1024 + 12),
        "--device",
        f"idstr={IDSTR},data={tmp_path / 'd.bin'}",
    )
    daemons.append(daemon)
    idle = resident(daemon.proc.pid, "VmRSS")
    streams = qs.build_streams([(IDSTR, 0, data, b"cfg")], 4, "reverse", chunk_size=600 * 1024)
    with PeakSampler(daemon.proc.pid) as sampler:
        qs.send_streams(daemon.address, streams)
        code, _, stderr = daemon.finish(timeout=60)
    assert code == 0, stderr
    assert (tmp_path / "d.bin").read_bytes() == data
    assert '"spilled_bytes": 0' not in stderr, "reverse order under this bound must spill"
    peak = sampler.peak
    assert peak - idle <= bound + SLACK, (
        f"peak RSS {peak / MiB:.0f} MiB, idle {idle / MiB:.0f} MiB, bound {bound / MiB:.0f} MiB"
    )


class PeakSampler:
    """Reads a process's VmHWM every few milliseconds until it exits (it only grows)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, resident(self.pid, "VmHWM"))
            except (OSError, AssertionError):
                return  # exited (or a zombie without memory figures)
            self._stop.wait(0.01)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        assert self.peak > 0, "no sample taken"
