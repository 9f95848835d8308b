"""One migration, destination side: listen, accept channels, load devices, finish.

The session is the one boundary errors flow back to. Channel readers, loaders
and the watchdog report problems through :meth:`Session.fail`; :meth:`run`
then stops everything, discards every output and raises the first error.
Outputs become final only when every device is complete (PROTOCOL.md 3.6).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import socket
import stat
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from .channel import ChannelProtocol, ChannelReader, ChannelState
from .config import Address, QueueFullPolicy, ReceiveSettings
from .errors import (
    Cancelled,
    DeviceIOError,
    HandshakeError,
    MultifdError,
    Reason,
    SessionError,
    UsageError,
    os_error_text,
)
from .loader import DeviceLoader
from .logconfig import debug_enabled
from .output import Output
from .pool import BufferPool
from .reassembly import Chunk, DeviceBuffer, ReassemblyBuffer
from .spill import SpillStore
from .wire import ChannelHandshake, DeviceKey, DevicePacket, check_handshake

log = structlog.get_logger("vfio_multifd.session")

#: How long a channel whose early chunk finds memory full waits for another
#: channel to bring the chunk a loader needs, before it spills (once per stall).
SPILL_GRACE = 0.025
#: What each chunk held in memory costs besides its data (its Chunk, the
#: packet and buffer objects, dict entries: measured at about 235 bytes).
CHUNK_OVERHEAD = 256
#: How long an aborting session waits for a writer thread's last write.
ABANDON_WRITER_AFTER = 0.5


class SessionStatus(enum.StrEnum):
    """QMP's names for a migration's states."""

    SETUP = "setup"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class DeviceResult:
    device: DeviceKey
    data_path: Path
    config_path: Path
    bytes: int
    chunks: int
    config_bytes: int
    digest: str
    seconds: float  # from the first byte received to the device's completion


@dataclass(frozen=True, slots=True)
class SessionResult:
    devices: tuple[DeviceResult, ...]
    seconds: float  # first byte received to the last device complete
    bytes_received: int  # on all channels, headers included
    peak_queued_bytes: int
    spilled_bytes: int
    paused_seconds: float

    @property
    def data_bytes(self) -> int:
        return sum(device.bytes for device in self.devices)

    @property
    def mb_per_s(self) -> float:
        return self.data_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


class Session:
    def __init__(self, settings: ReceiveSettings) -> None:
        self.settings = settings
        self.status = SessionStatus.SETUP
        # Idle pooled buffers are memory too: under a bound, keep no more than it.
        bound = settings.max_queued_bytes
        self.pool = BufferPool(max_idle_bytes=min(64 << 20, bound or 64 << 20))
        self.reassembly = ReassemblyBuffer(
            (spec.key for spec in settings.devices),
            max_queued_bytes=settings.max_queued_bytes,
            # QEMU's fail policy knows no reserve: it fails exactly at the bound.
            reserve=0
            if settings.on_queue_full is QueueFullPolicy.FAIL
            else min(settings.max_packet_size, (settings.max_queued_bytes or 0) // 4),
            chunk_overhead=CHUNK_OVERHEAD if settings.max_queued_bytes is not None else 0,
        )
        self.conditions = {spec.key: asyncio.Condition() for spec in settings.devices}
        # Set (and at once cleared) whenever queued memory shrinks or becomes
        # drainable: wakes the
        # channels waiting to make room under --max-queued-bytes. Synchronous,
        # so a wake-up cannot slip between a check and the wait.
        self.memory_changed = asyncio.Event()
        self._paused_channels = 0  # channels waiting in _make_room
        self._pause_started = 0.0
        self._grace_spent_at = -1  # bytes written when a grace last expired
        self.spill: SpillStore | None = None
        self.loaders = {
            spec.key: DeviceLoader(
                self.reassembly,
                self.reassembly.devices[spec.key],
                self.conditions[spec.key],
                Output(
                    spec.data_path, device=str(spec.key), what="data file", fsync=settings.fsync
                ),
                Output(
                    spec.config_path, device=str(spec.key), what="config file", fsync=settings.fsync
                ),
                digest=settings.digest,
                written=self._written,
                read_spilled=self._read_spilled,
                failed=self._writer_failed,
            )
            for spec in settings.devices
        }
        self.channels: dict[int, ChannelProtocol] = {}
        self.refused: list[tuple[str, HandshakeError]] = []  # (peer, why)
        self.connections: set[ChannelProtocol] = set()
        self.address: Address | None = None  # where we listen, once we do
        self.listening = asyncio.Event()
        self.error: MultifdError | None = None
        self.started: float | None = None  # monotonic, first channel accepted
        self.finished: float | None = None  # monotonic, completed, failed or cancelled
        self.paused_seconds = 0.0
        self._failed: asyncio.Future[MultifdError] | None = None
        self._pending_error: MultifdError | None = None
        self._committing = False
        self._owns_unix_path = False
        # True if a writer thread was stuck (a FIFO nobody reads) and left behind:
        # the process must then exit without waiting for it.
        self.abandoned_writers = False
        self._readers: set[asyncio.Task[None]] = set()
        self._spill_executor = ThreadPoolExecutor(1, thread_name_prefix="spill")
        self.log = log
        # QEMU's trace point vfio_load_state_device_buffer_incoming, per packet:
        # decided once here, so a disabled debug level costs one test per packet.
        self._trace = log.bind()
        self._trace_incoming = debug_enabled(self._trace)

    # -- running ----------------------------------------------------------------

    async def run(self) -> SessionResult:
        """Receive the whole migration. Raises a :class:`MultifdError` on failure."""
        loop = asyncio.get_running_loop()
        self._failed = loop.create_future()
        if self._pending_error is not None:  # cancelled or failed before run()
            self._failed.set_result(self._pending_error)
        try:
            return await self._run(loop)
        except asyncio.CancelledError:
            self._set_status(SessionStatus.CANCELLED)
            raise
        except MultifdError as error:
            self.error = error
            self._set_status(
                SessionStatus.CANCELLED if isinstance(error, Cancelled) else SessionStatus.FAILED
            )
            raise

    async def _run(self, loop: asyncio.AbstractEventLoop) -> SessionResult:
        settings = self.settings
        server: asyncio.Server | None = None
        tasks: list[asyncio.Task[None]] = []
        try:
            await self._open_outputs()
            self._check_spill_dir()
            server = await self._listen(loop)
            tasks = [
                asyncio.create_task(loader.run(), name=f"loader {key}")
                for key, loader in self.loaders.items()
            ]
            tasks.append(asyncio.create_task(self._watchdog(), name="watchdog"))
            loaded: asyncio.Future[list[None]] = asyncio.gather(*tasks[:-1])
            # On failure the loaders are cancelled; the error that counts is elsewhere.
            loaded.add_done_callback(_retrieve)
            assert self._failed is not None
            waiters: list[asyncio.Future[Any]] = [loaded, self._failed]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if self._failed.done():
                raise self._failed.result()
            loaded.result()  # a loader's own error (config blob, write failure)
            # Every device is complete: from here on the outcome is success, and
            # the channels we now hang up on (QEMU keeps them open) are no error.
            self._committing = True
            await self._close(server, tasks)
            server = None
            await loop.run_in_executor(None, self._commit)
            self._set_status(SessionStatus.COMPLETED)
            result = self._result()
            self._log_summary(result)
            return result
        except BaseException:
            await self._abort(server, tasks)
            raise
        finally:
            for loader in self.loaders.values():
                loader.close(wait=not self.abandoned_writers)
                if not self._committing:
                    # Even if the abort itself was cancelled: no .part file stays.
                    loader.discard_quietly()
            self._spill_executor.shutdown(wait=True, cancel_futures=True)
            if self.spill is not None:
                self.spill.close()
            if self._owns_unix_path:  # never another daemon's socket
                with contextlib.suppress(OSError):
                    os.unlink(settings.listen.path)

    async def _open_outputs(self) -> None:
        """Open every output; a FIFO waits for its reader, but a cancel still stops it."""
        assert self._failed is not None
        opening: asyncio.Future[list[None]] = asyncio.gather(
            *(loader.open() for loader in self.loaders.values())
        )
        opening.add_done_callback(_retrieve)
        waiters: list[asyncio.Future[Any]] = [opening, self._failed]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if not opening.done():
            for loader in self.loaders.values():
                loader.stop()
            with contextlib.suppress(MultifdError):
                await opening
            raise self._failed.result()
        try:
            opening.result()
        except DeviceIOError as error:
            raise UsageError(str(error)) from error

    def _commit(self) -> None:
        """On a worker thread: rename every output into place, checking all targets first.

        A rename that still fails part-way (the disk, a race) is reported with
        the outputs already in place, so nobody mistakes them for the old ones.
        """
        outputs = [output for loader in self.loaders.values() for output in loader.outputs]
        for output in outputs:
            output.check_target()
        renamed: list[Output] = []
        for output in outputs:
            if output.temp_path is None:
                continue  # a device or FIFO, written in place
            try:
                output.commit()
            except DeviceIOError as error:
                if renamed:
                    done = ", ".join(str(o.path) for o in renamed)
                    error.message += f"; already in place from this run: {done}"
                raise
            renamed.append(output)
        synced: set[Path] = set()
        for output in renamed:
            if output.path.parent not in synced:
                synced.add(output.path.parent)
                output.sync_directory()

    async def _listen(self, loop: asyncio.AbstractEventLoop) -> asyncio.Server:
        listen = self.settings.listen

        def factory() -> ChannelProtocol:
            protocol = ChannelProtocol(self)
            self.connections.add(protocol)
            return protocol

        try:
            if listen.kind == "unix":
                _claim_unix_path(listen.path)
                server = await loop.create_unix_server(factory, listen.path)
                self._owns_unix_path = True
                self.address = listen
            else:
                server = await loop.create_server(
                    factory, listen.host, listen.port, reuse_address=True
                )
                port = server.sockets[0].getsockname()[1]
                self.address = Address("tcp", listen.host, port)
        except OSError as error:
            raise UsageError(f"cannot listen on {listen}: {error.strerror or error}") from error
        self.log.info(
            "listening",
            address=str(self.address),
            channels=self.settings.channels,
            devices=[str(spec.key) for spec in self.settings.devices],
        )
        self.listening.set()
        return server

    async def _close(self, server: asyncio.Server | None, tasks: list[asyncio.Task[None]]) -> None:
        if server is not None:
            server.close()
        for protocol in list(self.connections):
            protocol.close()
        pending = [*tasks, *self._readers]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def _abort(self, server: asyncio.Server | None, tasks: list[asyncio.Task[None]]) -> None:
        await self._close(server, tasks)
        # A writer thread may be in the middle of a write: let it finish, then
        # remove every temporary file. Nothing reaches a final path. A write
        # that does not finish (a FIFO nobody reads) is abandoned, not awaited.
        loop = asyncio.get_running_loop()
        for loader in self.loaders.values():
            loader.stop()
            discarding = loop.run_in_executor(loader.executor, loader.discard)
            try:
                await asyncio.wait_for(asyncio.shield(discarding), ABANDON_WRITER_AFTER)
            except TimeoutError:
                self.abandoned_writers = True
                self.log.warning("writer_abandoned", device=str(loader.device.key))

    def fail(self, error: MultifdError) -> None:
        """Report an error that ends the migration (the first one wins)."""
        if self._committing or self.error is not None:
            return
        if self._failed is None:
            self._pending_error = self._pending_error or error
        elif not self._failed.done():
            self._failed.set_result(error)
        else:
            return
        # Show it at once (status socket), not only once the abort is done.
        if self.status in (SessionStatus.SETUP, SessionStatus.ACTIVE):
            cancelled = isinstance(error, Cancelled)
            self._set_status(SessionStatus.CANCELLING if cancelled else SessionStatus.FAILED)

    def _writer_failed(self, error: BaseException) -> None:
        if isinstance(error, MultifdError):
            self.fail(error)
        else:  # a bug rather than an I/O error: fail loudly, still cleanly
            self.fail(SessionError(Reason.DEVICE_WRITE, f"writer failed: {error!r}"))

    def cancel(self, why: str = "cancelled", *, signal_number: int | None = None) -> None:
        """Stop the migration; too late once every device is complete (then it is ignored)."""
        if self._committing or self.status not in (SessionStatus.SETUP, SessionStatus.ACTIVE):
            self.log.info("cancel_ignored", status=self.status.value, why=why)
            return
        self.fail(Cancelled(why, signal_number=signal_number))

    def _set_status(self, status: SessionStatus) -> None:
        if status is not self.status:
            self.log.info("state_change", old=self.status.value, new=status.value)
            self.status = status
            if status in _FINAL:
                self.finished = time.monotonic()

    # -- channels -----------------------------------------------------------------

    def accept_channel(self, protocol: ChannelProtocol, handshake: ChannelHandshake) -> None:
        settings = self.settings
        check_handshake(handshake, uuid=settings.uuid, channels=settings.channels)
        if handshake.channel_id in self.channels:
            raise HandshakeError(
                Reason.HANDSHAKE_DUPLICATE_CHANNEL,
                f"channel id {handshake.channel_id} is already connected",
            )
        self.channels[handshake.channel_id] = protocol
        if self.started is None:
            self.started = time.monotonic()
            self._set_status(SessionStatus.ACTIVE)
        task = asyncio.create_task(
            ChannelReader(protocol, self).run(), name=f"channel {handshake.channel_id}"
        )
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    def channel_refused(self, protocol: ChannelProtocol, error: HandshakeError) -> None:
        self.connections.discard(protocol)
        self.refused.append((protocol.peer, error))
        protocol.log.warning("channel_refused", error=str(error), reason=error.reason.value)

    def channel_closed(self, protocol: ChannelProtocol) -> None:
        """A channel ended cleanly. When all have, every device must be able to finish."""
        channels = self.channels
        if len(channels) < self.settings.channels:
            return
        if any(p.state is not ChannelState.CLOSED for p in channels.values()):
            return
        stuck = [d for d in self.reassembly.incomplete_devices() if not _fully_received(d)]
        if stuck:
            detail = "; ".join(f"device {d.key}: missing idx {d.missing()}" for d in stuck)
            self.fail(
                SessionError(
                    Reason.INCOMPLETE,
                    f"all {len(channels)} channels closed with "
                    f"{len(stuck)} device(s) incomplete: {detail}",
                )
            )

    @property
    def bytes_received(self) -> int:
        """Bytes of the accepted channels, handshakes included (refused strays are not traffic)."""
        return sum(protocol.decoder.bytes_received for protocol in self.channels.values())

    # -- queueing -----------------------------------------------------------------

    async def deliver(self, packet: DevicePacket, channel: int | None = None) -> None:
        """Queue one packet's chunk for its device's loader (a channel reader calls this)."""
        reassembly = self.reassembly
        device = reassembly.device(packet.device, packet.idx)
        condition = self.conditions[device.key]
        if self._trace_incoming:
            self._trace.debug(
                "buffer_incoming",
                channel=channel,
                device=str(device.key),
                idx=packet.idx,
                size=packet.size,
            )
        while True:
            # The common case costs one comparison: no bound, or room under it.
            async with condition:
                if reassembly.fits(packet.size, ahead=packet.idx != device.next_idx):
                    reassembly.insert(packet, channel)
                    if device.ready:
                        condition.notify()
                        if self._paused_channels:
                            self._memory_changed()  # memory just became drainable
                    return
            if await self._make_room(device, packet, channel):
                return

    async def _make_room(
        self, device: DeviceBuffer, packet: DevicePacket, channel: int | None
    ) -> bool:
        """Memory is at --max-queued-bytes. Returns True if ``packet`` itself was queued.

        Why this cannot deadlock: a channel waits here without a time limit
        only while some memory is *drainable* - being written by a loader,
        being spilled, or ready for a loader to take - and each of those frees
        memory with no further input from any channel. It may wait for other
        channels to bring a device's next chunk, but only for
        ``SPILL_GRACE`` seconds, once per stall, and only while another
        channel is still reading. Otherwise it spills to disk, which needs no
        input either.
        """
        reassembly = self.reassembly
        device.check(packet.idx, packet.config)  # a bad chunk fails now, not after a spill
        if self.settings.on_queue_full is QueueFullPolicy.FAIL:
            reassembly.check_fits_or_fail(packet)
            return False
        if reassembly.drainable_bytes() or reassembly.spilling_bytes:
            await self._wait_for_memory()
            return False
        if packet.idx != device.next_idx and self._stall_grace_allowed():
            # Memory holds only chunks that arrived early. When channels are
            # merely skewed, another one brings the next chunk within
            # milliseconds (into the reserve), and waiting beats spilling.
            if not await self._wait_for_memory(timeout=SPILL_GRACE):
                self._grace_spent_at = self._bytes_written()
            return False
        victim = reassembly.spill_victim()
        distance = reassembly.distance(packet.device, packet.idx)
        if distance > 0 and (
            victim is None or distance >= reassembly.distance(victim.device, victim.idx)
        ):
            await self._spill_packet(device, packet, channel)
            return True
        if victim is None:
            # Only the device's next chunk is left to place and every byte
            # in memory is on its way out: wait for it.
            await self._wait_for_memory()
            return False
        await self._spill_chunk(victim)
        return False

    async def _wait_for_memory(self, timeout: float | None = None) -> bool:
        """Wait until queued memory changes; False if ``timeout`` passed first."""
        if not self._paused_channels:
            self._pause_started = time.monotonic()
        self._paused_channels += 1
        try:
            if timeout is None:
                await self.memory_changed.wait()
                return True
            try:
                await asyncio.wait_for(self.memory_changed.wait(), timeout)
            except TimeoutError:
                return False
            return True
        finally:
            self._paused_channels -= 1
            if not self._paused_channels:
                # Wall-clock time with at least one channel paused, not a sum over channels.
                self.paused_seconds += time.monotonic() - self._pause_started

    def _stall_grace_allowed(self) -> bool:
        """Another channel may still bring what is missing, and no grace expired in vain
        since the loaders last wrote anything."""
        if self._grace_spent_at == self._bytes_written():
            return False
        reading = sum(p.state is ChannelState.ACTIVE for p in self.channels.values())
        return reading - self._paused_channels > 1  # someone besides this channel

    def _bytes_written(self) -> int:
        return sum(d.bytes_written for d in self.reassembly.devices.values())

    def _memory_changed(self) -> None:
        self.memory_changed.set()
        self.memory_changed.clear()

    def _spill_store(self, chunk: Chunk | DevicePacket, channel: int | None) -> SpillStore:
        if self.spill is None:
            directory = self._spill_dir()
            try:
                self.spill = SpillStore(directory)
            except OSError as error:
                raise _spill_error(
                    error, directory, chunk.device, idx=chunk.idx, channel=channel
                ) from error
            self.log.info("spill_file_opened", directory=str(directory))
        return self.spill

    async def _spill_write(
        self,
        store: SpillStore,
        ref: tuple[int, int],
        data: memoryview,
        chunk: Chunk | DevicePacket,
        channel: int | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._spill_executor, store.write, ref, data)
        except OSError as error:
            raise _spill_error(
                error, store.directory, chunk.device, idx=chunk.idx, channel=channel
            ) from error

    def _check_spill_dir(self) -> None:
        """A bound that may spill needs a place to spill to: say so now, not mid-migration."""
        settings = self.settings
        if settings.max_queued_bytes is None or settings.on_queue_full is not QueueFullPolicy.SPILL:
            return
        directory = self._spill_dir()
        if not directory.is_dir() or not os.access(directory, os.W_OK | os.X_OK):
            raise UsageError(f"cannot spill to {directory}: not a writable directory (--spill-dir)")

    def _spill_dir(self) -> Path:
        if self.settings.spill_dir is not None:
            return self.settings.spill_dir
        parent = self.settings.devices[0].data_path.resolve().parent
        # /dev/null's directory is no place for a file.
        return parent if parent != Path("/dev") else Path(tempfile.gettempdir())

    async def _spill_packet(
        self, device: DeviceBuffer, packet: DevicePacket, channel: int | None
    ) -> None:
        """Put an incoming chunk straight into the spill file: it never counts as memory."""
        store = self._spill_store(packet, channel)
        ref = store.reserve(packet.size)
        await self._spill_write(store, ref, packet.data, packet, channel)
        condition = self.conditions[device.key]
        async with condition:
            self.reassembly.insert_spilled(packet, ref, channel)
            if device.ready:
                condition.notify()
        self.pool.release(packet.buffer)

    async def _spill_chunk(self, chunk: Chunk) -> None:
        """Move a queued chunk from memory to the spill file."""
        store = self._spill_store(chunk, chunk.channel)
        reassembly = self.reassembly
        reassembly.spill_started(chunk)
        ref = store.reserve(chunk.size)
        await self._spill_write(store, ref, chunk.data, chunk, chunk.channel)
        self.pool.release(reassembly.spill_done(chunk, ref))
        device = reassembly.devices[chunk.device]
        condition = self.conditions[chunk.device]
        self._memory_changed()
        async with condition:
            if device.ready:
                condition.notify()

    def _written(self, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            if chunk.buffer is not None:
                self.pool.release(chunk.buffer)
        self.reassembly.release(chunks)
        self._memory_changed()

    def _read_spilled(self, chunk: Chunk) -> bytes:
        """On a writer thread: a spilled chunk's bytes, back from the spill file."""
        assert self.spill is not None
        try:
            return self.spill.read(chunk.spill_ref)
        except OSError as error:
            raise _spill_error(
                error, self.spill.directory, chunk.device, idx=chunk.idx, channel=chunk.channel
            ) from error

    # -- watchdog -----------------------------------------------------------------

    async def _watchdog(self) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        opened = loop.time()
        last_bytes, last_written, last_change = -1, -1, loop.time()
        while True:
            await asyncio.sleep(0.25)
            now = loop.time()
            if (
                settings.accept_timeout is not None
                and len(self.channels) < settings.channels
                and now - opened > settings.accept_timeout
            ):
                missing = sorted(set(range(settings.channels)) - set(self.channels))
                self.fail(
                    SessionError(
                        Reason.ACCEPT_TIMEOUT,
                        f"only {len(self.channels)} of {settings.channels} channels "
                        f"connected within {settings.accept_timeout:g} s "
                        f"(missing channel ids {', '.join(map(str, missing))})",
                    )
                )
            received, written = self.bytes_received, self._bytes_written()
            if received != last_bytes or written != last_written:
                last_bytes, last_written, last_change = received, written, now
            elif (
                settings.progress_timeout is not None
                and self.status is SessionStatus.ACTIVE
                and now - last_change > settings.progress_timeout
            ):
                self.fail(
                    SessionError(
                        Reason.PROGRESS_TIMEOUT,
                        f"no progress for {settings.progress_timeout:g} s "
                        f"({self.bytes_received} bytes received; waiting for "
                        + "; ".join(
                            f"device {d.key} idx {d.next_idx}"
                            for d in self.reassembly.incomplete_devices()
                        )
                        + ")",
                    )
                )

    # -- results ------------------------------------------------------------------

    def _result(self) -> SessionResult:
        started = self.started or time.monotonic()
        devices = []
        for spec in self.settings.devices:
            loader = self.loaders[spec.key]
            buffer = self.reassembly.devices[spec.key]
            devices.append(
                DeviceResult(
                    device=spec.key,
                    data_path=spec.data_path,
                    config_path=spec.config_path,
                    bytes=buffer.bytes_written,
                    chunks=buffer.chunks_written,
                    config_bytes=loader.config.bytes_written,
                    digest=loader.digest_text,
                    seconds=loader.completed_at - started,
                )
            )
        last = max(self.loaders[d.device].completed_at for d in devices)
        return SessionResult(
            devices=tuple(devices),
            seconds=last - started,
            bytes_received=self.bytes_received,
            peak_queued_bytes=self.reassembly.peak_queued_bytes,
            spilled_bytes=self.reassembly.spilled_bytes,
            paused_seconds=self.paused_seconds,
        )

    def _log_summary(self, result: SessionResult) -> None:
        self.log.info(
            "migration_completed",
            seconds=round(result.seconds, 3),
            mb_per_s=round(result.mb_per_s, 1),
            bytes=result.data_bytes,
            peak_queued_bytes=result.peak_queued_bytes,
            spilled_bytes=result.spilled_bytes,
            paused_seconds=round(result.paused_seconds, 3),
        )


_FINAL = (SessionStatus.COMPLETED, SessionStatus.FAILED, SessionStatus.CANCELLED)


def _claim_unix_path(path: str) -> None:
    """Remove a stale socket at ``path``; refuse a live one or any other file.

    asyncio would silently unlink a socket that another daemon is serving.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"cannot listen on unix:{path}: the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise UsageError(f"cannot listen on unix:{path}: another process is listening there")


def _spill_error(
    error: OSError,
    directory: Path,
    device: DeviceKey,
    *,
    idx: int | None = None,
    channel: int | None = None,
) -> DeviceIOError:
    what = "a queued chunk" if idx is None else f"state buffer {idx}"
    # ``channel`` is the one that brought the chunk, not the one whose arrival made room for it.
    return DeviceIOError(
        f"cannot spill {what} to {directory}: {os_error_text(error)}; "
        "see --spill-dir and --max-queued-bytes",
        device=str(device),
        errno=error.errno,
        idx=idx,
        channel=channel,
    )


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _fully_received(device: DeviceBuffer) -> bool:
    """Every chunk up to the config packet is queued (or already written)."""
    last = device.last_idx
    return last is not None and len(device.chunks) == last - device.next_idx + 1
