"""What a real QEMU sends beside device state: its main channel, RAM and SYNC packets.

The inputs of :class:`~.migration.Migration` for ``--main-stream`` and
``--ram`` (PROTOCOL.md section 7), pure like the rest of the core. The driver
parses the main channel (``core/mainstream.py``) and hands its events here
(:meth:`QemuStreams.main_event`); each channel's decoder hands RAM headers
and their page data (:meth:`QemuStreams.ram_header`, :meth:`QemuStreams.ram_data`).

Order: pages of a later round must win over an earlier copy even when a
channel lags, so every party (each channel, and the main stream) waits at
each sync point until all have reached it (``core/ram.py``'s
:class:`SyncBarrier`), and every page and main-stream byte goes to one
writer, first in first out (:class:`WriteRam`): the order the writes are
emitted in is the order they reach the files.

Memory: page data is read into a buffer of its own and queued to the writer,
within the RAM writer's share of ``--max-queued-bytes`` (``MemoryLayout.ram``):
once the queue passes ``MemoryLayout.ram_hold_above`` every channel and the
main channel pause (``holds`` "writes") until the writer catches up, so what
is queued and what is being read stay within the share. Every channel pauses,
not only the one that wrote: the others could each start another packet.
"""

from __future__ import annotations

from ..errors import HandshakeError, MultifdError, ProtocolError, Reason
from .commands import (
    AcceptedMain,
    CreateRamImages,
    PauseReading,
    ProvideBuffer,
    ResumeReading,
    StrayPrecopy,
    WritePrecopy,
    WriteRam,
)
from .connections import Connection
from .ram import MAIN, RamPacket, Released, SyncBarrier, parse_ram_packet
from .rules import Rules
from .savevm import (
    BlockList,
    Command,
    CommandEvent,
    Configuration,
    Ended,
    Event,
    Page,
    RamBlock,
    Record,
    Section,
    SyncPoint,
    Unfollowed,
    VfioData,
    ZeroPage,
)
from .state import ChannelState
from .wire import DeviceKey

#: Main-stream page records merged into one :class:`WriteRam` at most (1 MiB of 4 KiB
#: pages; a zero page carries no data).
PAGES_PER_WRITE = 256


class QemuStreams(Rules):
    def _init_qemu_streams(self) -> None:
        config = self.config
        self.blocks: dict[str, RamBlock] | None = None
        self.machine: str | None = None
        self.main_ended = False
        self.main_bytes = 0
        self.ram_pages = 0
        self.ram_zero_pages = 0
        self.ram_queued = 0  # bytes queued for the writer, not written yet
        self.ram_writes = 0  # WriteRam commands not done yet
        self.peak_ram_queued = 0
        self.ram_full = False  # every channel holds "writes" until the writer catches up
        self.barrier = (
            SyncBarrier(config.channels, main=config.main_stream) if config.ram else None
        )
        self.sync_points = 0
        # Devices whose loader may not take idx 0 yet: the main stream may still bring
        # pre-copy data for them, which goes first in their data file.
        self.precopy_pending: set[DeviceKey] = set(config.devices) if config.main_stream else set()
        self._precopy_last: set[DeviceKey] = set()  # their SECTION_END's data is being parsed
        self.precopy_bytes: dict[DeviceKey, int] = {}
        self._precopy_strays: set[DeviceKey] = set()

    @property
    def qemu_streams(self) -> bool:
        """The migration takes QEMU's main channel or RAM: it ends when QEMU's streams do."""
        return self.config.main_stream or self.config.ram

    # -- the main channel ---------------------------------------------------------------

    def main_channel(self, conn: int, now: float) -> None:
        """``conn`` began with ``QEVM``: the main channel, if asked for and the first."""
        c = self.connections.by_conn.get(conn)
        if c is None or c.state is not ChannelState.HANDSHAKE or c.hung_up:
            return
        try:
            if not self.phase.running:
                raise HandshakeError(
                    Reason.HANDSHAKE_CLOSED, "the migration no longer takes channels"
                )
            self.connections.accept_main(c)
        except HandshakeError as error:
            self._refuse(c, error)
            return
        self._emit(AcceptedMain(conn))
        self.outcome.start(now)

    def main_data(self, conn: int, data: bytes, now: float) -> None:
        """Bytes of the main channel, as received: kept at --main-stream PATH."""
        c = self._reading(conn)
        if c is None or not c.main:
            return
        self.main_bytes += len(data)
        self._write(c, (), data)

    @property
    def main_held(self) -> bool:
        """The main stream's events wait (at a sync point)."""
        main = self.connections.main
        return main is not None and bool(main.holds)

    def main_event(self, conn: int, event: Event, now: float) -> None:
        """One event of the main stream's parser (the driver stops handing them while
        :attr:`main_held`)."""
        c = self._reading(conn)
        if c is None or not c.main:
            return
        try:
            self._main_event(c, event, now)
        except ProtocolError as error:
            self._channel_failed(c, error, now)

    def _main_event(self, c: Connection, event: Event, now: float) -> None:
        if self.config.devices:
            self._precopy_event(c, event)
        if isinstance(event, Configuration):
            self.machine = event.machine
        elif isinstance(event, BlockList):
            self._block_list(event.blocks, now)
        elif isinstance(event, ZeroPage):
            self._needs_ram("a zero page")
            self.ram_zero_pages += 1
            self._write(c, ((event.block, event.offset, event.fill),), b"")
        elif isinstance(event, Page):
            self._needs_ram("a page")
            self.ram_pages += 1
            self._write(c, ((event.block, event.offset, memoryview(event.data)),), b"")
        elif isinstance(event, SyncPoint):
            self._reached(c, MAIN, now)
        elif isinstance(event, Ended):
            self.main_ended = True
            if self.barrier is not None:
                self.barrier.closed(MAIN)
            self._fail_held_for_blocks(now, "the main stream ended without a RAM block list")

    # -- pre-copy VFIO data ------------------------------------------------------------------

    def _precopy_event(self, c: Connection, event: Event) -> None:
        """Pre-copy data goes to its device's writer in main-stream order; the device's
        loader takes idx 0 only once the main stream can bring no more of it.

        The earliest such point: ``MIG_CMD_SWITCHOVER_START`` (QEMU sends it once
        iterating is over, before any SECTION_END: no SECTION_PART follows); without
        it, the end of the device's SECTION_END (the last section it has on the
        main stream; with multifd device state it carries only END_OF_STATE), known
        when the next event comes; at the latest the first section that cannot be
        followed (no VFIO data is parsed past it) or the stream's end.
        """
        if isinstance(event, VfioData):
            key = DeviceKey(event.idstr, event.instance_id)
            if key not in self.config.devices:
                if key not in self._precopy_strays:
                    self._precopy_strays.add(key)
                    self._emit(StrayPrecopy(key))
                return
            if key not in self.precopy_pending:
                raise ProtocolError(
                    Reason.MAIN_VFIO,
                    "pre-copy VFIO data after the device's last section or the switchover: "
                    "its multifd data may be written already",
                    device=str(key),
                )
            nbytes = len(event.data)
            self.precopy_bytes[key] = self.precopy_bytes.get(key, 0) + nbytes
            self._queue(WritePrecopy(c.conn, key, event.data, nbytes), nbytes)
            return
        if self._precopy_last:
            self._open_precopy(self._precopy_last)
        if isinstance(event, Section):
            key = DeviceKey(event.idstr, event.instance_id)
            if key in self.precopy_pending and event.kind in (Record.SECTION_END, Record.SECTION_FULL):
                self._precopy_last.add(key)
        elif (
            isinstance(event, CommandEvent) and event.command == Command.SWITCHOVER_START
        ) or isinstance(event, Unfollowed | Ended):
            self._open_precopy(self.precopy_pending)

    def _open_precopy(self, devices: set[DeviceKey]) -> None:
        for key in list(devices):
            self.precopy_pending.discard(key)
            self._precopy_last.discard(key)
            if self.reassembly.devices[key].ready:
                self._wake(key)

    def _needs_ram(self, what: str) -> None:
        if not self.config.ram:
            raise ProtocolError(
                Reason.PACKET_RAM,
                f"the main stream carries {what}; give --ram DIR (or --ram discard) to take "
                "QEMU's RAM",
                device="main channel",
            )

    def _block_list(self, blocks: tuple[RamBlock, ...], now: float) -> None:
        if self.blocks is not None:
            raise ProtocolError(
                Reason.RAM_BLOCK, "a second RAM block list on the main stream", device="main channel"
            )
        self.blocks = {block.name: block for block in blocks}
        if self.config.ram:
            self._emit(CreateRamImages(blocks))
        for c in list(self.connections.channels.values()):
            raw = c.ram_raw
            if raw is not None and self._reading(c.conn) is not None:
                c.ram_raw = None
                buffer = self._ram_buffer(c, raw, now)
                if buffer is not None:
                    self._emit(ProvideBuffer(c.conn, buffer))
                    self._unhold(c, "blocks")

    def _fail_held_for_blocks(self, now: float, why: str) -> None:
        for c in list(self.connections.channels.values()):
            if c.ram_raw is not None and self._reading(c.conn) is not None:
                self._channel_failed(
                    c,
                    ProtocolError(
                        Reason.RAM_BLOCK, f"a RAM packet came before the block list, and {why}"
                    ),
                    now,
                )

    # -- RAM packets ------------------------------------------------------------------------

    def ram_header(self, conn: int, raw: bytes, now: float) -> bytearray | None:
        """A RAM packet's header: the buffer for its page data, or None (held until the
        block list comes, then :class:`ProvideBuffer`; or failed)."""
        c = self._reading(conn)
        if c is None:
            return None
        if self.blocks is None:
            c.ram_raw = raw
            self._hold(c, "blocks")
            return None
        return self._ram_buffer(c, raw, now)

    def _ram_buffer(self, c: Connection, raw: bytes, now: float) -> bytearray | None:
        assert self.blocks is not None
        try:
            packet = parse_ram_packet(raw, self.blocks, page_size=self.config.page_size)
        except MultifdError as error:
            self._channel_failed(c, error, now)
            return None
        c.ram_packet = packet
        return bytearray(packet.data_size)

    def ram_data(self, conn: int, buffer: bytearray, now: float) -> None:
        """The page data of ``conn``'s RAM packet: queued to the writer; then its sync point."""
        c = self._reading(conn)
        if c is None:
            return
        packet = c.ram_packet
        assert isinstance(packet, RamPacket)
        c.ram_packet = None
        c.packets += 1
        if packet.block is not None:
            name = packet.block.name
            view = memoryview(buffer)
            size = self.config.page_size
            pages: list[tuple[str, int, memoryview | int]] = [
                (name, offset, view[i * size : (i + 1) * size])
                for i, offset in enumerate(packet.normal)
            ]
            pages += [(name, offset, 0) for offset in packet.zero]
            self.ram_pages += len(packet.normal)
            self.ram_zero_pages += len(packet.zero)
            self._write(c, tuple(pages), b"")
        if packet.sync:
            assert c.channel is not None
            self._reached(c, c.channel, now)

    # -- sync points and the writer ---------------------------------------------------------

    def _reached(self, c: Connection, party: int, now: float) -> None:
        assert self.barrier is not None or party == MAIN
        if self.barrier is None:  # a main stream without --ram: nothing to wait for
            return
        try:
            released = self.barrier.reached(party)
        except ProtocolError as error:
            self._channel_failed(c, error, now)
            return
        if released is None:
            self._hold(c, "sync")
        else:
            self._release(released)

    def _release(self, released: Released) -> None:
        self.sync_points = released.number
        for party in released.parties:
            c = self.connections.main if party == MAIN else self.connections.channels.get(party)
            if c is not None:
                self._unhold(c, "sync")

    def _write(
        self, c: Connection, pages: tuple[tuple[str, int, memoryview | int], ...], main: bytes
    ) -> None:
        nbytes = len(main) + sum(len(data) for _, _, data in pages if not isinstance(data, int))
        last = self._commands[-1] if self._commands else None
        if (
            not main
            and isinstance(last, WriteRam)
            and last.conn == c.conn
            and not last.main
            and len(last.pages) + len(pages) <= PAGES_PER_WRITE
        ):
            # The main stream brings its pages one record at a time (QEMU 7.2 sends every
            # zero page there): those next to each other in the command list go to the
            # writer as one job, in the same order.
            self._commands[-1] = WriteRam(c.conn, last.pages + pages, b"", last.nbytes + nbytes)
            self._charge_ram(nbytes)
            return
        self._queue(WriteRam(c.conn, pages, main, nbytes), nbytes)

    def _queue(self, command: WriteRam | WritePrecopy, nbytes: int) -> None:
        """A write of main-stream or RAM bytes, charged until ``ram_written``."""
        self.ram_writes += 1
        self._emit(command)
        self._charge_ram(nbytes)

    def _charge_ram(self, nbytes: int) -> None:
        self.ram_queued += nbytes
        self.peak_ram_queued = max(self.peak_ram_queued, self.ram_queued)
        if self.ram_queued > self.layout.ram_hold_above:
            self.ram_full = True
            for other in self.connections.by_conn.values():
                if other.state is ChannelState.ACTIVE and not (other.hung_up or other.gone):
                    self._hold(other, "writes")

    def ram_written(self, conn: int, nbytes: int, now: float) -> None:
        """A :class:`WriteRam` is done."""
        self.ram_queued -= nbytes
        self.ram_writes -= 1
        if self.ram_full and self.ram_queued <= self.layout.ram_hold_above:
            self.ram_full = False
            for c in self.connections.by_conn.values():
                self._unhold(c, "writes")
        self._maybe_commit(now)

    def _hold(self, c: Connection, why: str) -> None:
        if not c.holds and not c.waiting:
            self._emit(PauseReading(c.conn))
        c.holds.add(why)

    def _unhold(self, c: Connection, why: str) -> None:
        if why not in c.holds:
            return
        c.holds.discard(why)
        if not c.holds and not c.waiting and not (c.hung_up or c.gone):
            self._emit(ResumeReading(c.conn))

    def _streams_done(self) -> bool:
        """QEMU's streams are over: every channel and the main stream ended cleanly and
        every page is written (a device-state-only migration: always)."""
        if not self.qemu_streams:
            return True
        return (
            self.connections.all_closed
            and (self.main_ended or not self.config.main_stream)
            and self.ram_writes == 0
        )

    def _channel_closed(self, c: Connection, now: float) -> None:
        """``c`` ended cleanly: it leaves no party waiting at a sync point."""
        if self.barrier is not None and c.channel is not None:
            try:
                self.barrier.closed(c.channel)
            except ProtocolError as error:
                self._fail(error.with_context(channel=c.channel), now)
        if c.ram_raw is not None:
            self._fail(
                ProtocolError(
                    Reason.RAM_BLOCK,
                    "a RAM packet came before the block list, and the channel ended",
                    channel=c.channel,
                ),
                now,
            )
