"""Every connection of a migration: handshaking, accepted as a channel, refused.

Pure bookkeeping for :class:`~vfio_multifd.core.migration.Migration`: which
connections wait for their handshake (oldest first, so the oldest is shed),
which channel ids are taken, and the refusals, counted and the last few kept
with their reason for the final error (PROTOCOL.md 3.1).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ..errors import HandshakeError, Reason
from .reassembly import Chunk
from .state import ChannelState
from .wire import ChannelHandshake, PacketHeader, check_handshake

#: How many refusals are remembered with their reason (the count is kept for all).
RECENT_REFUSALS = 16
#: Distinct refusal messages the final error lists.
REFUSALS_SHOWN = 3
#: Failures that refused connections may explain: a channel that was refused
#: is a channel that never came, so its data is missing, or time ran out, or
#: the operator gave up waiting, or the source gave up and reset the others.
EXPLAINED_BY_REFUSALS = frozenset(
    {
        Reason.INCOMPLETE,
        Reason.ACCEPT_TIMEOUT,
        Reason.PROGRESS_TIMEOUT,
        Reason.MISSING_CHANNELS,
        Reason.CANCELLED,
        Reason.PACKET_TRUNCATED,
    }
)


@dataclass(slots=True, eq=False)
class Connection:
    """One connection as the core sees it (its socket and decoder are the driver's)."""

    conn: int
    peer: str
    handshake_deadline: float | None
    state: ChannelState = ChannelState.HANDSHAKE
    channel: int | None = None
    tls_subject: str | None = None
    received: int = 0  # bytes, its handshake included
    packets: int = 0
    #: The header whose payload is awaited or being read, and what its buffer is
    #: charged (0: not charged yet, or it is the staging buffer).
    header: PacketHeader | None = None
    charged: int = 0
    waiting: bool = False  # its header waits for memory
    wait_deadline: float | None = None
    victim: Chunk | None = None  # the chunk spilled to make room for its header
    hung_up: bool = False  # the core asked the driver to close or reset it
    gone: bool = False  # its socket is closed
    main: bool = False  # QEMU's main channel (--main-stream), not a multifd channel
    #: Why its reading is paused besides a header waiting for memory: "sync" (held at a
    #: sync point), "blocks" (a RAM packet before the block list), "writes" (too much
    #: RAM queued for the writer).
    holds: set[str] = field(default_factory=set)
    ram_raw: bytes | None = None  # a RAM header held until the block list comes
    ram_packet: object | None = None  # the RamPacket whose page data is being read


class Connections:
    def __init__(
        self, *, channels: int, uuid: bytes, max_pending: int, main_stream: bool = False
    ) -> None:
        self.expected = channels
        self.main_stream = main_stream  # --main-stream: one main channel is taken
        self.main: Connection | None = None
        self.uuid = uuid
        self.max_pending = max_pending
        self.by_conn: dict[int, Connection] = {}
        self.pending: dict[int, Connection] = {}  # handshaking, oldest first
        self.channels: dict[int, Connection] = {}  # accepted, by channel id
        self.refused: collections.deque[tuple[str, HandshakeError]] = collections.deque(
            maxlen=RECENT_REFUSALS
        )
        self.refused_count = 0
        self.shed_count = 0  # refused to make room (a subset of refused_count)
        # Refused once the migration was ending (a subset of refused_count): they
        # did not cause its end, so the final error does not list them.
        self.late_count = 0
        self.refused_by_reason: collections.Counter[str] = collections.Counter()

    def add(self, conn: int, peer: str, deadline: float | None) -> Connection:
        connection = Connection(conn, peer, deadline)
        self.by_conn[conn] = connection
        self.pending[conn] = connection
        return connection

    def oldest_pending(self) -> Connection | None:
        return next(iter(self.pending.values()), None)

    def accept(self, connection: Connection, handshake: ChannelHandshake) -> None:
        """Admit a completed handshake, or raise :class:`HandshakeError` to refuse it."""
        check_handshake(handshake, uuid=self.uuid, channels=self.expected)
        if handshake.channel_id in self.channels:
            raise HandshakeError(
                Reason.HANDSHAKE_DUPLICATE_CHANNEL,
                f"channel id {handshake.channel_id} is already connected",
            )
        self.pending.pop(connection.conn, None)
        connection.state = ChannelState.ACTIVE
        connection.channel = handshake.channel_id
        connection.handshake_deadline = None
        self.channels[handshake.channel_id] = connection

    def accept_main(self, connection: Connection) -> None:
        """The one place a connection's kind is decided: a ``QEVM`` connection is the
        main channel only when asked for (--main-stream), and only once. A refusal
        refuses that connection only: a stray ``QEVM`` never takes a migration down."""
        if not self.main_stream:
            raise HandshakeError(
                Reason.HANDSHAKE_MAIN_CHANNEL,
                "a QEMU main migration channel (QEVM) connected; give --main-stream PATH "
                "to take it (without it this destination receives only multifd channels)",
            )
        if self.main is not None:
            raise HandshakeError(
                Reason.HANDSHAKE_DUPLICATE_CHANNEL,
                "a second QEMU main channel (QEVM) connected; a migration has one",
            )
        self.pending.pop(connection.conn, None)
        connection.state = ChannelState.ACTIVE
        connection.main = True
        connection.handshake_deadline = None
        self.main = connection

    def refuse(self, connection: Connection, error: HandshakeError, *, late: bool) -> None:
        self.pending.pop(connection.conn, None)
        connection.state = ChannelState.REFUSED
        connection.handshake_deadline = None
        self.refused_count += 1
        self.refused_by_reason[error.reason.value] += 1
        if error.reason is Reason.HANDSHAKE_SHED:
            self.shed_count += 1
        if late:
            self.late_count += 1
        else:
            self.refused.append((connection.peer, HandshakeError(error.reason, error.message)))

    def forget(self, connection: Connection) -> None:
        """Its socket is closed: only an accepted channel is still remembered."""
        connection.gone = True
        self.pending.pop(connection.conn, None)
        if connection.channel is None and not connection.main:
            self.by_conn.pop(connection.conn, None)

    def refusals_text(self) -> str:
        return refusals_text(self.refused, self.refused_count - self.late_count)

    @property
    def all_closed(self) -> bool:
        """Every expected channel connected and reached a clean end of stream."""
        return (
            len(self.channels) == self.expected
            and all(c.state is ChannelState.CLOSED for c in self.channels.values())
            and (
                not self.main_stream
                or (self.main is not None and self.main.state is ChannelState.CLOSED)
            )
        )

    @property
    def reading(self) -> int:
        """Accepted channels still reading."""
        return sum(c.state is ChannelState.ACTIVE for c in self.channels.values())

    @property
    def main_missing(self) -> bool:
        return self.main_stream and self.main is None

    def missing(self) -> tuple[int, ...]:
        return tuple(sorted(set(range(self.expected)) - set(self.channels)))

    def live(self) -> Iterator[Connection]:
        """Connections not hung up on yet whose socket is open, in arrival order."""
        return (c for c in list(self.by_conn.values()) if not (c.hung_up or c.gone))


def refusals_text(refused: Iterable[tuple[str, HandshakeError]], total: int | None = None) -> str:
    """``2 connections refused: handshake channel id 2 is not below the 2 expected
    channels``: the refusals, each distinct message once, for the final error.
    ``total``: how many there were, when ``refused`` keeps only the last few."""
    counts: dict[str, int] = {}
    for _peer, error in refused:
        counts[str(error)] = counts.get(str(error), 0) + 1
    total = sum(counts.values()) if total is None else total
    if not total:
        return ""
    shown = [
        message if len(counts) == 1 or count == 1 else f"{message} ({count} times)"
        for message, count in list(counts.items())[:REFUSALS_SHOWN]
    ]
    if len(counts) > REFUSALS_SHOWN:
        shown.append(f"and {len(counts) - REFUSALS_SHOWN} other reasons")
    return f"{total} connection{'s' if total != 1 else ''} refused: {'; '.join(shown)}"
