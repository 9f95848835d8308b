"""One migration, destination side: its lifecycle, around the core's driver.

The core (``core/migration.py``) decides everything; :class:`Session` is a
:class:`~.driver.Driver` (which feeds the core and carries out its commands)
that also builds what the migration needs - the listener, the loaders and
their outputs, the spill file, the reader threads, the recorder - and runs
it: :meth:`Session.run` opens the outputs, listens, runs the loaders and,
when the core says so, renames the outputs into place; on failure it
discards them and raises the core's error. Outputs become final only when
every device is complete (PROTOCOL.md 3.6).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from ..config import Address, ReceiveSettings
from ..core.config import MigrationConfig
from ..core.migration import Migration
from ..core.reassembly import POOLED_MIN, capacity_of
from ..core.snapshot import MigrationSnapshot
from ..core.state import Phase
from ..errors import MultifdError, Reason, SessionError
from ..ops.recorder import Recorder
from ..results import SessionResult, SessionStatus, summarize
from . import commit as commit_module
from .channel import ChannelProtocol
from .driver import Driver, clock
from .listener import Listener
from .loader import DeviceLoader
from .output import device_outputs
from .pool import QEMU_CHUNK, BufferPool, warm_buffers
from .ram_sink import RamSink
from .reader_threads import ReaderThreads, default_reader_threads
from .spill import Spiller, spill_directory

if TYPE_CHECKING:

    from ..tls import TlsServer

log = structlog.get_logger("vfio_multifd.session")

#: Seconds without a payload before the pool is warmed (_warm_pool).
WARM_AFTER = 0.2
#: Buffers warmed at a time: what warming may hold beyond the bound.
WARM_BATCH = 4




class Session(Driver):
    def __init__(self, settings: ReceiveSettings) -> None:
        self.settings = settings
        # Credentials are read and checked now: a bad directory is a usage error (exit 2).
        self.tls: TlsServer | None = None
        if settings.tls is not None:
            from ..tls import load_server  # ssl: imported only for TLS channels

            self.tls = load_server(settings.tls)
        # TLS channels stay on the main loop, where their TLS layer is.
        threads = settings.reader_threads
        if threads is None:
            threads = default_reader_threads(settings.channels)
        # QEMU's main channel and RAM packets are read on the main loop.
        qemu = settings.main_stream is not None or settings.ram is not None
        self.readers = ReaderThreads(0 if self.tls is not None or qemu else threads)
        self.core = Migration(
            MigrationConfig.from_settings(settings, reader_threads=self.readers.count),
            BufferPool(),
        )
        self.spiller = Spiller(spill_directory(settings), max_bytes=settings.max_spill_bytes)
        self.loaders = {
            spec.key: DeviceLoader(
                spec.key,
                *device_outputs(spec, fsync=settings.fsync),
                digest=settings.digest,
                take=self.core.take_batch,
                release=self._written,
                read_spilled=self.spiller.read,
                write_failed=self.fail,
            )
            for spec in settings.devices
        }
        self.ram_sink = RamSink(settings) if qemu else None
        self.outputs = commit_module.OutputSet(list(self.loaders.values()), self.ram_sink)
        self.listener = Listener(expected=settings.channels, shed=self._shed)
        self.listening = asyncio.Event()
        #: Called with each new status (the status socket announces it as QMP's MIGRATION event).
        self.status_listeners: list[Callable[[SessionStatus], None]] = []
        #: --record DIR (the directory is checked now: a usage error, exit 2).
        self.recorder = None if settings.record is None else Recorder(settings)
        if self.recorder is not None:
            self.status_listeners.append(self.recorder.status_changed)
        #: Accepted channels by id (their protocols: the core keeps their state).
        self.channels: dict[int, ChannelProtocol] = {}
        self.log = log
        self.committed_at: float | None = None  # monotonic, every output in place
        self._start_driving()

    @property
    def address(self) -> Address | None:
        """Where the session listens, once it does (a port 0 resolved)."""
        return self.listener.address

    @property
    def status(self) -> SessionStatus:
        return self.core.status

    @property
    def error(self) -> MultifdError | None:
        return self.core.error

    def snapshot(self, now: float | None = None) -> MigrationSnapshot:
        """The migration as every output shows it (``now``: ``time.monotonic()``)."""
        return self.core.snapshot(clock() if now is None else now)

    # -- lifecycle ----------------------------------------------------------------

    async def run(self) -> SessionResult:
        """Receive the whole migration. Raises a :class:`MultifdError` on failure."""
        loop = self._loop = asyncio.get_running_loop()
        self._failed = loop.create_future()
        self._commit = loop.create_future()
        if self.core.error is not None:  # cancelled or failed before run()
            self._failed.set_result(self.core.error)
        if self.recorder is not None:
            self.recorder.start()
        result: SessionResult | None = None
        try:
            result = await self._run()
            return result
        finally:
            if self.recorder is not None:  # for failed and cancelled migrations too
                devices = () if result is None else result.devices
                await self.recorder.finish(self.status, self.error, self.address, devices)

    async def _run(self) -> SessionResult:
        assert self._failed is not None and self._commit is not None
        loop = asyncio.get_running_loop()
        try:
            await self.outputs.open(self._failed, timeout=self.settings.accept_timeout)
            if self.ram_sink is not None:
                await loop.run_in_executor(self.ram_sink.executor, self.ram_sink.open)
            if self.core.layout.staging:
                self.spiller.check_directory()
            await self._listen()
            # While no channel sends yet: pages of the first chunks' buffers in place.
            self._spawn(self._warm_pool(), "warm pool")
            for loader in self.loaders.values():
                self._spawn(self._load(loader), f"loader {loader.key}")
            decided: list[asyncio.Future[Any]] = [self._failed, self._commit]
            await asyncio.wait(decided, return_when=asyncio.FIRST_COMPLETED)
            if self._failed.done():
                raise self._failed.result()
            await self._commit_outputs()
            return self._result()
        except BaseException as error:
            self._decide(error)
            await self.outputs.discard()
            raise
        finally:
            await self._stop()

    def _decide(self, error: BaseException) -> None:
        """An error raised here (not reported to the core) ends the migration too."""
        if isinstance(error, asyncio.CancelledError):  # cancelled from outside
            self.core.cancel("cancelled", clock())
        elif isinstance(error, MultifdError):
            self.core.fail(error, clock())
        else:  # a bug: fail loudly, still cleanly
            self.log.error("internal_error", exc_info=error)
            self.core.fail(SessionError(Reason.INTERNAL, f"internal error: {error!r}"), clock())
        self._act()

    async def _stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.listener.stop()
        await self.readers.stop()  # after the hang-ups: they go first
        self.outputs.close()
        self.spiller.close()
        self.listener.remove_socket()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.core.stopped_at(clock())
        self._act()

    async def _commit_outputs(self) -> None:
        """Rename every output into place on a worker thread, all or none.

        Cancelling this (the task running :meth:`run`) waits for the commit to
        end first: the abort that follows must not remove the very files the
        thread is renaming. The cancellation is then raised all the same; the
        outputs are either all in place (status ``completed``) or all as before.
        """
        self.outputs.committing = True
        loop = asyncio.get_running_loop()
        commit = loop.run_in_executor(None, self.outputs.commit)
        try:
            await asyncio.shield(commit)
        except asyncio.CancelledError:
            while not commit.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([commit])
            if not commit.cancelled() and commit.exception() is None:
                self.core.committed(clock())
                self._act()
            raise
        except MultifdError as error:
            self.core.commit_failed(error, clock())
            self._act()
            raise
        self.committed_at = clock()
        self.core.committed(self.committed_at)
        self._act()

    async def _warm_pool(self, after: float = WARM_AFTER) -> None:
        """Fill the pool with warm buffers for QEMU's chunk size, as many as idle
        buffers may take under the bound, while no payload has been asked for.

        It starts only once the daemon has waited ``after`` seconds: a source that
        sends at once (a test, a demo) gains nothing from it, a migration's
        destination waits for its stop-copy far longer. A few at a time, each batch
        pooled (where the bound counts it) before the next is made, so that memory
        being warmed exceeds the bound by one batch at most; it stops at the first
        payload (the ledger's count is 0 from then on)."""
        capacity = capacity_of(min(QEMU_CHUNK, self.settings.max_payload_size))
        if capacity < POOLED_MIN:
            return
        await asyncio.sleep(after)
        loop = asyncio.get_running_loop()
        ledger = self.core.ledger
        started = clock()
        warmed = 0
        while (count := min(WARM_BATCH, ledger.warm_count(capacity))) > 0:
            buffers = await loop.run_in_executor(None, warm_buffers, capacity, count)
            ledger.add_idle(buffers)
            warmed += len(buffers)
            if len(buffers) < count:  # out of memory: enough
                break
        if warmed:  # its resident memory grew by this much, within the bound
            self.log.info(
                "pool_warmed",
                buffers=warmed,
                bytes=warmed * capacity,
                seconds=round(clock() - started, 3),
            )

    async def _listen(self) -> None:
        self.readers.start()
        tls = self.tls
        wrap = None
        if tls is not None:
            from .tls_channel import TlsServerProtocol

            wrap = functools.partial(TlsServerProtocol, tls)
        address = await self.listener.listen(self.settings.listen, self.connection, wrap)
        self.core.listening(str(address), clock())
        self._act()
        self.log.info(
            "listening",
            address=str(address),
            channels=self.settings.channels,
            devices=[str(spec.key) for spec in self.settings.devices],
            tls=tls is not None,
            reader_threads=self.readers.count,
        )
        self.listening.set()

    def connection(self, peer: str) -> ChannelProtocol:
        """A new connection's protocol (the listener's factory), known to the core."""
        conn = next(self._conn_ids)
        settings = self.settings
        ram = settings.ram is not None
        if self.recorder is None:
            channel = ChannelProtocol(
                self, conn, peer=peer, max_packet_size=settings.max_packet_size, ram=ram
            )
        else:
            channel = self.recorder.channel(
                self, conn, peer=peer, max_packet_size=settings.max_packet_size, ram=ram
            )
        self._connections[conn] = channel
        self._endpoints[conn] = channel
        self._feed(self.core.connection_made, conn, peer, clock())
        return channel

    async def _load(self, loader: DeviceLoader) -> None:
        try:
            await loader.run()
        except MultifdError as error:
            self.fail(error)
        except Exception as error:  # a bug: reported cleanly all the same
            self.log.error("internal_error", exc_info=error)
            self.fail(SessionError(Reason.INTERNAL, f"internal error: {error!r}"))

    # -- what outside asks -------------------------------------------------------------

    def cancel(self, why: str = "cancelled", *, signal_number: int | None = None) -> None:
        """Stop the migration; too late once every device is complete (then it is ignored,
        and said so), needless once it is failing or being cancelled already (a source
        stopped by the same Ctrl-C may have reset its channels first: no line then)."""
        if self.core.cancel(why, clock(), signal_number=signal_number):
            self._act()
        elif self.core.phase in (Phase.COMMITTING, Phase.COMPLETED):
            self.log.info(
                "cancel_ignored",
                status=SessionStatus.COMPLETED.value,
                why=f"{why}: every device is complete, its outputs are being put in place",
            )
        else:
            self.log.debug("cancel_ignored", status=self.status.value, why=why)

    # -- the result ---------------------------------------------------------------------------

    def _result(self) -> SessionResult:
        snapshot = self.snapshot()
        tls_subjects = None
        if self.tls is not None:
            tls_subjects = {c.id: c.tls_subject for c in snapshot.channels if c.id is not None}
        result = summarize(
            snapshot,
            list(self.loaders.values()),
            tls_subjects=tls_subjects,
            committed=self.committed_at,
        )
        self.log.info("migration_completed", **result.log_fields())
        return result

