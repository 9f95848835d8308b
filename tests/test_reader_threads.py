"""Channels read on reader threads (--reader-threads): the same bytes, errors, bounds and ends.

Every test runs a real session over loopback sockets under both event loops
(the reader threads run loops of the main loop's kind) with the streams of the
independent encoder (qemu_source), and checks that the channels really were
read on the reader threads, so that a regression to the main loop is caught.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import qemu_source as qs
from cli_helpers import Daemon, one_device_daemon, send_to
from helpers import (
    IDSTR,
    IDSTR_B,
    assert_outputs,
    connect,
    final_files,
    random_bytes,
    settings,
    start,
)

from vfio_multifd import Address, DeviceKey, ReceiveSettings
from vfio_multifd.cli import main
from vfio_multifd.daemon.reader_threads import ChannelReader, default_reader_threads
from vfio_multifd.errors import Cancelled, MultifdError, Reason

A = DeviceKey(IDSTR, 0)
B = DeviceKey(IDSTR_B, 0)
CHUNK = 64 << 10


@pytest.fixture
def reading_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[str]]:
    """The names of the threads that fed a handed-off channel's decoder."""
    names: set[str] = set()
    original = ChannelReader.get_buffer

    def get_buffer(self: ChannelReader, sizehint: int) -> memoryview:
        names.add(threading.current_thread().name)
        return original(self, sizehint)

    monkeypatch.setattr(ChannelReader, "get_buffer", get_buffer)
    yield names


def _reader_threads_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("reader-")]


async def test_channels_read_on_reader_threads_arrive_byte_exact(
    tmp_path: Path, reading_threads: set[str]
) -> None:
    config = settings(tmp_path, A, B, channels=4, reader_threads=2)
    data_a, data_b = random_bytes(37 * CHUNK + 5, 1), random_bytes(20 * CHUNK, 2)
    streams = qs.build_streams(
        [(IDSTR, 0, data_a, b"config A"), (IDSTR_B, 0, data_b, b"config B" * 50)],
        channels=4,
        order="random",
        seed=3,
        chunk_size=CHUNK,
    )
    running = await start(config)
    await asyncio.to_thread(qs.send_streams, running.address, streams)
    result = await running.result()
    assert_outputs(
        config,
        [(data_a, qs.config_blob(b"config A")), (data_b, qs.config_blob(b"config B" * 50))],
    )
    assert result.reader_threads == 2
    channels = running.session.channels
    assert sorted(channels) == [0, 1, 2, 3]
    assert all(c.detached for c in channels.values())
    # Four channels over two threads, the least loaded first: both read.
    assert reading_threads == {"reader-0", "reader-1"}
    assert result.bytes_received == sum(len(s) for s in streams)
    assert _reader_threads_alive() == []


async def test_without_reader_threads_the_main_loop_reads(
    tmp_path: Path, reading_threads: set[str]
) -> None:
    config = settings(tmp_path, A, channels=2, reader_threads=0)
    data = random_bytes(9 * CHUNK, 4)
    streams = qs.build_streams([(IDSTR, 0, data, b"c")], channels=2, chunk_size=CHUNK)
    running = await start(config)
    await asyncio.to_thread(qs.send_streams, running.address, streams)
    result = await running.result()
    assert_outputs(config, [(data, qs.config_blob(b"c"))])
    assert result.reader_threads == 0 and reading_threads == set()
    assert not any(c.detached for c in running.session.channels.values())


async def test_reverse_order_under_the_smallest_bound_spills_and_stays_bounded(
    tmp_path: Path, reading_threads: set[str]
) -> None:
    """Buffers asked of the main loop wait, spill or use the staging buffer across threads."""
    packet_size = CHUNK + 64
    base = settings(tmp_path, A, channels=3, reader_threads=3, max_packet_size=packet_size)
    config = settings(
        tmp_path,
        A,
        channels=3,
        reader_threads=3,
        max_packet_size=packet_size,
        max_queued_bytes=base.smallest_bound,
    )
    data = random_bytes(40 * CHUNK + 17, 5)
    streams = qs.build_streams(
        [(IDSTR, 0, data, b"cfg")], channels=3, order="reverse", chunk_size=CHUNK
    )
    running = await start(config)
    await asyncio.to_thread(qs.send_streams, running.address, streams)
    result = await running.result()
    assert_outputs(config, [(data, qs.config_blob(b"cfg"))])
    assert config.max_queued_bytes is not None
    assert 0 < result.peak_queued_bytes <= config.max_queued_bytes
    assert result.spilled_bytes > 0
    assert reading_threads == {"reader-0", "reader-1", "reader-2"}


async def test_a_bad_packet_on_a_reader_thread_names_channel_device_and_idx(
    tmp_path: Path, reading_threads: set[str]
) -> None:
    config = settings(tmp_path, A, channels=2, reader_threads=2)
    good = qs.device_packet(IDSTR, 0, 0, b"x" * 1000)
    bad = bytearray(qs.device_packet(IDSTR, 0, 1, b"y" * 1000))
    # The VFIO state version opens the payload, after the 276-byte device-state header.
    struct.pack_into(">I", bad, 276, 7)
    streams = [qs.handshake(0) + good, qs.handshake(1) + bytes(bad)]
    error = await _failure_of(config, streams)
    assert error.reason is Reason.VFIO_VERSION
    assert (error.channel, error.device, error.idx) == (1, str(A), 1)
    assert "VFIO state version 7" in error.message
    assert reading_threads  # decoded on a reader thread
    assert final_files(tmp_path) == []
    assert _reader_threads_alive() == []


async def test_a_duplicate_idx_from_two_reader_threads_fails_naming_both_ends(
    tmp_path: Path,
) -> None:
    config = settings(tmp_path, A, channels=2, reader_threads=2)
    packet = qs.device_packet(IDSTR, 0, 3, b"z" * 4096)
    streams = [qs.handshake(0) + packet, qs.handshake(1) + packet]
    error = await _failure_of(config, streams)
    assert error.reason is Reason.VFIO_ALREADY_FILLED
    assert error.device == str(A) and error.idx == 3 and error.channel in (0, 1)
    assert final_files(tmp_path) == []


async def test_a_connection_lost_inside_a_payload_on_a_reader_thread(tmp_path: Path) -> None:
    config = settings(tmp_path, A, channels=1, reader_threads=1)
    packet = qs.device_packet(IDSTR, 0, 0, b"p" * 100_000)
    running = await start(config)
    sock = await asyncio.to_thread(connect, running.address)
    sock.sendall(qs.handshake(0) + packet[:50_000])
    await asyncio.sleep(0.1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset, mid-payload
    with pytest.raises(MultifdError) as raised:
        await running.result()
    error = raised.value
    assert error.reason is Reason.PACKET_TRUNCATED
    assert (error.channel, error.device, error.idx) == (0, str(A), 0)
    assert final_files(tmp_path) == []


async def test_cancel_mid_transfer_stops_the_reader_threads(tmp_path: Path) -> None:
    config = settings(tmp_path, A, channels=2, reader_threads=2)
    running = await start(config)
    socks = [await asyncio.to_thread(connect, running.address) for _ in range(2)]
    streams = [qs.handshake(n) + qs.device_packet(IDSTR, 0, n, b"q" * 5000) for n in range(2)]
    for sock, stream in zip(socks, streams, strict=True):
        sock.sendall(stream)
    device = running.session.core.reassembly.devices[A]
    for _ in range(250):  # both packets read on the reader threads and written
        if device.bytes_written == 10_000:
            break
        await asyncio.sleep(0.02)
    assert device.bytes_written == 10_000
    assert running.session.snapshot().received_bytes == sum(map(len, streams))
    assert _reader_threads_alive() == ["reader-0", "reader-1"]
    running.session.cancel("test")
    with pytest.raises(Cancelled):
        await running.result()
    assert _reader_threads_alive() == []
    assert final_files(tmp_path) == []
    for sock in socks:  # the daemon hung up with a reset: the source knows it failed
        sock.settimeout(5)
        with pytest.raises(ConnectionResetError):
            while sock.recv(1):
                pass
        sock.close()


async def _failure_of(config: ReceiveSettings, streams: list[bytes]) -> MultifdError:
    """Run a session on ``streams``; the error it fails with."""
    running = await start(config)
    with pytest.raises(MultifdError) as raised:
        await asyncio.gather(
            asyncio.to_thread(_send_and_wait, running.address, streams), running.result()
        )
    return raised.value


def _send_and_wait(address: str, streams: list[bytes]) -> None:
    """Send, then wait for the daemon to hang up (it resets on failure)."""
    socks = [connect(address) for _ in streams]
    try:
        for sock, stream in zip(socks, streams, strict=True):
            sock.sendall(stream)
        for sock in socks:
            sock.settimeout(10)
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize(
    ("channels", "cpus", "expected"),
    [(4, 1, 0), (4, 2, 0), (4, 3, 0), (4, 4, 2), (8, 16, 8), (2, 16, 2), (1, 64, 1)],
)
def test_default_reader_threads_follow_cores_and_channels(
    channels: int, cpus: int, expected: int
) -> None:
    assert default_reader_threads(channels, cpus) == expected


@pytest.mark.parametrize("value", ["5", "-1", "two"])
def test_reader_threads_outside_0_to_channels_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    code = main(
        [
            "receive",
            "--channels",
            "4",
            "--reader-threads",
            value,
            "--device",
            f"idstr=a,data={tmp_path / 'a.bin'}",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "--reader-threads" in err
    assert list(tmp_path.iterdir()) == []


def test_the_daemon_says_how_many_reader_threads_read(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """``receive --reader-threads 2`` (under each --event-loop): the bytes arrive, and the
    listening line, the summary and the JSON summary say how many threads read."""
    daemon, data = one_device_daemon(tmp_path, daemons, 3, "--reader-threads", "2")
    [listening] = [e for e in daemon.events() if e["event"] == "listening"]
    assert listening["reader_threads"] == 2
    source = tmp_path / "source.bin"
    source.write_bytes(random_bytes(3 * (1 << 20) + 77, 9))
    sent = send_to(daemon.address, 3, f"idstr={IDSTR},source={source}")
    assert sent.returncode == 0, sent.stderr
    code, stdout, stderr = daemon.finish()
    assert code == 0, stderr
    assert data.read_bytes() == source.read_bytes()
    assert "channels read on 2 reader threads" in stdout
    [completed] = [e for e in daemon.events() if e["event"] == "migration_completed"]
    assert completed["reader_threads"] == 2


async def test_unix_socket_channels_are_read_on_reader_threads(
    short_dir: Path, reading_threads: set[str]
) -> None:
    config = settings(
        short_dir,
        A,
        channels=2,
        reader_threads=2,
        listen=Address("unix", path=str(short_dir / "m.sock")),
    )
    data = random_bytes(11 * CHUNK + 3, 12)
    streams = qs.build_streams([(IDSTR, 0, data, b"u")], channels=2, chunk_size=CHUNK)
    running = await start(config)
    await asyncio.to_thread(qs.send_streams, running.address, streams)
    result = await running.result()
    assert_outputs(config, [(data, qs.config_blob(b"u"))])
    assert result.reader_threads == 2 and reading_threads == {"reader-0", "reader-1"}


async def test_a_channel_that_cannot_move_is_read_where_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reading_threads: set[str]
) -> None:
    """Out of descriptors for the dup: the channel stays on the main loop, byte-exact."""
    import vfio_multifd.daemon.reader_threads as reader_threads

    def no_descriptor(fd: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(reader_threads.os, "dup", no_descriptor)
    config = settings(tmp_path, A, channels=2, reader_threads=2)
    data = random_bytes(6 * CHUNK, 13)
    streams = qs.build_streams([(IDSTR, 0, data, b"m")], channels=2, chunk_size=CHUNK)
    running = await start(config)
    await asyncio.to_thread(qs.send_streams, running.address, streams)
    await running.result()
    assert_outputs(config, [(data, qs.config_blob(b"m"))])
    assert reading_threads == set()
    assert not any(c.detached for c in running.session.channels.values())
