"""Files created where another local user might have put something first.

A daemon that runs as root must never write through a name someone else could
have planted: a symbolic link at a file's name (``O_CREAT|O_TRUNC`` would
follow it and overwrite its target), or a directory of theirs (where they can
plant one at any time). :func:`open_private_directory` opens a directory the
daemon's user owns and nobody else may write in, and :func:`create_new`
creates a file relative to its descriptor, never one that exists, never
through a link.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import UsageError, os_error_text

#: A file made by :func:`create_new`: new (``O_EXCL``), never through a link.
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def create_new(name: str, dir_fd: int, mode: int = 0o600) -> int:
    """Create the file ``name`` in the directory ``dir_fd`` for writing.

    Raises ``FileExistsError`` if anything is at ``name``, a link included.
    """
    return os.open(name, NEW_FILE, mode, dir_fd=dir_fd)


def check_private(info: os.stat_result, what: str) -> None:
    """Refuse a directory another user owns or may write in (``what`` names it)."""
    if not stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{what} exists and is not a directory")
    if info.st_uid != os.geteuid():
        raise UsageError(
            f"{what} belongs to another user (uid {info.st_uid}, not {os.geteuid()}): "
            "give a directory of the daemon's own user"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UsageError(
            f"{what} may be written by other users (mode {stat.S_IMODE(info.st_mode):04o}): "
            "give a directory only its owner may write in"
        )


def open_private_directory(path: Path, what: str) -> int:
    """Create ``path`` (mode 0700) unless it exists, then open it; returns its descriptor.

    The checks are made on the directory opened, not on a name looked at
    before: whatever is renamed in its place afterwards, files are created
    relative to this descriptor.
    """
    try:
        os.makedirs(path.parent, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as error:
        raise UsageError(f"{what}: cannot create it: {os_error_text(error)}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except NotADirectoryError:
        raise UsageError(f"{what} exists and is not a directory") from None
    except OSError as error:
        raise UsageError(f"{what}: {os_error_text(error)}") from None
    try:
        check_private(os.fstat(fd), what)
    except BaseException:
        os.close(fd)
        raise
    return fd
