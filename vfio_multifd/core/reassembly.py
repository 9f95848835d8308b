"""The reassembly buffer: chunks of every device, queued by ``idx`` until written.

Pure: no event loop, no files. The buffer decides what is legal (PROTOCOL.md
section 3.4), what the loader may take next, and how many bytes are held in
memory; the migration core (``migration.py``) and its drivers do the waiting and the
I/O. Memory grows with what is queued, never with the value of ``idx``:
chunks live in a dict keyed by ``idx``.

Memory is charged from the moment a payload buffer is allocated, before its
bytes arrive (:meth:`ReassemblyBuffer.allocate`), at the buffer's capacity
plus a per-chunk overhead, so what peers merely announce counts too. A chunk
is *held* from the moment it is inserted until the loader has written it and
calls :meth:`ReassemblyBuffer.release`; held chunks are either in memory or
spilled to disk by the adapter (``spill_ref`` is the adapter's token for
where; the core never looks inside it).

A chunk's idx is reserved from the moment its header is complete
(:meth:`ReassemblyBuffer.announce`), before its payload is read or has
memory: a second header for the same idx is refused at once, whichever of
the two came first, rather than once the first payload is queued (a channel
that never sends the second payload would otherwise leave the migration
waiting for it). A failed channel's reservations are dropped with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..errors import ProtocolError, Reason, SessionError
from .queue import (
    CHUNK_OVERHEAD,
    POOLED_MIN,
    Chunk,
    ChunkState,
    DeviceBuffer,
    capacity_of,
)
from .wire import DeviceKey, DevicePacket, PacketHeader

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer as PayloadBuffer

#: Also the reassembly buffer's names (most users import them from here).
__all__ = [
    "CHUNK_OVERHEAD",
    "POOLED_MIN",
    "Chunk",
    "ChunkState",
    "DeviceBuffer",
    "ReassemblyBuffer",
    "capacity_of",
]

class ReassemblyBuffer:
    """Every expected device's queue plus the shared memory accounting."""

    def __init__(
        self,
        devices: Iterable[DeviceKey],
        *,
        max_queued_bytes: int | None = None,
        reserve: int = 0,
        chunk_overhead: int = 0,
    ):
        self.devices: dict[DeviceKey, DeviceBuffer] = {key: DeviceBuffer(key) for key in devices}
        self.max_queued_bytes = max_queued_bytes
        # Part of the bound that only a device's next-needed chunk may use, so
        # that chunks arriving early can never crowd out the one a loader waits for.
        self.reserve = reserve
        # Bytes charged per chunk held in memory on top of its data: the
        # objects that describe it. Without it, a flood of zero-length early
        # chunks would cost memory that no bound sees.
        self.chunk_overhead = chunk_overhead
        # Memory charged against the bound: payload buffers allocated (being
        # received, or held by a chunk in MEMORY, SPILLING or TAKEN state).
        self.queued_bytes = 0
        self.in_flight_bytes = 0  # of which buffers still being received
        self.taken_bytes = 0  # of which handed to loaders and being written
        self.spilling_bytes = 0  # of which being written to the spill file
        self.peak_queued_bytes = 0
        self.spilled_bytes = 0  # total ever spilled
        self.spilled_now = 0  # bytes currently on disk only
        self.bytes_written = 0  # data bytes the loaders wrote, all devices together

    def device(self, key: DeviceKey, idx: int | None = None) -> DeviceBuffer:
        try:
            return self.devices[key]
        except KeyError:
            known = ", ".join(_key_text(k) for k in self.devices) or "none"
            at = "" if idx is None else f" in state buffer {idx}"
            raise ProtocolError(
                Reason.UNKNOWN_DEVICE,
                f"unknown device {_key_text(key)}{at}; expected one of (the --device "
                f"idstr= and instance= given): {known}",
                device=str(key),
                idx=idx,
            ) from None

    def announce(self, header: PacketHeader, channel: int | None) -> DeviceBuffer:
        """A channel's header is complete: check its chunk and reserve its idx
        (:meth:`DeviceBuffer.announce`); returns its device."""
        device = self.device(header.device, header.idx)
        device.announce(header.idx, header.config, channel)
        return device

    def channel_failed(self, channel: int) -> None:
        """``channel`` failed: the chunks it announced will never come."""
        for device in self.devices.values():
            for idx in [idx for idx, by in device.announced.items() if by == channel]:
                device.unannounce(idx)

    def cost(self, size: int) -> int:
        """What a chunk of ``size`` payload bytes counts against the bound while in memory."""
        return capacity_of(size) + self.chunk_overhead

    def fits(self, size: int, *, ahead: bool = False) -> bool:
        """Room for a chunk of ``size`` more bytes; a chunk ``ahead`` of its device's next may
        not use the reserve."""
        bound = self.max_queued_bytes
        if bound is None:
            return True
        if ahead:
            bound -= self.reserve
        return self.queued_bytes + self.cost(size) <= bound

    def allocate(self, size: int) -> int:
        """Charge a payload buffer about to be received; returns its cost (see :meth:`insert`)."""
        cost = self.cost(size)
        self.in_flight_bytes += cost
        self._grow(cost)
        return cost

    def free_allocation(self, cost: int) -> None:
        """A buffer charged by :meth:`allocate` will never be inserted (its channel failed)."""
        self.in_flight_bytes -= cost
        self.queued_bytes -= cost

    def insert(
        self,
        packet: DevicePacket,
        channel: int | None = None,
        *,
        allocated: bool = False,
        announced: bool = False,
    ) -> Chunk:
        """Queue a packet's chunk in memory. ``allocated``: its buffer was charged by
        :meth:`allocate` (otherwise it is charged now; the caller has checked :meth:`fits`).
        ``announced``: its header reserved its idx with :meth:`announce` (checked then)."""
        device = self.device(packet.device)
        cost = self.cost(packet.size)
        chunk = Chunk.of(packet, channel, cost=cost)
        device.insert(chunk, announced=announced)
        if allocated:
            self.in_flight_bytes -= cost
        else:
            self._grow(cost)
        return chunk

    def insert_spilled(
        self,
        packet: DevicePacket,
        ref: object,
        channel: int | None = None,
        *,
        announced: bool = False,
    ) -> Chunk:
        """Queue a chunk that went straight to the spill file (``ref`` says where)."""
        device = self.device(packet.device)
        chunk = Chunk(
            packet.device,
            packet.idx,
            packet.size,
            packet.config,
            None,
            ChunkState.SPILLED,
            ref,
            channel,
        )
        device.insert(chunk, announced=announced)
        self.spilled_bytes += chunk.size
        self.spilled_now += chunk.size
        return chunk

    def take(self, device: DeviceBuffer, max_bytes: int) -> list[Chunk]:
        """:meth:`DeviceBuffer.take_ready`, with the memory it holds accounted as taken."""
        chunks = device.take_ready(max_bytes)
        self.taken_bytes += sum(c.cost for c in chunks if c.state is ChunkState.TAKEN)
        return chunks

    def drainable(self) -> bool:
        """Some memory will be freed with no further input: a loader is writing it, or
        can take it now (O(devices))."""
        return self.taken_bytes > 0 or any(d.ready_in_memory for d in self.devices.values())

    def queue_full_error(self, packet: PacketHeader | DevicePacket) -> SessionError:
        """QEMU's policy: the error of a queue that ``packet`` would take over the bound."""
        return SessionError(
            Reason.QUEUE_FULL,
            f"queueing state buffer {packet.idx} ({packet.size} bytes) would hold "
            f"{self.queued_bytes + self.cost(packet.size)} bytes, over the bound of "
            f"{self.max_queued_bytes} (--max-queued-bytes)",
            device=str(packet.device),
            idx=packet.idx,
        )

    def _grow(self, size: int) -> None:
        self.queued_bytes += size
        if self.queued_bytes > self.peak_queued_bytes:
            self.peak_queued_bytes = self.queued_bytes

    def spill_started(self, chunk: Chunk) -> None:
        assert chunk.state is ChunkState.MEMORY
        chunk.state = ChunkState.SPILLING
        self.spilling_bytes += chunk.cost

    def spill_done(self, chunk: Chunk, ref: object) -> PayloadBuffer:
        """The chunk is on disk: it no longer counts as memory. Returns the freed buffer."""
        buffer = chunk.buffer
        assert buffer is not None and chunk.state is ChunkState.SPILLING
        chunk.buffer = None
        chunk.spill_ref = ref
        chunk.state = ChunkState.SPILLED
        self.queued_bytes -= chunk.cost
        self.spilling_bytes -= chunk.cost
        self.spilled_bytes += chunk.size
        self.spilled_now += chunk.size
        return buffer

    def distance(self, device: DeviceKey, idx: int) -> int:
        """How far ahead of its device's next-needed chunk ``idx`` is (0: needed now)."""
        return idx - self.devices[device].next_idx

    def spill_victim(self) -> Chunk | None:
        """The in-memory chunk needed furthest in the future, or ``None``.

        Evicting what is needed last is optimal for a consumer that reads in
        order (Belady); a device's next-needed chunk is never chosen, since the
        loader is about to write it anyway. O(devices x log n).
        """
        best: Chunk | None = None
        best_distance = 0
        for device in self.devices.values():
            chunk = device.farthest_in_memory()
            if chunk is not None and chunk.idx - device.next_idx > best_distance:
                best, best_distance = chunk, chunk.idx - device.next_idx
        return best

    def release(self, chunks: Iterable[Chunk]) -> None:
        """The loader wrote these chunks: forget them."""
        for chunk in chunks:
            device = self.devices[chunk.device]
            if chunk.config:
                device.complete = True
            else:
                device.bytes_written += chunk.size
                device.chunks_written += 1
                self.bytes_written += chunk.size
            if chunk.state is ChunkState.SPILLED:
                self.spilled_now -= chunk.size
            else:
                self.queued_bytes -= chunk.cost
                if chunk.state is ChunkState.TAKEN:
                    self.taken_bytes -= chunk.cost
            chunk.buffer = None

    def incomplete_error(self, why: str) -> SessionError | None:
        """The error if nothing more can arrive (``why``) and a device still misses chunks."""
        stuck = [d for d in self.incomplete_devices() if not d.fully_received]
        if not stuck:
            return None
        detail = "; ".join(f"device {d.key}: {d.missing()}" for d in stuck)
        return SessionError(
            Reason.INCOMPLETE, f"{why} with {len(stuck)} device(s) incomplete: {detail}"
        )

    def incomplete_devices(self) -> list[DeviceBuffer]:
        return [device for device in self.devices.values() if not device.complete]


def _key_text(key: DeviceKey) -> str:
    """``(idstr '0000:00:02.0/vfio', instance 0)``: both halves, the instance even when 0."""
    return f"(idstr {key.idstr!r}, instance {key.instance_id})"
