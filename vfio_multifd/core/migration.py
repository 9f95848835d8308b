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

from typing import TYPE_CHECKING

from ..errors import Cancelled, HandshakeError, MultifdError, ProtocolError, Reason
from .commands import (
    Accepted,
    Command,
    Finished,
    PauseReading,
    Spill,
)
from .reassembly import Chunk, ChunkState
from .snapshot import MigrationSnapshot, build_snapshot
from .state import ChannelState, Phase
from .watchdog import PERIOD, MissingChannels, Watchdog
from .wire import HANDSHAKE, ChannelHandshake, DeviceKey, DevicePacket, PacketHeader

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer as PayloadBuffer

    from .config import MigrationConfig
    from .ledger import BufferSource
from .qemu_streams import QemuStreams


class Migration(QemuStreams):
    def __init__(self, config: MigrationConfig, buffers: BufferSource) -> None:
        super().__init__(config, buffers)
        self._init_qemu_streams()

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
        deadlines += self.admission.deadlines()
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
            missing_channels_grace=self.config.missing_channels_grace,
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
        self.outcome.start(now)
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
        if not c.main:
            self._channel_closed(c, now)
        self._check_all_closed(now)
        self._maybe_commit(now)

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
        elif c.state is ChannelState.ACTIVE and c.hung_up:
            # We hung up on it when the outcome was decided: cleanly once completed,
            # reset otherwise. It reads no more either way.
            c.state = ChannelState.CLOSED if self.phase is Phase.COMPLETED else ChannelState.FAILED
        elif c.state is ChannelState.ACTIVE:
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
            buffer = self.admission.admit(c, now)
        except MultifdError as error:
            self._channel_failed(c, error, now)
            return None
        if buffer is None and c.state is ChannelState.ACTIVE and self.phase.running:
            self.admission.start_waiting(c, now)
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
            self._emit(Spill(Chunk.of(packet, c.channel, state=ChunkState.SPILLING)))
            return
        c.charged = 0  # the chunk holds the charge now
        self.reassembly.insert(packet, c.channel, allocated=True, announced=True)
        if self.reassembly.devices[packet.device].ready:
            self._wake(packet.device)
            if self.admission.waiting:
                self._memory_changed(now)  # memory just became drainable

    # -- loaders and the spill file ----------------------------------------------------------

    def take_batch(self, device: DeviceKey, max_bytes: int) -> list[Chunk]:
        """``device``'s next consecutive chunks (about ``max_bytes``), or [] until
        :class:`WakeLoader`. The config chunk always comes alone."""
        queue = self.reassembly.devices[device]
        if not queue.ready or device in self.precopy_pending:  # pre-copy data goes first
            self._idle_loaders.add(device)
            return []
        return self.reassembly.take(queue, max_bytes)

    def written(self, device: DeviceKey, chunks: list[Chunk], now: float) -> None:
        """A loader wrote ``chunks`` (the config chunk: the device is complete)."""
        self.ledger.release_written(chunks)
        if any(chunk.config for chunk in chunks):
            self._completed_at[device] = now
        if self.admission.waiting:
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
        if self.admission.waiting:
            self._memory_changed(now, first=self.admission.owner_of(chunk))

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
        self.outcome.set_phase(Phase.COMPLETED, now)
        for c in self.connections.live():
            self._hang_up(c, completed=True)
        self._emit(Finished(Phase.COMPLETED, None))

    def commit_failed(self, error: MultifdError, now: float) -> None:
        if self.phase is Phase.COMMITTING:
            self._decide(error, now)

    def stopped_at(self, now: float) -> None:
        """The driver has cleaned up (outputs discarded): a cancel is now ``cancelled``."""
        if self.outcome.stop(now):
            # Whatever connected since the outcome was decided goes too.
            for c in self.connections.live():
                self._hang_up(c, completed=self.phase is Phase.COMPLETED, why=self.error)

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
        for c in self.admission.expired(now):  # a grace ran out with nothing changed
            self._retry(c, now)
        if self._watched() and now >= self._next_sample:
            assert self._watchdog is not None
            self._next_sample = now + PERIOD
            found = self._watchdog.check(self._sample(), now)
            if isinstance(found, MissingChannels):
                self._emit(found)
            elif found is not None:
                self._fail(found, now)

    # -- what the watchdog and the outputs see --------------------------------------------------

    def completed_at(self, device: DeviceKey) -> float | None:
        return self._completed_at.get(device)

    @property
    def waiting_headers(self) -> int:
        """Connections whose header waits for memory (their reading paused)."""
        return len(self.admission.waiting)

    def paused_seconds(self, now: float) -> float:
        """Time with at least one header waiting for memory, a wait going on included."""
        return self.admission.paused_seconds(now)

    def snapshot(self, now: float) -> MigrationSnapshot:
        return build_snapshot(self, now)
