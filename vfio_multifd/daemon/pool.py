"""Payload buffers: allocated only when charged against the bound, reused while warm.

Allocating a fresh 1 MiB buffer costs page faults on every chunk (measured
here: about 2.5 ms for a zero-filled ``bytearray``, i.e. under 400 MB/s);
handing the buffers of written chunks back to the channels costs nothing.
Large payloads (``POOLED_MIN`` and up) get their own anonymous ``mmap`` of
whole pages: nothing is resident until bytes arrive, and a buffer let go is
unmapped at once, so resident memory follows what is charged. Small payloads
get an exact ``bytearray`` and are not pooled.

The pool is last in, first out (the buffer used last is the warmest) and keeps
idle buffers only while the caller says there is room for them: idle buffers
are memory too. Only the event loop thread touches a pool.

A fresh buffer's pages are zeroed by the kernel on first touch, in the read
that fills them: on the hot path, a page fault every 4 KiB. So while the
daemon waits for its channels (session.py), :func:`warm_buffers` makes buffers for the
chunk size QEMU sends with their pages already in place (``MAP_POPULATE``),
on a worker thread, and the pool keeps them as idle ones: the first
migration's chunks then land in warm memory, as every later one does.
"""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING

from ..core.reassembly import POOLED_MIN, capacity_of

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer as PayloadBuffer

#: The chunk size QEMU's source sends (VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE): what a
#: warm pool is made for.
QEMU_CHUNK = 1 << 20
_PRIVATE = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS


def new_buffer(capacity: int, *, populate: bool = False) -> mmap.mmap:
    """An anonymous private mapping of ``capacity`` bytes; ``populate``: its pages
    faulted in now (zeroed), not on first touch."""
    flags = _PRIVATE | (mmap.MAP_POPULATE if populate else 0)
    return mmap.mmap(-1, capacity, flags=flags)


def warm_buffers(capacity: int, count: int) -> list[mmap.mmap]:
    """``count`` populated buffers of ``capacity`` (blocking: call it on a worker thread);
    fewer if memory runs out."""
    buffers: list[mmap.mmap] = []
    try:
        for _ in range(count):
            buffers.append(new_buffer(capacity, populate=True))
    except (OSError, MemoryError):  # warming is an optimisation: keep what was made
        pass
    return buffers


class BufferPool:
    def __init__(self) -> None:
        self.idle_bytes = 0
        self._free: dict[int, list[mmap.mmap]] = {}  # capacity -> idle buffers, LIFO
        self.misses = 0  # buffers allocated because none of the size was idle

    def acquire(self, size: int) -> PayloadBuffer:
        """A buffer for a payload of ``size`` bytes (its contents are garbage)."""
        capacity = capacity_of(size)
        if capacity < POOLED_MIN:
            return bytearray(capacity)
        free = self._free.get(capacity)
        if free:
            self.idle_bytes -= capacity
            return free.pop()
        self.misses += 1
        return new_buffer(capacity)

    def fresh(self, capacity: int) -> PayloadBuffer:
        """A buffer of its own, never pooled (the staging buffer of a spill)."""
        return mmap.mmap(-1, capacity) if capacity >= POOLED_MIN else bytearray(capacity)

    def release(self, buffer: PayloadBuffer, *, room: int) -> None:
        """A buffer is free again: kept idle if ``room`` bytes of idle buffers are allowed."""
        if not isinstance(buffer, mmap.mmap):
            return
        capacity = len(buffer)
        if self.idle_bytes + capacity > room:
            return  # unmapped when its last view goes
        self._free.setdefault(capacity, []).append(buffer)
        self.idle_bytes += capacity

    def shrink(self, to_bytes: int) -> None:
        """Let idle buffers go until at most ``to_bytes`` are idle."""
        if self.idle_bytes <= to_bytes:
            return  # the common case, on every allocation: nothing to look at
        for buffers in self._free.values():
            while buffers and self.idle_bytes > to_bytes:
                self.idle_bytes -= len(buffers.pop())
