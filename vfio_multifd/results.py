"""What a migration reports: its QMP status and, once complete, each device's result."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .wire import DeviceKey

if TYPE_CHECKING:
    from .loader import DeviceLoader
    from .reassembly import ReassemblyBuffer


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
class SessionResult:
    devices: tuple[DeviceResult, ...]
    seconds: float  # first byte received to the last device complete
    bytes_received: int  # on all channels, headers included
    peak_queued_bytes: int
    spilled_bytes: int
    paused_seconds: float

    @property
    def data_bytes(self) -> int:
        return sum(device.bytes for device in self.devices)

    @property
    def mb_per_s(self) -> float:
        return self.data_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def log_fields(self) -> dict[str, float | int]:
        """The ``migration_completed`` log line's fields (benchmarks parse them)."""
        return {
            "seconds": round(self.seconds, 3),
            "mb_per_s": round(self.mb_per_s, 1),
            "bytes": self.data_bytes,
            "peak_queued_bytes": self.peak_queued_bytes,
            "spilled_bytes": self.spilled_bytes,
            "paused_seconds": round(self.paused_seconds, 3),
        }


def summarize(
    loaders: Sequence[DeviceLoader],
    reassembly: ReassemblyBuffer,
    *,
    started: float,
    bytes_received: int,
    paused_seconds: float,
) -> SessionResult:
    """The result of a completed migration (``started``: monotonic, the first channel)."""
    devices = tuple(
        DeviceResult(
            device=loader.device.key,
            data_path=loader.data.path,
            config_path=loader.config.path,
            bytes=loader.device.bytes_written,
            chunks=loader.device.chunks_written,
            config_bytes=loader.config.bytes_written,
            digest=loader.digest_text,
            seconds=loader.completed_at - started,
        )
        for loader in loaders
    )
    return SessionResult(
        devices=devices,
        seconds=max(loader.completed_at for loader in loaders) - started,
        bytes_received=bytes_received,
        peak_queued_bytes=reassembly.peak_queued_bytes,
        spilled_bytes=reassembly.spilled_bytes,
        paused_seconds=paused_seconds,
    )
