"""``--result PATH``: one JSON document that says how a command ended, for scripts.

Written once the exit code is known, for success, failure and cancellation
alike, complete or not at all: to a new file beside PATH (``O_EXCL``, never
through a link, see :mod:`vfio_multifd.safe_files`), synced, then renamed
over PATH. Its fields are listed in docs/receiving.md, docs/sending.md and
docs/record-replay.md.

The documents are built by :func:`receive_document`, :func:`send_document`
and :func:`replay_document` from plain values; :class:`ReceiveFacts`,
:class:`SendFacts` and :class:`ReplayFacts` gather those values from what a
run has (its session, the sender's tally, the replay), so the source of the
values can change without changing the documents.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import os
import secrets
import sys
import time
import uuid as uuid_module
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import Cancelled, MultifdError, Reason, UsageError, os_error_text
from ..safe_files import create_new

if TYPE_CHECKING:
    from ..config import Address, DeviceSpec
    from ..daemon.session import Session
    from ..results import QemuStreamFigures, SessionResult
    from ..source.plan import SourceDevice
    from ..source.replay import Replay
    from ..source.sender import SendTally

JSON = dict[str, Any]


class Outcome(enum.StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


def outcome_of(exit_code: int, error: BaseException | None) -> Outcome:
    """Cancelled: a signal or ``migrate_cancel``; failed: any other non-zero exit."""
    if exit_code == 0:
        return Outcome.COMPLETED
    if isinstance(error, Cancelled | KeyboardInterrupt):
        return Outcome.CANCELLED
    return Outcome.FAILED


def reason_of(error: BaseException | None) -> tuple[str | None, str | None]:
    """The error's stable reason code and its message (None, None on success)."""
    if error is None:
        return None, None
    if isinstance(error, MultifdError):
        return error.reason.value, str(error)
    if isinstance(error, KeyboardInterrupt):
        return Reason.CANCELLED.value, "cancelled by SIGINT"
    if isinstance(error, OSError):
        return "os-error", os_error_text(error)
    return Reason.INTERNAL.value, repr(error)


def _uuid_text(uuid: bytes) -> str:
    return str(uuid_module.UUID(bytes=uuid))


def _how_it_ended(
    command: str, exit_code: int, error: BaseException | None, uuid: str | None
) -> JSON:
    """The fields every document begins with."""
    reason, message = reason_of(error)
    return {
        "command": command,
        "outcome": outcome_of(exit_code, error).value,
        "exit_code": exit_code,
        "reason": reason,
        "message": message,
        "uuid": uuid,
    }


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """One device of the daemon: where its files are (None unless put in place)."""

    idstr: str
    instance: int
    data_path: str | None
    config_path: str | None
    bytes: int
    chunks: int
    config_bytes: int
    digest: str | None


@dataclass(frozen=True, slots=True)
class ChannelFacts:
    id: int
    peer: str
    bytes: int


def receive_document(
    *,
    exit_code: int,
    error: BaseException | None,
    uuid: bytes,
    duration_s: float,
    devices: Sequence[DeviceFacts],
    channels: Sequence[ChannelFacts],
    refused: Mapping[str, int],
    spilled_bytes: int,
    peak_queued_bytes: int,
    qemu: QemuStreamFigures | None = None,
) -> JSON:
    """``receive --result``'s document (docs/receiving.md lists every field); ``qemu``:
    the RAM and main-stream figures (their fields null for an option not given)."""
    ram = qemu if qemu is not None and qemu.ram else None
    main = qemu if qemu is not None and qemu.main_stream else None
    return {
        **_how_it_ended("receive", exit_code, error, _uuid_text(uuid)),
        "duration_s": round(duration_s, 3),
        "devices": [
            {
                "idstr": device.idstr,
                "instance": device.instance,
                "data_path": device.data_path,
                "config_path": device.config_path,
                "bytes": device.bytes,
                "chunks": device.chunks,
                "config_bytes": device.config_bytes,
                "digest": device.digest,
            }
            for device in devices
        ],
        "channels": [
            {"id": channel.id, "peer": channel.peer, "bytes": channel.bytes}
            for channel in channels
        ],
        "refused": dict(sorted(refused.items())),
        "spilled_bytes": spilled_bytes,
        "peak_queued_bytes": peak_queued_bytes,
        "ram_pages": None if ram is None else ram.normal_pages,
        "ram_zero_pages": None if ram is None else ram.zero_pages,
        "sync_points": None if ram is None else ram.sync_points,
        "main_stream_bytes": None if main is None else main.main_stream_bytes,
    }


def send_document(
    *,
    exit_code: int,
    error: BaseException | None,
    uuid: bytes,
    address: str,
    duration_s: float,
    devices: Sequence[tuple[SourceDevice, int, str | None]],
    channel_bytes: Sequence[int],
) -> JSON:
    """``send --result``'s document (docs/sending.md lists every field); ``devices``:
    each device with its chunk count and digest (None if not computed yet)."""
    return {
        **_how_it_ended("send", exit_code, error, _uuid_text(uuid)),
        "address": address,
        "duration_s": round(duration_s, 3),
        "devices": [
            {
                "idstr": device.key.idstr,
                "instance": device.key.instance_id,
                "source": None if device.source is None else str(device.source),
                "bytes": device.size,
                "chunks": chunks,
                "digest": digest,
            }
            for device, chunks, digest in devices
        ],
        "channels": [
            {"id": n, "peer": address, "bytes": sent} for n, sent in enumerate(channel_bytes)
        ],
    }


def replay_document(
    *,
    exit_code: int,
    error: BaseException | None,
    uuid: str | None,
    address: str,
    duration_s: float,
    directory: str,
    channels: Sequence[tuple[int | None, int, int]],
) -> JSON:
    """``replay --result``'s document (docs/record-replay.md lists every field); ``uuid``:
    the recording's (None if it could not be read); ``channels``: each recorded channel's
    id (None: QEMU's main channel), bytes sent and bytes recorded, in connection order."""
    return {
        **_how_it_ended("replay", exit_code, error, uuid),
        "address": address,
        "duration_s": round(duration_s, 3),
        "directory": directory,
        "channels": [
            {"id": channel_id, "peer": address, "bytes": sent, "recorded_bytes": recorded}
            for channel_id, sent, recorded in channels
        ],
    }


class ReceiveFacts:
    """What ``receive`` knows for its result: the options, then the session and,
    once it completed, its result."""

    def __init__(self, uuid: bytes, devices: Sequence[DeviceSpec]) -> None:
        self.uuid = uuid
        self.devices = devices
        self.session: Session | None = None
        self.result: SessionResult | None = None

    def document(self, exit_code: int, error: BaseException | None) -> JSON:
        session, result = self.session, self.result
        committed = result is not None and exit_code == 0
        snapshot = None if session is None else session.snapshot()
        written = {} if snapshot is None else {d.device: d for d in snapshot.devices}
        devices = []
        for spec in self.devices:
            loader = None if session is None else session.loaders[spec.key]
            device = written.get(spec.key)
            devices.append(
                DeviceFacts(
                    idstr=spec.key.idstr,
                    instance=spec.key.instance_id,
                    data_path=os.path.abspath(spec.data_path) if committed else None,
                    config_path=os.path.abspath(spec.config_path) if committed else None,
                    bytes=0 if device is None else device.bytes_written,
                    chunks=0 if device is None else device.chunks_written,
                    config_bytes=0 if loader is None else loader.config.bytes_written,
                    digest=loader.digest_text if committed and loader is not None else None,
                )
            )
        if snapshot is None:
            return receive_document(
                exit_code=exit_code, error=error, uuid=self.uuid, duration_s=0.0,
                devices=devices, channels=(), refused={}, spilled_bytes=0,
                peak_queued_bytes=0,
            )  # fmt: skip
        return receive_document(
            exit_code=exit_code,
            error=error,
            uuid=self.uuid,
            duration_s=snapshot.elapsed_seconds,
            devices=devices,
            channels=[
                ChannelFacts(channel.id, channel.peer, channel.received_bytes)
                for channel in snapshot.channels
                if channel.id is not None
            ],
            refused=dict(snapshot.refused_by_reason),
            spilled_bytes=snapshot.spilled_bytes,
            peak_queued_bytes=snapshot.peak_queued_bytes,
            qemu=snapshot.qemu,
        )


class SendFacts:
    """What ``send`` knows for its result: the options and the sender's tally."""

    def __init__(
        self, uuid: bytes, address: Address, devices: Sequence[SourceDevice], tally: SendTally
    ) -> None:
        self.uuid = uuid
        self.address = address
        self.devices = devices
        self.tally = tally

    def document(self, exit_code: int, error: BaseException | None) -> JSON:
        tally = self.tally
        digests: Sequence[str | None] = tally.digests or [None] * len(self.devices)
        started = tally.started
        return send_document(
            exit_code=exit_code,
            error=error,
            uuid=self.uuid,
            address=str(self.address),
            duration_s=0.0 if started is None else (tally.ended or time.monotonic()) - started,
            devices=[
                (device, chunks, digest)
                for device, chunks, digest in zip(
                    self.devices, tally.chunks or [0] * len(self.devices), digests, strict=True
                )
            ],
            channel_bytes=tally.channel_bytes,
        )


class ReplayFacts:
    """What ``replay`` knows for its result: the options, then the replay once its
    recording was read and checked."""

    def __init__(self, directory: Path, address: Address) -> None:
        self.directory = directory
        self.address = address
        self.replay: Replay | None = None

    def document(self, exit_code: int, error: BaseException | None) -> JSON:
        replay = self.replay
        return replay_document(
            exit_code=exit_code,
            error=error,
            uuid=None if replay is None else replay.recording.manifest.uuid,
            address=str(self.address),
            duration_s=0.0 if replay is None else replay.seconds,
            directory=str(self.directory),
            channels=()
            if replay is None
            else [
                (channel.id, sent, channel.bytes)
                for channel, sent in zip(replay.channels, replay.sent, strict=True)
            ],
        )


class ResultFile:
    """``--result PATH``: checked before the command starts, written when it ends."""

    def __init__(self, path: Path, option: str = "--result") -> None:
        self.path = path
        self.option = option
        self.checked = False
        #: Set by the command: its document, given the exit code and the error.
        self.describe: Callable[[int, BaseException | None], JSON] | None = None

    def check(self) -> None:
        """A usage error unless PATH can be written: its directory exists, and PATH is
        not a directory."""
        what = f"{self.option} {self.path}"
        try:
            fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            raise UsageError(
                f"{what}: its directory cannot be opened: {os_error_text(error)}"
            ) from None
        os.close(fd)
        if self.path.is_dir() and not self.path.is_symlink():
            raise UsageError(f"{what} is a directory; give the path of a file")
        self.checked = True

    def begin(self, describe: Callable[[int, BaseException | None], JSON]) -> None:
        """:meth:`check` PATH now, and write ``describe``'s document at exit."""
        self.check()
        self.describe = describe

    def write(self, exit_code: int, error: BaseException | None) -> int:
        """Write the document; returns the exit code (1 instead of 0 if it could not be
        written: a script that reads it must not find a success it cannot see)."""
        if not self.checked or self.describe is None:
            return exit_code
        try:
            write_atomically(self.path, self.describe(exit_code, error))
        except OSError as failed:
            print(
                f"vfio-multifd: error: cannot write {self.option} {self.path}: "
                f"{os_error_text(failed)}",
                file=sys.stderr,
            )
            return exit_code or 1
        return exit_code


def write_atomically(path: Path, document: JSON) -> None:
    """``document`` at ``path``, complete or not at all: a new file beside it (a name
    nobody had, never through a link), synced, renamed over ``path``."""
    data = memoryview((json.dumps(document, indent=2) + "\n").encode())
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for _ in range(100):
            temporary = f".{path.name}.{secrets.token_hex(4)}.tmp"
            try:
                fd = create_new(temporary, directory, 0o644)
            except FileExistsError:
                continue
            break
        else:
            raise OSError(errno.EEXIST, "no free temporary name")
        try:
            try:
                while data:
                    data = data[os.write(fd, data) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, path.name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=directory)
            raise
        with contextlib.suppress(OSError):  # some filesystems cannot sync a directory
            os.fsync(directory)
    finally:
        os.close(directory)
