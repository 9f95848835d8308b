"""Whole migrations through the sans-I/O core: bytes and the time in, commands out.

No event loop, no socket, no file: :class:`Driver` plays every driver at once
(a decoder per connection, the loaders, the spill file, the commit) and the
clock is a number the test moves.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
import qemu_source as qs
from helpers import IDSTR, IDSTR_B, random_bytes

from vfio_multifd.core import commands as cmd
from vfio_multifd.core.config import MigrationConfig
from vfio_multifd.core.decoder import (
    ASK,
    ChannelDecoder,
    DecoderState,
    MainBytes,
    MainChannel,
    RamData,
    RamHeader,
)
from vfio_multifd.core.memory import SPILL_GRACE
from vfio_multifd.core.migration import Migration
from vfio_multifd.core.qemu_streams import PAGES_PER_WRITE
from vfio_multifd.core.ram import encode_ram_packet
from vfio_multifd.core.reassembly import CHUNK_OVERHEAD, Chunk, ChunkState, capacity_of
from vfio_multifd.core.savevm import (
    BlockList,
    Command,
    CommandEvent,
    Ended,
    Page,
    RamBlock,
    Record,
    Section,
    SyncPoint,
    Unfollowed,
    VfioData,
    ZeroPage,
)
from vfio_multifd.core.state import ChannelState, Phase
from vfio_multifd.core.wire import ChannelHandshake, DeviceKey, PacketHeader
from vfio_multifd.daemon.pool import BufferPool
from vfio_multifd.errors import (
    HandshakeError,
    MultifdError,
    ProtocolError,
    Reason,
    SessionError,
    UsageError,
)
from vfio_multifd.results import SessionStatus

A = DeviceKey(IDSTR, 0)
B = DeviceKey(IDSTR_B, 0)
CHUNK = 64 << 10
PAGE = 4096
BATCH = 8 << 20
T = TypeVar("T")


@dataclass
class Connection:
    decoder: ChannelDecoder
    backlog: bytes = b""  # bytes sent while the decoder waits for a buffer
    reading: bool = True


@dataclass
class Driver:
    """Plays the drivers of one :class:`Migration`, with time passed in."""

    core: Migration
    now: float = 0.0
    spill_at_once: bool = True  # carry out Spill commands as they come
    commit_at_once: bool = True
    connections: dict[int, Connection] = field(default_factory=dict)
    log: list[cmd.Command] = field(default_factory=list)
    data: dict[DeviceKey, bytearray] = field(default_factory=dict)
    config: dict[DeviceKey, bytes] = field(default_factory=dict)
    spill_file: dict[int, bytes] = field(default_factory=dict)
    spills: list[Chunk] = field(default_factory=list)  # asked for, not yet carried out
    committed_called: bool = False
    ram: dict[str, bytearray] = field(default_factory=dict)  # the RAM writer's images
    write_ram_at_once: bool = True  # carry out WriteRam commands as they come
    ram_writes: list[cmd.WriteRam] = field(default_factory=list)  # asked for, not done

    @classmethod
    def start(cls, config: MigrationConfig, **options: object) -> Driver:
        driver = cls(Migration(config, BufferPool()), **options)  # type: ignore[arg-type]
        driver.core.listening("test", 0.0)
        return driver

    # -- the network side --------------------------------------------------------------

    def connect(self, peer: str = "source") -> int:
        conn = len(self.connections)
        decoder = ChannelDecoder(max_packet_size=1 << 20, allocate=ASK, ram=self.core.config.ram)
        self.connections[conn] = Connection(decoder)
        self.core.connection_made(conn, peer, self.now)
        self.act()
        return conn

    def send(self, conn: int, data: bytes) -> None:
        """``data`` arrives on ``conn``, read as a BufferedProtocol would (into the
        decoder's buffers), except while the decoder waits for a payload buffer or
        the core paused its reading (kept until then, as the kernel would)."""
        connection = self.connections[conn]
        data = connection.backlog + data
        decoder = connection.decoder
        while (
            data
            and connection.reading
            and not self.held(conn)
            and decoder.state
            in (
                DecoderState.HANDSHAKE,
                DecoderState.HEADER,
                DecoderState.RAM_HEADER,
                DecoderState.PAYLOAD,
            )
        ):
            target = decoder.get_buffer()
            n = min(len(target), len(data))
            target[:n] = data[:n]
            data = data[n:]
            decoder.buffer_updated(n)
            self.core.received(conn, n)
            self._events(conn)
        held = (
            decoder.state is DecoderState.AWAITING_BUFFER
            or not connection.reading
            or self.held(conn)
        )
        connection.backlog = data if held else b""
        self.act()

    def held(self, conn: int) -> bool:
        """The core holds ``conn`` (a sync point, the block list): it reads no further unit,
        as a channel reads one unit at a time and stops once held."""
        c = self.core.connections.by_conn.get(conn)
        return c is not None and bool(c.holds)

    def eof(self, conn: int) -> None:
        decoder = self.connections[conn].decoder
        decoder.eof()
        if self._events(conn):
            self.core.eof(conn, self.now)
        self.act()

    def lose(self, conn: int, exc: BaseException | None = None) -> None:
        """``conn``'s socket is gone (``exc``: why; a reset if not given)."""
        exc = exc or ConnectionResetError("reset")
        decoder = self.connections[conn].decoder
        truncated = decoder.truncated_error() if decoder.inside_unit else None
        self.core.lost(conn, exc, self.now, truncated=truncated)
        self.act()

    def _events(self, conn: int) -> bool:
        decoder = self.connections[conn].decoder
        core = self.core
        try:
            while (event := decoder.next_event()) is not None:
                if isinstance(event, ChannelHandshake):
                    core.handshake(conn, event, self.now)
                elif isinstance(event, MainChannel):
                    core.main_channel(conn, self.now)
                elif isinstance(event, MainBytes):
                    core.main_data(conn, event.data, self.now)
                elif isinstance(event, PacketHeader):
                    buffer = core.header(conn, event, self.now)
                    if buffer is not None:
                        decoder.provide_buffer(buffer)
                elif isinstance(event, RamHeader):
                    ram = core.ram_header(conn, event.raw, self.now)
                    if ram is not None:
                        decoder.provide_buffer(ram, len(ram))
                elif isinstance(event, RamData):
                    assert isinstance(event.buffer, bytearray)
                    core.ram_data(conn, event.buffer, self.now)
                else:
                    core.packet(conn, event, self.now)
        except ProtocolError as error:
            core.decode_error(conn, error, self.now)
            return False
        return True

    # -- carrying out the commands ---------------------------------------------------------

    def act(self) -> None:
        while commands := self.core.pop_commands():
            for command in commands:
                self.log.append(command)
                self._do(command)

    def _do(self, command: cmd.Command) -> None:
        if isinstance(command, cmd.ProvideBuffer):
            connection = self.connections[command.conn]
            connection.decoder.provide_buffer(command.buffer, len(memoryview(command.buffer)))
            self._events(command.conn)
        elif isinstance(command, cmd.PauseReading):
            self.connections[command.conn].reading = False
        elif isinstance(command, cmd.ResumeReading):
            connection = self.connections[command.conn]
            connection.reading = True
            if connection.backlog:
                self.send(command.conn, b"")
        elif isinstance(command, cmd.CloseConnection):
            assert self.committed_called, "a clean close before the outcome was committed"
        elif isinstance(command, cmd.Spill):
            self.spills.append(command.chunk)
            if self.spill_at_once:
                self.finish_spills()
        elif isinstance(command, cmd.Commit) and self.commit_at_once:
            self.commit()
        elif isinstance(command, cmd.CreateRamImages):
            self.ram = {block.name: bytearray(block.used_length) for block in command.blocks}
        elif isinstance(command, cmd.WritePrecopy):  # the device's writer, in order
            self.data.setdefault(command.device, bytearray()).extend(command.data)
            self.core.ram_written(command.conn, command.nbytes, self.now)
        elif isinstance(command, cmd.WriteRam):
            self.ram_writes.append(command)
            if self.write_ram_at_once:
                self.finish_ram_writes()

    def finish_ram_writes(self) -> None:
        """The RAM writer does every write queued, first in first out."""
        while self.ram_writes:
            command = self.ram_writes.pop(0)
            for name, offset, data in command.pages:
                page = bytes([data]) * PAGE if isinstance(data, int) else bytes(data)
                self.ram[name][offset : offset + PAGE] = page
            self.core.ram_written(command.conn, command.nbytes, self.now)
            self.act()

    def finish_spills(self) -> None:
        spills, self.spills = self.spills, []
        for chunk in spills:
            ref = len(self.spill_file)
            self.spill_file[ref] = bytes(chunk.data)
            self.core.spilled(chunk, ref, self.now)
        self.act()

    def commit(self) -> None:
        self.committed_called = True
        self.core.committed(self.now)

    # -- the loaders and the clock ------------------------------------------------------------

    def load(self) -> None:
        """Every loader takes and writes what is ready (the test's stand-in for the files)."""
        for key in self.core.config.devices:
            while chunks := self.core.take_batch(key, BATCH):
                for chunk in chunks:
                    data = (
                        self.spill_file[chunk.spill_ref]  # type: ignore[index]
                        if chunk.state is ChunkState.SPILLED
                        else bytes(chunk.data)
                    )
                    if chunk.config:
                        self.config[key] = data
                    else:
                        self.data.setdefault(key, bytearray()).extend(data)
                self.core.written(key, chunks, self.now)
                self.act()

    def advance(self, seconds: float) -> None:
        """Move the clock on, ticking at every deadline on the way."""
        end = self.now + seconds
        while (deadline := self.core.next_deadline()) is not None and deadline <= end:
            self.now = max(self.now, deadline)
            self.core.tick(self.now)
            self.act()
        self.now = end
        self.core.tick(self.now)
        self.act()

    # -- what happened ----------------------------------------------------------------------------

    def of(self, kind: type[T]) -> list[T]:
        return [command for command in self.log if isinstance(command, kind)]

    @property
    def finished(self) -> cmd.Finished:
        [finished] = self.of(cmd.Finished)
        return finished


def config(*keys: DeviceKey, channels: int = 2, **extra: object) -> MigrationConfig:
    return MigrationConfig(devices=keys or (A,), channels=channels, **extra)  # type: ignore[arg-type]


def streams(
    devices: list[tuple[str, bytes, bytes]], channels: int, order: str = "random", **extra: object
) -> list[bytes]:
    return qs.build_streams(
        [(idstr, 0, data, cfg) for idstr, data, cfg in devices],
        channels,
        order,
        chunk_size=CHUNK,
        **extra,  # type: ignore[arg-type]
    )


def interleave(
    driver: Driver, conns: list[int], data: list[bytes], piece: int = 7000, *, eof: bool = True
) -> None:
    """Send every stream in pieces, channel after channel, loading as the loaders would;
    each channel ends (``eof``) once its stream is sent, as a source half-closes it."""
    offsets = [0] * len(conns)
    while any(offset < len(stream) for offset, stream in zip(offsets, data, strict=True)):
        for n, conn in enumerate(conns):
            if offsets[n] < len(data[n]) and driver.connections[conn].reading:
                driver.send(conn, data[n][offsets[n] : offsets[n] + piece])
                offsets[n] += piece
                if eof and offsets[n] >= len(data[n]):
                    driver.eof(conn)
        driver.load()
        if not any(driver.connections[c].reading for c in conns):
            driver.finish_spills()
            driver.load()
            assert driver.spills or any(driver.connections[c].reading for c in conns), (
                "every channel paused and nothing left to free memory"
            )


def run_whole(driver: Driver, data: list[bytes]) -> list[int]:
    conns = [driver.connect(f"source:{n}") for n in range(len(data))]
    interleave(driver, conns, data)
    driver.load()
    return conns


# -- success --------------------------------------------------------------------------------


def test_a_whole_migration_delivers_every_byte_in_order() -> None:
    a, b = random_bytes(40 * CHUNK + 123, 1), random_bytes(25 * CHUNK, 2)
    driver = Driver.start(config(A, B, channels=3))
    conns = run_whole(driver, streams([(IDSTR, a, b"cfg-a"), (IDSTR_B, b, b"cfg-b")], 3))

    assert bytes(driver.data[A]) == a and bytes(driver.data[B]) == b
    assert driver.config[A] == qs.config_blob(b"cfg-a")
    assert driver.finished == cmd.Finished(Phase.COMPLETED, None)
    # Only once committed are the channels closed, each cleanly.
    commit = driver.log.index(cmd.Commit())
    closes = driver.of(cmd.CloseConnection)
    assert closes == [cmd.CloseConnection(conn) for conn in conns]
    assert all(driver.log.index(close) > commit for close in closes)
    assert not driver.of(cmd.ResetConnection) and not driver.of(cmd.Refuse)
    snapshot = driver.core.snapshot(driver.now)
    assert snapshot.status is SessionStatus.COMPLETED
    assert snapshot.written_bytes == len(a) + len(b)
    assert snapshot.queued_bytes == 0
    assert [c.state for c in snapshot.channels] == [ChannelState.CLOSED] * 3
    assert snapshot.received_bytes == sum(c.received_bytes for c in snapshot.channels)
    assert [(s.old, s.new) for s in driver.of(cmd.StatusChanged)] == [
        (SessionStatus.SETUP, SessionStatus.ACTIVE),
        (SessionStatus.ACTIVE, SessionStatus.COMPLETED),
    ]


def test_refusals_leave_the_migration_going() -> None:
    data = random_bytes(6 * CHUNK, 3)
    uuid = bytes(range(16))
    driver = Driver.start(config(channels=2, uuid=uuid))
    good = streams([(IDSTR, data, b"c")], 2, uuid=uuid)
    stranger = driver.connect("stranger")
    driver.send(stranger, qs.handshake(0, bytes(16)))  # wrong uuid
    first = driver.connect("first")
    driver.send(first, good[0][:64])
    duplicate = driver.connect("duplicate")
    driver.send(duplicate, good[0][:64])  # channel 0 again
    too_high = driver.connect("too-high")
    driver.send(too_high, qs.handshake(2, uuid))

    refusals = driver.of(cmd.Refuse)
    assert [(r.conn, r.error.reason) for r in refusals] == [
        (stranger, Reason.HANDSHAKE_UUID),
        (duplicate, Reason.HANDSHAKE_DUPLICATE_CHANNEL),
        (too_high, Reason.HANDSHAKE_CHANNEL_ID),
    ]
    assert str(refusals[1].error) == "channel id 0 is already connected"
    second = driver.connect("second")
    interleave(driver, [first, second], [good[0][64:], good[1]])
    driver.load()
    assert bytes(driver.data[A]) == data
    assert driver.finished.outcome is Phase.COMPLETED
    snapshot = driver.core.snapshot(driver.now)
    assert snapshot.refused_connections == 3
    assert dict(snapshot.refused_by_reason) == {
        "handshake-uuid": 1,
        "handshake-duplicate-channel": 1,
        "handshake-channel-id": 1,
    }


def test_a_stray_qevm_is_refused_naming_main_stream_and_the_migration_goes_on() -> None:
    data = random_bytes(2 * CHUNK, 5)
    driver = Driver.start(config(channels=2))
    good = streams([(IDSTR, data, b"c")], 2)
    stray = driver.connect("stray")
    driver.send(stray, b"QEVM\x00\x00\x00\x03")
    (refusal,) = driver.of(cmd.Refuse)
    assert refusal.conn == stray
    assert refusal.error.reason is Reason.HANDSHAKE_MAIN_CHANNEL
    assert "--main-stream PATH" in str(refusal.error)
    run_whole(driver, good)
    driver.load()
    assert bytes(driver.data[A]) == data
    assert driver.finished.outcome is Phase.COMPLETED


def test_with_main_stream_one_qevm_is_the_main_channel_and_a_second_is_refused() -> None:
    driver = Driver.start(config(channels=2, main_stream=True))
    main = driver.connect("main")
    driver.send(main, b"QEVM\x00\x00\x00\x03")
    assert driver.of(cmd.AcceptedMain) == [cmd.AcceptedMain(main)]
    second = driver.connect("second")
    driver.send(second, b"QEVM\x00\x00\x00\x03")
    (refusal,) = driver.of(cmd.Refuse)
    assert (refusal.conn, refusal.error.reason) == (second, Reason.HANDSHAKE_DUPLICATE_CHANNEL)
    assert driver.core.main_bytes == 8  # the second one's bytes are nobody's
    assert driver.core.phase is Phase.ACTIVE


def test_too_many_handshaking_connections_shed_the_oldest() -> None:
    driver = Driver.start(config(max_pending=2))
    first, second = driver.connect("1"), driver.connect("2")
    third = driver.connect("3")
    [refusal] = driver.of(cmd.Refuse)
    assert refusal == cmd.Refuse(first, refusal.error, False)
    assert refusal.error.reason is Reason.HANDSHAKE_SHED
    assert "more than 2 connections without a handshake" in str(refusal.error)
    assert list(driver.core.connections.pending) == [second, third]


def test_a_handshake_that_never_completes_times_out() -> None:
    driver = Driver.start(config(handshake_timeout=10.0))
    conn = driver.connect()
    driver.send(conn, qs.handshake(0)[:10])
    driver.advance(9.9)
    assert not driver.of(cmd.Refuse)
    driver.advance(0.2)
    [refusal] = driver.of(cmd.Refuse)
    assert refusal.error.reason is Reason.HANDSHAKE_TIMEOUT
    assert str(refusal.error) == "no complete handshake within 10 s (10 of 64 bytes)"
    assert driver.core.phase is Phase.SETUP  # one connection refused; the migration waits on


# -- memory --------------------------------------------------------------------------------


def smallest_bound(chunk: int = CHUNK) -> int:
    """What config.ReceiveSettings.smallest_bound says for a spilling migration."""
    return 2 * capacity_of(chunk) + CHUNK_OVERHEAD


def test_chunks_that_come_early_spill_and_come_back_in_their_turn() -> None:
    data = random_bytes(30 * CHUNK, 4)
    driver = Driver.start(
        config(channels=1, max_queued_bytes=4 * smallest_bound(), max_payload_size=CHUNK),
        spill_at_once=False,
    )
    run_whole(driver, streams([(IDSTR, data, b"c")], 1, "reverse"))

    assert bytes(driver.data[A]) == data
    assert driver.finished.outcome is Phase.COMPLETED
    spilled = driver.of(cmd.Spill)
    assert len(spilled) >= 20
    snapshot = driver.core.snapshot(driver.now)
    assert snapshot.spilled_bytes == sum(s.chunk.size for s in spilled)
    assert 0 < snapshot.peak_queued_bytes <= 4 * smallest_bound()
    assert snapshot.queued_bytes == 0
    # Reading paused while each spill was written, and resumed after it.
    assert len(driver.of(cmd.PauseReading)) == len(driver.of(cmd.ResumeReading)) > 0


def test_a_memory_wait_gives_another_channel_its_grace_then_spills() -> None:
    """Memory full of early chunks, and another channel reading: the header waits
    SPILL_GRACE for it to bring the chunk a loader needs, then goes to disk."""
    bound = smallest_bound() + 2 * (capacity_of(CHUNK) + CHUNK_OVERHEAD)
    driver = Driver.start(
        config(channels=2, max_queued_bytes=bound, max_payload_size=CHUNK), spill_at_once=False
    )
    first, second = driver.connect(), driver.connect()
    driver.send(second, qs.handshake(1))
    early = b"".join(qs.device_packet(IDSTR, 0, idx, bytes(CHUNK)) for idx in (5, 6))
    driver.send(first, qs.handshake(0) + early)
    assert driver.core.ledger.queued_bytes == 2 * (capacity_of(CHUNK) + CHUNK_OVERHEAD)
    driver.send(first, qs.device_packet(IDSTR, 0, 7, bytes(CHUNK))[:300])
    assert driver.log[-1] == cmd.PauseReading(first)
    assert driver.core.next_deadline() == pytest.approx(driver.now + SPILL_GRACE)

    driver.advance(SPILL_GRACE / 2)
    assert not driver.of(cmd.ProvideBuffer) and not driver.of(cmd.Spill)
    driver.advance(SPILL_GRACE)
    # The grace ran out in vain: the arrival (needed last) is received to go to disk.
    [provided] = driver.of(cmd.ProvideBuffer)
    assert provided.conn == first
    assert driver.core.ledger.is_staging(provided.buffer)
    assert driver.core.snapshot(driver.now).paused_seconds == pytest.approx(SPILL_GRACE)


def test_freed_memory_goes_first_to_the_waiting_chunk_needed_soonest() -> None:
    """Memory given to whichever header waited longest lets a channel far ahead hold it
    while the chunks needed next wait: the channels drift apart and every read waits
    for a write. Freed memory goes first to the header nearest its device's next chunk."""
    unit = capacity_of(CHUNK) + CHUNK_OVERHEAD
    bound = smallest_bound() + 2 * unit  # room for two chunks ahead of the next one
    driver = Driver.start(config(channels=3, max_queued_bytes=bound, max_payload_size=CHUNK))
    first, far, near = driver.connect(), driver.connect(), driver.connect()
    driver.send(first, qs.handshake(0) + qs.device_packet(IDSTR, 0, 0, bytes(CHUNK)))
    driver.send(far, qs.handshake(1) + qs.device_packet(IDSTR, 0, 9, bytes(CHUNK)))
    driver.send(far, qs.device_packet(IDSTR, 0, 10, bytes(CHUNK))[:300])
    assert driver.log[-1] == cmd.PauseReading(far)  # it waits first
    driver.send(near, qs.handshake(2) + qs.device_packet(IDSTR, 0, 2, bytes(CHUNK))[:300])
    assert driver.log[-1] == cmd.PauseReading(near)

    driver.load()  # idx 0 written: room for one chunk ahead again
    assert [provided.conn for provided in driver.of(cmd.ProvideBuffer)] == [near]
    assert [resumed.conn for resumed in driver.of(cmd.ResumeReading)] == [near]


def test_paused_seconds_include_a_pause_going_on() -> None:
    bound = smallest_bound() + capacity_of(CHUNK) + CHUNK_OVERHEAD
    driver = Driver.start(config(channels=2, max_queued_bytes=bound, max_payload_size=CHUNK))
    first, second = driver.connect(), driver.connect()
    driver.send(second, qs.handshake(1))
    driver.send(first, qs.handshake(0) + qs.device_packet(IDSTR, 0, 5, bytes(CHUNK)))
    driver.send(first, qs.device_packet(IDSTR, 0, 6, bytes(CHUNK))[:300])
    assert driver.log[-1] == cmd.PauseReading(first)
    driver.now += 0.01  # within the grace: still waiting
    assert driver.core.snapshot(driver.now).paused_seconds == pytest.approx(0.01)


def test_queue_full_fails_as_qemu_does() -> None:
    bound = capacity_of(CHUNK) + CHUNK_OVERHEAD
    driver = Driver.start(
        config(channels=1, max_queued_bytes=bound, max_payload_size=CHUNK, fail_when_full=True)
    )
    conn = driver.connect()
    driver.send(conn, qs.handshake(0) + qs.device_packet(IDSTR, 0, 1, bytes(CHUNK)))
    driver.send(conn, qs.device_packet(IDSTR, 0, 2, bytes(CHUNK))[:300])
    error = driver.finished.error
    assert isinstance(error, SessionError) and error.reason is Reason.QUEUE_FULL
    assert (error.channel, error.device, error.idx) == (0, str(A), 2)
    assert driver.of(cmd.ResetConnection) == [cmd.ResetConnection(conn, error)]


# -- timeouts and faults ------------------------------------------------------------------------


def test_no_progress_times_out_naming_what_the_loaders_wait_for() -> None:
    driver = Driver.start(config(channels=1, progress_timeout=5.0))
    conn = driver.connect()
    driver.send(conn, qs.handshake(0) + qs.device_packet(IDSTR, 0, 1, b"x" * 100))
    driver.advance(5.0)
    assert driver.core.phase is Phase.ACTIVE
    driver.advance(0.6)  # sampled every 0.25 s, from the first sample that saw the bytes
    error = driver.finished.error
    assert isinstance(error, SessionError) and error.reason is Reason.PROGRESS_TIMEOUT
    assert str(error) == (
        f"no progress for 5 s ({64 + 288 + 100} bytes received; waiting for device {IDSTR} idx 0)"
    )
    assert driver.of(cmd.ResetConnection) == [cmd.ResetConnection(conn, error)]
    assert driver.core.snapshot(driver.now).status is SessionStatus.FAILED


def test_channels_that_never_connect_time_out() -> None:
    driver = Driver.start(config(channels=3, accept_timeout=2.0))
    conn = driver.connect()
    driver.send(conn, qs.handshake(1))
    driver.advance(2.5)
    error = driver.finished.error
    assert isinstance(error, SessionError) and error.reason is Reason.ACCEPT_TIMEOUT
    assert "only 1 of 3 channels connected within 2 s (missing channel ids 0, 2)" in str(error)


def test_a_channels_mismatch_warns_then_fails_after_the_grace() -> None:
    """--missing-channels-grace, the core's own rule: once every channel that connected
    has ended (and none is handshaking), one warning naming the missing ids, then the
    failure ``missing-channels`` the grace later, instead of the progress timeout."""
    data = random_bytes(2 * CHUNK, 8)
    driver = Driver.start(config(channels=4, progress_timeout=150.0, missing_channels_grace=1.0))
    conns = [driver.connect(f"source:{n}") for n in range(2)]
    sent = streams([(IDSTR, data, b"c")], 2)
    driver.send(conns[0], sent[0])
    driver.send(conns[1], sent[1])
    stray = driver.connect("stray")  # handshaking: a channel may still come
    driver.eof(conns[0])
    driver.eof(conns[1])
    driver.load()
    driver.advance(5.0)
    assert not driver.of(cmd.MissingChannels) and driver.core.phase.running
    driver.lose(stray)  # nothing else may come now
    driver.advance(0.25)
    assert driver.of(cmd.MissingChannels) == [cmd.MissingChannels(4, (2, 3), 1.0)]
    assert driver.core.phase.running
    driver.advance(1.0)
    assert driver.core.phase.running  # exactly the grace: not yet
    driver.advance(0.25)
    error = driver.finished.error
    assert isinstance(error, SessionError) and error.reason is Reason.MISSING_CHANNELS
    assert str(error) == (
        "only 2 of 4 channels connected, and they ended 1 s ago (--missing-channels-grace): "
        "every channel that connected has ended, and channel ids 2, 3 never came: does the "
        "source use --channels 4 (QEMU's multifd-channels) too?; 1 connection refused: "
        "connection closed inside the handshake (reset)"  # a refusal may explain it
    )
    assert len(driver.of(cmd.MissingChannels)) == 1
    assert sorted(c.conn for c in driver.of(cmd.ResetConnection)) == conns


def test_without_a_grace_a_channels_mismatch_is_left_to_the_timeouts() -> None:
    driver = Driver.start(config(channels=4, progress_timeout=None))
    conn = driver.connect()
    driver.send(conn, qs.handshake(0))
    driver.eof(conn)
    driver.advance(1e6)
    assert not driver.of(cmd.MissingChannels) and driver.core.phase.running


def test_a_channel_lost_mid_payload_releases_its_charge() -> None:
    bound = 4 * smallest_bound()
    driver = Driver.start(config(channels=2, max_queued_bytes=bound, max_payload_size=CHUNK))
    first, second = driver.connect(), driver.connect()
    driver.send(second, qs.handshake(1))
    packet = qs.device_packet(IDSTR, 0, 3, bytes(CHUNK))
    driver.send(first, qs.handshake(0) + packet[: 300 + 1000])
    cost = capacity_of(CHUNK) + CHUNK_OVERHEAD
    assert (driver.core.ledger.queued_bytes, driver.core.ledger.in_flight_bytes) == (cost, cost)

    driver.lose(first)
    assert (driver.core.ledger.queued_bytes, driver.core.ledger.in_flight_bytes) == (0, 0)
    error = driver.finished.error
    assert isinstance(error, ProtocolError) and error.reason is Reason.PACKET_TRUNCATED
    assert (error.channel, error.device, error.idx) == (0, str(A), 3)
    assert str(error) == (
        f"channel 0: device {IDSTR}: stream closed inside state buffer 3: 1012 of "
        f"{CHUNK} data bytes received (connection lost: reset)"
    )
    assert driver.of(cmd.ResetConnection) == [cmd.ResetConnection(second, error)]


def test_a_decode_error_names_channel_device_and_idx() -> None:
    driver = Driver.start(config(channels=2))
    first, second = driver.connect(), driver.connect()
    driver.send(second, qs.handshake(1))
    packet = qs.device_packet(IDSTR, 0, 4, b"y" * 10)
    driver.send(first, qs.handshake(0) + packet)
    driver.send(second, packet)  # idx 4 again, on another channel
    error = driver.finished.error
    assert isinstance(error, ProtocolError) and error.reason is Reason.VFIO_ALREADY_FILLED
    assert (error.channel, error.device, error.idx) == (1, str(A), 4)
    assert str(error) == f"channel 1: device {IDSTR}: state buffer 4 already filled"
    resets = driver.of(cmd.ResetConnection)
    assert {r.conn for r in resets} == {first, second}
    assert driver.core.connections.channels[1].state is ChannelState.FAILED


def test_a_header_another_channel_announced_is_refused_before_its_payload() -> None:
    driver = Driver.start(config(channels=2))
    first, second = driver.connect(), driver.connect()
    packet = qs.device_packet(IDSTR, 0, 2, b"z" * 1000)
    driver.send(first, qs.handshake(0) + packet[:400])  # header complete, payload on its way
    driver.send(second, qs.handshake(1) + packet[:300])
    error = driver.finished.error
    assert isinstance(error, ProtocolError) and error.reason is Reason.VFIO_ALREADY_FILLED
    assert error.channel == 1 and "channel 0 announced it first" in str(error)


def test_cancel_then_cleaned_up() -> None:
    driver = Driver.start(config(channels=1))
    conn = driver.connect()
    driver.send(conn, qs.handshake(0))
    assert driver.core.cancel("cancelled by SIGTERM", driver.now, signal_number=15)
    driver.act()
    assert not driver.core.cancel("again", driver.now)
    error = driver.finished.error
    assert error is not None and error.reason is Reason.CANCELLED
    assert driver.core.snapshot(driver.now).status is SessionStatus.CANCELLING
    driver.core.stopped_at(driver.now + 1)
    driver.act()
    assert driver.core.snapshot(driver.now).status is SessionStatus.CANCELLED
    assert [s.new for s in driver.of(cmd.StatusChanged)] == [
        SessionStatus.ACTIVE,
        SessionStatus.CANCELLING,
        SessionStatus.CANCELLED,
    ]
    assert driver.of(cmd.ResetConnection) == [cmd.ResetConnection(conn, error)]


def test_the_first_error_wins() -> None:
    driver = Driver.start(config(channels=2))
    first, second = driver.connect(), driver.connect()
    driver.send(second, qs.handshake(1) + qs.device_packet(IDSTR, 0, 0, b"a" * 50)[:100])
    driver.send(first, qs.handshake(0) + b"\0" * 288)  # bad packet magic
    driver.lose(second)  # truncated, after the migration failed: not the error
    driver.core.fail(SessionError(Reason.INTERNAL, "later"), driver.now)
    assert not driver.core.cancel("too late", driver.now)
    driver.act()
    finished = driver.finished  # exactly one
    assert finished.outcome is Phase.FAILED
    assert finished.error is not None and finished.error.reason is Reason.PACKET_MAGIC
    assert driver.core.error is finished.error and finished.error.channel == 0
    # A connection that comes now is refused as late: it did not cause the end.
    late = driver.connect("late")
    driver.send(late, qs.handshake(1))
    refusal = driver.log[-1]
    assert refusal == cmd.Refuse(late, refusal.error, True)  # type: ignore[union-attr]
    assert refusal.error.reason is Reason.HANDSHAKE_CLOSED  # type: ignore[union-attr]
    assert driver.core.connections.refusals_text() == ""
    # Once the driver has cleaned up, what is still connected is hung up on.
    stranger = driver.connect("stranger")
    driver.core.stopped_at(driver.now)
    driver.act()
    assert driver.log[-1] == cmd.ResetConnection(stranger, finished.error)


def test_no_clean_close_before_the_commit_and_none_if_it_fails() -> None:
    data = random_bytes(3 * CHUNK, 5)
    driver = Driver.start(config(channels=1), commit_at_once=False)
    run_whole(driver, streams([(IDSTR, data, b"c")], 1))
    assert driver.of(cmd.Commit) == [cmd.Commit()]
    assert driver.core.phase is Phase.COMMITTING
    assert not driver.core.cancel("during the commit", driver.now)  # too late
    assert not driver.of(cmd.CloseConnection) and not driver.of(cmd.Finished)
    failure = MultifdError(Reason.DEVICE_WRITE, "rename failed")
    driver.core.commit_failed(failure, driver.now)
    driver.act()
    assert driver.finished == cmd.Finished(Phase.FAILED, failure)
    assert not driver.of(cmd.CloseConnection)
    assert driver.of(cmd.ResetConnection) == [cmd.ResetConnection(0, failure)]


def test_every_device_complete_waits_for_missing_channels() -> None:
    data = random_bytes(2 * CHUNK, 6)
    driver = Driver.start(config(channels=2))
    conn = driver.connect()
    driver.send(conn, streams([(IDSTR, data, b"c")], 1)[0])
    driver.load()
    assert driver.of(cmd.WaitingForChannels) == [cmd.WaitingForChannels(1, (1,))]
    assert not driver.of(cmd.Commit)
    late = driver.connect()
    driver.send(late, qs.handshake(1))
    assert driver.finished.outcome is Phase.COMPLETED
    assert bytes(driver.data[A]) == data


def test_all_channels_closed_with_a_device_incomplete_fails() -> None:
    driver = Driver.start(config(channels=1))
    conn = driver.connect()
    driver.send(conn, qs.handshake(0) + qs.device_packet(IDSTR, 0, 1, b"q" * 10))
    driver.eof(conn)
    error = driver.finished.error
    assert isinstance(error, SessionError) and error.reason is Reason.INCOMPLETE
    assert str(error).startswith("all 1 channels closed with 1 device(s) incomplete")


def test_a_tls_refusal_from_the_transport_refuses_the_connection() -> None:
    driver = Driver.start(config())
    conn = driver.connect()
    driver.lose(conn, HandshakeError(Reason.TLS, "TLS handshake failed"))
    [refusal] = driver.of(cmd.Refuse)
    assert refusal.error.reason is Reason.TLS


def test_packets_after_the_loader_took_its_batch_still_wake_it() -> None:
    driver = Driver.start(config(channels=1))
    conn = driver.connect()
    driver.send(conn, qs.handshake(0))
    assert driver.core.take_batch(A, BATCH) == []
    driver.send(conn, qs.device_packet(IDSTR, 0, 0, b"w" * 10))
    assert driver.of(cmd.WakeLoader) == [cmd.WakeLoader(A)]
    driver.send(conn, qs.device_packet(IDSTR, 0, 1, b"w" * 10))
    assert driver.of(cmd.WakeLoader) == [cmd.WakeLoader(A)]  # not again: it was not waiting
    assert [c.idx for c in driver.core.take_batch(A, BATCH)] == [0, 1]


# -- the core is pure -------------------------------------------------------------------------


CORE = Path(__file__).resolve().parent.parent / "vfio_multifd" / "core"


@pytest.mark.parametrize("module", sorted(p.name for p in CORE.glob("*.py")))
def test_the_core_imports_nothing_that_does_io(module: str) -> None:
    from test_purity import FORBIDDEN_IMPORTS

    tree = ast.parse((CORE / module).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & (FORBIDDEN_IMPORTS | {"time"}), imported


def test_importing_the_core_alone_loads_no_io_module() -> None:
    from test_purity import _REPORT, IO_MODULES, PACKAGE_DIR, _run

    code = (
        f"""
import sys, types
package = types.ModuleType("vfio_multifd")
package.__path__ = [{str(PACKAGE_DIR)!r}]
sys.modules["vfio_multifd"] = package
import vfio_multifd.core.migration
"""
        + _REPORT
    )
    assert _run(code, "-I", "-S") == {name: False for name in IO_MODULES}


def test_channels_ending_while_an_arrival_goes_to_the_spill_file_are_not_incomplete() -> None:
    """The last arrival was received into the staging buffer and is still being
    written to the spill file when every channel ends: not a missing chunk."""
    bound = smallest_bound() + 300  # room for the config chunk ahead, no more
    driver = Driver.start(
        config(channels=1, max_queued_bytes=bound, max_payload_size=CHUNK), spill_at_once=False
    )
    conn = driver.connect()
    # Ahead of idx 0 with only the reserve left: received into the staging buffer.
    driver.send(conn, qs.handshake(0) + qs.device_packet(IDSTR, 0, 1, b"1" * CHUNK))
    [staged] = driver.spills
    assert driver.core.ledger.is_staging(staged.buffer)
    driver.send(conn, qs.device_packet(IDSTR, 0, 2, qs.config_blob(b"c"), True))
    driver.send(conn, qs.device_packet(IDSTR, 0, 0, b"0" * CHUNK))
    driver.eof(conn)
    assert not driver.of(cmd.Finished), "incomplete while the spill was being written"
    driver.finish_spills()
    driver.load()
    assert driver.finished.outcome is Phase.COMPLETED
    assert bytes(driver.data[A]) == b"0" * CHUNK + b"1" * CHUNK


# -- QEMU's RAM and sync points (--main-stream, --ram) ------------------------------------------

UUID = bytes(16)
BLOCKS = (RamBlock("pc.ram", 16 * PAGE), RamBlock("vga.vram", 4 * PAGE))


def ram_migration(channels: int = 2, **options: object) -> tuple[Driver, int, list[int]]:
    """A RAM-only migration: its main channel and ``channels`` multifd channels connected,
    no block list yet (``options``: the config's)."""
    driver = Driver.start(
        MigrationConfig(
            devices=(), channels=channels, main_stream=True, ram=True, **options  # type: ignore[arg-type]
        )
    )
    main = driver.connect("main")
    driver.send(main, b"QEVM\x00\x00\x00\x03")
    conns = []
    for channel in range(channels):
        conn = driver.connect(f"source:{channel}")
        driver.send(conn, ChannelHandshake(channel, UUID).encode())
        conns.append(conn)
    return driver, main, conns


def main_event(driver: Driver, main: int, event: object) -> None:
    driver.core.main_event(main, event, driver.now)  # type: ignore[arg-type]
    driver.act()


def page(block: str, offset: int, fill: int, *, num: int = 0) -> bytes:
    return encode_ram_packet(block=block, normal=[(offset, bytes([fill]) * PAGE)], packet_num=num)


SYNC = encode_ram_packet(sync=True)


def test_a_channel_at_a_sync_point_waits_until_every_party_reaches_it() -> None:
    driver, main, (c0, c1) = ram_migration()
    main_event(driver, main, BlockList(BLOCKS))
    driver.send(c0, page("pc.ram", 0, 1) + SYNC)
    assert not driver.connections[c0].reading  # held at sync point 1
    assert driver.core.sync_points == 0
    # Its next round is not read: it stays in the backlog while the others lag.
    driver.send(c0, page("pc.ram", PAGE, 2, num=1))
    assert driver.ram["pc.ram"][PAGE] == 0
    main_event(driver, main, SyncPoint(1))
    assert driver.core.main_held and not driver.connections[c0].reading
    driver.send(c1, page("pc.ram", 0, 9) + SYNC)  # the last party: everyone goes on
    assert driver.core.sync_points == 1
    assert driver.connections[c0].reading and driver.connections[c1].reading
    assert not driver.core.main_held
    assert driver.ram["pc.ram"][PAGE] == 2  # c0's backlog was read once released
    assert driver.core.ram_pages == 3


def test_a_page_of_a_later_round_wins_over_a_lagging_channels_older_copy() -> None:
    """The barrier holds the fast channel's second round until the slow one delivered
    its first: the older copy of a page is written before the newer one."""
    driver, main, (c0, c1) = ram_migration()
    main_event(driver, main, BlockList(BLOCKS))
    driver.send(c0, SYNC + page("pc.ram", 0, 2, num=1) + SYNC)  # round 2 rewrites page 0
    main_event(driver, main, SyncPoint(1))
    driver.send(c1, page("pc.ram", 0, 1) + SYNC)  # round 1's copy comes late
    main_event(driver, main, SyncPoint(2))
    driver.send(c1, SYNC)
    assert driver.ram["pc.ram"][:PAGE] == bytes([2]) * PAGE
    assert driver.core.sync_points == 2


def test_a_ram_packet_before_the_block_list_holds_its_channel() -> None:
    driver, main, (c0, _c1) = ram_migration()
    driver.send(c0, page("vga.vram", PAGE, 7))
    assert not driver.connections[c0].reading
    assert driver.ram == {} and driver.core.ram_pages == 0
    main_event(driver, main, BlockList(BLOCKS))
    assert driver.connections[c0].reading
    assert driver.ram["vga.vram"][PAGE : 2 * PAGE] == bytes([7]) * PAGE
    assert driver.core.ram_pages == 1


def test_a_main_stream_that_ends_without_a_block_list_fails_the_held_channel() -> None:
    driver, main, (c0, _c1) = ram_migration()
    driver.send(c0, page("pc.ram", 0, 7))
    main_event(driver, main, Ended(followed=True, description=None))
    error = driver.finished.error
    assert isinstance(error, ProtocolError) and error.reason is Reason.RAM_BLOCK
    assert "channel 0" in str(error) and "before the block list" in str(error)


@pytest.mark.parametrize(
    ("packet", "reason", "expected"),
    [
        (
            page("rom", 0, 1, num=5),
            Reason.RAM_BLOCK,
            "RAM packet 5: RAMBlock 'rom' is not in the main stream's block list",
        ),
        (
            page("vga.vram", 4 * PAGE, 1, num=6),
            Reason.RAM_OFFSET,
            "RAM packet 6: page offset 0x4000 of RAMBlock vga.vram is not a 4096-byte page "
            "within its used length 0x4000",
        ),
    ],
    ids=["unknown-block", "offset-past-used-length"],
)
def test_a_ram_packet_outside_the_block_list_fails_naming_it(
    packet: bytes, reason: Reason, expected: str
) -> None:
    driver, main, (_c0, c1) = ram_migration()
    main_event(driver, main, BlockList(BLOCKS))
    driver.send(c1, packet)
    assert driver.finished.outcome is Phase.FAILED
    error = driver.finished.error
    assert isinstance(error, ProtocolError) and error.reason is reason
    assert str(error) == f"channel 1: {expected}"
    assert driver.ram["vga.vram"] == bytes(4 * PAGE)  # nothing written


def full_packet(block: str, first: int, fill: int) -> bytes:
    """A RAM packet of 128 pages (512 KiB of page data) from page ``first``."""
    pages = [((first + n) * PAGE, bytes([fill]) * PAGE) for n in range(128)]
    return encode_ram_packet(block=block, normal=pages)


def test_the_ram_writers_queue_stays_within_its_share_of_the_bound() -> None:
    """Past its share every channel pauses, not only the one that wrote; the writer
    catching up resumes them all. The share is part of --max-queued-bytes."""
    bound = 16 << 20
    driver, main, (c0, c1) = ram_migration(max_queued_bytes=bound, max_payload_size=CHUNK)
    layout = driver.core.layout
    assert layout.ram == (bound - 2 * capacity_of(CHUNK) - CHUNK_OVERHEAD) // 4
    assert layout.queue_bound == bound - layout.staging - layout.ram  # the chunks' part
    driver.write_ram_at_once = False
    blocks = (RamBlock("pc.ram", 64 << 20),)
    main_event(driver, main, BlockList(blocks))
    packets = (layout.ram_hold_above >> 19) + 1  # 512 KiB each: one past the threshold
    stream = b"".join(full_packet("pc.ram", 128 * n, n % 250 + 1) for n in range(packets + 4))
    driver.send(c0, stream)
    assert driver.core.ram_queued == packets << 19 <= layout.ram
    assert not driver.connections[c0].reading and not driver.connections[c1].reading
    assert driver.core.main_held
    driver.send(c1, full_packet("pc.ram", 0, 99))  # c1 reads nothing while held
    assert driver.core.ram_queued == packets << 19
    driver.finish_ram_writes()
    assert driver.connections[c1].reading and driver.core.ram_queued == 0
    driver.finish_ram_writes()
    assert driver.core.peak_ram_queued <= layout.ram
    assert driver.core.ram_pages == 128 * (packets + 5)
    assert driver.ram["pc.ram"][: 128 * PAGE] == bytes([99]) * 128 * PAGE  # c1's, after c0's


def test_main_stream_pages_handed_in_together_reach_the_writer_as_few_jobs_in_order() -> None:
    """QEMU 7.2 sends every zero page as a record of its own on the main stream: the
    records the driver hands in before it carries out the commands merge into one
    WriteRam of at most PAGES_PER_WRITE pages, in their order, charged as before."""
    driver, main, _conns = ram_migration()
    blocks = (RamBlock("pc.ram", 4 << 20),)
    main_event(driver, main, BlockList(blocks))
    driver.write_ram_at_once = False
    count = PAGES_PER_WRITE + 44
    events: list[object] = []
    for n in range(count):  # every page written twice: the later record must win
        offset = (n % (count // 2)) * PAGE
        fill = bytes([n % 250 + 1]) * PAGE
        events.append(ZeroPage("pc.ram", offset, 0) if n % 3 else Page("pc.ram", offset, fill))
    for event in events:
        driver.core.main_event(main, event, driver.now)  # type: ignore[arg-type]
    driver.act()
    jobs = list(driver.ram_writes)
    assert [len(job.pages) for job in jobs] == [PAGES_PER_WRITE, count - PAGES_PER_WRITE]
    assert driver.core.ram_writes == 2
    assert driver.core.ram_queued == sum(job.nbytes for job in jobs) == PAGE * sum(
        isinstance(event, Page) for event in events
    )
    written = [
        (block, offset, data if isinstance(data, int) else bytes(data))
        for job in jobs
        for block, offset, data in job.pages
    ]
    assert written == [
        (e.block, e.offset, e.fill if isinstance(e, ZeroPage) else e.data) for e in events  # type: ignore[attr-defined]
    ]
    # One input at a time (a command carried out after each), nothing merges.
    driver.core.main_event(main, ZeroPage("pc.ram", 0, 0), driver.now)
    driver.act()
    driver.core.main_event(main, ZeroPage("pc.ram", PAGE, 0), driver.now)
    driver.act()
    assert [len(job.pages) for job in driver.ram_writes[2:]] == [1, 1]
    driver.finish_ram_writes()
    assert driver.core.ram_queued == 0 and driver.core.ram_writes == 0
    expected = bytearray(4 << 20)
    for event in events:
        assert isinstance(event, (Page, ZeroPage))
        data = bytes([event.fill]) * PAGE if isinstance(event, ZeroPage) else event.data
        expected[event.offset : event.offset + PAGE] = data
    expected[: 2 * PAGE] = bytes(2 * PAGE)
    assert driver.ram["pc.ram"] == expected
    assert driver.core.ram_zero_pages == 2 + sum(isinstance(e, ZeroPage) for e in events)


def test_a_bound_too_small_for_qemus_streams_names_their_share() -> None:
    """With QEMU's streams the smallest bound adds the RAM writer's smallest share: a
    RAM packet's page data being read on each of 2 channels and the main channel, and
    one queued (4 x 512 KiB), to the chunks' two 1 MiB buffers (each with the room of
    the next packet's header, page-rounded) + 256."""
    from vfio_multifd.config import DeviceSpec, ReceiveSettings

    qemu = {"main_stream": Path("/dev/null"), "ram": "discard", "channels": 2}
    smallest = ReceiveSettings(devices=(), **qemu).smallest_bound  # type: ignore[arg-type]
    chunks = 2 * capacity_of(1 << 20) + CHUNK_OVERHEAD
    assert chunks == (2 << 20) + (8 << 10) + 256
    assert smallest == chunks + 4 * (512 << 10)
    device = DeviceSpec(A, Path("/nowhere/a.bin"), Path("/nowhere/a.bin.config"))
    assert ReceiveSettings(devices=(device,)).smallest_bound == chunks
    ReceiveSettings(devices=(), max_queued_bytes=smallest, **qemu)  # type: ignore[arg-type]
    with pytest.raises(UsageError) as error:
        ReceiveSettings(devices=(), max_queued_bytes=smallest - 1, **qemu)  # type: ignore[arg-type]
    assert f"the smallest bound that works is {smallest}" in str(error.value)
    assert f"and {4 * 512 * 1024} for QEMU's streams" in str(error.value)


# -- pre-copy VFIO data on the main stream -----------------------------------------------------

TIMER = Section(Record.SECTION_FULL, 0, "timer", 0, 2)


def precopy_migration(data: bytes) -> tuple[Driver, int]:
    """Device A over one channel, every packet of it sent (and the channel ended) before the
    main stream says anything past its header."""
    driver = Driver.start(config(A, channels=1, main_stream=True))
    main = driver.connect("main")
    driver.send(main, b"QEVM\x00\x00\x00\x03")
    run_whole(driver, streams([(IDSTR, data, b"cfg")], 1))
    return driver, main


def a_section(kind: Record) -> Section:
    return Section(kind, 2, A.idstr, A.instance_id, 1)


@pytest.mark.parametrize(
    "closing",
    [
        [CommandEvent(Command.SWITCHOVER_START, b"")],
        [a_section(Record.SECTION_END), VfioData(A.idstr, 0, b"end"), TIMER],
        [Unfollowed(TIMER, 100, "vmstate")],
        [Ended(followed=True, description=None)],
    ],
    ids=["switchover", "its-section-end-over", "unfollowed", "ended"],
)
def test_precopy_data_goes_first_and_chunk_0_waits_until_no_more_can_come(
    closing: list[object],
) -> None:
    data = random_bytes(5 * CHUNK + 7, 3)
    driver, main = precopy_migration(data)
    assert A not in driver.data  # every chunk is there, but idx 0 waits for the main stream
    main_event(driver, main, a_section(Record.SECTION_START))
    main_event(driver, main, a_section(Record.SECTION_PART))
    main_event(driver, main, VfioData(A.idstr, 0, b"pre-0"))
    main_event(driver, main, VfioData(A.idstr, 0, b"pre-1"))
    main_event(driver, main, a_section(Record.SECTION_PART))
    main_event(driver, main, VfioData(A.idstr, 0, b"pre-2"))
    for event in closing[:-1]:
        main_event(driver, main, event)
        driver.load()
    precopy = b"pre-0pre-1pre-2" + b"".join(e.data for e in closing if isinstance(e, VfioData))
    assert bytes(driver.data[A]) == precopy  # no chunk yet
    main_event(driver, main, closing[-1])
    assert driver.of(cmd.WakeLoader)[-1] == cmd.WakeLoader(A)
    driver.load()
    assert bytes(driver.data[A]) == precopy + data
    assert driver.core.precopy_bytes[A] == len(precopy)
    assert driver.core.ram_queued == 0 and driver.core.ram_writes == 0


def test_without_a_main_stream_the_loader_never_waits_for_one() -> None:
    data = random_bytes(3 * CHUNK, 4)
    driver = Driver.start(config(A, channels=1))
    run_whole(driver, streams([(IDSTR, data, b"cfg")], 1))
    assert bytes(driver.data[A]) == data


def test_precopy_data_after_the_switchover_fails_naming_the_device() -> None:
    driver, main = precopy_migration(random_bytes(CHUNK, 5))
    main_event(driver, main, CommandEvent(Command.SWITCHOVER_START, b""))
    main_event(driver, main, VfioData(A.idstr, 0, b"late"))
    error = driver.finished.error
    assert isinstance(error, ProtocolError) and error.reason is Reason.MAIN_VFIO
    assert str(A) in str(error) and "after the device's last section" in str(error)


def test_precopy_data_of_no_device_stays_in_the_main_stream_said_once() -> None:
    driver, main = precopy_migration(random_bytes(CHUNK, 6))
    other = DeviceKey("0000:00:09.0/vfio", 0)
    main_event(driver, main, VfioData(other.idstr, 0, b"x"))
    main_event(driver, main, VfioData(other.idstr, 0, b"y"))
    assert driver.of(cmd.StrayPrecopy) == [cmd.StrayPrecopy(other)]
    assert not driver.of(cmd.WritePrecopy) and other not in driver.data


def test_precopy_bytes_are_charged_until_the_device_writer_has_them() -> None:
    driver, main = precopy_migration(random_bytes(CHUNK, 7))
    done: list[cmd.WritePrecopy] = []
    driver._do = lambda command: (  # type: ignore[method-assign]
        done.append(command) if isinstance(command, cmd.WritePrecopy) else None
    )
    main_event(driver, main, VfioData(A.idstr, 0, b"z" * 1000))
    assert driver.core.ram_queued == 1000 and done == [cmd.WritePrecopy(main, A, b"z" * 1000, 1000)]
    driver.core.ram_written(main, 1000, driver.now)
    assert driver.core.ram_queued == 0
