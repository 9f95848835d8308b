"""What a migration reports: its QMP status and, once complete, each device's result."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .core.wire import DeviceKey

if TYPE_CHECKING:
    from .core.snapshot import MigrationSnapshot
    from .daemon.loader import DeviceLoader


class SessionStatus(enum.StrEnum):
    """QMP's names for a migration's states."""

    SETUP = "setup"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (SessionStatus.COMPLETED, SessionStatus.FAILED, SessionStatus.CANCELLED)


@dataclass(frozen=True, slots=True)
class QemuStreamFigures:
    """What came of QEMU's own streams: RAM pages (``--ram``) and the main channel
    (``--main-stream``); each count stays 0 when its option is not given."""

    ram: bool  # --ram given
    main_stream: bool  # --main-stream given
    page_size: int
    normal_pages: int = 0  # RAM pages with data, on the multifd channels or the main stream
    zero_pages: int = 0  # RAM pages announced as zero (no data)
    sync_points: int = 0  # sync points every channel and the main stream reached
    main_stream_bytes: int = 0  # bytes of the main channel, as received
    queued_bytes: int = 0  # pages and main-stream bytes queued for the RAM writer now
    peak_queued_bytes: int = 0

    @property
    def normal_bytes(self) -> int:
        return self.normal_pages * self.page_size

    def summary(self) -> str | None:
        """The summary's line, or None when neither option was given."""
        parts = []
        if self.ram:
            parts.append(
                f"ram: {self.normal_pages} pages ({self.normal_bytes} bytes), "
                f"{self.zero_pages} zero pages, {self.sync_points} sync points"
            )
        if self.main_stream:
            parts.append(f"main stream {self.main_stream_bytes} bytes")
        return "; ".join(parts) or None


@dataclass(frozen=True, slots=True)
class DeviceResult:
    device: DeviceKey
    data_path: Path
    config_path: Path
    bytes: int
    chunks: int
    config_bytes: int
    digest: str
    seconds: float  # from the first byte received to the device's completion


@dataclass(frozen=True, slots=True)
class Phases:
    """When the migration's last steps ended, in seconds from its first byte: every
    device received, its data written, its files synced, every output renamed into place."""

    received: float
    written: float
    synced: float
    committed: float

    def log_fields(self) -> dict[str, float]:
        names = ("received", "written", "synced", "committed")
        return {name: round(getattr(self, name), 4) for name in names}


@dataclass(frozen=True, slots=True)
class SessionResult:
    devices: tuple[DeviceResult, ...]
    seconds: float  # first byte received to the last device complete
    bytes_received: int  # on all channels, headers included
    peak_queued_bytes: int
    spilled_bytes: int
    paused_seconds: float
    #: TLS channels: each channel's client certificate subject (None: not verified);
    #: None for plaintext channels.
    tls_subjects: dict[int, str | None] | None = None
    #: Payload buffers mapped anew (the pool had none idle): a warm pool keeps this
    #: near the number of buffers in flight at the peak, whatever the size.
    buffers_allocated: int = 0
    #: Threads whose event loops read the channels (0: the main loop reads them).
    reader_threads: int = 0
    phases: Phases | None = None
    qemu: QemuStreamFigures | None = None

    @property
    def data_bytes(self) -> int:
        return sum(device.bytes for device in self.devices)

    @property
    def bytes_per_s(self) -> float:
        """Data bytes a second, from the first byte received to the last device complete."""
        return self.data_bytes / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        """:attr:`bytes_per_s` in MB/s (10^6 bytes), for the summary people read."""
        return self.bytes_per_s / 1e6

    def log_fields(self) -> dict[str, object]:
        """The ``migration_completed`` log line's fields (benchmarks parse them): bytes,
        seconds and bytes a second, as every log line."""
        fields: dict[str, object] = {
            "seconds": round(self.seconds, 3),
            "bytes_per_s": round(self.bytes_per_s),
            "bytes": self.data_bytes,
            "peak_queued_bytes": self.peak_queued_bytes,
            "spilled_bytes": self.spilled_bytes,
            "paused_seconds": round(self.paused_seconds, 3),
            "buffers_allocated": self.buffers_allocated,
            "reader_threads": self.reader_threads,
        }
        if self.phases is not None:
            fields["phases"] = self.phases.log_fields()
        qemu = self.qemu
        if qemu is not None and qemu.ram:
            fields["ram_pages"] = qemu.normal_pages
            fields["ram_zero_pages"] = qemu.zero_pages
            fields["sync_points"] = qemu.sync_points
        if qemu is not None and qemu.main_stream:
            fields["main_stream_bytes"] = qemu.main_stream_bytes
        if self.tls_subjects is not None:
            fields["tls"] = True
            fields["tls_subjects"] = {str(k): v for k, v in self.tls_subjects.items()}
        return fields

    def tls_summary(self) -> str | None:
        """``tls: 4 channels; client subject CN=src,O=Example (channels 0-3)``; None without TLS."""
        if self.tls_subjects is None:
            return None
        by_subject: dict[str | None, list[int]] = {}
        for channel, subject in self.tls_subjects.items():
            by_subject.setdefault(subject, []).append(channel)
        parts = [
            f"client subject {subject if subject is not None else '(not verified)'} "
            f"(channel{'s' if len(channels) > 1 else ''} {', '.join(map(str, channels))})"
            for subject, channels in by_subject.items()
        ]
        return f"tls: {len(self.tls_subjects)} channels; " + "; ".join(parts)


def summarize(
    snapshot: MigrationSnapshot,
    loaders: Sequence[DeviceLoader],
    *,
    tls_subjects: dict[int, str | None] | None = None,
    committed: float | None = None,
) -> SessionResult:
    """The result of a completed migration: the core's figures and each loader's files
    (``committed``: monotonic, every output in place)."""
    started = snapshot.started or snapshot.now
    figures = {device.device: device for device in snapshot.devices}
    devices = []
    for loader in loaders:
        device = figures[loader.key]
        devices.append(
            DeviceResult(
                device=loader.key,
                data_path=loader.data.path,
                config_path=loader.config.path,
                bytes=device.bytes_written,
                chunks=device.chunks_written,
                config_bytes=loader.config.bytes_written,
                digest=loader.digest_text,
                seconds=(device.completed_at or snapshot.now) - started,
            )
        )
    phases = None
    if loaders:
        completed = max(figures[loader.key].completed_at or snapshot.now for loader in loaders)
        # Each phase ends no earlier than the one before it (a batch can be written
        # before the device's last chunk comes in).
        received = max(loader.received_at for loader in loaders)
        written = max(received, *(loader.written_at for loader in loaders))
        phases = Phases(
            received=received - started,
            written=written - started,
            synced=max(written, completed) - started,
            committed=max(written, completed if committed is None else committed) - started,
        )
    return SessionResult(
        devices=tuple(devices),
        # RAM only (no --device): the migration's own time
        seconds=max(
            (device.seconds for device in devices),
            default=(snapshot.finished or snapshot.now) - started,
        ),
        bytes_received=snapshot.received_bytes,
        peak_queued_bytes=snapshot.peak_queued_bytes,
        spilled_bytes=snapshot.spilled_bytes,
        paused_seconds=snapshot.paused_seconds,
        tls_subjects=tls_subjects,
        buffers_allocated=snapshot.buffers_allocated,
        reader_threads=snapshot.reader_threads,
        phases=phases,
        qemu=snapshot.qemu,
    )
