"""One daemon per output: a lock file beside each data and config path, held for the run.

Two daemons given the same ``data=`` path (on two ports, say) would each write
a temporary file and rename it over the other's result. The first takes an
exclusive ``flock`` on ``.NAME.lock`` beside the path and writes its pid in
it; the second finds the lock taken and is refused, naming that pid. The lock
dies with its process (a SIGKILL leaves only an unlocked file, which the next
daemon takes over); a daemon that ends removes its lock file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

#: The lock file is opened never through a link, and never left to another process.
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


class PathLocked(OSError):
    """Another process holds the lock: ``pid`` is the one written in it (None: unknown)."""

    def __init__(self, lock_path: Path, pid: int | None) -> None:
        holder = "pid unknown" if pid is None else f"pid {pid}"
        super().__init__(
            errno.EBUSY,
            f"another vfio-multifd receive is writing it ({holder}, holding {lock_path}); "
            "give each daemon paths of its own",
        )
        self.pid = pid


class PathLock:
    def __init__(self, path: Path) -> None:
        self.path = path.with_name(f".{path.name}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`PathLocked` (or the :class:`OSError` met)."""
        for _ in range(100):
            fd = os.open(self.path, _LOCK_FLAGS, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise PathLocked(self.path, pid) from None
            except BaseException:
                os.close(fd)
                raise
            # The holder may have removed the file between our open and our lock: then
            # the lock is on a file nobody else will look at. Take the one at the path.
            mine = os.fstat(fd)
            try:
                there = os.lstat(self.path)
            except FileNotFoundError:
                os.close(fd)
                continue
            if (there.st_dev, there.st_ino) != (mine.st_dev, mine.st_ino):
                os.close(fd)
                continue
            if not stat.S_ISREG(mine.st_mode) or mine.st_nlink != 1 or mine.st_uid != os.geteuid():
                os.close(fd)
                raise OSError(errno.EPERM, f"{self.path} is not a lock file of this user's")
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return
        raise OSError(errno.EAGAIN, f"{self.path} keeps being replaced")

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and drop the lock; never raises."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            mine, there = os.fstat(fd), os.lstat(self.path)
            if (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(self.path)  # while locked: whoever opens it next sees it gone
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).split(b"\n", 1)[0])
    return None
