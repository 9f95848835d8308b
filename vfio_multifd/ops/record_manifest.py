"""A recording's manifest as the loop thread knows it at the end, for the writer to finish.

The loop thread knows the channels, refusals, outcome and devices; the writer
thread knows what it wrote to each file and its digest. :func:`manifest_builder`
takes the first and returns a :data:`Build` the writer completes with the second.
"""

from __future__ import annotations

import uuid as uuid_module
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .. import __version__
from ..config import Address, ReceiveSettings
from ..digest import format_digest, new_hasher
from ..errors import MultifdError
from ..results import DeviceResult, SessionStatus
from .manifest import (
    ChannelEnd,
    Manifest,
    RecordedChannel,
    RecordedDevice,
    RecordedError,
    RefusedConnection,
    channel_file,
)
from .record_channel import ChannelRecording, Refusal

#: The manifest, given what the writer wrote to each sink, its digest, and why it stopped.
Build = Callable[[dict[int, int], dict[int, str], str | None], Manifest]

_OUTCOMES = {
    SessionStatus.COMPLETED: "completed",
    SessionStatus.CANCELLED: "cancelled",
    SessionStatus.CANCELLING: "cancelled",
}


@dataclass(frozen=True, slots=True)
class Recorded:
    """What the loop thread recorded of a migration."""

    settings: ReceiveSettings
    started_at: str  # wall clock, ISO 8601
    origin: float  # monotonic: when the recording started
    channels: Sequence[ChannelRecording]  # accepted, in order
    refusals: Sequence[Refusal]
    refused_not_kept: int

    def since(self, moment: float | None) -> float | None:
        return None if moment is None else round(moment - self.origin, 6)


def manifest_builder(
    recorded: Recorded,
    status: SessionStatus,
    error: MultifdError | None,
    address: Address | None,
    devices: Sequence[DeviceResult],
) -> Build:
    channels = [_channel(recorded, r) for r in recorded.channels]
    channel_sinks = [r.sink for r in recorded.channels]
    refused = [_refused(recorded, refusal) for refusal in recorded.refusals]
    refused_sinks = [refusal.sink for refusal in recorded.refusals]
    base = _base(recorded, status, error, address, devices)
    digest = recorded.settings.digest
    nothing = format_digest(digest, new_hasher(digest))

    def build(written: dict[int, int], digests: dict[int, str], stopped: str | None) -> Manifest:
        return replace(
            base,
            complete=stopped is None,
            stopped=stopped,
            recorded_channels=tuple(
                replace(c, bytes=written.get(s, 0), digest=digests.get(s, nothing))
                for c, s in zip(channels, channel_sinks, strict=True)
                if s is not None
            ),
            refused=tuple(
                replace(r, bytes=written.get(s, 0))
                for r, s in zip(refused, refused_sinks, strict=True)
            ),
        )

    return build


def _channel(recorded: Recorded, r: ChannelRecording) -> RecordedChannel:
    assert r.sink is not None  # accepted (channel_id None: the main channel)
    return RecordedChannel(
        id=r.channel_id,
        file=channel_file(r.channel_id),
        peer=r.peer,
        bytes=0,
        received=r.received,
        first_byte_s=recorded.since(r.first_byte),
        last_byte_s=recorded.since(r.last_byte),
        end=r.end or ChannelEnd.OPEN,
        digest="",  # the writer's
    )


def _refused(recorded: Recorded, refusal: Refusal) -> RefusedConnection:
    return RefusedConnection(
        file=refusal.file,
        peer=refusal.recording.peer,
        reason=refusal.error.reason.value,
        message=str(refusal.error),
        bytes=0,
        first_byte_s=recorded.since(refusal.recording.first_byte),
    )


def _base(
    recorded: Recorded,
    status: SessionStatus,
    error: MultifdError | None,
    address: Address | None,
    devices: Sequence[DeviceResult],
) -> Manifest:
    """Everything but what the writer knows."""
    settings = recorded.settings
    digests = {result.device: result.digest for result in devices}
    return Manifest(
        tool=f"vfio-multifd {__version__}",
        started_at=recorded.started_at,
        uuid=str(uuid_module.UUID(bytes=settings.uuid)),
        channels=settings.channels,
        tls=settings.tls is not None,
        listen=str(address or settings.listen),
        devices=tuple(
            RecordedDevice(spec.key.idstr, spec.key.instance_id, digests.get(spec.key))
            for spec in settings.devices
        ),
        outcome=_OUTCOMES.get(status, "failed"),
        error=None
        if error is None
        else RecordedError(
            reason=error.reason.value,
            message=str(error),
            channel=error.channel,
            device=error.device,
            idx=error.idx,
        ),
        complete=True,
        stopped=None,
        recorded_channels=(),
        refused=(),
        refused_not_kept=recorded.refused_not_kept,
    )
