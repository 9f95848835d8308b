"""The incremental decoder of one multifd channel: bytes in, events out.

Pure: no sockets, no files, no event loop. "Need more data" is the absence of
an event, never an exception. Feeding never raises a protocol error: like h11,
the decoder keeps the error and :meth:`ChannelDecoder.next_event` raises it
once every event completed before it has been taken, so a handshake or packet
that arrived in the same read as bad bytes is never stranded. It is built for
a zero-copy receive path: :meth:`ChannelDecoder.get_buffer` returns the very
memory the next bytes belong in (for a payload, the buffer the chunk will
live in until it is written), so a socket can ``recv_into`` it; where that
buffer has room past the payload, the next packet's header is read with the
payload's last bytes, in the same read, and copied out. Every field
is checked as soon as its bytes are there, and a payload size is checked
against the maximum before anything is allocated. The layouts and constants
are ``wire.py``'s (PROTOCOL.md section 2).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import ProtocolError
from .decoder_checks import (
    check_handshake,
    check_idstr,
    check_packet_header,
    device_state_header,
    handshake_closed,
    truncated,
    vfio_idx,
)
from .decoder_events import DecoderState, Event, MainBytes, MainChannel, RamData, RamHeader
from .ram import ram_header_size
from .savevm import DEFAULT_PAGE_SIZE
from .wire import (
    DEFAULT_MAX_PACKET_SIZE,
    DEVICE_STATE_HEADER,
    HANDSHAKE,
    IDSTR_END,
    INVALID_IDX,
    MAX_IDSTR_LEN,
    MULTIFD_MAGIC,
    MULTIFD_VERSION,
    PACKET_HEADER,
    PACKET_PREFIX,
    PACKET_PREFIX_SIZE,
    QEMU_VM_FILE_MAGIC,
    VFIO_HEADER,
    VFIO_IDX_END,
    VFIO_STATE_VERSION,
    ChannelHandshake,
    DeviceKey,
    DevicePacket,
    PacketFlag,
    PacketHeader,
    VfioFlag,
)

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer as PayloadBuffer


_DEVICE_STATE_ONLY = int(PacketFlag.DEVICE_STATE)
_CONFIG_STATE = int(VfioFlag.CONFIG_STATE)

# The events and states are defined in decoder_events; importers take them from here too.
__all__ = ["ASK", "MAIN_READ_SIZE", "ChannelDecoder", "DecoderState", "Event"]
__all__ += ["MainBytes", "MainChannel", "RamData", "RamHeader"]


#: Bytes of the main channel read at once.
MAIN_READ_SIZE = 256 * 1024


def _default_allocate(size: int) -> bytearray:
    return bytearray(size)


#: ``allocate=`` for a decoder that asks for each payload buffer with a
#: :class:`PacketHeader` event instead of allocating it.
ASK = None


class ChannelDecoder:
    """Decodes one multifd channel: the handshake, then device-state packets.

    Zero-copy use (a ``BufferedProtocol``): write into :meth:`get_buffer`, then
    call :meth:`buffer_updated`. Copying use (tests, simple readers):
    :meth:`receive_data`. Either way, then drain :meth:`next_event` until it
    returns ``None``, and call :meth:`eof` (then drain again) when the peer closes.
    Bad input stops the decoder (``state`` ERROR, :attr:`error` set) but is
    raised only by :meth:`next_event`, after every event completed before it.

    Payload buffers come from ``allocate(size)``; with ``allocate=ASK`` the
    decoder instead emits a :class:`PacketHeader` and reads nothing more until
    :meth:`provide_buffer` is called (the owner of the memory decides first).
    """

    def __init__(
        self,
        *,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        allocate: Callable[[int], PayloadBuffer] | None = _default_allocate,
        ram: bool = False,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        if max_packet_size < VFIO_HEADER.size:
            raise ValueError(f"max_packet_size must be at least {VFIO_HEADER.size}")
        self.max_packet_size = max_packet_size
        self._allocate = allocate
        #: RAM and SYNC packets are taken (--ram); otherwise they are an error naming it.
        self.ram = ram
        self._ram_header = bytearray(ram_header_size(page_size)) if ram else bytearray()
        self._ram_packet = False  # the payload awaited is a RAM packet's page data
        self._main_buffer: bytearray | None = None
        self.state = DecoderState.HANDSHAKE
        self._events: deque[Event] = deque()
        self._handshake = bytearray(HANDSHAKE.size)
        self._prefix = bytearray(PACKET_PREFIX_SIZE)
        self._unit = memoryview(self._handshake)  # the memory being filled
        self._filled = 0
        self._checked = 0  # how many prefix bytes have been validated
        # header fields of the packet being received
        self._device: DeviceKey | None = None
        self._idx = 0
        self._config = False
        self._payload: PayloadBuffer | None = None
        self._payload_size = 0
        # The last packet's raw idstr and instance, and its key: most packets
        # of a channel name the same device, so its key is made once.
        self._last_name: tuple[bytes, int] | None = None
        self._last_device: DeviceKey | None = None
        #: Bytes consumed so far, and complete packets decoded.
        self.bytes_received = 0
        self.packets = 0
        #: Why the decoder stopped (state ERROR); raised by :meth:`next_event`.
        self.error: ProtocolError | None = None

    # -- feeding ----------------------------------------------------------------

    def get_buffer(self) -> memoryview:
        """The memory the next bytes of the stream belong in (never empty)."""
        if self.state in (DecoderState.CLOSED, DecoderState.ERROR, DecoderState.AWAITING_BUFFER):
            raise RuntimeError(f"decoder is {self.state.value}")
        return self._unit[self._filled :]

    def provide_buffer(self, buffer: PayloadBuffer, size: int | None = None) -> None:
        """The payload buffer a :class:`PacketHeader` asked for (at least ``size`` bytes);
        for a :class:`RamHeader`, ``size`` is its page data's (the owner parsed it)."""
        if self.state is not DecoderState.AWAITING_BUFFER:
            raise RuntimeError(f"decoder is {self.state.value}, not awaiting a buffer")
        if self._ram_packet:
            if size is None:
                raise ValueError("a RAM packet's buffer comes with its data size")
            self._payload_size = size
        self._start_payload(buffer)

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last :meth:`get_buffer`."""
        self._filled += nbytes
        self.bytes_received += nbytes
        try:
            if self.state is DecoderState.PAYLOAD:
                if self._filled >= self._payload_size:
                    self._payload_complete()
            elif self.state is DecoderState.HEADER:
                self._check_prefix()
            elif self.state is DecoderState.MAIN:
                self._main_bytes()
            elif self.state is DecoderState.RAM_HEADER:
                self._check_ram_header()
            else:
                self._check_handshake()
        except ProtocolError as error:
            self._stop(error)

    def _stop(self, error: ProtocolError) -> None:
        """Bad input: decode nothing more; :meth:`next_event` raises ``error`` in its turn."""
        self.state = DecoderState.ERROR
        self.error = error

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` in; events become available from :meth:`next_event`."""
        view = memoryview(data).cast("B")
        while view and self.state is not DecoderState.ERROR:  # the rest is never read
            if self.state is DecoderState.AWAITING_BUFFER:
                raise RuntimeError("provide_buffer() first: the decoder is awaiting a buffer")
            target = self.get_buffer()
            n = min(len(target), len(view))
            target[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)

    @property
    def needed(self) -> int:
        """Bytes still to come before the unit being received (handshake, header or
        payload) is complete: what a reader can wait for. 0 when nothing is read now
        (awaiting a buffer, closed, stopped)."""
        if self.state in (DecoderState.AWAITING_BUFFER, DecoderState.CLOSED, DecoderState.ERROR):
            return 0
        if self.state is DecoderState.PAYLOAD:
            return self._payload_size - self._filled
        return len(self._unit) - self._filled

    @property
    def has_events(self) -> bool:
        """:meth:`next_event` has something to return (an event, or the error)."""
        return bool(self._events) or self.error is not None

    def next_event(self) -> Event | None:
        """The next complete handshake or packet, or ``None`` when more data is needed.

        Once they are all taken, raises the :class:`ProtocolError` (a
        :class:`HandshakeError` for the handshake) that stopped the decoder,
        and again on every later call.
        """
        if self._events:
            return self._events.popleft()
        if self.error is not None:
            raise self.error.with_traceback(None)
        return None

    def eof(self) -> None:
        """The peer closed the stream. Clean only at a packet boundary; otherwise
        :meth:`next_event` raises why."""
        if self.state in (DecoderState.ERROR, DecoderState.CLOSED):
            return
        if self.state is DecoderState.MAIN:
            self.state = DecoderState.CLOSED  # the main stream's parser says if it was complete
        elif self.state is DecoderState.HANDSHAKE:
            self._stop(handshake_closed(self._filled))
        elif self.state in (DecoderState.PAYLOAD, DecoderState.AWAITING_BUFFER) or self._filled:
            self._stop(self.truncated_error())
        else:
            self.state = DecoderState.CLOSED

    @property
    def inside_unit(self) -> bool:
        """Part of a handshake or packet has been received, not all of it."""
        return self.state in (DecoderState.PAYLOAD, DecoderState.AWAITING_BUFFER) or (
            self.state in (DecoderState.HEADER, DecoderState.RAM_HEADER) and self._filled > 0
        )

    def truncated_error(self) -> ProtocolError:
        """The error for a stream that ends here (see :meth:`eof`)."""
        ram = self._ram_packet or self.state is DecoderState.RAM_HEADER
        in_payload = self.state in (DecoderState.PAYLOAD, DecoderState.AWAITING_BUFFER)
        received = self._filled if ram or self.state is not DecoderState.AWAITING_BUFFER else 0
        state, idx, size = self.state.value, self._idx, self._payload_size
        return truncated(state, ram, in_payload, received, idx, size, self._device)

    # -- units ----------------------------------------------------------------

    def _check_handshake(self) -> None:
        buf = self._handshake
        filled = self._filled
        if filled >= 4 and self._checked < 4 and bytes(buf[:4]) == QEMU_VM_FILE_MAGIC:
            # Whether it is taken is the core's decision (Connections.accept_main).
            self._events.append(MainChannel())
            self.state = DecoderState.MAIN
            self._main_buffer = bytearray(MAIN_READ_SIZE)
            self._unit = memoryview(self._main_buffer)
            self._events.append(MainBytes(bytes(buf[:filled])))
            self._filled = 0
            return
        self._checked = check_handshake(buf, filled, self._checked)
        if filled == HANDSHAKE.size:
            _, _, uuid, channel_id = HANDSHAKE.unpack(buf)
            self._events.append(ChannelHandshake(channel_id, uuid))
            self._start_header()

    def _main_bytes(self) -> None:
        assert self._main_buffer is not None
        self._events.append(MainBytes(bytes(self._main_buffer[: self._filled])))
        self._filled = 0

    def _check_ram_header(self) -> None:
        if self._filled == len(self._ram_header):
            self._ram_packet = True
            self.state = DecoderState.AWAITING_BUFFER
            self._events.append(RamHeader(bytes(self._ram_header)))

    def _start_header(self) -> None:
        self._ram_packet = False
        self.state = DecoderState.HEADER
        self._unit = memoryview(self._prefix)
        self._filled = 0
        self._checked = 0
        self._device = None
        self._payload = None

    def _check_prefix(self) -> None:
        buf = self._prefix
        filled = self._filled
        if filled == PACKET_PREFIX_SIZE and self._checked == 0 and self._prefix_valid():
            self._header_complete()
            return
        # Part of a prefix, or something in it is wrong: field by field, in order,
        # so that the first bad field is the one reported.
        if self._checked < PACKET_HEADER.size and filled >= 4:
            checked = check_packet_header(buf, filled, self._checked, self.ram)
            if checked is None:  # a RAM packet (--ram): the rest of its header goes there
                self._ram_header[:filled] = buf[:filled]
                self._unit = memoryview(self._ram_header)
                self.state = DecoderState.RAM_HEADER
                self._check_ram_header()
                return
            self._checked = checked
        if filled >= IDSTR_END and self._checked < IDSTR_END:
            check_idstr(buf)
            self._checked = IDSTR_END
        if filled >= DEVICE_STATE_HEADER.size and self._checked < DEVICE_STATE_HEADER.size:
            self._device, self._payload_size = device_state_header(buf, self.max_packet_size)
            self._checked = DEVICE_STATE_HEADER.size
        if filled >= VFIO_IDX_END and self._checked < VFIO_IDX_END:
            self._idx = vfio_idx(buf, self._device)
            self._checked = VFIO_IDX_END
        if filled == PACKET_PREFIX_SIZE:
            (flags,) = struct.unpack_from(">I", buf, VFIO_IDX_END)
            self._config = bool(flags & _CONFIG_STATE)
            self._header_complete()

    def _prefix_valid(self) -> bool:
        """The fast path: a whole prefix that passes every check at once (the common
        case) is taken in one unpack; False leaves it to the checks one by one."""
        magic, version, flags, raw_idstr, instance_id, size, vfio_version, idx, vfio_flags = (
            PACKET_PREFIX.unpack_from(self._prefix)
        )
        if not (
            magic == MULTIFD_MAGIC
            and version == MULTIFD_VERSION
            and flags == _DEVICE_STATE_ONLY
            and raw_idstr[MAX_IDSTR_LEN] == 0
            and VFIO_HEADER.size <= size <= self.max_packet_size
            and vfio_version == VFIO_STATE_VERSION
            and idx != INVALID_IDX
        ):
            return False
        name = (raw_idstr, instance_id)
        if name != self._last_name:
            idstr = raw_idstr[: raw_idstr.index(0)].decode("utf-8", "surrogateescape")
            self._last_device = DeviceKey(idstr, instance_id)
            self._last_name = name
        self._device = self._last_device
        self._payload_size = size - VFIO_HEADER.size
        self._idx = idx
        self._config = bool(vfio_flags & _CONFIG_STATE)
        self._checked = PACKET_PREFIX_SIZE
        return True

    def _header_complete(self) -> None:
        """Every prefix field is checked: ask for the payload's buffer, or allocate it."""
        if self._allocate is None:
            assert self._device is not None
            self.state = DecoderState.AWAITING_BUFFER
            self._events.append(
                PacketHeader(self._device, self._idx, self._config, self._payload_size)
            )
        else:
            self._start_payload(self._allocate(self._payload_size))

    def _start_payload(self, buffer: PayloadBuffer) -> None:
        size = self._payload_size
        self._payload = buffer
        # The payload, and as much of the next header as the buffer has room for.
        self._unit = memoryview(buffer)[: size + PACKET_PREFIX_SIZE]
        self._filled = 0
        self.state = DecoderState.PAYLOAD
        if size == 0:
            self._finish_packet()

    def _payload_complete(self) -> None:
        """The payload is in; bytes read past it are the next header's."""
        ahead = self._filled - self._payload_size
        if ahead == 0:
            self._finish_packet()
            return
        read_ahead = self._unit[self._payload_size : self._filled]
        self._finish_packet()
        self._prefix[:ahead] = read_ahead
        self._filled = ahead
        self._check_prefix()

    def _finish_packet(self) -> None:
        payload = self._payload
        if self._ram_packet:
            assert payload is not None
            self._events.append(RamData(payload, self._payload_size))
            self._start_header()
            return
        device = self._device
        assert payload is not None and device is not None
        self._events.append(
            DevicePacket(device, self._idx, self._config, payload, self._payload_size)
        )
        self.packets += 1
        self._start_header()
