"""The migration core's driver on the event loop: events in, commands carried out.

:class:`Driver` is every channel's :class:`~.channel.ChannelOwner`: what a
connection decoded goes to the core (``core/migration.py``) with the time,
by a plain call, and then every command the core returns is carried out, in
order, in one place (:meth:`Driver._act`), which is also the one place the
core's next deadline is scheduled. The session (``session.py``) is a driver
that also runs the migration's lifecycle. QEMU's own streams (its main channel,
RAM packets) are the part in ``driver_qemu.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import structlog

from ..config import ReceiveSettings
from ..core import commands as cmd
from ..core.migration import Migration
from ..core.watchdog import MissingChannels
from ..core.wire import ChannelHandshake, DevicePacket, PacketHeader
from ..errors import MultifdError, ProtocolError, Reason, SessionError, UsageError
from ..logconfig import debug_enabled
from ..ops.recorder import Recorder
from ..results import SessionStatus
from .channel import ChannelProtocol
from .driver_qemu import QemuStreamsDriver, clock
from .listener import Listener
from .loader import DeviceLoader
from .reader_threads import ReadElsewhere, ReaderThreads
from .spill import Spiller

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer as PayloadBuffer

    from ..core.reassembly import Chunk
    from ..core.wire import DeviceKey
    from ..tls import TlsServer
    from .ram_sink import RamSink


log = structlog.get_logger("vfio_multifd.session")

# clock is driver_qemu's (that part of the driver needs it too); the session takes it here.
__all__ = ["Driver", "Endpoint", "clock"]

#: Where the commands for one connection go: its protocol, or its reader thread.
Endpoint = ChannelProtocol | ReadElsewhere


class Driver(QemuStreamsDriver):
    # What it drives: set by the session before _start_driving().
    settings: ReceiveSettings
    core: Migration
    listener: Listener
    readers: ReaderThreads
    loaders: dict[DeviceKey, DeviceLoader]
    spiller: Spiller
    recorder: Recorder | None
    tls: TlsServer | None
    status_listeners: list[Callable[[SessionStatus], None]]
    channels: dict[int, ChannelProtocol]
    ram_sink: RamSink | None
    log: Any

    def _start_driving(self) -> None:
        self._connections: dict[int, ChannelProtocol] = {}  # every connection, by conn id
        self._endpoints: dict[int, Endpoint] = {}
        self._conn_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failed: asyncio.Future[MultifdError] | None = None  # the core's Finished, failed
        self._commit: asyncio.Future[None] | None = None  # the core's Commit
        self._acting = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # loaders and spills
        # QEMU's trace point vfio_load_state_device_buffer_incoming, per packet:
        # decided once here, so a disabled debug level costs one test per packet.
        self._trace_incoming = debug_enabled(log)
        self._start_qemu_streams()
        self._handlers: dict[type, Callable[[Any], None]] = {
            cmd.ProvideBuffer: self._provide_buffer,
            cmd.PauseReading: lambda c: self._endpoint_do(c.conn, "hold", True),
            cmd.ResumeReading: self._resume_reading,
            cmd.Accepted: self._accepted,
            cmd.AcceptedMain: self._accepted_main,
            cmd.CreateRamImages: self._create_ram_images,
            cmd.WriteRam: self._write_ram,
            cmd.Refuse: self._refused,
            cmd.ResetConnection: lambda c: self._hang_up(c.conn, completed=False),
            cmd.CloseConnection: lambda c: self._hang_up(c.conn, completed=True),
            cmd.WakeLoader: lambda c: self.loaders[c.device].wake(),
            cmd.WritePrecopy: self._write_precopy,
            cmd.StrayPrecopy: lambda c: self.log.warning(
                "precopy_not_kept",
                device=str(c.device),
                why="pre-copy VFIO data of a device that is no --device: kept in the main "
                "stream only",
            ),
            cmd.Spill: self._spill,
            cmd.WaitingForChannels: self._waiting_for_channels,
            MissingChannels: self._missing_channels,
            cmd.Commit: self._commit_now,
            cmd.StatusChanged: self._status_changed,
            cmd.Finished: self._finished,
        }

    def _spawn(self, coroutine: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def fail(self, error: BaseException) -> None:
        """A writer, a loader or the spill file failed: the migration fails."""
        if not isinstance(error, MultifdError):  # a bug rather than an I/O error
            error = SessionError(Reason.INTERNAL, f"writer failed: {error!r}")
        self._feed(self.core.fail, error, clock())

    # -- what channels tell (channel.ChannelOwner) ------------------------------------------

    def _feed(self, method: Callable[..., Any], *args: Any) -> Any:
        """One input to the core, then its commands carried out; a bug in either fails
        the migration cleanly rather than escaping into the event loop."""
        try:
            result = method(*args)
        except Exception as error:
            self.log.error("internal_error", exc_info=error)
            self.core.fail(SessionError(Reason.INTERNAL, f"internal error: {error!r}"), clock())
            result = None
        self._act()
        return result

    def received(self, channel: ChannelProtocol, nbytes: int) -> None:
        self.core.received(channel.conn, nbytes)

    def handshake(self, channel: ChannelProtocol, handshake: ChannelHandshake) -> None:
        subject = None
        if self.tls is not None:
            from .tls_channel import tls_of

            tls = tls_of(channel.transport)
            subject = None if tls is None else tls.get_extra_info("peer_subject")
        self._feed(
            functools.partial(self.core.handshake, tls_subject=subject),
            channel.conn,
            handshake,
            clock(),
        )

    def header(self, channel: ChannelProtocol, header: PacketHeader) -> PayloadBuffer | None:
        buffer: PayloadBuffer | None = self._feed(self.core.header, channel.conn, header, clock())
        return buffer

    def packet(self, channel: ChannelProtocol, packet: DevicePacket) -> None:
        if self._trace_incoming:
            channel.log.debug(
                "buffer_incoming", device=str(packet.device), idx=packet.idx, size=packet.size
            )
        self._feed(self.core.packet, channel.conn, packet, clock())

    def decode_error(self, channel: ChannelProtocol, error: ProtocolError) -> None:
        self._feed(self.core.decode_error, channel.conn, error, clock())

    def eof(self, channel: ChannelProtocol) -> None:
        if channel.conn == self._main_conn and self._main_parser is not None:
            self._main_parser.eof()
            self._main_eof = True
            self._drain_main()
        else:
            self._feed(self.core.eof, channel.conn, clock())
        connection = self.core.connections.by_conn.get(channel.conn)
        if connection is not None and connection.state.value == "closed":
            channel.log.info(
                "channel_closed", bytes=connection.received, packets=connection.packets
            )

    def lost(
        self, channel: ChannelProtocol, exc: BaseException | None, truncated: ProtocolError | None
    ) -> None:
        conn = channel.conn
        if self.recorder is not None:
            self.recorder.lost(channel, exc)
        if channel.transport is None:  # never connected (the peer left during set-up)
            self._feed(self.core.dropped, conn)
        else:
            self._feed(functools.partial(self.core.lost, truncated=truncated), conn, exc, clock())
        self.listener.closed(conn)
        self._endpoints.pop(conn, None)
        self._connections.pop(conn, None)

    def _shed(self, why: str) -> None:
        self._feed(self.core.shed_oldest, why)

    def _written(self, device: DeviceKey, chunks: list[Chunk]) -> None:
        self._feed(self.core.written, device, chunks, clock())

    # -- carrying out the core's commands ------------------------------------------------------

    def _act(self) -> None:
        """Carry out every command the core has, in order; then schedule its next tick.
        Commands that feed the core again (a 0-byte payload completing at once) queue
        theirs behind: the outer call carries them out, so the order holds."""
        if self._acting:
            return
        self._acting = True
        try:
            while commands := self.core.pop_commands():
                for command in commands:
                    self._handlers[type(command)](command)
            self._schedule()
        finally:
            self._acting = False

    @contextlib.contextmanager
    def _acting_together(self) -> Iterator[None]:
        """The inputs fed inside have their commands carried out together, at the end (or
        by the ``_act`` this runs inside): writes that wait side by side can merge."""
        outer, self._acting = self._acting, True
        try:
            yield
        finally:
            self._acting = outer
            self._act()

    def _schedule(self) -> None:
        loop = self._loop
        deadline = self.core.next_deadline()
        if loop is None or deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = None
        if deadline is not None:
            self._timer = loop.call_later(max(0.0, deadline - clock()), self._tick)

    def _tick(self) -> None:
        self._timer = self._timer_at = None
        self._feed(self.core.tick, clock())

    def _endpoint_do(self, conn: int, what: str, *args: Any) -> None:
        endpoint = self._endpoints.get(conn)
        if endpoint is not None:
            getattr(endpoint, what)(*args)

    def _provide_buffer(self, command: cmd.ProvideBuffer) -> None:
        self._endpoint_do(command.conn, "provide_buffer", command.buffer)

    def _hang_up(self, conn: int, *, completed: bool) -> None:
        endpoint = self._endpoints.get(conn)
        if endpoint is not None:
            endpoint.close(completed=completed)

    def _accepted(self, command: cmd.Accepted) -> None:
        channel = self._connections[command.conn]
        channel.accepted(command.channel)
        self.channels[command.channel] = channel
        if self.recorder is not None:  # before anything else may read the channel
            self.recorder.accepted(channel, command.channel)
        if self.readers.count:  # once this read's events are in: its socket moves
            channel.after_accept = self._hand_off

    def _resume_reading(self, command: cmd.ResumeReading) -> None:
        self._endpoint_do(command.conn, "hold", False)
        if command.conn == self._main_conn:
            self._drain_main()

    def _hand_off(self, channel: ChannelProtocol) -> None:
        connection = self.core.connections.by_conn.get(channel.conn)
        if connection is None or connection.hung_up or connection.gone:
            return  # it failed in the very read that accepted it
        elsewhere = self.readers.hand_off(channel)
        if elsewhere is not None and channel.conn in self._endpoints:
            self._endpoints[channel.conn] = elsewhere

    def _refused(self, command: cmd.Refuse) -> None:
        channel = self._connections.get(command.conn)
        if channel is None:
            return
        self.listener.log_refusal(channel, command.error, late=command.late)
        if self.recorder is not None:
            self.recorder.refused(channel, command.error)
        self._hang_up(command.conn, completed=False)

    def _spill(self, command: cmd.Spill) -> None:
        self._spawn(self._write_spill(command.chunk), f"spill {command.chunk.idx}")

    async def _write_spill(self, chunk: Chunk) -> None:
        try:
            ref = await self.spiller.write(chunk.data, chunk.device, chunk.idx, chunk.channel)
        except MultifdError as error:
            self.fail(error)
            return
        self._feed(self.core.spilled, chunk, ref, clock())

    def _waiting_for_channels(self, command: cmd.WaitingForChannels) -> None:
        self.log.warning(
            "waiting_for_channels",
            connected=command.connected,
            channels=self.settings.channels,
            missing=list(command.missing),
            why="every device is complete, but a migration needs all its channels",
        )

    def _missing_channels(self, warning: MissingChannels) -> None:
        self.log.warning(
            "missing_channels",
            channels=warning.channels,
            missing=list(warning.missing),
            fail_in=warning.grace,
            why=warning.text,
        )

    def _commit_now(self, command: cmd.Commit) -> None:
        if self._commit is not None and not self._commit.done():
            self._commit.set_result(None)

    def _status_changed(self, command: cmd.StatusChanged) -> None:
        # A usage error is reported by the command line itself (exit 2): no migration
        # had started, so no state_change line says it failed.
        if not isinstance(self.core.error, UsageError):
            self.log.info("state_change", old=command.old.value, new=command.new.value)
        for listener in list(self.status_listeners):
            listener(command.new)

    def _finished(self, command: cmd.Finished) -> None:
        self.listener.stop()
        self.listener.log_suppressed(self.core.connections.refused_count)
        error = command.error
        if error is not None and self._failed is not None and not self._failed.done():
            self._failed.set_result(error)
