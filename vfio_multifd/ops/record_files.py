"""``--record DIR``'s files: the directory, channel files, the manifest written whole.

Blocking: called from the recorder's writer thread (the directory's checks also when
the recorder is made). What the loop thread hands that writer is here too.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from ..errors import UsageError, os_error_text
from ..safe_files import check_private, create_new, open_private_directory
from .manifest import MANIFEST_NAME, Manifest
from .record_manifest import Build

log = structlog.get_logger("vfio_multifd.recorder")


def check_directory(directory: Path) -> None:
    """``--record DIR`` must not exist yet, or be an empty directory: recordings are
    never mixed (a replay would send another migration's channels). It must be the
    daemon's user's, and nobody else's to write in: another user could plant a link
    there for the daemon to write through."""
    what = f"--record {directory}"
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        return
    except OSError as error:
        raise UsageError(f"{what}: {os_error_text(error)}") from None
    check_private(info, what)
    _check_empty(directory, what)


def _check_empty(directory: Path | int, what: str) -> None:
    try:
        entries = os.listdir(directory)
    except OSError as error:
        raise UsageError(f"{what}: {os_error_text(error)}") from None
    if entries:
        raise UsageError(
            f"{what} is not empty: give a new or empty directory (a recording "
            "is never mixed with another)"
        )


def open_directory(directory: Path) -> int:
    """Create DIR (mode 0700: it holds device state) unless it exists, and open it,
    checked as :func:`check_directory` does but on the directory opened: every
    recording file is created relative to the descriptor returned."""
    what = f"--record {directory}"
    fd = open_private_directory(directory, what)
    try:
        _check_empty(fd, what)  # nothing appeared meanwhile
    except BaseException:
        os.close(fd)
        raise
    return fd


def append(fd: int, data: memoryview) -> None:
    """Write all of ``data`` to ``fd`` (a channel's file, the manifest)."""
    while data:
        data = data[os.write(fd, data) :]


# -- what the loop thread hands the writer thread --------------------------------------


@dataclass(frozen=True, slots=True)
class Open:
    sink: int
    name: str


@dataclass(frozen=True, slots=True)
class Close:
    sink: int


@dataclass(frozen=True, slots=True)
class Finish:
    build: Build
    done: concurrent.futures.Future[None]


#: Bytes to write: (sink, offset in the ring, size, padding before them to free with them).
Data = tuple[int, int, int, int]
Item = Data | Open | Close | Finish


def write_manifest(directory: int, path: Path, manifest: Manifest) -> None:
    """``manifest.json``, complete or not at all: written aside, synced, renamed."""
    temporary = f".{MANIFEST_NAME}.tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=directory)  # a link, whatever: never written through
        fd = create_new(temporary, directory)
        try:
            append(fd, memoryview(manifest.to_json().encode()))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, MANIFEST_NAME, src_dir_fd=directory, dst_dir_fd=directory)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=directory)
        log.warning(
            "record_manifest_failed",
            directory=str(path),
            error=os_error_text(error),
        )
        return
    log.info(
        "record_written",
        directory=str(path),
        channels=len(manifest.recorded_channels),
        bytes=sum(c.bytes for c in manifest.recorded_channels),
        refused=len(manifest.refused),
        complete=manifest.complete,
        outcome=manifest.outcome,
    )
