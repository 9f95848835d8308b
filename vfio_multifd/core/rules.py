"""The rules of a migration: what every input of the core leads to.

:class:`Rules` holds the core's state and the decisions its inputs share -
refusing a connection, failing a channel, the first error deciding the
outcome, hanging up, committing, waking a loader, admitting waiting headers
again - so that :class:`~.migration.Migration`, which subclasses it, is only
its inputs and outputs.
"""

from __future__ import annotations

from ..errors import HandshakeError, MultifdError
from ..results import SessionStatus
from .admission import Admission
from .commands import (
    CloseConnection,
    Command,
    Commit,
    Finished,
    ProvideBuffer,
    Refuse,
    ResetConnection,
    ResumeReading,
    WaitingForChannels,
    WakeLoader,
)
from .config import MigrationConfig
from .connections import EXPLAINED_BY_REFUSALS, Connection, Connections
from .ledger import BufferSource, Ledger, MemoryLayout
from .outcome import Outcome
from .state import ChannelState, Phase
from .watchdog import Sample, Watchdog
from .wire import DeviceKey


class Rules:
    def __init__(self, config: MigrationConfig, buffers: BufferSource) -> None:
        self.config = config
        self.layout = MemoryLayout.of(
            config.max_queued_bytes,
            max_payload_size=config.max_payload_size,
            fail_when_full=config.fail_when_full,
            qemu_streams=config.main_stream or config.ram,
            channels=config.channels,
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
            channels=config.channels,
            uuid=config.uuid,
            max_pending=config.max_pending,
            main_stream=config.main_stream,
        )
        self._commands: list[Command] = []
        self.outcome = Outcome(self._emit)
        self.address: str | None = None
        self.admission = Admission(self.ledger, self.connections, self._emit)
        self._idle_loaders: set[DeviceKey] = set(config.devices)  # woken when ready
        self._completed_at: dict[DeviceKey, float] = {}
        self._told_missing = False
        self._watchdog: Watchdog | None = None
        self._next_sample = 0.0

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
        self.admission.stop_waiting(c, now)
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
        self.outcome.decide(error, now)
        for c in self.admission.in_order():
            self.admission.stop_waiting(c, now)
        for c in self.connections.live():
            self._hang_up(c, completed=False, why=error)
        self._emit(Finished(self.phase, error))

    def _streams_done(self) -> bool:
        """Whatever besides device state must end before the commit has (qemu_streams.py)."""
        return True

    def _maybe_commit(self, now: float) -> None:
        if self.phase is not Phase.ACTIVE or self.reassembly.incomplete_devices():
            return
        if not self._streams_done():
            return
        missing = self.connections.missing()
        if missing:
            if not self._told_missing:
                self._told_missing = True
                self._emit(WaitingForChannels(len(self.connections.channels), missing))
            return
        self.outcome.set_phase(Phase.COMMITTING, now)
        self._emit(Commit())

    def _wake(self, device: DeviceKey) -> None:
        if device in self._idle_loaders:
            self._idle_loaders.discard(device)
            self._emit(WakeLoader(device))

    # -- memory ----------------------------------------------------------------------------------

    def _retry(self, c: Connection, now: float) -> None:
        try:
            buffer = self.admission.admit(c, now)
        except MultifdError as error:
            self._channel_failed(c, error, now)
            return
        if buffer is not None:
            self.admission.stop_waiting(c, now)
            self._emit(ProvideBuffer(c.conn, buffer))
            self._emit(ResumeReading(c.conn))

    def _memory_changed(self, now: float, first: Connection | None = None) -> None:
        """Queued memory shrank or became drainable: every waiting header looks again."""
        for c in self.admission.in_order(first):
            if c.waiting and self.phase.running:
                self._retry(c, now)

    def _check_all_closed(self, now: float) -> None:
        """Once every channel ended, every device must be able to finish (an arrival
        on its way to the spill file still counts: its check waits for ``spilled``)."""
        if self.connections.all_closed and not self.ledger.staging_busy:
            error = self.reassembly.incomplete_error(f"all {self.config.channels} channels closed")
            if error is not None:
                self._fail(error, now)

    def _watched(self) -> bool:
        config = self.config
        return (
            self._watchdog is not None
            and self.phase.running
            and (
                config.accept_timeout is not None
                or config.progress_timeout is not None
                or config.missing_channels_grace is not None
            )
        )

    def _sample(self) -> Sample:
        channels = self.connections.channels
        return Sample(
            connected=frozenset(channels),
            received=sum(c.received for c in channels.values())
            + (0 if self.connections.main is None else self.connections.main.received),
            written=self.reassembly.bytes_written,
            active=self.phase is Phase.ACTIVE,
            waiting_for=self.waiting_for(),
            reading=self.connections.reading,
            handshaking=len(self.connections.pending),
        )

    @property
    def phase(self) -> Phase:
        return self.outcome.phase

    @property
    def error(self) -> MultifdError | None:
        return self.outcome.error

    @property
    def status(self) -> SessionStatus:
        return self.outcome.status

    def waiting_for(self) -> tuple[str, ...]:
        waiting = [d.waiting_for for d in self.reassembly.incomplete_devices()]
        missing = self.connections.missing()
        if missing:
            waiting.append(f"channel ids {', '.join(map(str, missing))} to connect")
        if self.connections.main_missing:
            waiting.append("the main channel (QEVM) to connect")
        return tuple(waiting)
