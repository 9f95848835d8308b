"""Admission: memory for a channel's packets, under the bound, and their chunks into the queue.

The asyncio side of ``memory.py``. When a packet's header is complete, its
channel asks for a payload buffer: :meth:`Admission.allocate_now` grants one
at once when it fits under --max-queued-bytes (charged from that moment, so
memory that peers merely announce counts); otherwise :meth:`Admission.allocate`
asks the policy and carries the decision out - wait for memory, move a queued
chunk to the spill file, or receive the payload into the one staging buffer
and spill it from there. :meth:`Admission.deliver` then queues the complete
chunk under the device's ``asyncio.Condition`` (waking the loader when its next
chunk is there), and :meth:`Admission.release_written` gives memory back when
a loader has written a batch, waking those waiting for it.
"""

from __future__ import annotations

import asyncio
import mmap
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from .logconfig import debug_enabled
from .memory import Fail, Insert, MemoryPolicy, SpillIncoming, SpillVictim, Wait
from .pool import QEMU_CHUNK, BufferPool, warm_buffers
from .reassembly import POOLED_MIN, Chunk, ReassemblyBuffer, capacity_of
from .spill import Spiller
from .wire import DeviceKey, DevicePacket, PacketHeader

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer as PayloadBuffer

log = structlog.get_logger("vfio_multifd.admission")

#: Idle pooled buffers kept when memory is not bounded.
UNBOUNDED_IDLE_BYTES = 64 << 20
#: Buffers warmed at a time (warm_pool): what warming may hold beyond the bound.
WARM_BATCH = 4
#: Seconds without a payload before the pool is warmed (warm_pool).
WARM_AFTER = 0.2


class Admission:
    def __init__(
        self,
        reassembly: ReassemblyBuffer,
        policy: MemoryPolicy,
        spiller: Spiller,
        *,
        bound: int | None,
        staging_size: int,
        reading_channels: Callable[[], int],
    ) -> None:
        self.reassembly = reassembly
        self.policy = policy
        self.pool = BufferPool()
        self.spiller = spiller
        self.bound = bound  # --max-queued-bytes: chunks, staging and idle buffers together
        self.conditions = {key: asyncio.Condition() for key in reassembly.devices}
        self._reading_channels = reading_channels  # accepted channels still reading
        # The one buffer a chunk that goes straight to the spill file is received in.
        self._staging_size = staging_size
        self._staging: mmap.mmap | None = None
        self._staging_busy = False
        self._receiving = False  # a payload buffer was asked for (warm_pool stops then)
        # One future per channel waiting for memory: a change resolves them all,
        # so a wake-up cannot fall between a channel's check and its wait.
        self._memory_waiters: list[asyncio.Future[bool]] = []
        self._paused = 0  # channels waiting for memory
        self._pause_started = 0.0
        self.paused_seconds = 0.0  # wall-clock time with at least one channel waiting
        # QEMU's trace point vfio_load_state_device_buffer_incoming, per packet:
        # decided once here, so a disabled debug level costs one test per packet.
        self._trace = log.bind()
        self._trace_incoming = debug_enabled(self._trace)

    # -- payload buffers ------------------------------------------------------------

    def allocate_now(self, header: PacketHeader, channel: int | None) -> PayloadBuffer | None:
        """A charged buffer for ``header``'s payload if it fits now (the fast path).

        First the header reserves its idx (a bad chunk, or one another channel
        announced, fails here, before its payload); :meth:`allocate` then waits
        for the memory if there is none now.
        """
        self.reassembly.announce(header, channel)
        return self._allocate_if_room(header)

    def _allocate_if_room(self, header: PacketHeader) -> PayloadBuffer | None:
        self._receiving = True  # warming the pool stops
        reassembly = self.reassembly
        device = reassembly.devices[header.device]
        if not reassembly.fits(header.size, ahead=header.idx != device.next_idx):
            return None
        reassembly.allocate(header.size)
        buffer = self.pool.acquire(header.size)
        self._trim_pool()
        return buffer

    async def allocate(self, header: PacketHeader, channel: int | None) -> PayloadBuffer:
        """A buffer for the payload of ``header`` (announced by :meth:`allocate_now`,
        which had no room) once the memory policy allows it."""
        while (buffer := self._allocate_if_room(header)) is None:
            others = self._reading_channels() - self._paused - 1
            decision = self.policy.admit(
                header, now=time.monotonic(), others_reading=others, channel=channel
            )
            if isinstance(decision, Wait):
                if not await self._wait_for_memory(decision.deadline):
                    self.policy.wait_expired()
            elif isinstance(decision, SpillIncoming):
                return await self._acquire_staging()
            elif isinstance(decision, SpillVictim):
                await self._spill_victim(decision.chunk)
            elif isinstance(decision, Fail):
                raise decision.error
            else:
                assert isinstance(decision, Insert)  # room was made meanwhile: take it
        return buffer

    async def _acquire_staging(self) -> mmap.mmap:
        while self._staging_busy:  # freed once its chunk is in the spill file
            await self._wait_for_memory(None)
        self._staging_busy = True
        if self._staging is None:
            self._staging = mmap.mmap(-1, capacity_of(self._staging_size))
        return self._staging

    async def warm_pool(self, max_payload: int, *, after: float = WARM_AFTER) -> None:
        """Fill the pool with warm buffers for QEMU's chunk size (at most ``max_payload``),
        as many as idle buffers may take, while no payload has been asked for yet.

        It starts only once the daemon has waited ``after`` seconds with no
        payload: a source that sends at once (a test, a demo) gains nothing from
        it, a migration's destination waits for its stop-copy far longer. Then a
        few at a time, each batch added to the pool (where the bound counts it)
        before the next is made, so that memory being warmed never exceeds the
        bound by more than one batch, even if chunks come in meanwhile; and it stops
        at the first payload: from then on, buffers are made as they are needed."""
        capacity = capacity_of(min(QEMU_CHUNK, max_payload))
        if capacity < POOLED_MIN:
            return
        await asyncio.sleep(after)
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        warmed = 0
        while not self._receiving:
            count = min(WARM_BATCH, (self._idle_room() - self.pool.idle_bytes) // capacity)
            if count <= 0:
                break
            buffers = await loop.run_in_executor(None, warm_buffers, capacity, count)
            for buffer in buffers:  # kept while there is room (chunks may be queued by now)
                self._release_buffer(buffer)
            warmed += len(buffers)
            if len(buffers) < count:  # out of memory: enough
                break
        if warmed:  # its resident memory grew by this much, within the bound
            log.info(
                "pool_warmed",
                buffers=warmed,
                bytes=warmed * capacity,
                seconds=round(time.monotonic() - started, 3),
            )

    def _trim_pool(self) -> None:
        """Idle buffers are memory too: keep only what the bound has room for."""
        self.pool.shrink(self._idle_room())

    def _idle_room(self) -> int:
        if self.bound is None:
            return UNBOUNDED_IDLE_BYTES
        staging = 0 if self._staging is None else len(self._staging)
        return max(0, self.bound - self.reassembly.queued_bytes - staging)

    def _release_buffer(self, buffer: PayloadBuffer) -> None:
        self.pool.release(buffer, room=self._idle_room())

    # -- chunks -----------------------------------------------------------------------

    async def deliver(self, packet: DevicePacket, channel: int | None = None) -> None:
        """Queue one complete packet's chunk for its device's loader."""
        if self._trace_incoming:
            self._trace.debug(
                "buffer_incoming",
                channel=channel,
                device=str(packet.device),
                idx=packet.idx,
                size=packet.size,
            )
        if packet.buffer is self._staging:
            await self._spill_incoming(packet, channel)
            return
        reassembly = self.reassembly
        condition = self.conditions[packet.device]
        async with condition:
            reassembly.insert(packet, channel, allocated=True)
            if reassembly.devices[packet.device].ready:
                condition.notify()
                if self._paused:
                    self.memory_changed()  # memory just became drainable

    async def _spill_incoming(self, packet: DevicePacket, channel: int | None) -> None:
        """A chunk received in the staging buffer goes to the spill file: it never counts as memory."""
        try:
            ref = await self.spiller.write(packet.data, packet.device, packet.idx, channel)
            await self._insert_ready(
                packet.device, lambda: self.reassembly.insert_spilled(packet, ref, channel)
            )
        finally:
            self._staging_busy = False
            self.memory_changed()

    async def _spill_victim(self, chunk: Chunk) -> None:
        """Move a queued chunk from memory to the spill file."""
        reassembly = self.reassembly
        reassembly.spill_started(chunk)
        ref = await self.spiller.write(chunk.data, chunk.device, chunk.idx, chunk.channel)
        self._release_buffer(reassembly.spill_done(chunk, ref))
        self.memory_changed()
        await self._insert_ready(chunk.device, lambda: None)

    async def _insert_ready(self, key: DeviceKey, change: Callable[[], object]) -> None:
        """Make ``change`` under the device's condition and wake its loader if it can go on."""
        condition = self.conditions[key]
        async with condition:
            change()
            if self.reassembly.devices[key].ready:
                condition.notify()

    def release_written(self, chunks: list[Chunk]) -> None:
        """A loader wrote ``chunks``: their memory is free for the channels again."""
        buffers = [chunk.buffer for chunk in chunks if chunk.buffer is not None]
        self.reassembly.release(chunks)  # forgets each chunk's buffer
        for buffer in buffers:
            self._release_buffer(buffer)
        self.memory_changed()

    # -- waiting for memory --------------------------------------------------------------

    async def _wait_for_memory(self, deadline: float | None) -> bool:
        """Wait until queued memory changes; False if ``deadline`` passed first."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._memory_waiters.append(waiter)
        if not self._paused:
            self._pause_started = time.monotonic()
        self._paused += 1
        timer = None
        if deadline is not None:
            timer = loop.call_later(max(0.0, deadline - time.monotonic()), _expire, waiter)
        try:
            return await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if waiter in self._memory_waiters:
                self._memory_waiters.remove(waiter)
            self._paused -= 1
            if not self._paused:
                self.paused_seconds += time.monotonic() - self._pause_started

    def paused_total(self, now: float) -> float:
        """:attr:`paused_seconds` including a pause still going on (``now``: monotonic)."""
        ongoing = now - self._pause_started if self._paused else 0.0
        return self.paused_seconds + ongoing

    def memory_changed(self) -> None:
        """Queued memory shrank or became drainable: every waiting channel looks again."""
        waiters, self._memory_waiters = self._memory_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(True)


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)
