"""One migration, destination side: its lifecycle and the one decision on failure.

The session wires the data path together (socket -> channel -> admission ->
reassembly -> loader -> output) and runs it in one ``asyncio.TaskGroup``. It
is the boundary errors flow back to: channel readers, loaders and the
watchdog report problems through :meth:`Session.fail`, the first one wins,
and :meth:`Session.run` then stops everything, discards every output and
raises it. Outputs become final only when every device is complete
(PROTOCOL.md 3.6).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import structlog

from .admission import Admission
from .channel import ChannelProtocol, read_channel
from .commit import OutputSet
from .config import Address, QueueFullPolicy, ReceiveSettings
from .errors import (
    Cancelled,
    HandshakeError,
    MultifdError,
    Reason,
    SessionError,
    UsageError,
)
from .listener import EXPLAINED_BY_REFUSALS, ChannelRegistry
from .loader import DeviceLoader
from .memory import MemoryPolicy
from .output import device_outputs
from .reader_threads import ReaderThreads, default_reader_threads
from .reassembly import CHUNK_OVERHEAD, ReassemblyBuffer, capacity_of
from .recorder import Recorder
from .results import SessionResult, SessionStatus, summarize
from .spill import Spiller, spill_directory
from .watchdog import MissingChannels, Sample, Watchdog, watch
from .wire import ChannelHandshake, DevicePacket, PacketHeader

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer as PayloadBuffer

    from .tls import TlsServer

log = structlog.get_logger("vfio_multifd.session")

class Session:
    def __init__(self, settings: ReceiveSettings) -> None:
        self.settings = settings
        self.status = SessionStatus.SETUP
        bound = settings.max_queued_bytes
        fail_when_full = settings.on_queue_full is QueueFullPolicy.FAIL
        spills = bound is not None and not fail_when_full
        # Spilling sets aside part of the bound: a buffer to receive a chunk that
        # goes straight to the spill file, and a reserve that only a device's
        # next-needed chunk may use, so that early chunks can never crowd it out.
        staging = capacity_of(settings.max_payload_size) if spills else 0
        self.reassembly = ReassemblyBuffer(
            (spec.key for spec in settings.devices),
            max_queued_bytes=None if bound is None else bound - staging,
            reserve=capacity_of(settings.max_payload_size) + CHUNK_OVERHEAD if spills else 0,
            chunk_overhead=CHUNK_OVERHEAD if bound is not None else 0,
        )
        self.registry = ChannelRegistry(
            channels=settings.channels,
            uuid=settings.uuid,
            max_pending=settings.max_pending_connections,
        )
        # Credentials are read and checked now: a bad directory is a usage error (exit 2).
        self.tls: TlsServer | None = None
        if settings.tls is not None:
            from .tls import load_server  # ssl: imported only for TLS channels

            self.tls = load_server(settings.tls)
        # TLS channels stay on the main loop, where their TLS layer is.
        threads = settings.reader_threads
        if threads is None:
            threads = default_reader_threads(settings.channels)
        self.readers = ReaderThreads(0 if self.tls is not None else threads)
        self.spiller = Spiller(spill_directory(settings), max_bytes=settings.max_spill_bytes)
        self.admission = Admission(
            self.reassembly,
            MemoryPolicy(self.reassembly, fail_when_full=fail_when_full),
            self.spiller,
            bound=bound,
            staging_size=settings.max_payload_size,
            reading_channels=lambda: self.registry.reading,
        )
        self.loaders = [
            DeviceLoader(
                self.reassembly,
                self.reassembly.devices[spec.key],
                self.admission.conditions[spec.key],
                *device_outputs(spec, fsync=settings.fsync),
                digest=settings.digest,
                release=self.admission.release_written,
                read_spilled=self.spiller.read,
                write_failed=self._writer_failed,
            )
            for spec in settings.devices
        ]
        self.outputs = OutputSet(self.loaders)
        self.listening = asyncio.Event()
        self._all_connected = asyncio.Event()  # every expected channel was accepted
        self.error: MultifdError | None = None
        #: Refused connections by reason code, for the metrics (the registry counts them all).
        self.refused_by_reason: collections.Counter[str] = collections.Counter()
        #: Called with each new status (the status socket announces it as QMP's MIGRATION event).
        self.status_listeners: list[Callable[[SessionStatus], None]] = []
        #: --record DIR (the directory is checked now: a usage error, exit 2).
        self.recorder = None if settings.record is None else Recorder(settings)
        if self.recorder is not None:
            self.status_listeners.append(self.recorder.status_changed)
        self.started: float | None = None  # monotonic, first channel accepted
        self.finished: float | None = None  # monotonic, completed, failed or cancelled
        self.committed: float | None = None  # monotonic, every output in place
        self._first_error: asyncio.Future[MultifdError] | None = None  # set by fail()
        self._pending_error: MultifdError | None = None  # failed before run()
        self._group: asyncio.TaskGroup | None = None  # while channels may join
        self._background: set[asyncio.Task[None]] = set()  # readers, watchdog
        self.log = log

    @property
    def address(self) -> Address | None:
        """Where the session listens, once it does (a port 0 resolved)."""
        return self.registry.address

    @property
    def bytes_received(self) -> int:
        return self.registry.bytes_received

    # -- lifecycle ----------------------------------------------------------------

    async def run(self) -> SessionResult:
        """Receive the whole migration. Raises a :class:`MultifdError` on failure."""
        self._first_error = asyncio.get_running_loop().create_future()
        if self._pending_error is not None:  # cancelled or failed before run()
            self._first_error.set_result(self._pending_error)
        if self.recorder is not None:
            self.recorder.start()
        result: SessionResult | None = None
        try:
            result = await self._run(self._first_error)
            return result
        except asyncio.CancelledError:
            if self.status is not SessionStatus.COMPLETED:  # cancelled once committed: too late
                self._set_status(SessionStatus.CANCELLED)
            raise
        except MultifdError as error:
            if error.reason in EXPLAINED_BY_REFUSALS:
                refusals = self.registry.refusals_text()
                if refusals:
                    error.message += f"; {refusals}"
            self.error = error
            cancelled = isinstance(error, Cancelled)
            self._set_status(
                SessionStatus.CANCELLED if cancelled else SessionStatus.FAILED,
                quiet=isinstance(error, UsageError),
            )
            raise
        finally:
            if self.recorder is not None:  # for failed and cancelled migrations too
                devices = () if result is None else result.devices
                await self.recorder.finish(self.status, self.error, self.address, devices)

    async def _run(self, first_error: asyncio.Future[MultifdError]) -> SessionResult:
        try:
            await self.outputs.open(first_error, timeout=self.settings.accept_timeout)
            settings = self.settings
            if settings.max_queued_bytes is not None and not self.admission.policy.fail_when_full:
                self.spiller.check_directory()
            await self._receive(first_error)
            # Every device is complete: from here on the outcome is success, and
            # the channels we now hang up on (QEMU keeps them open) are no error.
            await self._commit()
            self.committed = time.monotonic()
            # Only now, with every output in place, does a source see a clean close.
            self.registry.close(completed=True)
            self._set_status(SessionStatus.COMPLETED)
            return self._result()
        except BaseException:
            self.registry.close()
            await self.outputs.discard()
            raise
        finally:
            await self.readers.stop()  # after registry.close: its hang-ups go first
            self.outputs.close()
            self.spiller.close()
            self.registry.remove_socket()

    async def _commit(self) -> None:
        """Rename every output into place on a worker thread, all or none.

        Cancelling this (the task running :meth:`run`) waits for the commit to
        end first: the abort that follows must not remove the very files the
        thread is renaming. The cancellation is then raised all the same; the
        outputs are either all in place (status ``completed``) or all as before.
        """
        commit = asyncio.get_running_loop().run_in_executor(None, self.outputs.commit)
        try:
            await asyncio.shield(commit)
        except asyncio.CancelledError:
            while not commit.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([commit])
            if not commit.cancelled() and commit.exception() is None:
                self._set_status(SessionStatus.COMPLETED)
            raise

    async def _receive(self, first_error: asyncio.Future[MultifdError]) -> None:
        """Listen, and load every device; returns once all are complete, or raises the first error."""
        settings = self.settings
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                self._spawn(_raise_when_set(first_error), "failure")
                await self._listen()
                # While no channel sends yet: pages of the first chunks' buffers in place.
                self._spawn(self.admission.warm_pool(settings.max_payload_size), "warm pool")
                watchdog = Watchdog(
                    channels=settings.channels,
                    accept_timeout=settings.accept_timeout,
                    progress_timeout=settings.progress_timeout,
                    now=asyncio.get_running_loop().time(),
                    missing_channels_grace=settings.missing_channels_grace,
                )
                warn = self._warn_missing_channels
                self._spawn(watch(watchdog, self._sample, self.fail, warn), "watchdog")
                loads = [
                    group.create_task(self._load(loader), name=f"loader {loader.device.key}")
                    for loader in self.loaders
                ]
                await asyncio.gather(*loads)
                await self._every_channel_connected()
                self.outputs.committing = True
                self._group = None
                for task in self._background:
                    task.cancel()
        except BaseExceptionGroup as group_error:
            raise self._decide(group_error) from None
        finally:
            self._group = None

    async def _every_channel_connected(self) -> None:
        """Every device is complete; wait for the channels that never connected.

        As QEMU's destination, which starts loading only once every multifd channel
        exists, a migration needs all its ``--channels``: fewer means the two ends
        disagree. ``--accept-timeout`` (or ``--progress-timeout``) bounds the wait.
        """
        missing = self._missing_channels()
        if not missing:
            return
        self.log.warning(
            "waiting_for_channels",
            connected=len(self.registry.channels),
            channels=self.settings.channels,
            missing=missing,
            why="every device is complete, but a migration needs all its channels",
        )
        await self._all_connected.wait()

    def _warn_missing_channels(self, warning: MissingChannels) -> None:
        self.log.warning(
            "missing_channels",
            channels=warning.channels,
            missing=list(warning.missing),
            fail_in=warning.grace,
            why=warning.text,
        )

    def _missing_channels(self) -> list[int]:
        return sorted(set(range(self.settings.channels)) - set(self.registry.channels))

    def _decide(self, group_error: BaseExceptionGroup[BaseException]) -> MultifdError:
        """The error the migration ends with: the first reported, else a loader's own."""
        assert self._first_error is not None
        if self._first_error.done():
            return self._first_error.result()
        errors = _leaves(group_error)
        for error in errors:
            if isinstance(error, MultifdError):
                return error
        self.log.error("internal_error", exc_info=errors[0])
        return SessionError(Reason.INTERNAL, f"internal error: {errors[0]!r}")

    async def _listen(self) -> None:
        readers = self.readers
        readers.start()
        hand_off = readers.hand_off if readers.count else None
        make = ChannelProtocol if self.recorder is None else self.recorder.channel

        def new_channel() -> ChannelProtocol:
            channel = make(
                self,
                max_packet_size=self.settings.max_packet_size,
                handshake_timeout=self.settings.handshake_timeout,
            )
            channel.hand_off = hand_off
            return channel

        tls = self.tls
        wrap = None
        if tls is not None:
            from .tls_channel import TlsServerProtocol

            wrap = functools.partial(TlsServerProtocol, tls)
        address = await self.registry.listen(self.settings.listen, new_channel, wrap)
        self.log.info(
            "listening",
            address=str(address),
            channels=self.settings.channels,
            devices=[str(spec.key) for spec in self.settings.devices],
            tls=tls is not None,
            reader_threads=readers.count,
        )
        self.listening.set()

    async def _load(self, loader: DeviceLoader) -> None:
        """Run a loader; its own error is reported first, so that the migration is
        known to be ending (no channel joins) before the task group aborts."""
        try:
            await loader.run()
        except MultifdError as error:
            self.fail(error)
            raise
        except Exception as error:  # a bug: reported cleanly all the same
            self.fail(SessionError(Reason.INTERNAL, f"internal error: {error!r}"))
            raise

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        assert self._group is not None
        task = self._group.create_task(coroutine, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- the failure decision -------------------------------------------------------

    def fail(self, error: MultifdError) -> None:
        """Report an error that ends the migration (the first one wins)."""
        if error.channel is not None:  # what that channel announced will never come
            self.reassembly.channel_failed(error.channel)
        if self.outputs.committing or self.error is not None:
            return
        if self._first_error is None:
            self._pending_error = self._pending_error or error
        elif not self._first_error.done():
            self._first_error.set_result(error)
        else:
            return
        # Show it at once (status socket), not only once the abort is done.
        if self.status in (SessionStatus.SETUP, SessionStatus.ACTIVE):
            cancelled = isinstance(error, Cancelled)
            self._set_status(
                SessionStatus.CANCELLING if cancelled else SessionStatus.FAILED,
                quiet=isinstance(error, UsageError),
            )

    def cancel(self, why: str = "cancelled", *, signal_number: int | None = None) -> None:
        """Stop the migration; too late once every device is complete (then it is ignored,
        and said so), needless once it is failing or being cancelled already (a source
        stopped by the same Ctrl-C may have reset its channels first: no line then)."""
        if self.outputs.committing or self.status is SessionStatus.COMPLETED:
            self.log.info(
                "cancel_ignored",
                status=SessionStatus.COMPLETED.value,
                why=f"{why}: every device is complete, its outputs are being put in place",
            )
            return
        if self.status not in (SessionStatus.SETUP, SessionStatus.ACTIVE):
            self.log.debug("cancel_ignored", status=self.status.value, why=why)
            return
        self.fail(Cancelled(why, signal_number=signal_number))

    def _writer_failed(self, error: BaseException) -> None:
        if isinstance(error, MultifdError):
            self.fail(error)
        else:  # a bug rather than an I/O error: fail loudly, still cleanly
            self.fail(SessionError(Reason.INTERNAL, f"writer failed: {error!r}"))

    def _set_status(self, status: SessionStatus, *, quiet: bool = False) -> None:
        """``quiet``: a usage error, which the command line reports itself (exit 2):
        no migration had started, so no state_change line says it failed."""
        if status is not self.status:
            if not quiet:
                self.log.info("state_change", old=self.status.value, new=status.value)
            self.status = status
            if status.final:  # before the listeners: the status socket reports the figures
                self.finished = time.monotonic()
            for listener in list(self.status_listeners):
                listener(status)

    # -- what channels ask of the session (channel.ChannelOwner) --------------------

    def accept(self, channel: ChannelProtocol, handshake: ChannelHandshake) -> None:
        # Once the migration is ending (failed, cancelled, or every device complete)
        # no reader may start: the task group is shutting down or gone.
        if self._group is None or self._ending:
            raise HandshakeError(Reason.HANDSHAKE_CLOSED, "the migration no longer takes channels")
        self.registry.accept(channel, handshake)
        if self.recorder is not None:
            self.recorder.accepted(channel, handshake.channel_id)
        if len(self.registry.channels) == self.settings.channels:
            self._all_connected.set()
        if self.started is None:
            self.started = time.monotonic()
            self._set_status(SessionStatus.ACTIVE)
        self._spawn(read_channel(channel, self), f"channel {handshake.channel_id}")

    @property
    def _ending(self) -> bool:
        """An error was reported: the migration is failing or being cancelled."""
        done = self._first_error is not None and self._first_error.done()
        return done or self._pending_error is not None

    def refused(self, channel: ChannelProtocol, error: HandshakeError) -> None:
        self.refused_by_reason[error.reason.value] += 1
        self.registry.refuse(channel, error, late=self._ending)
        if self.recorder is not None:
            self.recorder.refused(channel, error)

    def allocate_now(self, header: PacketHeader, channel: int | None) -> PayloadBuffer | None:
        return self.admission.allocate_now(header, channel)

    async def allocate(self, header: PacketHeader, channel: int | None) -> PayloadBuffer:
        return await self.admission.allocate(header, channel)

    async def deliver(self, packet: DevicePacket, channel: int | None) -> None:
        await self.admission.deliver(packet, channel)

    def closed(self, channel: ChannelProtocol) -> None:
        """A channel ended cleanly. When all have, every device must be able to finish."""
        if self.registry.all_closed:
            error = self.reassembly.incomplete_error(f"all {self.settings.channels} channels closed")
            if error is not None:
                self.fail(error)

    # -- what the watchdog and the summary see --------------------------------------------

    def _sample(self) -> Sample:
        return Sample(
            connected=frozenset(self.registry.channels),
            received=self.registry.bytes_received,
            written=self.reassembly.bytes_written,
            active=self.status is SessionStatus.ACTIVE,
            waiting_for=self._waiting_for(),
            reading=self.registry.reading,
            handshaking=len(self.registry.pending),
        )

    def _waiting_for(self) -> tuple[str, ...]:
        waiting = [d.waiting_for for d in self.reassembly.incomplete_devices()]
        missing = self._missing_channels()
        if missing:
            waiting.append(f"channel ids {', '.join(map(str, missing))} to connect")
        return tuple(waiting)

    def peer_subjects(self) -> dict[int, str | None]:
        """Each accepted channel's client certificate subject (None: none verified)."""
        from .tls_channel import tls_of

        subjects: dict[int, str | None] = {}
        for channel_id, channel in sorted(self.registry.channels.items()):
            tls = tls_of(channel.transport)
            subjects[channel_id] = None if tls is None else tls.get_extra_info("peer_subject")
        return subjects

    def _result(self) -> SessionResult:
        result = summarize(
            self.loaders,
            self.reassembly,
            started=self.started or time.monotonic(),
            bytes_received=self.registry.bytes_received,
            paused_seconds=self.admission.paused_seconds,
            tls_subjects=None if self.tls is None else self.peer_subjects(),
            buffers_allocated=self.admission.pool.misses,
            reader_threads=self.readers.count,
            committed=self.committed,
        )
        self.log.info("migration_completed", **result.log_fields())
        return result


async def _raise_when_set(first_error: asyncio.Future[MultifdError]) -> None:
    """Turn the first reported error into a task failure, which stops the task group."""
    raise await asyncio.shield(first_error)  # cancelling this task must not cancel the future


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for error in group.exceptions:
        leaves.extend(_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    return leaves
