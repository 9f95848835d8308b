"""One multifd connection on the event loop: bytes in, decoded events out, by plain calls.

:class:`ChannelProtocol` is the fast path. The event loop asks it where the
next bytes go (``get_buffer``) and it answers with the decoder's buffer: for a
payload, the very buffer the chunk will live in until it is written, so the
kernel copies each byte once. Every event the decoder completes goes to the
:class:`ChannelOwner` at once, from the same callback: a complete header asks
for its payload's buffer (``header``), and when none is granted yet reading
stops until :meth:`ChannelProtocol.provide_buffer` brings it. The owner (the
session, which feeds the migration core) decides everything else; a channel
knows nothing above it but this protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

import structlog

from ..core.decoder import (
    ASK,
    ChannelDecoder,
    DecoderState,
    MainBytes,
    MainChannel,
    RamData,
    RamHeader,
)
from ..core.state import ChannelState
from ..core.wire import ChannelHandshake, DevicePacket, PacketHeader
from ..errors import ProtocolError
from .sockopts import size_receive_buffer

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer as PayloadBuffer

__all__ = [
    "ChannelOwner",
    "ChannelProtocol",
    "ChannelState",
    "hang_up",
    "reset",
    "switch_reading",
]

log = structlog.get_logger("vfio_multifd.channel")

#: The decoder states in which the stream is read.
_READING = (
    DecoderState.HANDSHAKE,
    DecoderState.HEADER,
    DecoderState.PAYLOAD,
    DecoderState.RAM_HEADER,
    DecoderState.MAIN,
)


class ChannelOwner(Protocol):
    """Where a connection's decoded events go (the session implements it)."""

    def received(self, channel: ChannelProtocol, nbytes: int) -> None: ...

    def handshake(self, channel: ChannelProtocol, handshake: ChannelHandshake) -> None: ...

    def header(self, channel: ChannelProtocol, header: PacketHeader) -> PayloadBuffer | None:
        """The payload's buffer now, or None: :meth:`ChannelProtocol.provide_buffer` later."""

    def packet(self, channel: ChannelProtocol, packet: DevicePacket) -> None: ...

    def main_channel(self, channel: ChannelProtocol) -> None:
        """The connection began with QEVM (its bytes follow as ``main_data``)."""

    def main_data(self, channel: ChannelProtocol, data: bytes) -> None: ...

    def ram_header(self, channel: ChannelProtocol, raw: bytes) -> bytearray | None:
        """The buffer for the RAM packet's page data now, or None: ``provide_buffer`` later."""

    def ram_data(self, channel: ChannelProtocol, data: RamData) -> None: ...

    def decode_error(self, channel: ChannelProtocol, error: ProtocolError) -> None: ...

    def eof(self, channel: ChannelProtocol) -> None:
        """A clean end of stream (an unclean one is a ``decode_error``)."""

    def lost(
        self,
        channel: ChannelProtocol,
        exc: BaseException | None,
        truncated: ProtocolError | None,
    ) -> None:
        """The socket is closed; ``truncated``: the decoder's error if inside a packet."""


class ChannelProtocol(asyncio.BufferedProtocol):
    def __init__(
        self,
        owner: ChannelOwner,
        conn: int,
        *,
        peer: str = "?",
        max_packet_size: int,
        ram: bool = False,
    ) -> None:
        self.owner = owner
        self.conn = conn  # the session's name for this connection
        self.peer = peer
        # Each payload buffer is asked of the owner when its header is complete.
        self.decoder = ChannelDecoder(max_packet_size=max_packet_size, allocate=ASK, ram=ram)
        self.channel_id: int | None = None
        self.transport: asyncio.Transport | None = None
        self.log = log.bind(peer=peer)
        self._held = False  # the owner asked it to stop reading
        self._reading = True
        self._closing: bool | None = None  # asked to close (completed?) before connection_made
        self.detached = False  # its socket moved elsewhere (a reader thread)
        #: Called once, after the events of the read that accepted it (reader threads).
        self.after_accept: Callable[[ChannelProtocol], None] | None = None

    # -- asyncio callbacks ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        if self._closing is not None:  # hung up on before it was made
            self._hang_up(self._closing)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.decoder.buffer_updated(nbytes)
        self.owner.received(self, nbytes)
        self._take_events()

    def eof_received(self) -> bool:
        self.decoder.eof()
        if self._take_events():
            self.owner.eof(self)
        # Keep our side open: the migration closes every channel when it ends, cleanly
        # only if it completed (see close), so that the source learns the outcome.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.detached:
            return  # the socket lives on elsewhere; its loss is reported from there
        decoder = self.decoder
        truncated = decoder.truncated_error() if decoder.inside_unit else None
        self.owner.lost(self, exc, truncated)

    def _take_events(self) -> bool:
        """Hand every event decoded so far to the owner, then the error that stopped the
        decoder, if any (after the events before it). False once the decoder stopped."""
        decoder, owner = self.decoder, self.owner
        try:
            while (event := decoder.next_event()) is not None:
                if isinstance(event, DevicePacket):
                    owner.packet(self, event)
                elif isinstance(event, PacketHeader):
                    buffer = owner.header(self, event)
                    # The fast path: memory allows it, the payload is read at once.
                    if buffer is not None and decoder.state is DecoderState.AWAITING_BUFFER:
                        decoder.provide_buffer(buffer)
                elif isinstance(event, MainBytes):
                    owner.main_data(self, event.data)
                elif isinstance(event, RamHeader):
                    ram = owner.ram_header(self, event.raw)
                    if ram is not None and decoder.state is DecoderState.AWAITING_BUFFER:
                        decoder.provide_buffer(ram, len(ram))
                elif isinstance(event, RamData):
                    owner.ram_data(self, event)
                elif isinstance(event, MainChannel):
                    owner.main_channel(self)
                else:
                    owner.handshake(self, event)
        except ProtocolError as error:
            owner.decode_error(self, error)
            return False
        self._update_reading()
        after, self.after_accept = self.after_accept, None
        if after is not None:
            after(self)
        return True

    def _update_reading(self) -> None:
        """Read while the decoder wants bytes and the owner has not held it."""
        transport = self.transport
        if transport is None or self._closing is not None or self.detached:
            return
        state = self.decoder.state
        if state is DecoderState.CLOSED or state is DecoderState.ERROR:
            return
        wanted = not self._held and state in _READING
        self._reading = switch_reading(transport, reading=self._reading, wanted=wanted)

    # -- what the owner asks ----------------------------------------------------

    def accepted(self, channel_id: int) -> None:
        self.channel_id = channel_id
        self.log = self.log.bind(channel=channel_id)
        self.log.info("channel_accepted")
        if self.transport is not None and not self.detached:
            size_receive_buffer(self.transport.get_extra_info("socket"))

    def provide_buffer(self, buffer: PayloadBuffer) -> None:
        """The buffer the last header waited for: the payload can be read now."""
        if self.decoder.state is not DecoderState.AWAITING_BUFFER:
            return  # hung up on meanwhile
        self.decoder.provide_buffer(buffer, len(memoryview(buffer)))
        self._take_events()  # a payload of 0 bytes is complete at once

    def hold(self, held: bool) -> None:
        self._held = held
        self._update_reading()

    def detach(self) -> None:
        """Its socket now lives elsewhere (reader_threads.py): nothing more comes from here."""
        self.detached = True

    def close(self, *, completed: bool = False) -> None:
        """Hang up: with a clean close only once the migration ``completed``, otherwise
        with a reset, so that a source knows whether the destination took its state."""
        self._closing = completed
        if self.transport is not None:
            self._hang_up(completed)

    def _hang_up(self, completed: bool) -> None:
        assert self.transport is not None
        hang_up(self.transport, completed=completed)


def switch_reading(transport: asyncio.ReadTransport, *, reading: bool, wanted: bool) -> bool:
    """Pause or resume ``transport`` when ``wanted`` is not what it is doing; returns ``wanted``."""
    if wanted != reading:
        if wanted:
            transport.resume_reading()
        else:
            transport.pause_reading()
    return wanted


def hang_up(transport: asyncio.Transport, *, completed: bool) -> None:
    """The verdict a channel carries: a clean close once the migration ``completed``,
    a reset otherwise."""
    if completed:
        transport.close()
    else:
        reset(transport)


def reset(transport: asyncio.Transport) -> None:
    """Close with a reset (TCP RST) rather than a clean end of stream: the only answer
    a channel carries back. (A unix socket resets only with bytes left unread.)"""
    if not transport.is_closing():
        with contextlib.suppress(OSError, ValueError):  # ValueError: uvloop's, once closed
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
