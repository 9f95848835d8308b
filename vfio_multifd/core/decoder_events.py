"""What the channel decoder (``decoder.py``) emits, and the states it passes through.

Pure: dataclasses and an enum. The device-state events (``ChannelHandshake``,
``PacketHeader``, ``DevicePacket``) are ``wire.py``'s; these are the decoder's own.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .wire import ChannelHandshake, DevicePacket, PacketHeader

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer as PayloadBuffer


class DecoderState(enum.Enum):
    HANDSHAKE = "handshake"
    HEADER = "header"  # the 288-byte packet prefix
    RAM_HEADER = "ram-header"  # the rest of a RAM packet's header (--ram)
    MAIN = "main"  # QEMU's main channel: its bytes go up as they come
    AWAITING_BUFFER = "awaiting-buffer"  # PacketHeader emitted; see provide_buffer()
    PAYLOAD = "payload"
    CLOSED = "closed"  # clean end of stream at a packet boundary
    ERROR = "error"  # terminal; the decoder raised


@dataclass(frozen=True, slots=True)
class MainChannel:
    """The connection began with ``QEVM``: QEMU's main channel. Its bytes (these first
    ones included) come next as :class:`MainBytes`; the core decides whether to take it."""


@dataclass(frozen=True, slots=True)
class MainBytes:
    data: bytes


@dataclass(frozen=True, slots=True)
class RamHeader:
    """A RAM (or SYNC) packet's whole header (``ram_header_size`` bytes), not parsed here:
    its fields mean something only against the main stream's block list. The decoder
    waits for :meth:`ChannelDecoder.provide_buffer` with the size of its page data."""

    raw: bytes


@dataclass(frozen=True, slots=True)
class RamData:
    """The page data of the last :class:`RamHeader` (``size`` bytes of ``buffer``)."""

    buffer: PayloadBuffer
    size: int


Event = (
    ChannelHandshake | PacketHeader | DevicePacket | MainChannel | MainBytes | RamHeader | RamData
)
