"""One device's queue of chunks, by ``idx``: what is legal, what is ready, what is missing.

Pure, like the reassembly buffer (``reassembly.py``) that holds one queue per
device and the memory accounting over them all. :meth:`DeviceBuffer.check`
is where PROTOCOL.md section 3.4's rules are: no idx twice, nothing after the
config packet, one config packet.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import ProtocolError, Reason
from .wire import PACKET_PREFIX_SIZE, DeviceKey, DevicePacket

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

    @classmethod
    def of(
        cls,
        packet: DevicePacket,
        channel: int | None,
        *,
        state: ChunkState = ChunkState.MEMORY,
        cost: int = 0,
    ) -> Chunk:
        """The chunk ``packet`` brought (on ``channel``), its buffer still the packet's."""
        return cls(
            packet.device,
            packet.idx,
            packet.size,
            packet.config,
            packet.buffer,
            state,
            channel=channel,
            cost=cost,
        )

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

    def insert(self, chunk: Chunk, *, announced: bool = False) -> None:
        """Queue ``chunk``. ``announced``: its header reserved its idx (and was checked
        then: nothing since can have made it illegal), so it is not checked again."""
        if announced:
            assert self.announced.get(chunk.idx, -1) == chunk.channel, "not announced"
        else:
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
