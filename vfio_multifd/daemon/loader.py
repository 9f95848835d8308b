"""One loader per device: takes chunks in ``idx`` order and writes them off the loop.

When the chunk it needs next is there (:meth:`DeviceLoader.wake`: the core's
``WakeLoader``, a plain call from the callback that delivered it), the loader
asks the migration core for every consecutive ready chunk (``take``), in
batches, and hands each batch to the device's own writer thread, which hashes
and ``writev``s it. Channels keep reading meanwhile. After the last data chunk comes
the config state: its tags are checked, it is stored, and the device is
complete (QEMU's ``vfio_load_bufs_thread``). Each batch written goes back to
the core (``written``), which releases its memory; the writer thread
(``writer_thread.py``) tells the loop about every batch it wrote since it last
did in one call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable

import structlog

from ..config import Digest
from ..core.reassembly import Chunk, ChunkState
from ..core.wire import DeviceKey, check_config_blob
from ..digest import format_digest, new_hasher
from ..errors import MultifdError
from ..logconfig import debug_enabled
from .output import Output
from .writer_thread import WriterThread

log = structlog.get_logger("vfio_multifd.loader")

#: How many bytes one writev batch may carry.
BATCH_BYTES = 8 << 20


class DeviceLoader:
    def __init__(
        self,
        key: DeviceKey,
        data: Output,
        config: Output,
        *,
        digest: Digest,
        take: Callable[[DeviceKey, int], list[Chunk]],
        release: Callable[[DeviceKey, list[Chunk]], None],
        read_spilled: Callable[[Chunk], bytes] | None = None,
        write_failed: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.key = key
        self._take = take  # the next batch, or [] until wake()
        self._config: list[Chunk] | None = None  # taken: every data chunk was before it
        self._config_ready = asyncio.Event()
        self._stopped = False  # run() ended: nothing more is taken
        self.data = data
        self.config = config
        self.digest = digest
        self.hasher = new_hasher(digest)
        self._release = release  # gives the written chunks' memory back
        self._read_spilled = read_spilled
        self._write_failed = write_failed  # a batch written in the background failed
        self._unwritten = 0  # batches queued to the writer thread, not yet reported written
        self._all_written: asyncio.Future[None] | None = None  # run() waits for them
        self.write_error: BaseException | None = None
        self.executor = WriterThread(f"writer-{key}")
        self.next_idx = 0  # the idx this loader takes next
        self.bytes_written = 0
        self.precopy_written = 0  # pre-copy bytes of the main stream, before every chunk
        self.chunks_written = 0
        # Monotonic times of the device's last steps (the summary's phases):
        self.received_at = 0.0  # its config chunk taken: every byte of it received
        self.written_at = 0.0  # its last data batch written (on the writer thread)
        self.log = log.bind(device=str(key))
        self._debug = debug_enabled(self.log)

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self.data.open)
        await loop.run_in_executor(self.executor, self.config.open)

    def wake(self) -> None:
        """The chunk this loader needs next is there: queue every ready batch to the
        writer thread now. A plain call (the core's WakeLoader, from any callback), so
        a chunk goes from its socket to the writer thread without waiting for a task."""
        if self._config is not None or self._stopped:
            return
        while chunks := self._take(self.key, BATCH_BYTES):
            self.next_idx = chunks[-1].idx + 1
            if chunks[0].config:  # the last chunk: run() completes the device
                self.received_at = time.monotonic()
                self._config = chunks
                self._config_ready.set()
                return
            self._submit(chunks)
        if self._debug:
            self.log.debug("load_starved", next_idx=self.next_idx)

    async def run(self) -> None:
        """Load until the config chunk is written: the device is complete."""
        loop = asyncio.get_running_loop()
        self.log.info("load_thread_start")
        try:
            self.wake()
            await self._config_ready.wait()
            assert self._config is not None
            if self._unwritten:  # every data chunk is written first
                self._all_written = loop.create_future()
                await self._all_written
            if self.write_error is not None:
                raise self.write_error
            await self._load_config(loop, self._config[0])
        finally:
            self._stopped = True
        self._release(self.key, self._config)
        self.log.info(
            "load_thread_end",
            bytes=self.bytes_written,
            precopy_bytes=self.precopy_written,
            chunks=self.chunks_written,
            digest=self.digest_text,
        )

    def write_precopy(self, data: bytes) -> asyncio.Future[None]:
        """Pre-copy bytes from the main stream, queued to the writer thread: they land
        before idx 0 because the core lets this loader take idx 0 only after their last."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.executor, self._write_precopy, data)

        def done(done: asyncio.Future[None]) -> None:
            if not done.cancelled() and done.exception() is None:
                self.precopy_written += len(data)

        future.add_done_callback(done)
        return future

    def _write_precopy(self, data: bytes) -> None:
        self.hasher.update(data)
        self.data.write([data])

    def _submit(self, chunks: list[Chunk]) -> None:
        """Queue a batch for the writer thread without waiting for it.

        The loader goes straight back for the next ready chunks, so the writer
        always has work queued and never waits for the event loop to come
        round (one loop iteration can receive more than a batch). The single
        writer thread keeps batches in order; each one's memory is released
        when it is written (:meth:`_batch_written`).
        """
        self._unwritten += 1
        if self._debug:  # QEMU's vfio_load_state_device_buffer_load_start/_end
            first, last = chunks[0].idx, chunks[-1].idx
            self.log.debug("load_start", first_idx=first, last_idx=last, chunks=len(chunks))
        self.executor.post(self._write_batch, chunks, self._batch_written)

    def _batch_written(self, chunks: list[Chunk], error: BaseException | None) -> None:
        """On the loop: the writer thread wrote ``chunks`` (or failed to: ``error``)."""
        self._unwritten -= 1
        if self._debug:
            self.log.debug("load_end", first_idx=chunks[0].idx, last_idx=chunks[-1].idx)
        if error is None:
            self.bytes_written += sum(chunk.size for chunk in chunks)
            self.chunks_written += len(chunks)
            self._release(self.key, chunks)
        elif self.write_error is None:
            # Whatever it was, the batch is not on disk: the device can never complete.
            self.write_error = error
            if self._write_failed is not None:
                self._write_failed(error)
        waiting = self._all_written
        if not self._unwritten and waiting is not None and not waiting.done():
            waiting.set_result(None)

    @property
    def digest_text(self) -> str:
        return format_digest(self.digest, self.hasher)

    def _write_batch(self, chunks: list[Chunk]) -> None:
        """On the writer thread: hash and write a run of consecutive chunks.

        Chunks in memory go out in one writev; a spilled chunk is read back and
        written on its own, so reading back never holds more than one chunk.
        """
        views: list[bytes | memoryview] = []
        for chunk in chunks:
            if chunk.state is ChunkState.SPILLED:
                assert self._read_spilled is not None
                if views:
                    self.data.write(views)
                    views = []
                data = self._read_spilled(chunk)
                self.hasher.update(data)
                self.data.write([data])
                continue
            view = chunk.data
            # hashlib and xxhash release the GIL on large buffers.
            self.hasher.update(view)
            views.append(view)
        if views:
            self.data.write(views)
        self.written_at = time.monotonic()

    async def _load_config(self, loop: asyncio.AbstractEventLoop, chunk: Chunk) -> None:
        def load() -> None:
            blob: bytes | memoryview
            if chunk.state is ChunkState.SPILLED:
                assert self._read_spilled is not None
                blob = self._read_spilled(chunk)
            else:
                blob = chunk.data
            try:
                check_config_blob(blob, self.key, chunk.idx)
            except MultifdError as error:
                raise error.with_context(channel=chunk.channel) from None
            self.config.write([blob])
            # Both files are durable before the session renames anything into place.
            self.data.finish()
            self.config.finish()

        if self._debug:
            self.log.debug("load_config_start", idx=chunk.idx)
        await loop.run_in_executor(self.executor, load)
        if self._debug:
            self.log.debug("load_config_end", idx=chunk.idx, size=chunk.size)

    @property
    def outputs(self) -> tuple[Output, Output]:
        return (self.data, self.config)

    def discard_quietly(self) -> None:
        """Remove temporary files without waiting for any thread; idempotent, never raises."""
        for output in (self.data, self.config):
            if output.temp_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(output.temp_path)

    def discard(self) -> None:
        """Drop the outputs (blocking but quick: closes and unlinks); never raises."""
        self.data.discard()
        self.config.discard()

    def stop(self) -> None:
        """The migration ends: stop waiting for a FIFO's reader."""
        self.data.stop.set()
        self.config.stop.set()

    def close(self, *, wait: bool = True) -> None:
        self.executor.shutdown(wait=wait, cancel_futures=True)
