"""Every row of PROTOCOL.md section 4, over real loopback sockets.

Handshake problems refuse one connection and the migration goes on; every
other problem ends the migration with an error naming channel, device and
idx, and leaves nothing at the final paths (an earlier file stays untouched).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import qemu_source as qs
from helpers import (
    IDSTR,
    IDSTR_B,
    assert_outputs,
    connect,
    final_files,
    random_bytes,
    send_streams_quietly,
    settings,
    start,
    until,
)

from vfio_multifd import (
    Address,
    Cancelled,
    DeviceIOError,
    DeviceKey,
    DeviceSpec,
    HandshakeError,
    MultifdError,
    ProtocolError,
    Reason,
    SessionError,
)
from vfio_multifd.core.connections import refusals_text
from vfio_multifd.core.wire import PACKET_PREFIX_SIZE

A = DeviceKey(IDSTR, 0)
IDSTR_B_KEY = DeviceKey(IDSTR_B, 0)
DATA = random_bytes(5 * 4096 + 7, 1)
CFG = b"config bytes"
CHUNKS = qs.device_chunks(DATA, 4096)
CONFIG_PACKET = qs.device_packet(IDSTR, 0, len(CHUNKS), qs.config_blob(CFG), config=True)


def good(idx: int) -> bytes:
    return qs.device_packet(IDSTR, 0, idx, CHUNKS[idx])


def with_field(packet: bytes, offset: int, value: bytes) -> bytes:
    return packet[:offset] + value + packet[offset + len(value) :]


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


# name -> (channel 0's packets after its handshake, reason, device named, idx named)
PACKET_CASES: dict[str, tuple[Callable[[], bytes], Reason, str | None, int | None]] = {
    "packet magic": (
        lambda: with_field(good(0), 0, u32(0x12345678)),
        Reason.PACKET_MAGIC,
        None,
        None,
    ),
    "packet version": (lambda: with_field(good(0), 4, u32(2)), Reason.PACKET_VERSION, None, None),
    "RAM packet": (
        lambda: with_field(good(0), 8, u32(0)) + bytes(400),
        Reason.PACKET_RAM,
        None,
        None,
    ),
    "SYNC packet": (lambda: with_field(good(0), 8, u32(1)), Reason.PACKET_RAM, None, None),
    "SYNC bit on device state": (
        lambda: with_field(good(0), 8, u32(0x41)),
        Reason.PACKET_SYNC,
        None,
        None,
    ),
    "idstr not NUL-terminated": (
        lambda: with_field(good(0), 12, b"x" * 256),
        Reason.PACKET_IDSTR,
        None,
        None,
    ),
    "next_packet_size zero": (
        lambda: with_field(good(0), 272, u32(0)),
        Reason.PACKET_SIZE,
        IDSTR,
        None,
    ),
    "next_packet_size too big": (
        lambda: with_field(good(0), 272, u32(0xFFFFFFFF)),
        Reason.PACKET_SIZE,
        IDSTR,
        None,
    ),
    "payload shorter than 12": (
        lambda: with_field(good(0), 272, u32(8))[:284],
        Reason.VFIO_SHORT,
        IDSTR,
        None,
    ),
    "VFIO version": (lambda: with_field(good(0), 276, u32(1)), Reason.VFIO_VERSION, IDSTR, 0),
    "idx 0xffffffff": (
        lambda: with_field(good(0), 280, u32(0xFFFFFFFF)),
        Reason.VFIO_INVALID_IDX,
        IDSTR,
        0xFFFFFFFF,
    ),
    "unknown device": (
        lambda: qs.device_packet("0000:99:00.0/vfio", 0, 4, b"x"),
        Reason.UNKNOWN_DEVICE,
        "0000:99:00.0/vfio",
        4,
    ),
    "unknown instance": (
        lambda: qs.device_packet(IDSTR, 7, 0, b"x"),
        Reason.UNKNOWN_DEVICE,
        f"{IDSTR} instance 7",
        0,
    ),
    "idx already filled": (
        lambda: good(1) + good(0) + good(1),
        Reason.VFIO_ALREADY_FILLED,
        IDSTR,
        1,
    ),
    "idx after the config packet": (
        lambda: CONFIG_PACKET + qs.device_packet(IDSTR, 0, len(CHUNKS) + 3, b"late"),
        Reason.VFIO_AFTER_CONFIG,
        IDSTR,
        len(CHUNKS) + 3,
    ),
    "config packet before a higher idx": (
        lambda: qs.device_packet(IDSTR, 0, 9, b"x") + CONFIG_PACKET,
        Reason.VFIO_AFTER_CONFIG,
        IDSTR,
        9,
    ),
    "second config packet": (
        lambda: (
            CONFIG_PACKET
            + qs.device_packet(IDSTR, 0, len(CHUNKS), qs.config_blob(b"2"), config=True)
        ),
        Reason.VFIO_ALREADY_FILLED,
        IDSTR,
        len(CHUNKS),
    ),
    "second config packet, other idx": (
        lambda: qs.device_packet(IDSTR, 0, 3, qs.config_blob(b"2"), config=True) + CONFIG_PACKET,
        Reason.VFIO_SECOND_CONFIG,
        IDSTR,
        len(CHUNKS),
    ),
    "config blob without DEV_CONFIG_STATE": (
        lambda: (
            b"".join(good(i) for i in range(len(CHUNKS)))
            + qs.device_packet(
                IDSTR, 0, len(CHUNKS), bytes(8) + CFG + qs.config_blob(b"")[8:], config=True
            )
        ),
        Reason.VFIO_CONFIG_BLOB,
        IDSTR,
        len(CHUNKS),
    ),
    "config blob without END_OF_STATE": (
        lambda: (
            b"".join(good(i) for i in range(len(CHUNKS)))
            + qs.device_packet(IDSTR, 0, len(CHUNKS), qs.config_blob(CFG)[:-8], config=True)
        ),
        Reason.VFIO_CONFIG_BLOB,
        IDSTR,
        len(CHUNKS),
    ),
    "stream closed inside a header": (lambda: good(0)[:100], Reason.PACKET_TRUNCATED, None, None),
    "stream closed inside a payload": (lambda: good(0)[:-10], Reason.PACKET_TRUNCATED, IDSTR, 0),
}


@pytest.mark.parametrize("case", sorted(PACKET_CASES))
async def test_packet_error_fails_the_migration_and_leaves_nothing(
    tmp_path: Path, case: str
) -> None:
    build, reason, device, idx = PACKET_CASES[case]
    config = settings(tmp_path, A, channels=1, max_packet_size=64 * 1024)
    config.devices[0].data_path.write_bytes(b"previous run")
    running = await start(config)
    await asyncio.to_thread(send_streams_quietly, running.address, [qs.handshake(0) + build()])
    with pytest.raises(ProtocolError) as caught:
        await running.result()
    error = caught.value
    assert error.reason is reason, str(error)
    assert error.channel == 0 and str(error).startswith("channel 0: ")
    assert error.device == device
    if device is not None:
        assert f"device {device}: " in str(error)
    assert error.idx == idx
    if idx is not None:
        assert str(idx) in str(error) or f"{idx:#x}" in str(error)
    assert config.devices[0].data_path.read_bytes() == b"previous run"
    assert final_files(tmp_path) == ["dev0.bin"], "temporary files are removed"
    assert running.session.status.value == "failed"


def all_good_streams(channels: int = 2) -> list[bytes]:
    return qs.build_streams([(IDSTR, 0, DATA, CFG)], channels, chunk_size=4096)


HANDSHAKE_CASES: dict[str, tuple[bytes, Reason]] = {
    "wrong magic": (with_field(qs.handshake(0), 0, u32(0xCAFEBABE)), Reason.HANDSHAKE_MAGIC),
    "wrong version": (with_field(qs.handshake(0), 4, u32(9)), Reason.HANDSHAKE_VERSION),
    "another VM's uuid": (qs.handshake(0, bytes(range(16))), Reason.HANDSHAKE_UUID),
    "id equal to channels": (qs.handshake(2), Reason.HANDSHAKE_CHANNEL_ID),
    "QEMU main channel": (b"QEVM\x00\x00\x00\x03" + bytes(100), Reason.HANDSHAKE_MAIN_CHANNEL),
    "HTTP request": (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", Reason.HANDSHAKE_MAGIC),
    "closed inside the handshake": (qs.handshake(0)[:20], Reason.HANDSHAKE_CLOSED),
    "empty connection": (b"", Reason.HANDSHAKE_CLOSED),
}


def stray(address: str, payload: bytes) -> bytes:
    """Connect, send, half-close; return what the daemon sent back before closing."""
    with connect(address) as sock:
        # The daemon may refuse (and close) before it has read it all.
        with contextlib.suppress(OSError):
            if payload:
                sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass
        return received


@pytest.mark.parametrize("case", sorted(HANDSHAKE_CASES))
async def test_bad_handshake_refuses_only_that_connection(tmp_path: Path, case: str) -> None:
    payload, reason = HANDSHAKE_CASES[case]
    config = settings(tmp_path, A, channels=2)
    running = await start(config)
    answer = await asyncio.to_thread(stray, running.address, payload)
    assert answer == b"", "the destination answers nothing on a channel"
    for _ in range(100):
        if running.session.core.connections.refused:
            break
        await asyncio.sleep(0.01)
    [(_, error)] = running.session.core.connections.refused
    assert isinstance(error, HandshakeError) and error.reason is reason, str(error)
    assert running.session.status.value == "setup"
    await asyncio.to_thread(qs.send_streams, running.address, all_good_streams())
    await running.result()
    assert_outputs(config, [(DATA, qs.config_blob(CFG))])


async def test_duplicate_channel_id_is_refused_while_the_first_one_works(tmp_path: Path) -> None:
    config = settings(tmp_path, A, channels=2)
    running = await start(config)
    streams = all_good_streams()
    first = connect(running.address)
    first.sendall(streams[0])
    first.shutdown(socket.SHUT_WR)
    await asyncio.to_thread(stray, running.address, qs.handshake(0))
    reasons = [e.reason for _, e in running.session.core.connections.refused]
    assert reasons == [Reason.HANDSHAKE_DUPLICATE_CHANNEL]
    await asyncio.to_thread(qs.send_streams, running.address, streams[1:])
    await running.result()
    first.close()
    assert_outputs(config, [(DATA, qs.config_blob(CFG))])


async def test_silent_connection_times_out_and_is_refused(tmp_path: Path) -> None:
    config = settings(tmp_path, A, channels=1, handshake_timeout=0.2)
    running = await start(config)
    with connect(running.address) as silent:
        silent.sendall(qs.handshake(0)[:10])
        silent.settimeout(5)
        with pytest.raises(ConnectionResetError):  # refused: a reset, never a clean close
            await asyncio.to_thread(silent.recv, 10)
    [(_, error)] = running.session.core.connections.refused
    assert error.reason is Reason.HANDSHAKE_TIMEOUT and "10 of 64 bytes" in str(error)
    await asyncio.to_thread(qs.send_streams, running.address, all_good_streams(1))
    await running.result()
    assert_outputs(config, [(DATA, qs.config_blob(CFG))])


async def test_all_channels_closed_names_the_missing_indices(tmp_path: Path) -> None:
    packets = [good(i) for i in (0, 3)]  # 1, 2 and whatever follows 3 never come
    config = settings(tmp_path, A, channels=2)
    running = await start(config)
    await asyncio.to_thread(
        qs.send_streams,
        running.address,
        [qs.handshake(0) + packets[0], qs.handshake(1) + packets[1]],
    )
    with pytest.raises(SessionError) as caught:
        await running.result()
    assert caught.value.reason is Reason.INCOMPLETE
    assert str(caught.value) == (
        f"all 2 channels closed with 1 device(s) incomplete: device {IDSTR}: missing 2 chunks "
        "(idx 1-2: about 8192 bytes at 4096 bytes a chunk), and the "
        "config state packet never came, nor anything after idx 3 (the highest received)"
    )
    assert final_files(tmp_path) == []


async def test_no_progress_within_the_timeout(tmp_path: Path) -> None:
    config = settings(tmp_path, A, channels=1, progress_timeout=0.5)
    running = await start(config)
    with connect(running.address) as sock:
        sock.sendall(qs.handshake(0) + good(1))  # then nothing, connection kept open
        with pytest.raises(SessionError) as caught:
            await running.result(timeout=10)
    assert caught.value.reason is Reason.PROGRESS_TIMEOUT
    assert f"device {IDSTR} idx 0" in str(caught.value)
    assert final_files(tmp_path) == []


async def test_accept_timeout_names_the_missing_channels(tmp_path: Path) -> None:
    config = settings(tmp_path, A, channels=3, accept_timeout=0.4)
    running = await start(config)
    with connect(running.address) as sock:
        sock.sendall(qs.handshake(1))
        with pytest.raises(SessionError) as caught:
            await running.result(timeout=10)
    assert caught.value.reason is Reason.ACCEPT_TIMEOUT
    assert "only 1 of 3 channels" in str(caught.value) and "missing channel ids 0, 2" in str(
        caught.value
    )


async def test_cancel_mid_transfer_leaves_nothing(tmp_path: Path) -> None:
    config = settings(tmp_path, A, channels=1)
    config.devices[0].data_path.write_bytes(b"keep me")
    running = await start(config)
    with connect(running.address) as sock:
        sock.sendall(qs.handshake(0) + good(0) + good(1))
        device = running.session.core.reassembly.devices[A]
        await until(lambda: device.bytes_written, "a chunk written")
        running.session.cancel("test says stop")
        with pytest.raises(Cancelled):
            await running.result(timeout=5)
    assert running.session.status.value == "cancelled"
    assert final_files(tmp_path) == ["dev0.bin"]
    assert config.devices[0].data_path.read_bytes() == b"keep me"


async def test_write_error_names_enospc(tmp_path: Path) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    config = settings(tmp_path, A, channels=2)
    config = type(config)(
        **{
            **{f: getattr(config, f) for f in config.__dataclass_fields__},
            "devices": (DeviceSpec(A, Path("/dev/full"), tmp_path / "cfg"),),
        }
    )
    running = await start(config)
    await asyncio.to_thread(send_streams_quietly, running.address, all_good_streams())
    with pytest.raises(DeviceIOError) as caught:
        await running.result()
    assert caught.value.errno == errno.ENOSPC
    assert "No space left on device" in str(caught.value) and IDSTR in str(caught.value)
    assert final_files(tmp_path) == []


async def test_unix_socket_stray_connection(tmp_path: Path) -> None:
    config = settings(tmp_path, A, channels=1, listen=Address("unix", path=str(tmp_path / "s")))
    running = await start(config)

    def poke() -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(tmp_path / "s"))
            sock.sendall(b"hello")
            sock.shutdown(socket.SHUT_WR)
            sock.recv(10)

    await asyncio.to_thread(poke)
    await asyncio.to_thread(qs.send_streams, running.address, all_good_streams(1))
    await running.result()
    assert [e.reason for _, e in running.session.core.connections.refused] == [Reason.HANDSHAKE_MAGIC]
    assert_outputs(config, [(DATA, qs.config_blob(CFG))])


@pytest.mark.parametrize("reader_threads", [0, 2])
@pytest.mark.parametrize("first", ["header", "packet"])
async def test_a_second_header_for_an_idx_fails_at_once_whichever_came_first(
    tmp_path: Path, first: str, reader_threads: int
) -> None:
    """Issue 20 item 5: channel 1 announces idx 0 and never sends its payload (a
    recorded duplicate-idx failure, replayed). Whether its header reaches the daemon
    before channel 0's idx 0 or after, the migration fails at once with the duplicate
    named: it waited for the progress timeout when the header came first."""
    config = settings(tmp_path, A, channels=2, reader_threads=reader_threads)
    config.devices[0].data_path.write_bytes(b"keep me")
    running = await start(config)
    reassembly = running.session.core.reassembly
    announce = qs.handshake(1) + good(0)[:PACKET_PREFIX_SIZE]  # no payload follows
    whole = qs.handshake(0) + good(0) + good(1)
    with connect(running.address) as channel_0, connect(running.address) as channel_1:
        if first == "header":  # its payload's buffer is charged as its header is taken
            channel_1.sendall(announce)
            await until(lambda: reassembly.in_flight_bytes, "channel 1's header taken")
            channel_0.sendall(whole)
            culprit = 0
        else:
            channel_0.sendall(whole)
            await until(lambda: reassembly.devices[A].max_idx == 1, "channel 0's chunks queued")
            channel_1.sendall(announce)
            culprit = 1
        with pytest.raises(ProtocolError) as caught:
            await running.result(timeout=5)
    error = caught.value
    assert error.reason is Reason.VFIO_ALREADY_FILLED
    assert (error.channel, error.device, error.idx) == (culprit, IDSTR, 0)
    assert str(error).startswith(f"channel {culprit}: device {IDSTR}: state buffer 0 already filled")
    if first == "header":
        assert str(error).endswith("channel 1 announced it first (its payload is still on the way)")
    assert final_files(tmp_path) == ["dev0.bin"]
    assert config.devices[0].data_path.read_bytes() == b"keep me"


def test_error_hierarchy_is_split_by_fault() -> None:
    assert issubclass(HandshakeError, ProtocolError)
    assert issubclass(ProtocolError, MultifdError)
    assert not issubclass(DeviceIOError, ProtocolError)
    assert issubclass(Cancelled, SessionError)
    error = ProtocolError(
        Reason.VFIO_ALREADY_FILLED, "state buffer 7 already filled", device=IDSTR_B, idx=7
    )
    assert (
        str(error.with_context(channel=1))
        == f"channel 1: device {IDSTR_B}: state buffer 7 already filled"
    )


async def test_cancel_before_run_is_not_lost(tmp_path: Path) -> None:
    from vfio_multifd import Session

    session = Session(settings(tmp_path, A, channels=1))
    session.cancel("changed my mind")
    with pytest.raises(Cancelled):
        await asyncio.wait_for(session.run(), 10)
    assert session.status.value == "cancelled"
    assert final_files(tmp_path) == []


async def test_cancel_after_completion_is_ignored(tmp_path: Path) -> None:
    config = settings(tmp_path, A, channels=2)
    running = await start(config)
    await asyncio.to_thread(qs.send_streams, running.address, all_good_streams())
    await running.result()
    running.session.cancel("too late")
    assert running.session.status.value == "completed"
    assert_outputs(config, [(DATA, qs.config_blob(CFG))])


async def test_unix_path_of_a_live_daemon_is_not_taken_over(tmp_path: Path) -> None:
    from vfio_multifd import UsageError

    path = str(tmp_path / "mig.sock")
    first = await start(settings(tmp_path, A, channels=1, listen=Address("unix", path=path)))
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    with pytest.raises(UsageError, match="another process is listening"):
        await start(settings(second_dir, A, channels=1, listen=Address("unix", path=path)))
    await asyncio.to_thread(qs.send_streams, first.address, all_good_streams(1))
    await first.result()
    assert final_files(second_dir) == []


async def test_an_unexpected_writer_error_fails_the_migration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not an OSError, not ours: still a failure, never a short file renamed into place."""
    from vfio_multifd.daemon import loader

    real = loader.DeviceLoader._write_batch

    def broken(self: loader.DeviceLoader, chunks: list[object]) -> None:
        if any(getattr(c, "idx", None) == 1 for c in chunks):
            raise ValueError("a bug in the writer")
        real(self, chunks)  # type: ignore[arg-type]

    monkeypatch.setattr(loader.DeviceLoader, "_write_batch", broken)
    config = settings(tmp_path, A, channels=1)
    running = await start(config)
    await asyncio.to_thread(send_streams_quietly, running.address, all_good_streams(1))
    with pytest.raises(SessionError) as caught:
        await running.result()
    assert caught.value.reason is Reason.INTERNAL and "a bug in the writer" in str(caught.value)
    assert final_files(tmp_path) == []


async def test_a_fifo_without_reader_does_not_block_a_cancel(tmp_path: Path) -> None:
    import os

    from vfio_multifd import Session

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    config = settings(tmp_path, A, channels=1)
    config = type(config)(
        **{
            **{f: getattr(config, f) for f in config.__dataclass_fields__},
            "devices": (DeviceSpec(A, fifo, tmp_path / "cfg"),),
        }
    )
    session = Session(config)
    task = asyncio.create_task(session.run())
    await asyncio.sleep(0.3)  # waiting for a reader of the FIFO
    assert not task.done()
    session.cancel("no reader came")
    with pytest.raises(Cancelled):
        await asyncio.wait_for(task, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


async def test_cancelling_the_abort_itself_leaves_no_part_file(tmp_path: Path) -> None:
    config = settings(tmp_path, A, IDSTR_B_KEY, channels=1)
    running = await start(config)
    with connect(running.address) as sock:
        sock.sendall(qs.handshake(0) + good(0))
        await asyncio.sleep(0.2)
        running.task.cancel()
        await asyncio.sleep(0)
        running.task.cancel()  # a second cancel while the first abort runs
        with pytest.raises(asyncio.CancelledError):
            await running.task
    assert final_files(tmp_path) == []


async def test_a_directory_at_a_final_path_fails_before_anything_is_renamed(tmp_path: Path) -> None:
    """Device 0's file must not be replaced when device 1's cannot be."""
    config = settings(tmp_path, A, IDSTR_B_KEY, channels=1)
    config.devices[0].data_path.write_bytes(b"old 0")
    running = await start(config)
    config.devices[1].data_path.mkdir()  # appears while the migration runs
    streams = qs.build_streams([(IDSTR, 0, DATA, CFG), (IDSTR_B, 0, DATA, CFG)], 1, chunk_size=4096)
    await asyncio.to_thread(send_streams_quietly, running.address, streams)
    with pytest.raises(DeviceIOError) as caught:
        await running.result()
    assert "a directory is in the way" in str(caught.value)
    assert config.devices[0].data_path.read_bytes() == b"old 0"
    assert final_files(tmp_path) == ["dev0.bin", "dev1.bin"]


def test_refusals_text_lists_each_message_once_with_its_count() -> None:
    def refused(reason: Reason, message: str) -> tuple[str, HandshakeError]:
        return ("127.0.0.1:1", HandshakeError(reason, message))

    uuid = refused(Reason.HANDSHAKE_UUID, "handshake uuid 01 differs from the expected 00")
    main = refused(Reason.HANDSHAKE_MAIN_CHANNEL, "a QEMU main migration channel (QEVM) connected")
    assert refusals_text([]) == ""
    assert refusals_text([uuid]) == "1 connection refused: " + uuid[1].message
    assert refusals_text([uuid, main, uuid]) == (
        "3 connections refused: handshake uuid 01 differs from the expected 00 (2 times); "
        "a QEMU main migration channel (QEVM) connected"
    )
    many = [refused(Reason.HANDSHAKE_MAGIC, f"handshake magic {n}") for n in range(5)]
    assert refusals_text(many) == (
        "5 connections refused: handshake magic 0; handshake magic 1; handshake magic 2; "
        "and 2 other reasons"
    )
    # A bounded deque of the last refusals (as issue 15 may keep) reads the same.
    assert refusals_text(collections.deque([uuid, uuid], maxlen=8)) == (
        "2 connections refused: " + uuid[1].message
    )


@pytest.mark.parametrize("late", ["handshake completed after the end", "hung up on by the end"])
async def test_connections_turned_away_as_the_migration_ends_explain_nothing(
    tmp_path: Path, late: str
) -> None:
    """A channel still in its handshake when the migration failed was turned away
    because it ended, not the other way round: the final error does not list it
    (it did, as "connection closed inside the handshake (reset)", when the daemon's
    own hang-up was taken for a refusal, or "the migration no longer takes channels")."""
    config = settings(tmp_path, DeviceKey(IDSTR, 0), channels=2)
    running = await start(config)
    session = running.session
    straggler = await asyncio.to_thread(connect, running.address)
    straggler.sendall(qs.handshake(1)[:10])
    # The daemon holds the straggler's connection, handshaking.
    await until(lambda: session.core.connections.pending, "the straggler's connection")
    assert len(session.core.connections.pending) == 1
    broken = await asyncio.to_thread(connect, running.address)
    broken.sendall(qs.handshake(0) + qs.device_packet(IDSTR, 0, 0, b"x" * 1000)[:300])
    await until(lambda: session.core.connections.channels, "channel 0 accepted")
    if late == "handshake completed after the end":
        session.fail(ProtocolError(Reason.PACKET_TRUNCATED, "cut short"))
        straggler.sendall(qs.handshake(1)[10:])  # completes while the session aborts
        await asyncio.sleep(0.05)
    else:
        broken.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        broken.close()  # a reset inside idx 0: the migration fails, the straggler is hung up on
    with pytest.raises(ProtocolError) as caught:
        await running.result()
    assert caught.value.reason is Reason.PACKET_TRUNCATED
    assert "refused" not in str(caught.value)
    assert session.core.connections.refusals_text() == ""
    for sock in (straggler, broken):
        sock.close()


def send_and_wait_for_the_close(address: str, streams: list[bytes], data_path: Path) -> list[str]:
    """Send each stream on its channel, half-close, and report how each channel ended:
    ``"closed"`` (with the data file then in place or not) or ``"reset"``."""
    socks = [connect(address) for _ in streams]
    for sock, stream in zip(socks, streams, strict=True):
        sock.settimeout(20)
        with contextlib.suppress(OSError):  # a failing daemon may reset while we send
            sock.sendall(stream)
            sock.shutdown(socket.SHUT_WR)
    ends = []
    for sock in socks:
        with sock:
            try:
                assert sock.recv(1) == b"", "the destination answers nothing"
                ends.append(f"closed, data file {'in place' if data_path.exists() else 'absent'}")
            except ConnectionResetError:
                ends.append("reset")
    return ends


async def test_a_source_sees_a_clean_close_only_once_the_outputs_are_in_place(
    tmp_path: Path,
) -> None:
    config = settings(tmp_path, A, channels=2)
    running = await start(config)
    ends = await asyncio.to_thread(
        send_and_wait_for_the_close, running.address, all_good_streams(), config.devices[0].data_path
    )
    await running.result()
    assert ends == ["closed, data file in place"] * 2


async def test_a_failed_migration_resets_every_channel(tmp_path: Path) -> None:
    """Over TCP a source can tell: a reset, not the clean close of a completed migration."""
    config = settings(tmp_path, A, channels=2)
    running = await start(config)
    streams = all_good_streams()
    streams[1] += good(0)  # a second chunk 0, once the whole stream has been sent
    ends = await asyncio.to_thread(
        send_and_wait_for_the_close, running.address, streams, config.devices[0].data_path
    )
    with pytest.raises(ProtocolError):
        await running.result()
    assert ends == ["reset", "reset"]

async def test_a_handshake_completed_while_the_migration_ends_is_refused(tmp_path: Path) -> None:
    """The session failed and its task group is shutting down when a connection's
    handshake completes: that connection is refused. (It was accepted and given a
    reader nobody awaited, or raised RuntimeError("TaskGroup ... is shutting down")
    out of the protocol callback, depending on how far the shutdown had got.)"""
    from helpers import FakeTransport

    from vfio_multifd.daemon.channel import ChannelProtocol, ChannelState

    running = await start(settings(tmp_path, A, channels=2))
    session = running.session

    def connect_fake(channel_id: int) -> tuple[ChannelProtocol, FakeTransport]:
        protocol = session.connection("fake")
        transport = FakeTransport(protocol)
        protocol.connection_made(transport)  # type: ignore[arg-type]
        transport.feed(qs.handshake(channel_id))
        return protocol, transport

    def state(protocol: ChannelProtocol) -> ChannelState:
        return session.core.connections.by_conn[protocol.conn].state

    try:
        first, _ = connect_fake(0)
        assert state(first) is ChannelState.ACTIVE
        session.cancel("ending")
        for waited in range(3):  # at once, then as the session shuts down
            late, transport = connect_fake(1)
            assert state(late) is ChannelState.REFUSED and transport.aborted, waited
            # Counted as refused, for the status and metrics, but as late: it
            # explains nothing, so the final error does not list it.
            by_reason = session.core.connections.refused_by_reason
            assert by_reason[Reason.HANDSHAKE_CLOSED.value] == waited + 1
            assert session.core.connections.late_count == waited + 1
            assert session.core.connections.refusals_text() == ""
            await asyncio.sleep(0)
    finally:
        with pytest.raises(Cancelled):
            await running.result()
