"""The ring of bytes a recording's loop thread copies into and its writer thread writes from."""

from __future__ import annotations

import mmap


class ByteRing:
    """Where the loop thread copies each read and the writer thread writes it from,
    first in, first out.

    A fresh ``bytes`` per read would cost more than the copy itself (measured:
    reads average about 0.5 MiB, and a new object that large is new pages, each
    faulted in and zeroed: about 0.4 CPU s per GB recorded, against 0.1 for the
    copy). Here the pages are reused, and only those written are resident: when
    the writer has caught up (nothing queued) the next read starts over at the
    beginning, so a recording that keeps up touches little more than its largest
    read. The ring's size is the bound on what may wait for the disk.

    Not thread-safe: the recorder's lock guards :meth:`reserve` and :meth:`free`;
    the copy into a reserved place, and the write from it, need no lock.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.view = memoryview(mmap.mmap(-1, max(capacity, 1)))
        self._produced = 0  # bytes reserved so far, padding at the end included
        self._consumed = 0  # bytes freed so far

    @property
    def queued(self) -> int:
        return self._produced - self._consumed

    def reserve(self, size: int) -> tuple[int, int] | None:
        """``(offset, padding)`` of ``size`` contiguous bytes (``padding``: the end of
        the ring skipped to start over at 0), or None if they do not fit now."""
        if self._produced == self._consumed:
            self._produced = self._consumed = 0  # empty: back to the warm beginning
        offset = self._produced % self.capacity if self.capacity else 0
        padding = self.capacity - offset if offset + size > self.capacity else 0
        if self.queued + padding + size > self.capacity:
            return None
        self._produced += padding + size
        return (0 if padding else offset), padding

    def free(self, size: int) -> None:
        """The oldest ``size`` bytes reserved (with their padding) are written."""
        self._consumed += size
