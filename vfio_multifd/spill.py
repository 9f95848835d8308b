"""Spill file: where queued chunks go when memory is at its bound.

An anonymous temporary file (unlinked as soon as it is created, so nothing
is left behind even if the process is killed). Space is reserved on the event
loop thread; the blocking ``pwrite`` / ``pread`` calls run on worker threads,
and positioned I/O lets them run concurrently on one descriptor.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class SpillStore:
    def __init__(self, directory: Path) -> None:
        fd, path = tempfile.mkstemp(dir=directory, prefix=".vfio-multifd-spill.")
        os.unlink(path)
        self.fd: int | None = fd
        self.directory = directory
        self.end = 0

    def reserve(self, size: int) -> tuple[int, int]:
        """A place for ``size`` bytes: the token :meth:`write` and :meth:`read` take."""
        ref = (self.end, size)
        self.end += size
        return ref

    def write(self, ref: tuple[int, int], data: memoryview) -> None:
        fd = self.fd
        assert fd is not None
        offset, size = ref
        view = data.cast("B")
        done = 0
        while done < size:
            done += os.pwrite(fd, view[done:], offset + done)

    def read(self, ref: object) -> bytes:
        fd = self.fd
        assert fd is not None and isinstance(ref, tuple)
        offset, size = ref
        data = os.pread(fd, size, offset)
        while len(data) < size:  # a short read is legal; EOF here would be a bug
            more = os.pread(fd, size - len(data), offset + len(data))
            if not more:
                raise OSError(f"spill file ends at {offset + len(data)}, expected {offset + size}")
            data += more
        return data

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
