"""What one migration is set up with, as the core needs it (no paths, no sockets)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .memory import SPILL_GRACE
from .wire import DeviceKey

if TYPE_CHECKING:
    from ..config import ReceiveSettings


@dataclass(frozen=True, slots=True)
class MigrationConfig:
    devices: tuple[DeviceKey, ...]
    channels: int
    uuid: bytes = bytes(16)
    max_payload_size: int = 1 << 20
    max_queued_bytes: int | None = None
    fail_when_full: bool = False
    handshake_timeout: float = 10.0
    max_pending: int = 64
    accept_timeout: float | None = None
    progress_timeout: float | None = None
    missing_channels_grace: float | None = None
    tls: bool = False
    reader_threads: int = 0
    spill_grace: float = SPILL_GRACE
    main_stream: bool = False  # --main-stream: QEMU's main channel is taken
    ram: bool = False  # --ram: RAM and SYNC packets are taken
    page_size: int = 4096  # the source's target page size (x86)

    @classmethod
    def from_settings(cls, settings: ReceiveSettings, *, reader_threads: int) -> MigrationConfig:
        return cls(
            devices=tuple(spec.key for spec in settings.devices),
            channels=settings.channels,
            uuid=settings.uuid,
            max_payload_size=settings.max_payload_size,
            max_queued_bytes=settings.max_queued_bytes,
            fail_when_full=settings.on_queue_full.value == "fail",
            handshake_timeout=settings.handshake_timeout,
            max_pending=settings.max_pending_connections,
            accept_timeout=settings.accept_timeout,
            progress_timeout=settings.progress_timeout,
            missing_channels_grace=settings.missing_channels_grace,
            tls=settings.tls is not None,
            reader_threads=reader_threads,
            main_stream=settings.main_stream is not None,
            ram=settings.ram is not None,
        )
