"""One migration, destination side: the asyncio driver of the migration core.

The core (``core/migration.py``) decides everything; this module does the
I/O. It listens (``listener.py``), feeds the core what each connection
decoded (it is every channel's :class:`~.channel.ChannelOwner`), what the
loaders wrote, what the spill file and the commit did, and the time; and it
carries out the commands the core returns, in order, in one place
(:meth:`Session._act`), which is also the one place the core's next deadline
is scheduled. :meth:`Session.run` opens the outputs, listens, runs the
loaders and, when the core says so, renames the outputs into place; on
failure it discards them and raises the core's error. Outputs become final
only when every device is complete (PROTOCOL.md 3.6).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from ..config import Address, ReceiveSettings
from ..core import commands as cmd
from ..core.config import MigrationConfig
from ..core.migration import Migration
from ..core.snapshot import MigrationSnapshot
from ..core.wire import ChannelHandshake, DevicePacket, PacketHeader
from ..errors import MultifdError, ProtocolError, Reason, SessionError
from ..logconfig import debug_enabled
from ..ops.recorder import Recorder
from ..results import SessionResult, SessionStatus, summarize
from . import commit as commit_module
from .channel import ChannelProtocol
from .listener import Listener
from .loader import DeviceLoader
from .output import device_outputs
from .pool import BufferPool
from .reader_threads import ReadElsewhere, ReaderThreads, default_reader_threads
from .spill import Spiller, spill_directory

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer as PayloadBuffer

    from ..core.reassembly import Chunk
    from ..core.wire import DeviceKey
    from ..tls import TlsServer

log = structlog.get_logger("vfio_multifd.session")

#: Where the commands for one connection go: its protocol, or its reader thread.
Endpoint = ChannelProtocol | ReadElsewhere


def _now() -> float:
    """The core's clock (monotonic; the same as the loop's for asyncio, finer than uvloop's)."""
    return time.monotonic()


class Session:
    def __init__(self, settings: ReceiveSettings) -> None:
        self.settings = settings
        # Credentials are read and checked now: a bad directory is a usage error (exit 2).
        self.tls: TlsServer | None = None
        if settings.tls is not None:
            from ..tls import load_server  # ssl: imported only for TLS channels

            self.tls = load_server(settings.tls)
        # TLS channels stay on the main loop, where their TLS layer is.
        threads = settings.reader_threads
        if threads is None:
            threads = default_reader_threads(settings.channels)
        self.readers = ReaderThreads(0 if self.tls is not None else threads)
        self.core = Migration(
            MigrationConfig.from_settings(settings, reader_threads=self.readers.count),
            BufferPool(),
        )
        self.spiller = Spiller(spill_directory(settings), max_bytes=settings.max_spill_bytes)
        self.loaders = {
            spec.key: DeviceLoader(
                spec.key,
                *device_outputs(spec, fsync=settings.fsync),
                digest=settings.digest,
                take=self.core.take_batch,
                release=self._written,
                read_spilled=self.spiller.read,
                write_failed=self.fail,
            )
            for spec in settings.devices
        }
        self.outputs = commit_module.OutputSet(list(self.loaders.values()))
        self.listener = Listener(expected=settings.channels, shed=self._shed)
        self.listening = asyncio.Event()
        #: Called with each new status (the status socket announces it as QMP's MIGRATION event).
        self.status_listeners: list[Callable[[SessionStatus], None]] = []
        #: --record DIR (the directory is checked now: a usage error, exit 2).
        self.recorder = None if settings.record is None else Recorder(settings)
        if self.recorder is not None:
            self.status_listeners.append(self.recorder.status_changed)
        #: Accepted channels by id (their protocols: the core keeps their state).
        self.channels: dict[int, ChannelProtocol] = {}
        self.log = log
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
        self._handlers: dict[type, Callable[[Any], None]] = {
            cmd.ProvideBuffer: self._provide_buffer,
            cmd.PauseReading: lambda c: self._endpoint_do(c.conn, "hold", True),
            cmd.ResumeReading: lambda c: self._endpoint_do(c.conn, "hold", False),
            cmd.Accepted: self._accepted,
            cmd.Refuse: self._refused,
            cmd.ResetConnection: lambda c: self._hang_up(c.conn, completed=False),
            cmd.CloseConnection: lambda c: self._hang_up(c.conn, completed=True),
            cmd.WakeLoader: lambda c: self.loaders[c.device].wake(),
            cmd.Spill: self._spill,
            cmd.WaitingForChannels: self._waiting_for_channels,
            cmd.Commit: self._commit_now,
            cmd.StatusChanged: self._status_changed,
            cmd.Finished: self._finished,
        }

    @property
    def address(self) -> Address | None:
        """Where the session listens, once it does (a port 0 resolved)."""
        return self.listener.address

    @property
    def status(self) -> SessionStatus:
        return self.core.status

    @property
    def error(self) -> MultifdError | None:
        return self.core.error

    def snapshot(self, now: float | None = None) -> MigrationSnapshot:
        """The migration as every output shows it (``now``: ``time.monotonic()``)."""
        return self.core.snapshot(_now() if now is None else now)

    # -- lifecycle ----------------------------------------------------------------

    async def run(self) -> SessionResult:
        """Receive the whole migration. Raises a :class:`MultifdError` on failure."""
        loop = self._loop = asyncio.get_running_loop()
        self._failed = loop.create_future()
        self._commit = loop.create_future()
        if self.core.error is not None:  # cancelled or failed before run()
            self._failed.set_result(self.core.error)
        if self.recorder is not None:
            self.recorder.start()
        result: SessionResult | None = None
        try:
            result = await self._run()
            return result
        finally:
            if self.recorder is not None:  # for failed and cancelled migrations too
                devices = () if result is None else result.devices
                await self.recorder.finish(self.status, self.error, self.address, devices)

    async def _run(self) -> SessionResult:
        assert self._failed is not None and self._commit is not None
        try:
            await self.outputs.open(self._failed, timeout=self.settings.accept_timeout)
            if self.core.layout.staging:
                self.spiller.check_directory()
            await self._listen()
            for loader in self.loaders.values():
                self._spawn(self._load(loader), f"loader {loader.key}")
            decided: list[asyncio.Future[Any]] = [self._failed, self._commit]
            await asyncio.wait(decided, return_when=asyncio.FIRST_COMPLETED)
            if self._failed.done():
                raise self._failed.result()
            await self._commit_outputs()
            return self._result()
        except BaseException as error:
            self._decide(error)
            await self.outputs.discard()
            raise
        finally:
            await self._stop()

    def _decide(self, error: BaseException) -> None:
        """An error raised here (not reported to the core) ends the migration too."""
        if isinstance(error, asyncio.CancelledError):  # cancelled from outside
            self.core.cancel("cancelled", _now())
        elif isinstance(error, MultifdError):
            self.core.fail(error, _now())
        else:  # a bug: fail loudly, still cleanly
            self.log.error("internal_error", exc_info=error)
            self.core.fail(SessionError(Reason.INTERNAL, f"internal error: {error!r}"), _now())
        self._act()

    async def _stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.listener.stop()
        await self.readers.stop()  # after the hang-ups: they go first
        self.outputs.close()
        self.spiller.close()
        self.listener.remove_socket()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.core.stopped_at(_now())
        self._act()

    async def _commit_outputs(self) -> None:
        """Rename every output into place on a worker thread, all or none.

        Cancelling this (the task running :meth:`run`) waits for the commit to
        end first: the abort that follows must not remove the very files the
        thread is renaming. The cancellation is then raised all the same; the
        outputs are either all in place (status ``completed``) or all as before.
        """
        self.outputs.committing = True
        loop = asyncio.get_running_loop()
        commit = loop.run_in_executor(None, self.outputs.commit)
        try:
            await asyncio.shield(commit)
        except asyncio.CancelledError:
            while not commit.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([commit])
            if not commit.cancelled() and commit.exception() is None:
                self.core.committed(_now())
                self._act()
            raise
        except MultifdError as error:
            self.core.commit_failed(error, _now())
            self._act()
            raise
        self.core.committed(_now())
        self._act()

    async def _listen(self) -> None:
        self.readers.start()
        tls = self.tls
        wrap = None
        if tls is not None:
            from .tls_channel import TlsServerProtocol

            wrap = functools.partial(TlsServerProtocol, tls)
        address = await self.listener.listen(self.settings.listen, self.connection, wrap)
        self.core.listening(str(address), _now())
        self._act()
        self.log.info(
            "listening",
            address=str(address),
            channels=self.settings.channels,
            devices=[str(spec.key) for spec in self.settings.devices],
            tls=tls is not None,
            reader_threads=self.readers.count,
        )
        self.listening.set()

    def connection(self, peer: str) -> ChannelProtocol:
        """A new connection's protocol (the listener's factory), known to the core."""
        conn = next(self._conn_ids)
        settings = self.settings
        if self.recorder is None:
            channel = ChannelProtocol(
                self, conn, peer=peer, max_packet_size=settings.max_packet_size
            )
        else:
            channel = self.recorder.channel(
                self, conn, peer=peer, max_packet_size=settings.max_packet_size
            )
        self._connections[conn] = channel
        self._endpoints[conn] = channel
        self._feed(self.core.connection_made, conn, peer, _now())
        return channel

    async def _load(self, loader: DeviceLoader) -> None:
        try:
            await loader.run()
        except MultifdError as error:
            self.fail(error)
        except Exception as error:  # a bug: reported cleanly all the same
            self.log.error("internal_error", exc_info=error)
            self.fail(SessionError(Reason.INTERNAL, f"internal error: {error!r}"))

    def _spawn(self, coroutine: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- what outside asks -------------------------------------------------------------

    def cancel(self, why: str = "cancelled", *, signal_number: int | None = None) -> None:
        """Stop the migration; too late once every device is complete (then it is ignored)."""
        if not self.core.cancel(why, _now(), signal_number=signal_number):
            self.log.info("cancel_ignored", status=self.status.value, why=why)
        self._act()

    def fail(self, error: BaseException) -> None:
        """A writer, a loader or the spill file failed: the migration fails."""
        if not isinstance(error, MultifdError):  # a bug rather than an I/O error
            error = SessionError(Reason.INTERNAL, f"writer failed: {error!r}")
        self._feed(self.core.fail, error, _now())

    # -- what channels tell (channel.ChannelOwner) ------------------------------------------

    def _feed(self, method: Callable[..., Any], *args: Any) -> Any:
        """One input to the core, then its commands carried out; a bug in either fails
        the migration cleanly rather than escaping into the event loop."""
        try:
            result = method(*args)
        except Exception as error:
            self.log.error("internal_error", exc_info=error)
            self.core.fail(SessionError(Reason.INTERNAL, f"internal error: {error!r}"), _now())
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
            _now(),
        )

    def header(self, channel: ChannelProtocol, header: PacketHeader) -> PayloadBuffer | None:
        buffer: PayloadBuffer | None = self._feed(self.core.header, channel.conn, header, _now())
        return buffer

    def packet(self, channel: ChannelProtocol, packet: DevicePacket) -> None:
        if self._trace_incoming:
            channel.log.debug(
                "buffer_incoming", device=str(packet.device), idx=packet.idx, size=packet.size
            )
        self._feed(self.core.packet, channel.conn, packet, _now())

    def decode_error(self, channel: ChannelProtocol, error: ProtocolError) -> None:
        self._feed(self.core.decode_error, channel.conn, error, _now())

    def eof(self, channel: ChannelProtocol) -> None:
        self._feed(self.core.eof, channel.conn, _now())
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
            self._feed(functools.partial(self.core.lost, truncated=truncated), conn, exc, _now())
        self.listener.closed(conn)
        self._endpoints.pop(conn, None)
        self._connections.pop(conn, None)

    def _shed(self, why: str) -> None:
        self._feed(self.core.shed_oldest, why)

    def _written(self, device: DeviceKey, chunks: list[Chunk]) -> None:
        self._feed(self.core.written, device, chunks, _now())

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
            self._timer = loop.call_later(max(0.0, deadline - _now()), self._tick)

    def _tick(self) -> None:
        self._timer = self._timer_at = None
        self._feed(self.core.tick, _now())

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
        self.listener.log_refusal(channel, command.error)
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
        self._feed(self.core.spilled, chunk, ref, _now())

    def _waiting_for_channels(self, command: cmd.WaitingForChannels) -> None:
        self.log.warning(
            "waiting_for_channels",
            connected=command.connected,
            channels=self.settings.channels,
            missing=list(command.missing),
            why="every device is complete, but a migration needs all its channels",
        )

    def _commit_now(self, command: cmd.Commit) -> None:
        if self._commit is not None and not self._commit.done():
            self._commit.set_result(None)

    def _status_changed(self, command: cmd.StatusChanged) -> None:
        self.log.info("state_change", old=command.old.value, new=command.new.value)
        for listener in list(self.status_listeners):
            listener(command.new)

    def _finished(self, command: cmd.Finished) -> None:
        self.listener.stop()
        self.listener.log_suppressed(self.core.connections.refused_count)
        error = command.error
        if error is not None and self._failed is not None and not self._failed.done():
            self._failed.set_result(error)

    # -- the result ---------------------------------------------------------------------------

    def _result(self) -> SessionResult:
        snapshot = self.snapshot()
        tls_subjects = None
        if self.tls is not None:
            tls_subjects = {c.id: c.tls_subject for c in snapshot.channels if c.id is not None}
        result = summarize(snapshot, list(self.loaders.values()), tls_subjects=tls_subjects)
        self.log.info("migration_completed", **result.log_fields())
        return result

