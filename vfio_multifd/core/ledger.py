"""The one memory ledger: everything --max-queued-bytes counts, and every release.

The bound covers chunks being received or queued, the one staging buffer a
chunk bound straight for the spill file is received in, idle pooled buffers,
and (with QEMU's streams) the RAM pages and main-stream bytes being received
or queued for the RAM writer. :class:`MemoryLayout` splits it once; :class:`Ledger` charges each
payload buffer when its header is complete (memory that peers merely announce
counts), releases the charge when the chunk is written, spilled, or its
channel fails mid-payload, and asks the pure :class:`~vfio_multifd.memory.MemoryPolicy`
what to do when a buffer does not fit. Buffers themselves come from a
:class:`BufferSource` the driver gives (``pool.BufferPool``: anonymous mmaps),
so this module allocates nothing itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .decoder import MAIN_READ_SIZE
from .memory import SPILL_GRACE, Decision, MemoryPolicy
from .ram import MULTIFD_PACKET_SIZE
from .reassembly import CHUNK_OVERHEAD, Chunk, ReassemblyBuffer, capacity_of
from .wire import DeviceKey, PacketHeader

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer as PayloadBuffer

#: Idle pooled buffers kept when memory is not bounded.
UNBOUNDED_IDLE_BYTES = 64 << 20
#: The most one write to the RAM writer, or one read in flight, holds: a RAM packet's
#: page data, or one read of the main channel.
RAM_WRITE_MAX = max(MULTIFD_PACKET_SIZE, MAIN_READ_SIZE)
#: The RAM writer's share of the bound, at most (and its cap without a bound).
RAM_QUEUE_BYTES = 32 << 20


def smallest_chunk_bound(max_payload_size: int, *, fail_when_full: bool) -> int:
    """The smallest part of the bound with which chunks complete in every arrival order:
    the largest chunk and its bookkeeping (and as much again to spill from)."""
    largest = capacity_of(max_payload_size) + CHUNK_OVERHEAD
    return largest if fail_when_full else largest + capacity_of(max_payload_size)


def smallest_ram_share(channels: int) -> int:
    """The smallest share of the bound for QEMU's streams: a read in flight on every
    channel and the main channel, and one write queued."""
    return (channels + 2) * RAM_WRITE_MAX


@dataclass(frozen=True, slots=True)
class MemoryLayout:
    """How the bound is split (the arithmetic lives only here)."""

    bound: int | None  # --max-queued-bytes: chunks, staging and idle buffers together
    staging: int  # the staging buffer's capacity (0: chunks never spill)
    queue_bound: int | None  # what queued and in-flight chunks may take
    #: Part of ``queue_bound`` only a device's next-needed chunk may use, so that
    #: early chunks can never crowd out the one a loader waits for.
    reserve: int
    chunk_overhead: int  # charged per chunk besides its buffer (0 when unbounded)
    #: What RAM pages and main-stream bytes may take, being read or queued for the RAM
    #: writer (0: no QEMU streams); apart from ``queue_bound``, so that neither can
    #: starve the other.
    ram: int = 0
    #: RAM queued past this holds every channel until the writer catches up: room
    #: for a read in flight on each of ``channels`` and the main channel.
    ram_hold_above: int = 0

    @classmethod
    def of(
        cls,
        bound: int | None,
        *,
        max_payload_size: int,
        fail_when_full: bool,
        qemu_streams: bool = False,
        channels: int = 0,
    ) -> MemoryLayout:
        spills = bound is not None and not fail_when_full
        staging = capacity_of(max_payload_size) if spills else 0
        ram = 0
        if qemu_streams:
            smallest = smallest_ram_share(channels)
            if bound is None:
                ram = max(RAM_QUEUE_BYTES, smallest)
            else:  # a quarter of what the chunks need not have, within [smallest, 32 MiB]
                spare = bound - smallest_chunk_bound(max_payload_size, fail_when_full=fail_when_full)
                ram = min(max(RAM_QUEUE_BYTES, smallest), max(smallest, spare // 4))
        return cls(
            bound=bound,
            staging=staging,
            queue_bound=None if bound is None else bound - staging - ram,
            reserve=capacity_of(max_payload_size) + CHUNK_OVERHEAD if spills else 0,
            chunk_overhead=CHUNK_OVERHEAD if bound is not None else 0,
            ram=ram,
            ram_hold_above=ram - (channels + 1) * RAM_WRITE_MAX if qemu_streams else 0,
        )

    def reassembly(self, devices: Iterable[DeviceKey]) -> ReassemblyBuffer:
        """The reassembly buffer this layout accounts (its counters are the ledger's)."""
        return ReassemblyBuffer(
            devices,
            max_queued_bytes=self.queue_bound,
            reserve=self.reserve,
            chunk_overhead=self.chunk_overhead,
        )


class BufferSource(Protocol):
    """Where payload buffers come from (``pool.BufferPool``, or plain bytearrays)."""

    idle_bytes: int
    misses: int

    def acquire(self, size: int) -> PayloadBuffer: ...
    def release(self, buffer: PayloadBuffer, *, room: int) -> None: ...
    def shrink(self, to_bytes: int) -> None: ...
    def fresh(self, capacity: int) -> PayloadBuffer: ...


class Ledger:
    def __init__(
        self,
        reassembly: ReassemblyBuffer,
        layout: MemoryLayout,
        buffers: BufferSource,
        *,
        fail_when_full: bool,
        grace: float = SPILL_GRACE,
    ) -> None:
        self.reassembly = reassembly
        self.layout = layout
        self.buffers = buffers
        self.policy = MemoryPolicy(reassembly, fail_when_full=fail_when_full, grace=grace)
        self._staging: PayloadBuffer | None = None  # made on the first spill of an arrival
        self.staging_busy = False
        self.charged = False  # a payload buffer was asked for: warming the pool stops

    # -- charges ------------------------------------------------------------------------

    def charge(self, header: PacketHeader) -> tuple[PayloadBuffer, int] | None:
        """A buffer for ``header``'s payload and its charge, if it fits now."""
        self.charged = True
        reassembly = self.reassembly
        device = reassembly.devices[header.device]
        if not reassembly.fits(header.size, ahead=header.idx != device.next_idx):
            return None
        cost = reassembly.allocate(header.size)
        buffer = self.buffers.acquire(header.size)
        self.buffers.shrink(self._idle_room())  # idle buffers are memory too
        return buffer, cost

    def uncharge(self, cost: int) -> None:
        """A charged buffer will never hold a queued chunk: its channel failed mid-payload.
        (The buffer is not reused: a reader may still be writing into it.)"""
        if cost:
            self.reassembly.free_allocation(cost)

    def decide(
        self, header: PacketHeader, *, now: float, others_reading: int, channel: int | None
    ) -> Decision:
        """What to do with an announced header that did not fit (see ``memory.py``)."""
        return self.policy.admit(
            header, now=now, others_reading=others_reading, channel=channel, announced=True
        )

    def wait_expired(self) -> None:
        self.policy.wait_expired()

    # -- the staging buffer ---------------------------------------------------------------

    def take_staging(self) -> PayloadBuffer | None:
        """The staging buffer, unless another arrival is in it (until it is spilled)."""
        if self.staging_busy:
            return None
        self.staging_busy = True
        if self._staging is None:
            self._staging = self.buffers.fresh(self.layout.staging)
        return self._staging

    def is_staging(self, buffer: object) -> bool:
        return buffer is not None and buffer is self._staging

    def release_staging(self) -> None:
        self.staging_busy = False

    # -- warming the pool (while no channel sends) ------------------------------------------

    def warm_count(self, capacity: int) -> int:
        """How many more idle buffers of ``capacity`` the bound has room for now (0 once a
        payload was asked for: from then on buffers are made as they are needed)."""
        if self.charged:
            return 0
        return max(0, (self._idle_room() - self.buffers.idle_bytes) // capacity)

    def add_idle(self, buffers: Iterable[PayloadBuffer]) -> None:
        """Warm buffers made meanwhile: kept idle while there is room (chunks may be queued)."""
        for buffer in buffers:
            self._release_buffer(buffer)

    # -- releases -------------------------------------------------------------------------

    def spill_started(self, chunk: Chunk) -> None:
        self.reassembly.spill_started(chunk)

    def spill_done(self, chunk: Chunk, ref: object) -> None:
        """``chunk`` is on disk: its buffer is free."""
        self._release_buffer(self.reassembly.spill_done(chunk, ref))

    def release_written(self, chunks: list[Chunk]) -> None:
        """A loader wrote ``chunks``: their memory is free for the channels again."""
        buffers = [chunk.buffer for chunk in chunks if chunk.buffer is not None]
        self.reassembly.release(chunks)  # forgets each chunk's buffer
        for buffer in buffers:
            self._release_buffer(buffer)

    def _release_buffer(self, buffer: PayloadBuffer) -> None:
        self.buffers.release(buffer, room=self._idle_room())

    def _idle_room(self) -> int:
        bound = self.layout.bound
        if bound is None:
            return UNBOUNDED_IDLE_BYTES
        staging = 0 if self._staging is None else self.layout.staging
        return max(0, bound - self.reassembly.queued_bytes - staging - self.layout.ram)

    # -- what the snapshot shows -------------------------------------------------------------

    @property
    def queued_bytes(self) -> int:
        return self.reassembly.queued_bytes

    @property
    def in_flight_bytes(self) -> int:
        return self.reassembly.in_flight_bytes

    @property
    def peak_queued_bytes(self) -> int:
        return self.reassembly.peak_queued_bytes

    @property
    def spilled_bytes(self) -> int:
        return self.reassembly.spilled_bytes

    @property
    def idle_bytes(self) -> int:
        return self.buffers.idle_bytes

    @property
    def buffers_allocated(self) -> int:
        return self.buffers.misses
