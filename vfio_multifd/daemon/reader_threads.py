"""Reader threads: accepted channels read on event loops of their own, one per thread.

The only module that knows about these threads. One event loop thread cannot
receive faster than one core copies bytes out of the kernel: every ``read`` of
every channel runs on it. So once a channel is accepted (its handshake read,
checked and admitted on the main loop, as before), its socket moves to one of
``--reader-threads`` threads, each running its own event loop of the main
loop's kind. There the channel's decoder reads payloads straight into their
chunk buffers (the kernel's copy runs without the GIL, so several cores copy
at once) and cuts the stream into packets. Everything else stays on the main
loop: the migration core, with its memory bound and reassembly, the loaders.

The two sides talk in batches, each way with ``call_soon_threadsafe``:

* reader -> main: the events one loop iteration decoded on a channel (at most
  a complete packet and the next header, since a header stops reading until
  its buffer comes), the bytes read meanwhile, its decoding error, its end of
  stream, its loss (with the decoder's error if it was inside a packet): the
  main loop hands them to the channel's owner, as a channel read there does;
* main -> reader: the payload buffer granted for a header, "hold / go on",
  and the hang-up that carries the verdict.

Backpressure is what it was: a payload is read only into a buffer the main
loop's core granted (charged against --max-queued-bytes). Nothing on the main
loop reads the reader's decoder: counts come with the batches. The handshake
stays on the main loop: shedding, refusals and descriptor counting see only
connections that are not yet channels. TLS channels are not handed off
(their TLS state lives in the main loop's layer).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from ..core.decoder import ChannelDecoder, DecoderState
from ..core.wire import DevicePacket, PacketHeader
from ..errors import ProtocolError
from .channel import ChannelProtocol, hang_up, switch_reading

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer as PayloadBuffer

log = structlog.get_logger("vfio_multifd.reader_threads")

Event = DevicePacket | PacketHeader


#: Below this many cores the main loop reads every channel itself (see default_reader_threads).
READER_THREADS_MIN_CPUS = 4


def default_reader_threads(channels: int, cpus: int | None = None) -> int:
    """Threads that read channels when --reader-threads is not given: half the
    cores, at most one per channel, and none below :data:`READER_THREADS_MIN_CPUS`.

    A reader thread costs CPU (two handoffs per packet, and the GIL passed back
    and forth) and pays off only with a core to itself: the main loop needs one
    (admission, queueing, loaders), each device's writer part of another
    (digests). Measured on 2 cores shared with the sender (benchmarks/throughput.py,
    docs/benchmarks.md), one reader thread cost 0.14 CPU s/GB more and received a quarter less
    than none.
    """
    cpus = cpus if cpus is not None else len(os.sched_getaffinity(0))
    if cpus < READER_THREADS_MIN_CPUS:
        return 0
    return min(channels, cpus // 2)


class ReaderThreads:
    """``count`` threads, each running an event loop that reads the channels handed to it."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._loops: list[asyncio.AbstractEventLoop] = []
        self._threads: list[threading.Thread] = []
        self._channels = [0] * count  # channels handed to each thread so far
        self._main: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start the threads, each on a new loop of the running loop's kind."""
        main = asyncio.get_running_loop()
        self._main = main
        loop_type: Callable[[], asyncio.AbstractEventLoop] = type(main)
        for n in range(self.count):
            loop = loop_type()
            # What goes wrong on a reader loop is reported as on the main loop.
            loop.set_exception_handler(main.get_exception_handler())
            started = threading.Event()
            thread = threading.Thread(
                target=_run, args=(loop, started), name=f"reader-{n}", daemon=True
            )
            thread.start()
            started.wait()
            self._loops.append(loop)
            self._threads.append(thread)

    def hand_off(self, channel: ChannelProtocol) -> ReadElsewhere | None:
        """Move an accepted channel's socket to the reader thread with the fewest
        channels; returns what now stands for it on the main loop, or None if it
        stays where it is (no threads, or no descriptor to spare)."""
        transport = channel.transport
        sock = None if transport is None else transport.get_extra_info("socket")
        if not self._loops or sock is None or self._main is None or transport is None:
            return None
        try:
            moved = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:  # out of descriptors: it is read where it is
            return None
        n = self._channels.index(min(self._channels))
        self._channels[n] += 1
        loop = self._loops[n]
        reader = ChannelReader(channel.decoder, self._main, loop)
        elsewhere = ReadElsewhere(channel, reader, loop)
        reader.elsewhere = elsewhere
        channel.detach()
        # Our descriptor keeps the connection open: closing the main loop's one
        # sends nothing to the peer (no shutdown, no reset).
        transport.abort()
        loop.call_soon_threadsafe(reader.start, moved)
        return elsewhere

    async def stop(self) -> None:
        """Close what the readers still hold, stop their loops, wait for the threads."""
        for loop in self._loops:
            with contextlib.suppress(RuntimeError):  # closed already
                loop.call_soon_threadsafe(_stop_soon, loop)
        threads, self._threads = self._threads, []
        main = asyncio.get_running_loop()
        for thread in threads:
            await main.run_in_executor(None, thread.join)
        loops, self._loops = self._loops, []
        for loop in loops:
            loop.close()


def _run(loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(started.set)
    try:
        loop.run_forever()
    finally:
        # A socket handed off just before the end may not be connected yet: its
        # task, cancelled, closes it.
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        with contextlib.suppress(Exception):
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())


def _stop_soon(loop: asyncio.AbstractEventLoop) -> None:
    # Two iterations: a transport closed just before (the stdlib's closes its
    # socket in a callback of its own) is closed before the loop stops.
    loop.call_soon(loop.call_soon, loop.stop)


#: A reader thread in the middle of a long payload says how far it got at least
#: every this many bytes (progress for the watchdog and the status socket).
PROGRESS_BYTES = 4 << 20


class ChannelReader(asyncio.BufferedProtocol):
    """The reader loop's side of one handed-off channel: it reads and decodes.

    Its decoder is the channel's own (mid-stream, just after the handshake);
    from the handoff on, only this thread touches it.
    """

    def __init__(
        self,
        decoder: ChannelDecoder,
        main: asyncio.AbstractEventLoop,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.decoder = decoder
        self.main = main
        self.loop = loop
        self.elsewhere: ReadElsewhere | None = None  # where batches go, on the main loop
        self.transport: asyncio.Transport | None = None
        self._events: list[Event] = []
        self._received = 0  # bytes read since the last batch
        self._error: ProtocolError | None = None
        self._eof = False
        self._flush_scheduled = False
        self._reading = True
        self._held = False  # the main loop asked us to stop reading
        self._close: bool | None = None  # close(completed=) asked before connection_made
        self._connecting: asyncio.Task[None] | None = None

    # -- on the reader loop ----------------------------------------------------------

    def start(self, sock: socket.socket) -> None:
        self._connecting = self.loop.create_task(self._connect(sock))

    async def _connect(self, sock: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: self, sock)
        except asyncio.CancelledError:  # the reader thread stops
            if self.transport is None:
                sock.close()
            raise
        except Exception as error:  # the peer is gone already
            sock.close()
            self._lost(error)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self._close is not None:
            self._apply_close(self._close)
            return
        self._update_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        decoder = self.decoder
        decoder.buffer_updated(nbytes)
        self._received += nbytes
        # The fast path: in the middle of a payload there is nothing to decode.
        if decoder.state is DecoderState.PAYLOAD and not decoder.has_events:
            if self._received >= PROGRESS_BYTES:
                self._schedule_flush()
            return
        self._collect()

    def eof_received(self) -> bool:
        self.decoder.eof()
        self._collect()
        self._eof = True
        self._schedule_flush()
        return True  # the session closes the channel once the migration ends

    def connection_lost(self, exc: Exception | None) -> None:
        self._flush()
        self._lost(exc)

    def _lost(self, exc: BaseException | None) -> None:
        decoder = self.decoder
        truncated = decoder.truncated_error() if decoder.inside_unit else None
        assert self.elsewhere is not None
        self._post(self.elsewhere.lost, exc, truncated)

    def _collect(self) -> None:
        decoder = self.decoder
        try:
            while (event := decoder.next_event()) is not None:
                assert isinstance(event, (DevicePacket, PacketHeader))
                self._events.append(event)
        except ProtocolError as error:
            self._error = error
        self._update_reading()
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        # One batch per loop iteration: a payload's last read and the next header's
        # read usually come in the same one.
        if not self._flush_scheduled and (
            self._events or self._error or self._eof or self._received
        ):
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not (self._events or self._error or self._eof or self._received):
            return
        events, self._events = self._events, []
        error, self._error = self._error, None
        eof, self._eof = self._eof, False
        received, self._received = self._received, 0
        assert self.elsewhere is not None
        self._post(self.elsewhere.take_batch, events, received, error, eof)

    def _post(self, callback: Callable[..., object], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the main loop is closed: nobody listens
            self.main.call_soon_threadsafe(callback, *args)

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        state = self.decoder.state
        wanted = not self._held and state in _READING
        self._reading = switch_reading(transport, reading=self._reading, wanted=wanted)

    # -- asked by the main loop (run on the reader loop) -------------------------------

    def provide_buffer(self, buffer: PayloadBuffer) -> None:
        if self.decoder.state is not DecoderState.AWAITING_BUFFER:
            return  # the channel failed meanwhile
        self.decoder.provide_buffer(buffer)
        self._collect()  # a payload of 0 bytes is complete at once

    def hold(self, held: bool) -> None:
        self._held = held
        self._update_reading()

    def close(self, completed: bool) -> None:
        """Hang up as ChannelProtocol.close does: cleanly if ``completed``, else a reset."""
        if self.transport is None:
            self._close = completed  # not connected yet: close as soon as it is
            return
        self._apply_close(completed)

    def _apply_close(self, completed: bool) -> None:
        assert self.transport is not None
        hang_up(self.transport, completed=completed)


_READING = (DecoderState.HEADER, DecoderState.PAYLOAD)


class ReadElsewhere:
    """On the main loop, a channel read by a reader thread: its batches go to the
    channel's owner as if decoded here, and what the session asks of the channel
    (a buffer, hold, close) is passed to the thread, in order."""

    def __init__(
        self, channel: ChannelProtocol, reader: ChannelReader, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.channel = channel
        self.reader = reader
        self.loop = loop
        self._closing = False

    # -- from the reader thread ------------------------------------------------------

    def take_batch(
        self, events: list[Event], received: int, error: ProtocolError | None, eof: bool
    ) -> None:
        channel = self.channel
        owner = channel.owner
        if received:
            owner.received(channel, received)
        for event in events:
            if isinstance(event, PacketHeader):
                buffer = owner.header(channel, event)
                if buffer is not None:
                    self.provide_buffer(buffer)
            else:
                owner.packet(channel, event)
        if error is not None:
            owner.decode_error(channel, error)
        elif eof:
            owner.eof(channel)

    def lost(self, exc: BaseException | None, truncated: ProtocolError | None) -> None:
        self.channel.owner.lost(self.channel, exc, truncated)

    # -- to the reader thread ----------------------------------------------------------

    def _call(self, callback: Callable[..., object], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the reader loop is stopped: it closed all
            self.loop.call_soon_threadsafe(callback, *args)

    def provide_buffer(self, buffer: PayloadBuffer) -> None:
        self._call(self.reader.provide_buffer, buffer)

    def hold(self, held: bool) -> None:
        self._call(self.reader.hold, held)

    def close(self, *, completed: bool = False) -> None:
        if not self._closing:
            self._closing = True
            self._call(self.reader.close, completed)
