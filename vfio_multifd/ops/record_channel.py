"""The recording side of a connection: the channel whose decoder hands every byte it
is fed to its :class:`ChannelRecording`, which keeps the bytes until the handshake is
decided and then passes them to the recorder's writer (``recorder.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from ..core.decoder import ASK, ChannelDecoder
from ..daemon.channel import ChannelOwner, ChannelProtocol
from ..errors import HandshakeError
from .manifest import ChannelEnd

#: Bytes of a connection kept while its handshake is undecided (the decoder reads
#: at most the 64-byte handshake before that; this only bounds the unexpected).
MAX_PENDING_BYTES = 64 << 10


class RecordSink(Protocol):
    """What a channel's recording needs of the recorder."""

    @property
    def decided(self) -> bool:
        """The migration's outcome is known: how a channel ends is no longer noted."""

    def write(self, sink: int, view: memoryview) -> None: ...


class ChannelRecording:
    """One connection's recording, on the loop thread: pending until its handshake is
    decided, then a sink of the writer thread (accepted), or a refused file, or nothing."""

    __slots__ = (
        "channel_id",
        "end",
        "first_byte",
        "last_byte",
        "peer",
        "pending",
        "received",
        "recorder",
        "sink",
    )

    def __init__(self, recorder: RecordSink) -> None:
        self.recorder = recorder
        self.pending: bytearray | None = bytearray()  # None once decided
        self.sink: int | None = None  # the writer's file, once accepted
        self.channel_id: int | None = None
        self.peer = "?"
        self.received = 0
        self.first_byte: float | None = None  # monotonic
        self.last_byte: float | None = None
        self.end: ChannelEnd | None = None

    def data(self, view: memoryview) -> None:
        now = time.monotonic()
        if self.first_byte is None:
            self.first_byte = now
        self.last_byte = now
        self.received += len(view)
        if self.sink is not None:
            self.recorder.write(self.sink, view)
        elif self.pending is not None and len(self.pending) + len(view) <= MAX_PENDING_BYTES:
            self.pending += view

    def ended(self, end: ChannelEnd) -> None:
        if self.end is None and not self.recorder.decided:
            self.end = end


_NOTHING = memoryview(b"")


class RecordingDecoder(ChannelDecoder):
    """A channel's decoder that hands every byte it is given to the recording first.

    The hook is here rather than in the protocol so that whoever feeds the
    decoder is recorded alike: the channel's own ``buffer_updated`` on the
    event loop, TLS decrypting into it, or anything else that reads the socket
    for the channel with ``get_buffer`` / ``buffer_updated``. The bytes of
    ``buffer_updated(n)`` are the first ``n`` of the last buffer handed out.
    """

    def __init__(
        self, recording: ChannelRecording, *, max_packet_size: int, ram: bool = False
    ) -> None:
        super().__init__(max_packet_size=max_packet_size, allocate=ASK, ram=ram)
        self.recording = recording
        self._given = _NOTHING  # the buffer handed out last

    def get_buffer(self) -> memoryview:
        self._given = buffer = super().get_buffer()
        return buffer

    def buffer_updated(self, nbytes: int) -> None:
        # Not kept past this call: a view would keep a released chunk's mmap alive.
        given, self._given = self._given, _NOTHING
        self.recording.data(given[:nbytes])  # first: these bytes may complete the handshake
        super().buffer_updated(nbytes)

    def eof(self) -> None:
        self._given = _NOTHING
        self.recording.ended(ChannelEnd.EOF)
        super().eof()


class RecordingChannel(ChannelProtocol):
    """A channel whose decoder records what it is fed."""

    def __init__(
        self,
        recorder: RecordSink,
        owner: ChannelOwner,
        conn: int,
        *,
        peer: str,
        max_packet_size: int,
        ram: bool = False,
    ) -> None:
        super().__init__(owner, conn, peer=peer, max_packet_size=max_packet_size, ram=ram)
        self.recording = ChannelRecording(recorder)
        self.recording.peer = peer
        self.decoder = RecordingDecoder(self.recording, max_packet_size=max_packet_size, ram=ram)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused connection whose bytes are kept (its file, on the writer's sink)."""

    recording: ChannelRecording
    sink: int
    file: str
    error: HandshakeError
