"""The migration's state machine: decoded events and the time in, commands out.

No I/O and no clock of its own, in the manner of aioquic's connection: a
driver feeds it what happened on its connections (``connection_made``,
``handshake``, ``header``, ``packet``, ``eof``, ``lost``...), what its loaders
and spill file did (``written``, ``spilled``, ``committed``) and the time
(``tick(now)`` at :meth:`Migration.next_deadline`), and carries out what
:meth:`Migration.pop_commands` returns. Everything that decides the outcome
lives here: which connections are accepted or refused, what a header may
announce (checked once, when the header is complete), whether its payload
gets memory now, waits, or spills, when every device is complete, and the
first error, which wins.

A new kind of connection or packet is one more input here and one more
handler beside ``handshake`` / ``header`` / ``packet``; the drivers only
decode and pass it on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import Cancelled, HandshakeError, MultifdError, ProtocolError, Reason
from ..results import SessionStatus
from .commands import (
    Accepted,
    CloseConnection,
    Command,
    Commit,
    Finished,
    PauseReading,
    ProvideBuffer,
    Refuse,
    ResetConnection,
    ResumeReading,
    Spill,
    StatusChanged,
    WaitingForChannels,
    WakeLoader,
)
from .connections import EXPLAINED_BY_REFUSALS, Connection, Connections
from .ledger import BufferSource, Ledger, MemoryLayout
from .memory import SPILL_GRACE, Fail, SpillIncoming, SpillVictim, Wait
from .reassembly import Chunk, ChunkState
from .snapshot import MigrationSnapshot, build_snapshot
from .state import ChannelState, Phase
from .watchdog import PERIOD, Sample, Watchdog
from .wire import HANDSHAKE, ChannelHandshake, DeviceKey, DevicePacket, PacketHeader

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer as PayloadBuffer

    from ..config import ReceiveSettings


@dataclass(frozen=True, slots=True)
class MigrationConfig:
    devices: tuple[DeviceKey, ...]
    channels: int
    uuid: bytes = bytes(16)
    max_payload_size: int = 1 << 20
    max_queued_bytes: int | None = None
    fail_when_full: bool = False
    handshake_timeout: float = 10.0
    max_pending: int = 64
    accept_timeout: float | None = None
    progress_timeout: float | None = None
    tls: bool = False
    reader_threads: int = 0
    spill_grace: float = SPILL_GRACE

    @classmethod
    def from_settings(cls, settings: ReceiveSettings, *, reader_threads: int) -> MigrationConfig:
        return cls(
            devices=tuple(spec.key for spec in settings.devices),
            channels=settings.channels,
            uuid=settings.uuid,
            max_payload_size=settings.max_payload_size,
            max_queued_bytes=settings.max_queued_bytes,
            fail_when_full=settings.on_queue_full.value == "fail",
            handshake_timeout=settings.handshake_timeout,
            max_pending=settings.max_pending_connections,
            accept_timeout=settings.accept_timeout,
            progress_timeout=settings.progress_timeout,
            tls=settings.tls is not None,
            reader_threads=reader_threads,
        )


class Migration:
    def __init__(self, config: MigrationConfig, buffers: BufferSource) -> None:
        self.config = config
        self.layout = MemoryLayout.of(
            config.max_queued_bytes,
            max_payload_size=config.max_payload_size,
            fail_when_full=config.fail_when_full,
        )
        self.reassembly = self.layout.reassembly(config.devices)
        self.ledger = Ledger(
            self.reassembly,
            self.layout,
            buffers,
            fail_when_full=config.fail_when_full,
            grace=config.spill_grace,
        )
        self.connections = Connections(
            channels=config.channels, uuid=config.uuid, max_pending=config.max_pending
        )
        self.phase = Phase.SETUP
        self.error: MultifdError | None = None
        self.stopped = False  # the driver has cleaned up after the outcome
        self.address: str | None = None
        self.started: float | None = None  # the first channel accepted
        self.finished: float | None = None
        self._commands: list[Command] = []
        # Connections whose header waits for memory, in the order they began to.
        self._waiting: dict[int, Connection] = {}
        self._pause_started = 0.0
        self._paused_seconds = 0.0  # with at least one of them waiting
        self._idle_loaders: set[DeviceKey] = set(config.devices)  # woken when ready
        self._completed_at: dict[DeviceKey, float] = {}
        self._told_missing = False
        self._watchdog: Watchdog | None = None
        self._next_sample = 0.0

    # -- outputs ---------------------------------------------------------------------

    def pop_commands(self) -> list[Command]:
        commands, self._commands = self._commands, []
        return commands

    def next_deadline(self) -> float | None:
        """When :meth:`tick` must be called next (the clock of the ``now`` given)."""
        deadlines = [
            c.handshake_deadline
            for c in self.connections.pending.values()
            if c.handshake_deadline is not None
        ]
        deadlines += [
            c.wait_deadline for c in self._waiting.values() if c.wait_deadline is not None
        ]
        if self._watched():
            deadlines.append(self._next_sample)
        return min(deadlines, default=None)

    # -- connections -------------------------------------------------------------------

    def listening(self, address: str, now: float) -> None:
        self.address = address
        self._watchdog = Watchdog(
            channels=self.config.channels,
            accept_timeout=self.config.accept_timeout,
            progress_timeout=self.config.progress_timeout,
            now=now,
        )
        self._next_sample = now + PERIOD

    def connection_made(self, conn: int, peer: str, now: float) -> None:
        connections = self.connections
        if len(connections.pending) >= connections.max_pending:
            self.shed_oldest(f"more than {connections.max_pending} connections without a handshake")
        connections.add(conn, peer, now + self.config.handshake_timeout)

    def dropped(self, conn: int) -> None:
        """``conn``'s socket never became a connection (the peer left during its set-up,
        or we stopped listening): forgotten, not refused."""
        c = self.connections.by_conn.get(conn)
        if c is not None and c.state is ChannelState.HANDSHAKE:
            c.hung_up = True
            self.connections.pending.pop(conn, None)
            self.connections.forget(c)

    def shed_oldest(self, why: str) -> None:
        """Refuse the connection that has waited longest for its handshake."""
        oldest = self.connections.oldest_pending()
        if oldest is not None:
            self._refuse(
                oldest,
                HandshakeError(
                    Reason.HANDSHAKE_SHED,
                    f"no complete handshake yet, dropped to make room ({why})",
                ),
            )

    def received(self, conn: int, nbytes: int) -> None:
        """``nbytes`` more came on ``conn`` (progress, and the handshake timeout's message)."""
        c = self.connections.by_conn.get(conn)
        if c is not None:
            c.received += nbytes

    def handshake(
        self, conn: int, handshake: ChannelHandshake, now: float, *, tls_subject: str | None = None
    ) -> None:
        c = self.connections.by_conn.get(conn)
        if c is None or c.state is not ChannelState.HANDSHAKE or c.hung_up:
            return
        c.tls_subject = tls_subject
        try:
            if not self.phase.running:
                raise HandshakeError(
                    Reason.HANDSHAKE_CLOSED, "the migration no longer takes channels"
                )
            self.connections.accept(c, handshake)
        except HandshakeError as error:
            self._refuse(c, error)
            return
        self._emit(Accepted(conn, handshake.channel_id))
        if self.started is None:
            self.started = now
            self._set_phase(Phase.ACTIVE, now)
        self._maybe_commit(now)

    def decode_error(self, conn: int, error: ProtocolError, now: float) -> None:
        """``conn``'s decoder stopped on bad input (after every event before it)."""
        c = self.connections.by_conn.get(conn)
        if c is None or c.hung_up:
            return
        if c.state is ChannelState.HANDSHAKE and isinstance(error, HandshakeError):
            self._refuse(c, error)
        elif c.state is ChannelState.ACTIVE:
            self._channel_failed(c, error, now)

    def eof(self, conn: int, now: float) -> None:
        """A clean end of stream, at a packet boundary. The connection stays open
        (half-closed) until the outcome is known: its close is the source's verdict."""
        c = self._reading(conn)
        if c is None:
            return
        c.state = ChannelState.CLOSED
        self._check_all_closed(now)

    def _check_all_closed(self, now: float) -> None:
        """Once every channel ended, every device must be able to finish (an arrival
        on its way to the spill file still counts: its check waits for ``spilled``)."""
        if self.connections.all_closed and not self.ledger.staging_busy:
            error = self.reassembly.incomplete_error(f"all {self.config.channels} channels closed")
            if error is not None:
                self._fail(error, now)

    def lost(
        self,
        conn: int,
        exc: BaseException | None,
        now: float,
        *,
        truncated: ProtocolError | None = None,
    ) -> None:
        """``conn``'s socket is closed. ``truncated``: the decoder's error for a stream
        cut inside a packet (it names the device and idx)."""
        c = self.connections.by_conn.get(conn)
        if c is None or c.gone:
            return
        c.gone = True  # nothing left to hang up on
        if c.state is ChannelState.HANDSHAKE:
            if c.hung_up:  # we hung up on it: nothing of its own to report
                c.state = ChannelState.REFUSED
            elif isinstance(exc, HandshakeError):  # the transport says why (a TLS handshake)
                self._refuse(c, exc)
            else:
                self._refuse(
                    c,
                    HandshakeError(
                        Reason.HANDSHAKE_CLOSED,
                        f"connection closed inside the handshake ({exc or 'reset'})",
                    ),
                )
        elif c.state is ChannelState.ACTIVE and not c.hung_up:
            if truncated is not None:
                truncated.message += f" (connection lost: {exc or 'reset'})"
                error = truncated
            else:
                error = ProtocolError(
                    Reason.PACKET_TRUNCATED,
                    f"connection lost before the end of the stream: {exc or 'reset'}",
                )
            self._channel_failed(c, error, now)
        self._forget_payload(c, now)
        self.connections.forget(c)

    # -- packets ---------------------------------------------------------------------------

    def header(self, conn: int, header: PacketHeader, now: float) -> PayloadBuffer | None:
        """A header is complete: its payload's buffer, or None while it waits for memory
        (then reading pauses, and :class:`ProvideBuffer` comes later) or failed.

        What the header announces is checked here, once: its idx is reserved, so a
        second header for it is refused at once, whichever payload comes first.
        """
        c = self._reading(conn)
        if c is None:
            return None
        try:
            self.reassembly.announce(header, c.channel)
            c.header = header
            buffer = self._admit(c, now)
        except MultifdError as error:
            self._channel_failed(c, error, now)
            return None
        if buffer is None and c.state is ChannelState.ACTIVE and self.phase.running:
            self._start_waiting(c, now)
            self._emit(PauseReading(conn))
        return buffer

    def packet(self, conn: int, packet: DevicePacket, now: float) -> None:
        """A payload is complete: its chunk joins its device's queue."""
        c = self._reading(conn)
        if c is None:
            return
        c.packets += 1
        c.header = None
        if self.ledger.is_staging(packet.buffer):  # bound straight for the spill file
            chunk = Chunk(
                packet.device,
                packet.idx,
                packet.size,
                packet.config,
                packet.buffer,
                ChunkState.SPILLING,
                channel=c.channel,
            )
            self._emit(Spill(chunk))
            return
        c.charged = 0  # the chunk holds the charge now
        self.reassembly.insert(packet, c.channel, allocated=True, announced=True)
        if self.reassembly.devices[packet.device].ready:
            self._wake(packet.device)
            if self._waiting:
                self._memory_changed(now)  # memory just became drainable

    # -- loaders and the spill file ----------------------------------------------------------

    def take_batch(self, device: DeviceKey, max_bytes: int) -> list[Chunk]:
        """``device``'s next consecutive chunks (about ``max_bytes``), or [] until
        :class:`WakeLoader`. The config chunk always comes alone."""
        queue = self.reassembly.devices[device]
        if not queue.ready:
            self._idle_loaders.add(device)
            return []
        return self.reassembly.take(queue, max_bytes)

    def written(self, device: DeviceKey, chunks: list[Chunk], now: float) -> None:
        """A loader wrote ``chunks`` (the config chunk: the device is complete)."""
        self.ledger.release_written(chunks)
        if any(chunk.config for chunk in chunks):
            self._completed_at[device] = now
        if self._waiting:
            self._memory_changed(now)
        self._maybe_commit(now)

    def spilled(self, chunk: Chunk, ref: object, now: float) -> None:
        """``chunk`` (a :class:`Spill`'s) is in the spill file at ``ref``."""
        if self.ledger.is_staging(chunk.buffer):
            self.ledger.release_staging()
            if self.phase.ended:  # its channel's reservation may be gone: so is the migration
                return
            arrived = DevicePacket(chunk.device, chunk.idx, chunk.config, b"", chunk.size)
            self.reassembly.insert_spilled(arrived, ref, chunk.channel, announced=True)
            self._check_all_closed(now)
        else:
            self.ledger.spill_done(chunk, ref)
        if self.reassembly.devices[chunk.device].ready:
            self._wake(chunk.device)
        if self._waiting:
            owner = next((c for c in self._waiting.values() if c.victim is chunk), None)
            self._memory_changed(now, first=owner)

    # -- the outcome -----------------------------------------------------------------------

    def fail(self, error: MultifdError, now: float) -> None:
        """An error from the driver's side (a write, the spill file, a bug) ends the migration."""
        if error.channel is not None:  # what that channel announced will never come
            self.reassembly.channel_failed(error.channel)
        self._fail(error, now)

    def cancel(self, why: str, now: float, *, signal_number: int | None = None) -> bool:
        """Stop the migration; False (ignored) once the outcome is decided or committing."""
        if not self.phase.running:
            return False
        self._fail(Cancelled(why, signal_number=signal_number), now)
        return True

    def committed(self, now: float) -> None:
        """Every output is in place: only now does a source see a clean close."""
        if self.phase is not Phase.COMMITTING:
            return
        self._set_phase(Phase.COMPLETED, now)
        for c in self.connections.live():
            self._hang_up(c, completed=True)
        self._emit(Finished(Phase.COMPLETED, None))

    def commit_failed(self, error: MultifdError, now: float) -> None:
        if self.phase is Phase.COMMITTING:
            self._decide(error, now)

    def stopped_at(self, now: float) -> None:
        """The driver has cleaned up (outputs discarded): a cancel is now ``cancelled``."""
        if self.phase.ended and not self.stopped:
            old = self.status
            self.stopped = True
            self._status_changed(old, now)
            # Whatever connected since the outcome was decided goes too.
            for c in self.connections.live():
                self._hang_up(c, completed=self.phase is Phase.COMPLETED, why=self.error)

    @property
    def status(self) -> SessionStatus:
        return self.phase.status(stopped=self.stopped)

    def tick(self, now: float) -> None:
        """Time passed: handshakes and memory waits that ran out, and the watchdog."""
        for c in list(self.connections.pending.values()):
            if c.handshake_deadline is not None and c.handshake_deadline <= now:
                self._refuse(
                    c,
                    HandshakeError(
                        Reason.HANDSHAKE_TIMEOUT,
                        f"no complete handshake within {self.config.handshake_timeout:g} s "
                        f"({c.received} of {HANDSHAKE.size} bytes)",
                    ),
                )
        for c in list(self._waiting.values()):
            if c.waiting and c.wait_deadline is not None and c.wait_deadline <= now:
                c.wait_deadline = None  # a grace ran out with nothing changed
                self.ledger.wait_expired()
                self._retry(c, now)
        if self._watched() and now >= self._next_sample:
            assert self._watchdog is not None
            self._next_sample = now + PERIOD
            error = self._watchdog.check(self._sample(), now)
            if error is not None:
                self._fail(error, now)

    # -- inside -------------------------------------------------------------------------------

    def _emit(self, command: Command) -> None:
        self._commands.append(command)

    def _reading(self, conn: int) -> Connection | None:
        """``conn`` if it is an accepted channel still read (not ended, failed or hung up)."""
        c = self.connections.by_conn.get(conn)
        if c is None or c.state is not ChannelState.ACTIVE or c.hung_up:
            return None
        return c

    def _refuse(self, c: Connection, error: HandshakeError) -> None:
        if c.state is not ChannelState.HANDSHAKE:
            return
        self.connections.refuse(c, error, late=self.phase in (Phase.FAILED, Phase.CANCELLED))
        c.hung_up = True
        self._emit(Refuse(c.conn, error, self.phase in (Phase.FAILED, Phase.CANCELLED)))

    def _channel_failed(self, c: Connection, error: MultifdError, now: float) -> None:
        error.with_context(channel=c.channel)
        c.state = ChannelState.FAILED
        self._forget_payload(c, now)
        if c.channel is not None:
            self.reassembly.channel_failed(c.channel)
        if not (c.hung_up or c.gone):
            self._hang_up(c, completed=False, why=error)
        self._fail(error, now)

    def _forget_payload(self, c: Connection, now: float) -> None:
        """The payload ``c`` was receiving will never come: release its charge."""
        self._stop_waiting(c, now)
        self.ledger.uncharge(c.charged)
        c.charged = 0
        c.header = None

    def _hang_up(self, c: Connection, *, completed: bool, why: MultifdError | None = None) -> None:
        c.hung_up = True
        c.handshake_deadline = None
        self.connections.pending.pop(c.conn, None)
        self._emit(CloseConnection(c.conn) if completed else ResetConnection(c.conn, why))

    def _fail(self, error: MultifdError, now: float) -> None:
        """The first error decides; later ones (and those while committing) do not."""
        if self.phase.running:
            self._decide(error, now)

    def _decide(self, error: MultifdError, now: float) -> None:
        if error.reason in EXPLAINED_BY_REFUSALS:
            refusals = self.connections.refusals_text()
            if refusals:
                error.message += f"; {refusals}"
        self.error = error
        self._set_phase(Phase.CANCELLED if isinstance(error, Cancelled) else Phase.FAILED, now)
        for c in list(self._waiting.values()):
            self._stop_waiting(c, now)
        for c in self.connections.live():
            self._hang_up(c, completed=False, why=error)
        self._emit(Finished(self.phase, error))

    def _set_phase(self, phase: Phase, now: float) -> None:
        old = self.status
        self.phase = phase
        self._status_changed(old, now)

    def _status_changed(self, old: SessionStatus, now: float) -> None:
        new = self.status
        if new is not old:
            if new.final:
                self.finished = now
            self._emit(StatusChanged(old, new))

    def _maybe_commit(self, now: float) -> None:
        if self.phase is not Phase.ACTIVE or self.reassembly.incomplete_devices():
            return
        missing = self.connections.missing()
        if missing:
            if not self._told_missing:
                self._told_missing = True
                self._emit(WaitingForChannels(len(self.connections.channels), missing))
            return
        self._set_phase(Phase.COMMITTING, now)
        self._emit(Commit())

    def _wake(self, device: DeviceKey) -> None:
        if device in self._idle_loaders:
            self._idle_loaders.discard(device)
            self._emit(WakeLoader(device))

    # -- memory ----------------------------------------------------------------------------------

    def _admit(self, c: Connection, now: float) -> PayloadBuffer | None:
        """Carry out the memory policy for ``c``'s header until it has a buffer (returned)
        or must wait (None, with ``c.wait_deadline`` set if the wait has one)."""
        header = c.header
        assert header is not None
        while True:
            charged = self.ledger.charge(header)
            if charged is not None:
                buffer, c.charged = charged
                return buffer
            waiting_others = len(self._waiting) - c.waiting
            decision = self.ledger.decide(
                header,
                now=now,
                others_reading=self.connections.reading - waiting_others - 1,
                channel=c.channel,
            )
            c.wait_deadline = None
            c.victim = None
            if isinstance(decision, Wait):
                c.wait_deadline = decision.deadline
                return None
            if isinstance(decision, SpillIncoming):
                return self.ledger.take_staging()  # None: another arrival is in it
            if isinstance(decision, SpillVictim):
                c.victim = decision.chunk
                self.ledger.spill_started(decision.chunk)
                self._emit(Spill(decision.chunk))
                return None
            if isinstance(decision, Fail):
                raise decision.error
            # Insert: room was made meanwhile; take it

    def _retry(self, c: Connection, now: float) -> None:
        try:
            buffer = self._admit(c, now)
        except MultifdError as error:
            self._channel_failed(c, error, now)
            return
        if buffer is not None:
            self._stop_waiting(c, now)
            self._emit(ProvideBuffer(c.conn, buffer))
            self._emit(ResumeReading(c.conn))

    def _memory_changed(self, now: float, first: Connection | None = None) -> None:
        """Queued memory shrank or became drainable: every waiting header looks again."""
        order = list(self._waiting.values())
        if first is not None:
            order.remove(first)
            order.insert(0, first)
        for c in order:
            if c.waiting and self.phase.running:
                self._retry(c, now)

    def _start_waiting(self, c: Connection, now: float) -> None:
        if not self._waiting:
            self._pause_started = now
        c.waiting = True
        self._waiting[c.conn] = c

    def _stop_waiting(self, c: Connection, now: float) -> None:
        if not c.waiting:
            return
        c.waiting = False
        c.wait_deadline = None
        c.victim = None
        del self._waiting[c.conn]
        if not self._waiting:
            self._paused_seconds += now - self._pause_started

    # -- what the watchdog and the outputs see --------------------------------------------------

    def _watched(self) -> bool:
        config = self.config
        return (
            self._watchdog is not None
            and self.phase.running
            and (config.accept_timeout is not None or config.progress_timeout is not None)
        )

    def _sample(self) -> Sample:
        channels = self.connections.channels
        return Sample(
            connected=frozenset(channels),
            received=sum(c.received for c in channels.values()),
            written=self.reassembly.bytes_written,
            active=self.phase is Phase.ACTIVE,
            waiting_for=self.waiting_for(),
        )

    def completed_at(self, device: DeviceKey) -> float | None:
        return self._completed_at.get(device)

    def waiting_for(self) -> tuple[str, ...]:
        waiting = [d.waiting_for for d in self.reassembly.incomplete_devices()]
        missing = self.connections.missing()
        if missing:
            waiting.append(f"channel ids {', '.join(map(str, missing))} to connect")
        return tuple(waiting)

    @property
    def waiting_headers(self) -> int:
        """Connections whose header waits for memory (their reading paused)."""
        return len(self._waiting)

    def paused_seconds(self, now: float) -> float:
        """Time with at least one header waiting for memory, a wait going on included."""
        ongoing = now - self._pause_started if self._waiting else 0.0
        return self._paused_seconds + ongoing

    def snapshot(self, now: float) -> MigrationSnapshot:
        return build_snapshot(self, now)
