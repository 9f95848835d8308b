"""The reassembly buffer: chunks of every device, queued by ``idx`` until written.

Pure: no event loop, no files. The buffer decides what is legal (PROTOCOL.md
section 3.4), what the loader may take next, and how many bytes are held in
memory; the asyncio adapters (``session``, ``loader``) do the waiting and the
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

import enum
import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import ProtocolError, Reason, SessionError
from .wire import PACKET_PREFIX_SIZE, DeviceKey, DevicePacket, PacketHeader

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer as PayloadBuffer


#: What each chunk held in memory costs besides its buffer (its Chunk, the
#: packet and buffer objects, dict and heap entries: measured at about 235 bytes).
CHUNK_OVERHEAD = 256
#: Payloads this large get page-rounded buffers of their own (and are pooled),
#: with room after the payload for the next packet's header: the decoder reads
#: it in the payload's last read (decoder.py). Smaller ones get an exact ``bytearray``.
POOLED_MIN = 64 << 10
PAGE = 4096


def capacity_of(size: int) -> int:
    """The bytes a payload buffer of ``size`` really takes: what memory is charged for."""
    return size if size < POOLED_MIN else -(-(size + PACKET_PREFIX_SIZE) // PAGE) * PAGE


class ChunkState(enum.Enum):
    MEMORY = "memory"  # payload held in ``buffer``
    SPILLING = "spilling"  # being written to the spill file; still in memory
    SPILLED = "spilled"  # on disk only; ``spill_ref`` says where
    TAKEN = "taken"  # handed to the loader, not yet written


@dataclass(slots=True, eq=False)
class Chunk:
    device: DeviceKey
    idx: int
    size: int
    config: bool
    buffer: PayloadBuffer | None
    state: ChunkState = ChunkState.MEMORY
    spill_ref: object | None = None
    channel: int | None = None  # which channel brought it, for error messages
    cost: int = 0  # what it counts against the bound while in memory

    @property
    def data(self) -> memoryview:
        assert self.buffer is not None, "chunk is spilled"
        return memoryview(self.buffer)[: self.size]


@dataclass(slots=True)
class DeviceBuffer:
    """One device's queue: what has been written, what waits, where it ends."""

    key: DeviceKey
    next_idx: int = 0  # the next idx the loader takes
    last_idx: int | None = None  # the config packet's idx, once it came
    max_idx: int = -1  # the highest idx received
    chunks: dict[int, Chunk] = field(default_factory=dict)  # waiting, by idx
    # -idx of chunks inserted in memory: the top is the spill victim candidate.
    # Stale entries (taken, spilled) are dropped when they reach the top.
    in_memory: list[int] = field(default_factory=list)
    bytes_written: int = 0
    chunks_written: int = 0
    complete: bool = False
    # idx announced by a header whose chunk is not queued yet -> the channel that
    # announced it; and the config packet's idx if one of them is it.
    announced: dict[int, int | None] = field(default_factory=dict)
    announced_last: int | None = None

    @property
    def ready(self) -> bool:
        """The chunk the loader needs next is there and can be taken."""
        chunk = self.chunks.get(self.next_idx)
        return chunk is not None and chunk.state is not ChunkState.SPILLING

    def insert(self, chunk: Chunk) -> None:
        self.check(chunk.idx, chunk.config, chunk.channel)
        if chunk.idx in self.announced:  # its own header's reservation (check said so)
            self.unannounce(chunk.idx)
        if chunk.config:
            self.last_idx = chunk.idx
        if chunk.state is ChunkState.MEMORY:
            if len(self.in_memory) > 2 * len(self.chunks) + 16:
                # Mostly stale (chunks taken in order never reach the top): rebuild,
                # amortized O(1) per insert, so the heap stays as small as the queue.
                self.in_memory = [
                    -idx for idx, c in self.chunks.items() if c.state is ChunkState.MEMORY
                ]
                heapq.heapify(self.in_memory)
            heapq.heappush(self.in_memory, -chunk.idx)
        self.chunks[chunk.idx] = chunk
        if chunk.idx > self.max_idx:
            self.max_idx = chunk.idx

    def check(self, idx: int, config: bool, channel: int | None = None) -> None:
        """Raise if a chunk ``idx`` (a config chunk if ``config``) may not be queued now.

        Chunks announced but not queued yet count as queued, except ``idx``'s own
        reservation by ``channel`` (its header's, when its payload is queued).
        """
        if idx < self.next_idx or idx in self.chunks:
            raise ProtocolError(
                Reason.VFIO_ALREADY_FILLED,
                f"state buffer {idx} already filled",
                device=str(self.key),
                idx=idx,
            )
        own = idx in self.announced and self.announced[idx] == channel
        if idx in self.announced and not own:
            raise self._announced_first(idx)
        last = self.last_idx
        if last is None and not (own and idx == self.announced_last):
            last = self.announced_last
        if config:
            if last is not None:
                raise ProtocolError(
                    Reason.VFIO_SECOND_CONFIG,
                    f"second config state packet (idx {idx}; the first was idx {last})",
                    device=str(self.key),
                    idx=idx,
                )
            highest = max(self.max_idx, max(self.announced, default=-1))
            if highest > idx:
                raise ProtocolError(
                    Reason.VFIO_AFTER_CONFIG,
                    f"state buffer {highest} came before the config state packet "
                    f"with idx {idx}, which must be the last",
                    device=str(self.key),
                    idx=highest,
                )
        elif last is not None and idx > last:
            raise ProtocolError(
                Reason.VFIO_AFTER_CONFIG,
                f"state buffer {idx} is after the config state packet (idx {last})",
                device=str(self.key),
                idx=idx,
            )

    def announce(self, idx: int, config: bool, channel: int | None) -> None:
        """A header of ``channel`` announced chunk ``idx``: raise if it may not be
        queued, else reserve ``idx`` until its chunk is inserted."""
        if idx in self.announced:
            # Even by ``channel`` itself: its first chunk ``idx`` is complete and on its
            # way to the queue, so this header announces a second chunk ``idx``.
            if self.announced[idx] == channel:
                raise ProtocolError(
                    Reason.VFIO_ALREADY_FILLED,
                    f"state buffer {idx} already filled",
                    device=str(self.key),
                    idx=idx,
                )
            raise self._announced_first(idx)
        self.check(idx, config, channel)
        self.announced[idx] = channel
        if config:
            self.announced_last = idx

    def _announced_first(self, idx: int) -> ProtocolError:
        return ProtocolError(
            Reason.VFIO_ALREADY_FILLED,
            f"state buffer {idx} already filled: channel {self.announced[idx]} "
            "announced it first (its payload is still on the way)",
            device=str(self.key),
            idx=idx,
        )

    def unannounce(self, idx: int) -> None:
        del self.announced[idx]
        if idx == self.announced_last:
            self.announced_last = None

    @property
    def waiting_for(self) -> str:
        """What this incomplete device waits for: its next chunk, or (with that chunk or
        every chunk already here) its own writes, such as to a FIFO nobody reads."""
        last = self.last_idx
        if self.next_idx in self.chunks or (last is not None and self.next_idx > last):
            return f"device {self.key} to write what it received"
        return f"device {self.key} idx {self.next_idx}"

    @property
    def fully_received(self) -> bool:
        """Every chunk up to the config packet is queued (or already written)."""
        last = self.last_idx
        return last is not None and len(self.chunks) == last - self.next_idx + 1

    @property
    def ready_in_memory(self) -> bool:
        """The next chunk is in memory: the loader will free it with no further input."""
        chunk = self.chunks.get(self.next_idx)
        return chunk is not None and chunk.state is ChunkState.MEMORY

    def farthest_in_memory(self) -> Chunk | None:
        """The in-memory chunk needed last (not the next one), in O(log n) amortized."""
        heap = self.in_memory
        chunks = self.chunks
        while heap:
            chunk = chunks.get(-heap[0])
            if chunk is not None and chunk.state is ChunkState.MEMORY:
                return chunk if chunk.idx > self.next_idx else None
            heapq.heappop(heap)  # taken, spilled or spilling: no longer a candidate
        return None

    def take_ready(self, max_bytes: int) -> list[Chunk]:
        """Pop consecutive ready chunks from ``next_idx`` (at least one, about ``max_bytes``)."""
        taken: list[Chunk] = []
        total = 0
        chunks = self.chunks
        while True:
            chunk = chunks.get(self.next_idx)
            if chunk is None or chunk.state is ChunkState.SPILLING:
                break
            if taken and (total + chunk.size > max_bytes or chunk.config):
                break  # the config chunk goes alone, after every data chunk is written
            del chunks[self.next_idx]
            if chunk.state is ChunkState.MEMORY:
                chunk.state = ChunkState.TAKEN
            taken.append(chunk)
            total += chunk.size
            self.next_idx += 1
            if chunk.config:
                break
        return taken

    def missing(self) -> str:
        """What never came, for an error message: how many chunks, about how many bytes
        (at the chunk size seen), which idx, and whether the config state packet came.

        ``""`` once everything up to the config packet is here. O(chunks held), never
        O(the size of a gap): a source that sends idx 4294967294 alone must not make
        this message slow.
        """
        last = self.last_idx
        end = self.max_idx if last is None else last
        gaps = list(_gaps(self.next_idx, end, self.chunks))
        count = sum(stop - first + 1 for first, stop in gaps)
        text = ""
        if gaps:
            shown = ", ".join(_span(first, stop) for first, stop in gaps[:MISSING_RANGES_SHOWN])
            if len(gaps) > MISSING_RANGES_SHOWN:
                shown += f" and {len(gaps) - MISSING_RANGES_SHOWN} more ranges"
            size = self._chunk_size_seen()
            about = "" if size is None else f": about {count * size} bytes at {size} bytes a chunk"
            of = "" if last is None else f" of {last}"
            plural = "s" if (count if last is None else last) != 1 else ""
            text = f"missing {count}{of} chunk{plural} (idx {shown}{about})"
        if last is not None:
            return text
        if self.max_idx < 0:
            return "nothing came: no chunk and no config state packet"
        tail = (
            f"the config state packet never came, nor anything after idx {self.max_idx} "
            "(the highest received"
        )
        tail += ")" if gaps else "; every chunk up to it came)"
        return f"{text}, and {tail}" if text else tail

    def _chunk_size_seen(self) -> int | None:
        """The largest data chunk held, else the average written; None if none came."""
        held = [chunk.size for chunk in self.chunks.values() if not chunk.config]
        if held:
            return max(held)
        if self.chunks_written:
            return -(-self.bytes_written // self.chunks_written)
        return None


#: Ranges of missing idx an error message lists before it says how many more.
MISSING_RANGES_SHOWN = 8


def _gaps(start: int, end: int, present: dict[int, Chunk]) -> Iterator[tuple[int, int]]:
    """The runs ``(first, last)`` of indices in ``start..end`` that are absent.

    Time grows with the chunks held, never with the size of a gap.
    """
    idx = start
    for held in sorted(i for i in present if i >= start):
        if held > end:
            break
        if held > idx:
            yield idx, held - 1
        idx = held + 1
    if idx <= end:
        yield idx, end


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


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
        self, packet: DevicePacket, channel: int | None = None, *, allocated: bool = False
    ) -> Chunk:
        """Queue a packet's chunk in memory. ``allocated``: its buffer was charged by
        :meth:`allocate` (otherwise it is charged now; the caller has checked :meth:`fits`)."""
        device = self.device(packet.device)
        cost = self.cost(packet.size)
        chunk = Chunk(
            packet.device,
            packet.idx,
            packet.size,
            packet.config,
            packet.buffer,
            channel=channel,
            cost=cost,
        )
        device.insert(chunk)
        if allocated:
            self.in_flight_bytes -= cost
        else:
            self._grow(cost)
        return chunk

    def insert_spilled(
        self, packet: DevicePacket, ref: object, channel: int | None = None
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
        device.insert(chunk)
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
