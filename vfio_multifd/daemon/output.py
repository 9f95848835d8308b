"""Where a device's state goes: a data or config file that is only ever complete.

A regular file is written to a temporary file in the same directory and,
once the whole migration has completed, fsynced and renamed over the final
path; a failed or cancelled run removes the temporary file and leaves
whatever was at the final path untouched. The temporary file is 0600 (or
stricter) while state streams in, and takes the final file's mode just
before it is renamed: an existing file's mode and owner are kept (the owner
where the daemon may change it), a new file gets the mode ``open()`` would
give it (0666 less the umask). Character devices and FIFOs (``/dev/null``, a
pipe to another program) cannot be renamed into place and are written
directly, once the descriptor opened is seen to be one (never a regular
file put at the path meanwhile).

Every method here blocks: the loader calls them on its writer thread, never
on the event loop thread.
"""

from __future__ import annotations

import contextlib
import errno as errno_module
import os
import secrets
import stat
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config import DeviceSpec
from ..errors import DeviceIOError, os_error_text
from .path_lock import PathLock, PathLocked


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once, at import on the main thread: umask can only be read by setting it.
_UMASK = _read_umask()

# writev takes at most IOV_MAX buffers (1024 on Linux).
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 16

Buffer = bytes | bytearray | memoryview

#: Reserve at most this far ahead of what a data file holds.
MAX_RESERVE_AHEAD = 64 << 20
#: link() errors that mean "no hard links here": keep the old file aside by renaming it.
_NO_LINKS = {errno_module.EPERM, errno_module.EXDEV, errno_module.EMLINK, errno_module.EOPNOTSUPP}
_RESERVE_GIVE_UP = {
    errno_module.EOPNOTSUPP,
    errno_module.EINVAL,
    errno_module.ENOSPC,
    errno_module.EDQUOT,
    errno_module.EFBIG,
}


def write_fully(write: Callable[[Sequence[Buffer]], int], buffers: Sequence[Buffer]) -> int:
    """Write every byte of ``buffers`` through a writev-like ``write``, retrying short writes."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    total = 0
    start = 0
    while start < len(views):
        written = write(views[start : start + _IOV_MAX])
        if written <= 0:
            raise OSError(errno_module.EIO, f"write returned {written}")
        total += written
        # Skip whole buffers written, then trim the partly written one.
        while start < len(views) and written >= len(views[start]):
            written -= len(views[start])
            start += 1
        if written:
            views[start] = views[start][written:]
    return total


class Output:
    """One output file of one device (its data, or its config state)."""

    def __init__(self, path: Path, *, device: str, what: str, fsync: bool = True) -> None:
        self.path = path
        self.device = device
        self.what = what  # "data file" / "config file", for messages
        self.fsync = fsync
        self.fd: int | None = None
        self.temp_path: Path | None = None  # None: written in place (device or FIFO)
        self.backup_path: Path | None = None  # the old final file, kept aside while committing
        self._committed_from: Path | None = None  # the temp path this output was renamed from
        self.mode = 0o666 & ~_UMASK  # the final file's, set just before it is renamed
        self.owner: tuple[int, int] | None = None  # the existing file's (uid, gid), kept
        self.bytes_written = 0
        self.allocated = 0  # bytes reserved ahead with posix_fallocate
        self.reserving = False  # for regular files, where the filesystem supports it
        self.stop = threading.Event()  # set when the migration ends: stop waiting for a FIFO
        self.waiting_for_reader = False  # a FIFO nobody has opened for reading yet
        self._lock: PathLock | None = None  # held from open() to unlock(): regular files

    def open(self) -> None:
        try:
            try:
                info: os.stat_result | None = os.stat(self.path)
            except FileNotFoundError:
                info = None
            mode = None if info is None else info.st_mode
            if (mode is None or stat.S_ISREG(mode)) and os.path.islink(self.path):
                raise _symlink_error(self.path)
            if mode is not None and stat.S_ISFIFO(mode):
                self.fd = self._open_fifo()
                return
            if mode is not None and stat.S_ISCHR(mode):
                self.fd = _open_special(self.path, os.O_WRONLY, stat.S_ISCHR, "character device")
                return
            if mode is not None and not stat.S_ISREG(mode):
                raise IsADirectoryError(errno_module.EISDIR, "not a regular file", str(self.path))
            if info is not None:  # the file replaced keeps its mode (not set-id bits) and owner
                self.mode = stat.S_IMODE(info.st_mode) & 0o777
                self.owner = (info.st_uid, info.st_gid)
            fd, temp = self._create_beside()
            self.fd, self.temp_path = fd, Path(temp)
            self.reserving = True
            if self.mode & 0o600 != 0o600:
                os.fchmod(fd, self.mode & 0o600)  # never more open than the final file
        except OSError as error:
            raise self._error("cannot open", error) from error

    def _create_beside(self) -> tuple[int, str]:
        """Lock the path (one daemon per path), and create the temporary file beside it:
        a new name (``mkstemp``: O_EXCL, never through a link), mode 0600."""
        directory = self.path.parent or Path(".")
        self._lock = PathLock(self.path)
        try:
            self._lock.acquire()
            return tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".part")
        except PathLocked as locked:
            raise DeviceIOError(
                f"{self.what} {self.path}: {locked.strerror}", device=self.device, errno=None
            ) from None
        except FileNotFoundError as error:
            if not directory.is_dir():
                raise
            # /proc, /sys: the file exists, but nothing new may be made beside it, and
            # /proc says ENOENT, as if the directory were not there.
            raise DeviceIOError(
                f"cannot write {self.what} {self.path}: no new file can be created in "
                f"{directory} (the kernel answers ENOENT, errno {error.errno}), and a file is "
                "written beside its path, then renamed over it: give a path in a directory "
                "where files can be created",
                device=self.device,
                errno=error.errno,
            ) from error

    def _open_fifo(self) -> int:
        """Wait for the FIFO's reader without blocking in open(), so a stop can interrupt it."""
        while True:
            try:
                fd = _open_special(self.path, os.O_WRONLY | os.O_NONBLOCK, stat.S_ISFIFO, "FIFO")
            except OSError as error:
                if error.errno != errno_module.ENXIO:  # ENXIO: no reader yet
                    raise
                self.waiting_for_reader = True
                if self.stop.wait(0.05):
                    raise OSError(errno_module.ENXIO, "no reader opened the FIFO") from None
                continue
            self.waiting_for_reader = False
            os.set_blocking(fd, True)
            return fd

    def write(self, buffers: Sequence[Buffer]) -> None:
        fd = self.fd
        assert fd is not None, "output is not open"
        try:
            if self.reserving:
                self._reserve(fd, sum(len(b) for b in buffers))
            self.bytes_written += write_fully(lambda views: os.writev(fd, views), buffers)
        except OSError as error:
            raise self._error("cannot write", error) from error

    def _reserve(self, fd: int, size: int) -> None:
        """Allocate the file's blocks ahead of the writes, in growing steps.

        Measured here (ext4): writing into reserved blocks takes about half the
        CPU of extending the file write by write. A file reserves ahead as much
        as it already holds (at most 64 MiB), so a small device reserves
        little and what all outputs reserve ahead never exceeds what they
        hold: a disk that fits the data is never full of reservations. The
        file is cut back to what was written in :meth:`finish`.
        """
        needed = self.bytes_written + size
        if needed <= self.allocated:
            return
        target = needed + min(needed, MAX_RESERVE_AHEAD)
        try:
            os.posix_fallocate(fd, self.allocated, target - self.allocated)
        except OSError as error:
            # Not supported here, or no room to reserve that far ahead: the
            # writes themselves will say whether the data fits. Never try again.
            if error.errno in _RESERVE_GIVE_UP:
                self.reserving = False
                return
            raise
        self.allocated = target

    def finish(self) -> None:
        """Make the written bytes durable (before the rename makes them visible)."""
        if self.fd is None:
            return
        try:
            if self.allocated > self.bytes_written:
                os.ftruncate(self.fd, self.bytes_written)
            if self.temp_path is not None:
                self._take_final_attributes(self.fd)
                if self.fsync:
                    os.fsync(self.fd)
            os.close(self.fd)
        except OSError as error:
            raise self._error("cannot finish", error) from error
        finally:
            self.fd = None

    def _take_final_attributes(self, fd: int) -> None:
        """The temporary file, complete, gets the final file's owner and mode."""
        if self.owner is not None:
            info = os.fstat(fd)
            if (info.st_uid, info.st_gid) != self.owner:
                try:
                    os.fchown(fd, *self.owner)
                except PermissionError:  # not root: keep the group if it is one of ours
                    with contextlib.suppress(PermissionError):
                        os.fchown(fd, -1, self.owner[1])
        os.fchmod(fd, self.mode)  # after fchown, which may clear mode bits

    def check_target(self) -> None:
        """Before any output is renamed: can this one be? (A directory there cannot be replaced.)"""
        if self.temp_path is None:
            return
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        except OSError as error:
            raise self._error("cannot rename into place", error) from error
        if stat.S_ISLNK(mode):  # appeared since open(): never replace a link
            raise self._error("cannot rename into place", _symlink_error(self.path))
        if stat.S_ISDIR(mode):
            raise self._error(
                "cannot rename into place",
                IsADirectoryError(errno_module.EISDIR, "a directory is in the way"),
            )

    def keep_old(self) -> None:
        """Before :meth:`commit`: keep the file at the final path aside (a hard link,
        or a rename where links are not possible), so that it can be put back."""
        if self.temp_path is None or not os.path.lexists(self.path):
            return
        for _ in range(100):
            backup = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.old")
            try:
                try:
                    os.link(self.path, backup, follow_symlinks=False)
                except OSError as error:
                    if error.errno == errno_module.EEXIST:
                        continue
                    if error.errno not in _NO_LINKS:
                        raise
                    os.rename(self.path, backup)  # no atomic replacement, but restorable
            except OSError as error:
                raise self._error("cannot keep the old file aside at", error) from error
            self.backup_path = backup
            return
        raise self._error(
            "cannot keep the old file aside at", OSError(errno_module.EEXIST, "names taken")
        )

    def commit(self) -> None:
        """Put the finished file at its final path (call after :meth:`finish`)."""
        if self.temp_path is None:
            return
        try:
            os.replace(self.temp_path, self.path)
            self._committed_from, self.temp_path = self.temp_path, None
        except OSError as error:
            raise self._error("cannot rename into place", error) from error

    def restore_old(self) -> bool:
        """Undo :meth:`keep_old` and :meth:`commit`: this run's file back to its
        temporary path (to be discarded), the old file back at the final path.
        Returns whether anything was undone; on a failure ``backup_path`` stays set."""
        undone = False
        if self._committed_from is not None:
            with contextlib.suppress(OSError):
                os.rename(self.path, self._committed_from)
                self.temp_path, self._committed_from = self._committed_from, None
                undone = True
        if self.backup_path is not None:
            with contextlib.suppress(OSError):
                if os.path.lexists(self.path) and os.path.samefile(self.backup_path, self.path):
                    os.unlink(self.backup_path)  # rename() of two links to one file does nothing
                else:
                    os.replace(self.backup_path, self.path)
                self.backup_path = None
                undone = True
        return undone

    def drop_old(self) -> None:
        """Every output is in place: the old file kept aside is no longer needed."""
        backup, self.backup_path = self.backup_path, None
        self._committed_from = None
        if backup is not None:
            with contextlib.suppress(OSError):
                os.unlink(backup)

    def sync_directory(self) -> None:
        """Make the rename durable."""
        if not self.fsync:
            return
        try:
            directory = os.open(self.path.parent or ".", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as error:
            raise self._error("cannot sync the directory of", error) from error

    def discard(self) -> None:
        """Forget everything written; the final path stays as it was. Never raises."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        if self.temp_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.temp_path)
            self.temp_path = None

    def unlock(self) -> None:
        """The run is over (committed or discarded): another daemon may take the path."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def _error(self, doing: str, error: OSError) -> DeviceIOError:
        return DeviceIOError(
            f"{doing} {self.what} {self.path}: {os_error_text(error)}",
            device=self.device,
            errno=error.errno,
        )


def _open_special(
    path: Path, flags: int, is_kind: Callable[[int], bool], kind: str
) -> int:
    """Open a FIFO or character device for writing, and check the descriptor is one:
    a link to a regular file put at the path after it was looked at is never written."""
    fd = os.open(path, flags | os.O_NOCTTY | os.O_CLOEXEC)
    if not is_kind(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"no longer a {kind}: something replaced it since it was looked at")
    return fd


def _symlink_error(path: Path) -> OSError:
    """A symbolic link at a file output's final path is refused, not followed or replaced:
    the output is renamed into place, which would replace the link itself."""
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return OSError(
        errno_module.ELOOP,
        f"a symbolic link (to {target}) is in the way; give the path of the file itself",
    )


def device_outputs(spec: DeviceSpec, *, fsync: bool) -> tuple[Output, Output]:
    """A device's data file and config file."""
    device = str(spec.key)
    return (
        Output(spec.data_path, device=device, what="data file", fsync=fsync),
        Output(spec.config_path, device=device, what="config file", fsync=fsync),
    )
