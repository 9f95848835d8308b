"""The daemon takes a QEMU-10-like migration (``source/qemu_like.py``) over loopback: the
main channel, RAM and SYNC packets mixed with device-state packets, several rounds of a
running guest. The RAM image must equal the last round's memory even when one channel is
held back (the sync points order the rounds), and the device's files its bytes."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from pathlib import Path

import pytest
from cli_helpers import Daemon

from vfio_multifd.core.wire import DeviceKey
from vfio_multifd.source.qemu_like import VfioDevice, qemu10_migration

UUID = "6b8e1a52-3c1d-4f8e-9b1a-22c0ffee0022"
PAGE = 4096
SIZE = 2 << 20  # bytes of pc.ram


def rounds(count: int) -> list[dict[str, bytes]]:
    """A guest's RAM over ``count`` rounds: each round rewrites some pages (some to zero)."""
    rng = random.Random(22)
    ram = bytearray(SIZE)
    for page in range(0, SIZE // PAGE, 3):
        ram[page * PAGE : (page + 1) * PAGE] = rng.randbytes(PAGE)
    images = [{"pc.ram": bytes(ram), "vga.vram": bytes(64 * PAGE)}]
    for number in range(1, count):
        for page in rng.sample(range(SIZE // PAGE), 64):
            ram[page * PAGE : (page + 1) * PAGE] = (
                bytes(PAGE) if page % 5 == 0 else bytes([number]) * PAGE
            )
        images.append({"pc.ram": bytes(ram), "vga.vram": bytes(64 * PAGE)})
    return images


def send(port: int, main: bytes, channels: list[bytes], *, lag: int | None) -> None:
    """Connect the main channel and every channel; channel ``lag`` sends its first half
    only after the others have sent everything they could (then are held at a sync point)."""
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(len(channels) + 1)]

    def run(sock: socket.socket, data: bytes, delay: float) -> None:
        time.sleep(delay)
        with contextlib.suppress(OSError):  # the daemon may have reset it
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)

    threads = [threading.Thread(target=run, args=(sockets[0], main, 0.0))]
    for index, data in enumerate(channels):
        delay = 1.0 if index == lag else 0.0
        threads.append(threading.Thread(target=run, args=(sockets[index + 1], data, delay)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for sock in sockets:
        sock.settimeout(30)
        with contextlib.suppress(OSError):
            sock.recv(1)  # the daemon's verdict: a close
        sock.close()


@pytest.mark.parametrize("lag", [None, 1], ids=["together", "one-channel-held-back"])
@pytest.mark.parametrize("zero_pages", ["multifd", "legacy"])
def test_a_qemu10_like_migration_through_the_daemon(
    tmp_path: Path, daemons: list[Daemon], lag: int | None, zero_pages: str
) -> None:
    images = rounds(4)
    device = VfioDevice(
        DeviceKey("0000:00:02.0/vfio", 0),
        precopy=(b"pre" * 100,),
        chunks=tuple(bytes([n]) * 70000 for n in range(5)),
        config=b"config-bytes",
    )
    streams = qemu10_migration(
        images,
        channels=3,
        uuid=bytes.fromhex(UUID.replace("-", "")),
        devices=[device],
        zero_pages=zero_pages,
    )
    assert streams.sync_points >= 4
    data = tmp_path / "dev.bin"
    daemon = Daemon(
        tmp_path,
        "--channels", "3",
        "--uuid", UUID,
        "--main-stream", str(tmp_path / "main.bin"),
        "--ram", str(tmp_path / "ram"),
        "--device", f"idstr={device.key.idstr},data={data}",
    )
    daemons.append(daemon)
    port = int(daemon.address.rsplit(":", 1)[1])
    send(port, streams.main, streams.channels, lag=lag)
    code, _, stderr = daemon.finish(60)
    assert code == 0, stderr
    assert (tmp_path / "ram" / "pc.ram").read_bytes() == images[-1]["pc.ram"]
    assert (tmp_path / "ram" / "vga.vram").read_bytes() == images[-1]["vga.vram"]
    assert (tmp_path / "main.bin").read_bytes() == streams.main
    assert data.read_bytes() == b"".join(device.chunks)


def test_without_ram_a_ram_packet_fails_naming_the_option(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    streams = qemu10_migration(rounds(1), channels=2, uuid=bytes.fromhex(UUID.replace("-", "")))
    daemon = Daemon(
        tmp_path,
        "--channels", "2",
        "--uuid", UUID,
        "--main-stream", "/dev/null",
        "--device", f"idstr=dev,data={tmp_path / 'dev.bin'}",
    )
    daemons.append(daemon)
    port = int(daemon.address.rsplit(":", 1)[1])
    send(port, streams.main, streams.channels, lag=None)
    code, _, stderr = daemon.finish(60)
    assert code == 1
    assert "give --ram DIR (or --ram discard)" in stderr
    assert not (tmp_path / "dev.bin").exists()
