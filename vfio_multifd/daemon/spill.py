"""The spill file: where chunks go when memory is at --max-queued-bytes.

An anonymous temporary file (unlinked as soon as it is created, so nothing is
left behind even if the process is killed), created on the first spill.
:class:`SpillStore` is the file: space is reserved on the event loop thread,
and positioned ``pwrite`` / ``pread`` let worker threads use one descriptor
at once. :class:`Spiller` runs the writes on its own thread for the event
loop, and the reads on a loader's writer thread; errors name the chunk.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog

from ..config import ReceiveSettings
from ..core.reassembly import Chunk
from ..core.wire import DeviceKey
from ..errors import DeviceIOError, Reason, SessionError, UsageError, os_error_text

log = structlog.get_logger("vfio_multifd.spill")

SpillRef = tuple[int, int]  # offset, size


class SpillStore:
    """The file. Space freed by a chunk read back is reused by the next chunk
    of the same size and its blocks are given back to the filesystem (a hole
    punched), so the blocks the file holds follow the bytes spilled now."""

    def __init__(self, directory: Path) -> None:
        fd, path = tempfile.mkstemp(dir=directory, prefix=".vfio-multifd-spill.")
        os.unlink(path)
        self.fd: int | None = fd
        self.directory = directory
        self.end = 0
        self.held = 0  # bytes of chunks in the file now
        self._free: dict[int, list[int]] = {}  # size -> offsets of freed places
        self._lock = threading.Lock()  # reserve on the loop, release on writer threads
        self._punch = _punch_hole_function()

    def reserve(self, size: int) -> SpillRef:
        """A place for ``size`` bytes: the token :meth:`write` and :meth:`read` take."""
        with self._lock:
            self.held += size
            free = self._free.get(size)
            if free:
                return (free.pop(), size)
            ref = (self.end, size)
            self.end += size
            return ref

    def write(self, ref: SpillRef, data: memoryview) -> None:
        fd = self.fd
        assert fd is not None
        offset, size = ref
        view = data.cast("B")
        done = 0
        while done < size:
            written = os.pwrite(fd, view[done:], offset + done)
            if written <= 0:  # never loop forever on a file that takes nothing
                raise OSError(errno.EIO, f"pwrite of the spill file returned {written}")
            done += written

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

    def release(self, ref: SpillRef) -> None:
        """The chunk at ``ref`` was read back for good: its place is free."""
        offset, size = ref
        if size and self._punch is not None and self.fd is not None:
            self._punch(self.fd, offset, size)
        with self._lock:
            self.held -= size
            self._free.setdefault(size, []).append(offset)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _punch_hole_function() -> Callable[[int, int, int], None] | None:
    """``fallocate(PUNCH_HOLE | KEEP_SIZE)`` from the C library (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
    except (OSError, AttributeError):
        return None
    fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fallocate.restype = ctypes.c_int
    unsupported = False

    def punch(fd: int, offset: int, size: int) -> None:
        nonlocal unsupported
        if unsupported:
            return
        if fallocate(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, offset, size) != 0:
            code = ctypes.get_errno()
            if code in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                unsupported = True  # the place is still reused; its blocks stay
                return
            raise OSError(code, os.strerror(code))

    return punch


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def spill_directory(settings: ReceiveSettings) -> Path:
    """--spill-dir, or the first data file's directory (never /dev: /dev/null's)."""
    if settings.spill_dir is not None:
        return settings.spill_dir
    if not settings.devices:  # RAM only: nothing is ever spilled
        return Path(tempfile.gettempdir())
    parent = settings.devices[0].data_path.resolve().parent
    return parent if parent != Path("/dev") else Path(tempfile.gettempdir())


class Spiller:
    """Puts chunks in the spill file and gets them back; the file opens on first use."""

    def __init__(self, directory: Path, *, max_bytes: int | None = None) -> None:
        self.directory = directory
        self.max_bytes = max_bytes  # --max-spill-bytes; None: no cap
        self.peak_bytes = 0
        self.store: SpillStore | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="spill")

    def check_directory(self) -> None:
        """A bound that may spill needs a place to spill to: say so now, not mid-migration."""
        directory = self.directory
        if not directory.is_dir() or not os.access(directory, os.W_OK | os.X_OK):
            raise UsageError(f"cannot spill to {directory}: not a writable directory (--spill-dir)")

    async def write(
        self, data: memoryview, device: DeviceKey, idx: int, channel: int | None
    ) -> SpillRef:
        """Write one chunk's bytes off the loop; the token says where they went."""
        size = len(data)
        held = 0 if self.store is None else self.store.held
        if self.max_bytes is not None and held + size > self.max_bytes:
            raise SessionError(
                Reason.SPILL_FULL,
                f"cannot spill state buffer {idx} ({size} bytes): the spill file would hold "
                f"{held + size} bytes, over --max-spill-bytes {self.max_bytes}",
                device=str(device),
                idx=idx,
                channel=channel,
            )
        try:
            if self.store is None:
                self.store = SpillStore(self.directory)
                log.info(
                    "spill_file_opened", directory=str(self.directory), max_bytes=self.max_bytes
                )
            store = self.store
            ref = store.reserve(size)
            self.peak_bytes = max(self.peak_bytes, store.held)
            await asyncio.get_running_loop().run_in_executor(self._executor, store.write, ref, data)
        except OSError as error:
            raise self._error(error, device, idx, channel) from error
        return ref

    def read(self, chunk: Chunk) -> bytes:
        """On a writer thread: a spilled chunk's bytes, back from the spill file."""
        assert self.store is not None and isinstance(chunk.spill_ref, tuple)
        try:
            data = self.store.read(chunk.spill_ref)
            self.store.release(chunk.spill_ref)
            return data
        except OSError as error:
            raise self._error(error, chunk.device, chunk.idx, chunk.channel) from error

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self.store is not None:
            self.store.close()

    def _error(
        self, error: OSError, device: DeviceKey, idx: int, channel: int | None
    ) -> DeviceIOError:
        # ``channel`` is the one that brought the chunk, not the one whose arrival made room for it.
        return DeviceIOError(
            f"cannot spill state buffer {idx} to {self.directory}: {os_error_text(error)}; "
            "see --spill-dir and --max-queued-bytes",
            device=str(device),
            errno=error.errno,
            idx=idx,
            channel=channel,
        )
