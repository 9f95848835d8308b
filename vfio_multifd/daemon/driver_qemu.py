"""The driver's part for QEMU's own streams: its main channel and RAM packets.

A mixin of :class:`~.driver.Driver`: the main channel's bytes go to the core and to
the main stream's parser (``core/mainstream.py``), whose events are handed to the
core while it is not held at a sync point; RAM headers and page data go to the
core, and its ``CreateRamImages`` and ``WriteRam`` commands run on the RAM sink's
thread (``ram_sink.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..core import commands as cmd
from ..core.decoder import RamData
from ..core.mainstream import MainStreamParser
from ..core.migration import Migration
from ..errors import ProtocolError
from ..ops.recorder import Recorder
from .channel import ChannelProtocol

if TYPE_CHECKING:
    from ..core.wire import DeviceKey
    from .loader import DeviceLoader
    from .ram_sink import RamSink


def clock() -> float:
    """The core's clock (monotonic; the same as the loop's for asyncio, finer than uvloop's)."""
    return time.monotonic()


class QemuStreamsDriver:
    # Set by Driver (and the session): what the methods below use.
    core: Migration
    recorder: Recorder | None
    ram_sink: RamSink | None
    loaders: dict[DeviceKey, DeviceLoader]
    _loop: asyncio.AbstractEventLoop | None
    _connections: dict[int, ChannelProtocol]

    if TYPE_CHECKING:

        def _feed(self, method: Callable[..., Any], *args: Any) -> Any: ...
        def _acting_together(self) -> contextlib.AbstractContextManager[None]: ...
        def fail(self, error: BaseException) -> None: ...

    def _start_qemu_streams(self) -> None:
        # QEMU's main channel (--main-stream): its parser, like a channel's decoder.
        self._main_conn: int | None = None
        self._main_parser: MainStreamParser | None = None
        self._main_eof = False  # its end came; the core hears it once its events are in
        self._draining = False

    def main_channel(self, channel: ChannelProtocol) -> None:
        self._feed(self.core.main_channel, channel.conn, clock())

    def main_data(self, channel: ChannelProtocol, data: bytes) -> None:
        if channel.conn != self._main_conn:
            return  # refused: its bytes are nobody's
        self._feed(self.core.main_data, channel.conn, data, clock())
        assert self._main_parser is not None
        self._main_parser.receive_data(data)
        self._drain_main()

    def _drain_main(self) -> None:
        """Hand the main stream's events to the core while it is not held at a sync point;
        then, once its end came and every event is in, that end."""
        parser, conn = self._main_parser, self._main_conn
        if parser is None or conn is None or self._draining:
            return
        # One act for the whole drain (after it, so that a resume it carries out drains
        # again): the core's page writes merge while they wait.
        with self._acting_together():
            self._draining = True
            try:
                self._hand_events(parser, conn)
            finally:
                self._draining = False

    def _hand_events(self, parser: MainStreamParser, conn: int) -> None:
        while not self.core.main_held:
            try:
                event = parser.next_event()
            except ProtocolError as error:
                self._feed(self.core.decode_error, conn, error, clock())
                return
            if event is None:
                break
            self._feed(self.core.main_event, conn, event, clock())
        else:
            return
        if self._main_eof:
            self._main_eof = False
            self._feed(self.core.eof, conn, clock())

    def ram_header(self, channel: ChannelProtocol, raw: bytes) -> bytearray | None:
        buffer: bytearray | None = self._feed(self.core.ram_header, channel.conn, raw, clock())
        return buffer

    def ram_data(self, channel: ChannelProtocol, data: RamData) -> None:
        assert isinstance(data.buffer, bytearray)
        self._feed(self.core.ram_data, channel.conn, data.buffer, clock())

    def _accepted_main(self, command: cmd.AcceptedMain) -> None:
        channel = self._connections[command.conn]
        channel.log = channel.log.bind(channel="main")
        channel.log.info("channel_accepted", kind="main")
        if self.recorder is not None:  # before anything else may read the channel
            self.recorder.accepted(channel, None)
        self._main_conn = command.conn
        self._main_parser = MainStreamParser(page_size=self.core.config.page_size)

    def _create_ram_images(self, command: cmd.CreateRamImages) -> None:
        sink = self.ram_sink
        assert sink is not None and self._loop is not None
        future = self._loop.run_in_executor(sink.executor, sink.create, command.blocks)
        future.add_done_callback(self._ram_done)

    def _write_ram(self, command: cmd.WriteRam) -> None:
        sink = self.ram_sink
        assert sink is not None and self._loop is not None
        future = self._loop.run_in_executor(sink.executor, sink.write, command.pages, command.main)
        future.add_done_callback(functools.partial(self._ram_written, command.conn, command.nbytes))

    def _write_precopy(self, command: cmd.WritePrecopy) -> None:
        # On the device's own writer, so its pre-copy bytes come before its chunks.
        future = self.loaders[command.device].write_precopy(command.data)
        future.add_done_callback(functools.partial(self._ram_written, command.conn, command.nbytes))

    def _ram_done(self, future: asyncio.Future[None]) -> None:
        if not future.cancelled() and future.exception() is not None:
            self.fail(future.exception())  # type: ignore[arg-type]

    def _ram_written(self, conn: int, nbytes: int, future: asyncio.Future[None]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            self.fail(error)
            return
        self._feed(self.core.ram_written, conn, nbytes, clock())
