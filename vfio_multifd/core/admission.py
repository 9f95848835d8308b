"""Admission: memory for each announced header, now or after a wait, a spill, or staging.

Part of the migration core (pure). :meth:`Admission.admit` carries out the
memory policy for one header until it has a buffer or must wait; the headers
that wait are kept here in the order they began to, with the time at least
one of them waited (reading paused). :class:`~.migration.Migration` decides
when they look again (every change of memory, or a wait's deadline), and they
look nearest-needed first (:meth:`Admission.in_order`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from .commands import Command, Spill
from .connections import Connection, Connections
from .ledger import Ledger
from .memory import Fail, SpillIncoming, SpillVictim, Wait

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer as PayloadBuffer


class Admission:
    def __init__(
        self, ledger: Ledger, connections: Connections, emit: Callable[[Command], None]
    ) -> None:
        self.ledger = ledger
        self.connections = connections
        self._emit = emit
        #: Connections whose header waits for memory, in the order they began to.
        self.waiting: dict[int, Connection] = {}
        self._pause_started = 0.0
        self._paused_seconds = 0.0  # with at least one of them waiting

    def admit(self, c: Connection, now: float) -> PayloadBuffer | None:
        """Carry out the memory policy for ``c``'s header until it has a buffer (returned)
        or must wait (None, with ``c.wait_deadline`` set if the wait has one). Raises
        the policy's error (``--on-queue-full fail``)."""
        header = c.header
        assert header is not None
        while True:
            charged = self.ledger.charge(header)
            if charged is not None:
                buffer, c.charged = charged
                return buffer
            waiting_others = len(self.waiting) - c.waiting
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

    def start_waiting(self, c: Connection, now: float) -> None:
        if not self.waiting:
            self._pause_started = now
        c.waiting = True
        self.waiting[c.conn] = c

    def stop_waiting(self, c: Connection, now: float) -> None:
        if not c.waiting:
            return
        c.waiting = False
        c.wait_deadline = None
        c.victim = None
        del self.waiting[c.conn]
        if not self.waiting:
            self._paused_seconds += now - self._pause_started

    def in_order(self, first: Connection | None = None) -> list[Connection]:
        """The waiting connections, the header nearest its device's next chunk first
        (ties: the one waiting longer), but ``first`` (whose spill just made room) first.

        Freed memory goes where it is freed again soonest. Given to whichever
        waited longest, it lets a channel far ahead hold it while the chunks
        needed next wait: the channels drift apart until every read waits
        for a write.
        """
        order = sorted(self.waiting.values(), key=self._distance)
        if first is not None:
            order.remove(first)
            order.insert(0, first)
        return order

    def _distance(self, c: Connection) -> int:
        header = c.header
        assert header is not None, "a connection waits for memory only for its header"
        return self.ledger.reassembly.distance(header.device, header.idx)

    def owner_of(self, victim: object) -> Connection | None:
        """The waiting connection for whose header ``victim`` was spilled."""
        return next((c for c in self.waiting.values() if c.victim is victim), None)

    def expired(self, now: float) -> Iterator[Connection]:
        """Waits whose deadline passed with nothing changed (each ends here)."""
        for c in list(self.waiting.values()):
            if c.waiting and c.wait_deadline is not None and c.wait_deadline <= now:
                c.wait_deadline = None
                self.ledger.wait_expired()
                yield c

    def deadlines(self) -> list[float]:
        return [c.wait_deadline for c in self.waiting.values() if c.wait_deadline is not None]

    def paused_seconds(self, now: float) -> float:
        """Time with at least one header waiting for memory, a wait going on included."""
        ongoing = now - self._pause_started if self.waiting else 0.0
        return self._paused_seconds + ongoing
