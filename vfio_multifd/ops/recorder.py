"""``receive --record DIR``: every connection's bytes as received, written off the event loop.

A :class:`RecordingChannel` is the channel protocol with a
:class:`RecordingDecoder`: the bytes of each read are copied (the buffer is
the chunk's own, reused once the chunk is written) into the
:class:`Recorder`'s :class:`ByteRing`, and its one
writer thread appends them from there to ``DIR/channel-<id>.bin`` (QEMU's main
channel: ``DIR/main-channel.bin``). The event
loop never waits for the disk: handing bytes over is a copy and a put on a
queue, and the ring's size (``RecordSettings.max_queued_bytes``, 64 MiB) bounds
what may wait. When the disk falls that far behind, or a write fails (``ENOSPC``,
``EDQUOT``, any ``OSError``), the recording stops with one ``record_stopped``
warning and the migration goes on untouched; the manifest then says
``"complete": false`` and why. Without ``--record`` the session makes plain
``ChannelProtocol``s: none of this runs, not even a test per read.

A connection is recorded from its first byte. Until its handshake is decided
its bytes wait in memory (at most 64: the decoder reads nothing past the
handshake before it is decided); accepted, they open ``channel-<id>.bin``;
refused, they become ``refused-<n>.bin`` (the first ``max_refused``; the rest
are counted). With TLS the channel is fed plaintext (``tls_channel.py``
decrypts into its buffers), so plaintext is what is recorded.

How a channel ended (``eof``, ``lost``, else ``open``) is noted only until the
migration's outcome is decided (the session's status leaves ``setup`` and
``active``): the daemon then resets every channel, and what the source does
in return (reset its other channels) did not cause the outcome, so a replay
must not do it first. The manifest (``manifest.py``) is written at the end of
every migration - completed, failed or cancelled - to a temporary name, then
renamed. It holds the digest of each channel file (the writer thread hashes
what it writes, in the daemon's ``--digest``) and of each device's data.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import itertools
import os
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Sequence

import structlog

from ..config import Address, ReceiveSettings
from ..daemon.channel import ChannelOwner, ChannelProtocol
from ..digest import Hasher, format_digest, new_hasher
from ..errors import HandshakeError, MultifdError, os_error_text
from ..results import DeviceResult, SessionStatus
from ..safe_files import create_new
from .manifest import (
    ChannelEnd,
    channel_file,
    refused_file,
)
from .record_channel import ChannelRecording, RecordingChannel, Refusal
from .record_files import (
    Close,
    Finish,
    Item,
    Open,
    append,
    check_directory,
    open_directory,
    write_manifest,
)
from .record_manifest import Build, Recorded, manifest_builder
from .record_ring import ByteRing

log = structlog.get_logger("vfio_multifd.recorder")

#: How long the end of a migration waits for the recording to reach the disk.
FINISH_TIMEOUT = 60.0


class Recorder:
    """The recording of one session: what the loop thread knows, and the writer thread.

    Loop thread: :meth:`channel` (the protocol factory), :meth:`accepted`,
    :meth:`refused`, :meth:`status_changed`, :meth:`finish`. Whichever thread
    feeds a channel's decoder: :meth:`write`. Writer thread: everything under
    ``_write_loop``. They share the queue, and the ring and ``stopped`` under
    ``_lock``.
    """

    def __init__(self, settings: ReceiveSettings) -> None:
        assert settings.record is not None
        self.settings = settings
        self.directory = settings.record.directory
        self.max_queued_bytes = settings.record.max_queued_bytes
        self.max_refused = settings.record.max_refused
        check_directory(self.directory)  # a usage error now, before anything starts
        self.stopped: str | None = None  # why the recording stopped (set once)
        self.decided = False  # the migration's outcome is known: ends are no longer noted
        self._lock = threading.Lock()
        self._ring: ByteRing | None = None  # made by start()
        self._queue: queue.SimpleQueue[Item] = queue.SimpleQueue()
        self._sinks = itertools.count()
        self._channels: list[ChannelRecording] = []  # accepted, in order
        self._refusals: list[Refusal] = []
        self._refused_not_kept = 0
        self._thread: threading.Thread | None = None
        self._directory_fd = -1  # DIR, opened by start(); closed by the writer thread
        self._finished = False
        self._origin = 0.0  # monotonic: when the recording started
        self._started_at = ""

    # -- the loop thread -------------------------------------------------------------

    def start(self) -> None:
        """Create DIR and start the writer thread (before the session listens)."""
        self._directory_fd = open_directory(self.directory)
        self._ring = ByteRing(self.max_queued_bytes)
        self._origin = time.monotonic()
        self._started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        self._thread = threading.Thread(target=self._write_loop, name="record-writer", daemon=True)
        self._thread.start()
        log.info("recording", directory=str(self.directory), max_queued_bytes=self.max_queued_bytes)

    def channel(
        self, owner: ChannelOwner, conn: int, *, peer: str, max_packet_size: int, ram: bool = False
    ) -> RecordingChannel:
        return RecordingChannel(
            self, owner, conn, peer=peer, max_packet_size=max_packet_size, ram=ram
        )

    def lost(self, channel: ChannelProtocol, exc: BaseException | None) -> None:
        """The connection is gone (wherever it was read); ``exc``: the peer broke it
        (our own hang-up reports None)."""
        if exc is not None and isinstance(channel, RecordingChannel):
            channel.recording.ended(ChannelEnd.LOST)

    def _take_pending(
        self, channel: ChannelProtocol
    ) -> tuple[ChannelRecording, bytearray] | None:
        """A recorded connection's handshake bytes, once: it is accepted or refused now."""
        if not isinstance(channel, RecordingChannel):
            return None
        recording = channel.recording
        pending, recording.pending = recording.pending, None
        if self._finished or pending is None:
            return None
        return recording, pending

    def accepted(self, channel: ChannelProtocol, channel_id: int | None) -> None:
        """The connection joined the migration as ``channel_id`` (None: QEMU's main
        channel): its file opens (before anything else may read the channel)."""
        taken = self._take_pending(channel)
        if taken is None:
            return
        recording, pending = taken
        recording.channel_id = channel_id
        recording.sink = sink = next(self._sinks)
        self._channels.append(recording)
        self._queue.put(Open(sink, channel_file(channel_id)))
        if pending:
            self.write(sink, memoryview(pending))

    def refused(self, channel: ChannelProtocol, error: HandshakeError) -> None:
        """The connection was refused: keep its bytes, if fewer than the cap were kept."""
        taken = self._take_pending(channel)
        if taken is None:
            return
        recording, pending = taken
        if len(self._refusals) >= self.max_refused:
            self._refused_not_kept += 1
            return
        refusal = Refusal(
            recording, next(self._sinks), refused_file(len(self._refusals)), error
        )
        self._refusals.append(refusal)
        self._queue.put(Open(refusal.sink, refusal.file))
        if pending:
            self.write(refusal.sink, memoryview(pending))
        self._queue.put(Close(refusal.sink))

    def status_changed(self, status: SessionStatus) -> None:
        if status not in (SessionStatus.SETUP, SessionStatus.ACTIVE):
            self.decided = True

    def write(self, sink: int, view: memoryview) -> None:
        """Copy ``view`` into the ring for the writer, unless the ring is full."""
        ring = self._ring
        if self.stopped is not None or ring is None:
            return
        size = len(view)
        # Under the lock: with several threads feeding channels, the queue's order must
        # be the ring's, for the writer frees the ring's oldest bytes first.
        with self._lock:
            place = ring.reserve(size)
            if place is not None:
                offset, padding = place
                ring.view[offset : offset + size] = view  # the writer does not touch it yet
                self._queue.put((sink, offset, size, padding))
        if place is None:
            self._stop(
                f"the disk fell behind: more than {self.max_queued_bytes} received bytes waited "
                "to be written (the recording's bound)"
            )

    def _stop(self, why: str) -> None:
        """Stop recording (from either thread); the first reason is the one kept."""
        with self._lock:
            if self.stopped is not None:
                return
            self.stopped = why
        log.warning(
            "record_stopped",
            directory=str(self.directory),
            why=why,
            note="the migration goes on; the recording is incomplete",
        )

    async def finish(
        self,
        status: SessionStatus,
        error: MultifdError | None,
        address: Address | None,
        devices: Sequence[DeviceResult] = (),
    ) -> None:
        """Close every file and write the manifest (with the digests of ``devices``,
        those of a completed migration); waits (off the loop) at most
        :data:`FINISH_TIMEOUT` for the writer to get there."""
        if self._thread is None or self._finished:
            return
        self._finished = self.decided = True
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        finish = Finish(self._manifest(status, error, address, devices), done)
        for recording in self._channels:
            if recording.sink is not None:
                self._queue.put(Close(recording.sink))
                recording.sink = None  # bytes still arriving are not recorded
        self._queue.put(finish)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(done)), FINISH_TIMEOUT)
        except TimeoutError:
            log.warning(
                "record_unfinished",
                directory=str(self.directory),
                why=f"the recording did not reach the disk within {FINISH_TIMEOUT:g} s",
            )

    def _manifest(
        self,
        status: SessionStatus,
        error: MultifdError | None,
        address: Address | None,
        devices: Sequence[DeviceResult],
    ) -> Build:
        """The manifest as the loop thread knows it now; the writer adds its byte counts
        and digests."""
        return manifest_builder(
            Recorded(
                settings=self.settings,
                started_at=self._started_at,
                origin=self._origin,
                channels=self._channels,
                refusals=self._refusals,
                refused_not_kept=self._refused_not_kept,
            ),
            status,
            error,
            address,
            devices,
        )

    # -- the writer thread --------------------------------------------------------------

    def _write_loop(self) -> None:
        try:
            self._write_files()
        finally:
            os.close(self._directory_fd)

    def _write_files(self) -> None:
        files: dict[int, tuple[int, str]] = {}  # sink -> (fd, file name)
        written: dict[int, int] = {}
        digest = self.settings.digest
        hashers: defaultdict[int, Hasher] = defaultdict(lambda: new_hasher(digest))
        broken = False  # a write failed: drop what comes, but still write the manifest
        while True:
            item = self._queue.get()
            try:
                if isinstance(item, tuple):
                    sink, offset, size, padding = item
                    assert self._ring is not None
                    entry = files.get(sink)
                    if entry is not None and not broken:
                        try:
                            append(entry[0], self._ring.view[offset : offset + size])
                        except OSError as error:
                            broken = True
                            # Part of the write may have landed: the file holds what the
                            # manifest counts, so that replay can check it.
                            with contextlib.suppress(OSError):
                                os.ftruncate(entry[0], written[sink])
                            self._stop(f"cannot write {entry[1]}: {os_error_text(error)}")
                        else:
                            written[sink] += size
                            hashers[sink].update(self._ring.view[offset : offset + size])
                    with self._lock:
                        self._ring.free(padding + size)
                elif isinstance(item, Open):
                    # Even once broken: every channel the manifest names has its file.
                    try:
                        fd = create_new(item.name, self._directory_fd)
                    except OSError as error:
                        broken = True
                        self._stop(f"cannot create {item.name}: {os_error_text(error)}")
                    else:
                        files[item.sink] = (fd, item.name)
                        written[item.sink] = 0
                elif isinstance(item, Close):
                    entry = files.pop(item.sink, None)
                    if entry is not None:
                        os.close(entry[0])
                else:
                    for fd, _ in files.values():
                        os.close(fd)
                    files.clear()
                    digests = {sink: format_digest(digest, h) for sink, h in hashers.items()}
                    write_manifest(
                        self._directory_fd, self.directory, item.build(written, digests, self.stopped)
                    )
                    item.done.set_result(None)
                    return
            except Exception as error:  # a bug: the recording stops, the migration does not
                broken = True
                self._stop(f"internal error: {error!r}")
                if isinstance(item, Finish):
                    item.done.set_result(None)
                    return
