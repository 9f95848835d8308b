"""Admission: a channel's packet into the reassembly buffer, under the memory bound.

The asyncio side of ``memory.py``. :meth:`Admission.deliver` asks the policy
what to do with each packet and carries the decision out: insert it under the
device's ``asyncio.Condition`` (waking the loader when its next chunk is
there), wait for memory, or move a chunk to the spill file. It also gives
memory back when a loader has written a batch, and wakes those waiting for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from .logconfig import debug_enabled
from .memory import Fail, Insert, MemoryPolicy, SpillIncoming, SpillVictim, Wait
from .pool import BufferPool
from .reassembly import Chunk, DeviceBuffer, ReassemblyBuffer
from .spill import Spiller
from .wire import DeviceKey, DevicePacket

log = structlog.get_logger("vfio_multifd.admission")


class Admission:
    def __init__(
        self,
        reassembly: ReassemblyBuffer,
        policy: MemoryPolicy,
        pool: BufferPool,
        spiller: Spiller,
        *,
        reading_channels: Callable[[], int],
    ) -> None:
        self.reassembly = reassembly
        self.policy = policy
        self.pool = pool
        self.spiller = spiller
        self.conditions = {key: asyncio.Condition() for key in reassembly.devices}
        self._reading_channels = reading_channels  # accepted channels still reading
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
                        if self._paused:
                            self.memory_changed()  # memory just became drainable
                    return
            others = self._reading_channels() - self._paused - 1
            decision = self.policy.admit(packet, now=time.monotonic(), others_reading=others)
            if isinstance(decision, Insert):
                continue  # room was made while we asked
            if isinstance(decision, Wait):
                if not await self._wait_for_memory(decision.deadline):
                    self.policy.wait_expired()
            elif isinstance(decision, SpillIncoming):
                await self._spill_incoming(device, packet, channel)
                return
            elif isinstance(decision, SpillVictim):
                await self._spill_victim(decision.chunk)
            elif isinstance(decision, Fail):
                raise decision.error

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

    def memory_changed(self) -> None:
        """Queued memory shrank or became drainable: every waiting channel looks again."""
        waiters, self._memory_waiters = self._memory_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(True)

    async def _spill_incoming(
        self, device: DeviceBuffer, packet: DevicePacket, channel: int | None
    ) -> None:
        """Put an arriving chunk straight into the spill file: it never counts as memory."""
        ref = await self.spiller.write(packet.data, packet.device, packet.idx, channel)
        await self._insert_ready(
            device.key, lambda: self.reassembly.insert_spilled(packet, ref, channel)
        )
        self.pool.release(packet.buffer)

    async def _spill_victim(self, chunk: Chunk) -> None:
        """Move a queued chunk from memory to the spill file."""
        reassembly = self.reassembly
        reassembly.spill_started(chunk)
        ref = await self.spiller.write(chunk.data, chunk.device, chunk.idx, chunk.channel)
        self.pool.release(reassembly.spill_done(chunk, ref))
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
        for chunk in chunks:
            if chunk.buffer is not None:
                self.pool.release(chunk.buffer)
        self.reassembly.release(chunks)
        self.memory_changed()


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)
