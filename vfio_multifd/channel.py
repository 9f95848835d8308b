"""One multifd channel: a buffered protocol that receives, a coroutine that queues.

:class:`ChannelProtocol` is the fast path. The event loop asks it where the
next bytes go (``get_buffer``) and it answers with the decoder's buffer: for a
payload, the very buffer the chunk will live in until it is written, so the
kernel copies each byte once. That buffer is asked of the owner when the
packet's header is complete, before any payload byte is read: memory is
charged for what a peer announces, and when the owner cannot grant it at once
reading pauses until it can. Complete packets go to a short deque; when that
is full, reading pauses too (TCP then pushes back on the source).

:func:`read_channel` is the coroutine that asks for the buffers the fast
path could not get at once, and hands complete packets to the owner's ``deliver``, which queues them under the device's
``asyncio.Condition``: a synchronous protocol callback could not, since
``notify`` needs the lock and only a coroutine can await it. Above itself a
channel sees only :class:`ChannelOwner`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

import structlog

from .decoder import ASK, ChannelDecoder
from .errors import HandshakeError, MultifdError, ProtocolError, Reason, SessionError
from .sockopts import size_receive_buffer
from .wire import ChannelHandshake, DevicePacket, PacketHeader

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer as PayloadBuffer

    from .reader_threads import HandedOffTransport

log = structlog.get_logger("vfio_multifd.channel")

#: Complete packets a channel may hold before it stops reading its socket.
MAX_PENDING_PACKETS = 2


class ChannelState(enum.Enum):
    HANDSHAKE = "handshake"
    ACTIVE = "active"
    CLOSED = "closed"  # clean end of stream
    REFUSED = "refused"  # failed the handshake
    FAILED = "failed"


class ChannelOwner(Protocol):
    """What a channel may ask of the migration it belongs to (the session implements it).

    Channels know nothing above them: this is the whole of their view upward.
    """

    def accept(self, channel: ChannelProtocol, handshake: ChannelHandshake) -> None:
        """Take the channel into the migration; raise :class:`HandshakeError` to refuse it."""

    def refused(self, channel: ChannelProtocol, error: HandshakeError) -> None:
        """The connection failed its handshake and is gone; the migration goes on."""

    def fail(self, error: MultifdError) -> None:
        """An accepted channel broke the protocol: the migration fails."""

    def allocate_now(self, header: PacketHeader, channel: int | None) -> PayloadBuffer | None:
        """A buffer for the announced payload if memory allows it at once, else ``None``.

        Raises :class:`ProtocolError` for a chunk that may not be queued at all
        (one another channel already announced included).
        """

    async def allocate(self, header: PacketHeader, channel: int | None) -> PayloadBuffer:
        """A buffer for the payload of a header ``allocate_now`` had no memory for,
        once memory allows (may wait or spill)."""

    async def deliver(self, packet: DevicePacket, channel: int | None) -> None:
        """Queue a packet's chunk for its device's loader (may wait for memory)."""

    def closed(self, channel: ChannelProtocol) -> None:
        """An accepted channel reached a clean end of stream."""


class ChannelProtocol(asyncio.BufferedProtocol):
    def __init__(
        self, owner: ChannelOwner, *, max_packet_size: int, handshake_timeout: float
    ) -> None:
        self.owner = owner
        self.handshake_timeout = handshake_timeout
        # Each payload buffer is asked of the owner when its header is complete.
        self.decoder = ChannelDecoder(max_packet_size=max_packet_size, allocate=ASK)
        self.state = ChannelState.HANDSHAKE
        self.channel_id: int | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        # Complete packets, and at most one header still waiting for its buffer.
        self.pending: deque[DevicePacket | PacketHeader] = deque()
        self._awaiting_buffer = False
        self.end_of_stream = False  # the peer shut its side down cleanly
        self._waiter: asyncio.Future[None] | None = None
        self._reading = True
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._closing = False  # closed before the transport was made: abort it at once
        #: Called once the connection is gone (its socket closed): the listener counts descriptors.
        self.on_lost: Callable[[ChannelProtocol], None] | None = None
        #: Once accepted, moves the socket to a reader thread (reader_threads.py), or
        #: leaves it where it is if it cannot.
        self.hand_off: Callable[[ChannelProtocol, asyncio.Transport], None] | None = None
        # Read by a reader thread: its decoded events come in take_batch.
        self._handed_off: HandedOffTransport | None = None
        self.log = log

    # -- asyncio callbacks ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
        self.log = log.bind(peer=self.peer)
        if self._closing or self.state is not ChannelState.HANDSHAKE:  # shed or closed already
            self.transport.abort()
            return
        loop = asyncio.get_running_loop()
        self._handshake_timer = loop.call_later(self.handshake_timeout, self._handshake_timed_out)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.decoder.buffer_updated(nbytes)
        self._take_events()

    def _take_events(
        self,
        next_event: Callable[[], ChannelHandshake | PacketHeader | DevicePacket | None] | None = None,
    ) -> bool:
        """Act on every event decoded so far, then on the error that stopped the
        decoder, if any (after the events before it). False once the channel is done."""
        try:
            self._take_decoded(next_event or self.decoder.next_event)
        except HandshakeError as error:
            self._refuse(error)
            return False
        except ProtocolError as error:
            self.fail(error)
            return False
        return True

    def _take_decoded(
        self, next_event: Callable[[], ChannelHandshake | PacketHeader | DevicePacket | None]
    ) -> None:
        while (event := next_event()) is not None:
            if isinstance(event, ChannelHandshake):
                self._on_handshake(event)
            elif isinstance(event, PacketHeader):
                # The fast path: memory allows it, the payload is read at once.
                buffer = self.owner.allocate_now(event, self.channel_id)
                if buffer is not None:
                    self._provide(buffer)
                else:  # the reader asks again, and may wait: read nothing meanwhile
                    self._awaiting_buffer = True
                    self.pending.append(event)
                    self._wake()
            else:
                self.pending.append(event)
                self._wake()
        self._update_reading()

    def _update_reading(self) -> None:
        """Read while no header waits for its buffer and few packets wait for the reader."""
        transport = self.transport
        if transport is None or self.end_of_stream or self.state is not ChannelState.ACTIVE:
            return
        wanted = not self._awaiting_buffer and len(self.pending) < MAX_PENDING_PACKETS
        self._reading = switch_reading(transport, reading=self._reading, wanted=wanted)

    def eof_received(self) -> bool:
        self.decoder.eof()
        if self._take_events():
            self._ended()
        # Keep our side open: the session closes every channel when the migration
        # ends, cleanly only if it completed (see close), so the source learns the outcome.
        return True

    def _ended(self) -> None:
        self.end_of_stream = True
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handed_off is None:
            self.lost_in_reader(exc)
        # else: the main loop's transport let the socket go to a reader thread;
        # the connection is lost when that thread says so (lost_in_reader).

    # -- a channel read by a reader thread (reader_threads.py) ---------------------

    def handed_off(self, transport: HandedOffTransport) -> None:
        """From now on a reader thread reads this channel; ``transport`` stands in for its own."""
        self._handed_off = transport
        self.transport = transport

    def take_batch(
        self, events: list[DevicePacket | PacketHeader], error: ProtocolError | None, eof: bool
    ) -> None:
        """What the reader thread decoded in one go: as if decoded here (see _take_events)."""
        if self.state is not ChannelState.ACTIVE:
            return  # failed meanwhile: what it still sends is not delivered
        batch = iter(events)

        def next_event() -> DevicePacket | PacketHeader | None:
            event = next(batch, None)
            if event is None and error is not None:
                raise error
            return event

        if self._take_events(next_event) and eof:
            self._ended()

    def lost_in_reader(self, exc: BaseException | None) -> None:
        """The connection is gone (on whichever loop read it)."""
        self._cancel_handshake_timer()
        if self.state is ChannelState.HANDSHAKE and isinstance(exc, HandshakeError):
            self._refuse(exc)  # the transport says why (tls.py: the TLS handshake failed)
        elif self.state is ChannelState.HANDSHAKE and self._closing:
            # We hung up on it as the migration ended: no refusal of its own, and
            # nothing that explains how the migration ended.
            self.state = ChannelState.REFUSED
        elif self.state is ChannelState.HANDSHAKE:
            self._refuse(
                HandshakeError(
                    Reason.HANDSHAKE_CLOSED,
                    f"connection closed inside the handshake ({exc or 'reset'})",
                )
            )
        elif self.state is ChannelState.ACTIVE and not self.end_of_stream:
            if self.decoder.inside_unit:  # name the device and idx being received
                error = self.decoder.truncated_error()
                error.message += f" (connection lost: {exc or 'reset'})"
            else:
                error = ProtocolError(
                    Reason.PACKET_TRUNCATED,
                    f"connection lost before the end of the stream: {exc or 'reset'}",
                )
            self.fail(error)
        self._wake()
        if self.on_lost is not None:
            self.on_lost(self)

    # -- handshake --------------------------------------------------------------

    def _on_handshake(self, handshake: ChannelHandshake) -> None:
        self._cancel_handshake_timer()
        self.owner.accept(self, handshake)  # raises HandshakeError to refuse
        self.channel_id = handshake.channel_id
        self.state = ChannelState.ACTIVE
        self.log = self.log.bind(channel=self.channel_id)
        self.log.info("channel_accepted")
        if self.transport is not None:
            size_receive_buffer(self.transport.get_extra_info("socket"))
        if self.hand_off is not None and self.transport is not None:
            self.hand_off(self, self.transport)

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        if self.state is ChannelState.HANDSHAKE:
            self._refuse(
                HandshakeError(
                    Reason.HANDSHAKE_TIMEOUT,
                    f"no complete handshake within {self.handshake_timeout:g} s "
                    f"({self.decoder.bytes_received} of 64 bytes)",
                )
            )

    def _cancel_handshake_timer(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def refuse(self, error: HandshakeError) -> None:
        """Refuse this connection if it is still handshaking (the listener sheds it)."""
        self._refuse(error)

    def _refuse(self, error: HandshakeError) -> None:
        """Refuse this one connection; the migration goes on waiting for its channels."""
        if self.state is not ChannelState.HANDSHAKE:
            return
        self._cancel_handshake_timer()
        self.state = ChannelState.REFUSED
        self.owner.refused(self, error)
        if self.transport is not None:
            reset(self.transport)

    def fail(self, error: MultifdError) -> None:
        if self.state is not ChannelState.ACTIVE:
            return
        self.state = ChannelState.FAILED
        self.owner.fail(error.with_context(channel=self.channel_id))
        if self.transport is not None:
            reset(self.transport)
        self._wake()

    # -- the reader's side --------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_item(self) -> DevicePacket | PacketHeader | None:
        """The next complete packet or header awaiting its buffer; ``None`` at a clean
        end, and at once when the channel failed (what it still holds is not delivered)."""
        while not self.pending or self.state is not ChannelState.ACTIVE:
            if self.end_of_stream or self.state is not ChannelState.ACTIVE:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self.pending.popleft()
        self._update_reading()
        return item

    def provide_buffer(self, buffer: PayloadBuffer) -> None:
        """The buffer the last header asked for: the payload can be read now."""
        self._awaiting_buffer = False
        if self.state is not ChannelState.ACTIVE:
            return
        self._provide(buffer)
        if self._handed_off is None:
            self._take_events()
        else:
            self._update_reading()

    def _provide(self, buffer: PayloadBuffer) -> None:
        if self._handed_off is None:
            self.decoder.provide_buffer(buffer)
        else:  # its events come back in a batch
            self._handed_off.provide_buffer(buffer)

    def close(self, *, completed: bool = False) -> None:
        """Hang up: with a clean close only once the migration ``completed``, otherwise
        with a reset, so that a source knows whether the destination took its state."""
        self._closing = True
        if self.transport is None:
            return
        if completed:
            self.transport.close()
        else:
            reset(self.transport)


def switch_reading(transport: asyncio.ReadTransport, *, reading: bool, wanted: bool) -> bool:
    """Pause or resume ``transport`` when ``wanted`` is not what it is doing; returns ``wanted``."""
    if wanted != reading:
        if wanted:
            transport.resume_reading()
        else:
            transport.pause_reading()
    return wanted


def reset(transport: asyncio.Transport) -> None:
    """Close with a reset (TCP RST) rather than a clean end of stream: the only answer
    a channel carries back. (A unix socket resets only with bytes left unread.)"""
    if not transport.is_closing():
        with contextlib.suppress(OSError, ValueError):  # ValueError: uvloop's, once closed
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def read_channel(protocol: ChannelProtocol, owner: ChannelOwner) -> None:
    """The coroutine side of one accepted channel: its packets, queued in order."""
    channel = protocol.channel_id
    try:
        while (item := await protocol.next_item()) is not None:
            if isinstance(item, PacketHeader):
                protocol.provide_buffer(await owner.allocate(item, channel))
            else:
                await owner.deliver(item, channel)
    except MultifdError as error:
        protocol.fail(error)
        return
    except Exception as error:  # a bug must end the migration, not hang it
        protocol.log.exception("channel_reader_crashed")
        protocol.fail(SessionError(Reason.INTERNAL, f"internal error: {error!r}"))
        return
    if protocol.state is ChannelState.ACTIVE:
        protocol.state = ChannelState.CLOSED
        protocol.log.info(
            "channel_closed",
            bytes=protocol.decoder.bytes_received,
            packets=protocol.decoder.packets,
        )
        owner.closed(protocol)
