"""One view of a migration for every reader: status socket, metrics, notify, summary.

Built by :meth:`Migration.snapshot` on the thread that drives the core, so
nobody reads a decoder or a dict another thread is changing. One set of
units: bytes, seconds, and rates in bytes per second; each output converts
(query-migrate's milliseconds and megabits, the summary's MB/s) when it renders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import MultifdError
from ..results import QemuStreamFigures, SessionStatus
from .connections import Connection
from .reassembly import ChunkState, DeviceBuffer
from .state import ChannelState, Phase
from .wire import DeviceKey

if TYPE_CHECKING:
    from .migration import Migration


@dataclass(frozen=True, slots=True)
class DeviceSnapshot:
    device: DeviceKey
    bytes_written: int
    chunks_written: int
    next_idx: int
    last_idx: int | None  # the config packet's idx, once it came
    queued_chunks: int
    queued_bytes: int  # data bytes of its chunks held in memory
    spilled_bytes: int  # data bytes of its chunks on disk now
    complete: bool
    completed_at: float | None  # the clock's time its config state was written


@dataclass(frozen=True, slots=True)
class ChannelSnapshot:
    id: int | None  # None: still in its handshake
    state: ChannelState
    received_bytes: int  # its handshake included
    packets: int
    peer: str
    tls_subject: str | None  # the client certificate's subject (None: none verified)


@dataclass(frozen=True, slots=True)
class MigrationSnapshot:
    now: float
    phase: Phase
    status: SessionStatus
    error: MultifdError | None
    started: float | None  # the first channel accepted
    finished: float | None  # the outcome known (for a cancel: cleaned up)
    elapsed_seconds: float  # from the first channel to the end, or to ``now``
    received_bytes: int  # on the accepted channels, handshakes included
    written_bytes: int  # data bytes the loaders wrote
    queued_bytes: int  # charged against --max-queued-bytes now
    peak_queued_bytes: int
    spilled_bytes: int  # ever
    paused_seconds: float  # with at least one channel waiting for memory, one going on included
    buffers_allocated: int  # payload buffers mapped anew (none of the size was idle)
    devices: tuple[DeviceSnapshot, ...]
    channels: tuple[ChannelSnapshot, ...]  # accepted by id, then those handshaking
    pending_connections: int
    refused_connections: int
    refused_by_reason: tuple[tuple[str, int], ...]
    waiting_for: tuple[str, ...]  # what the loaders and the commit wait for
    address: str | None
    tls: bool
    reader_threads: int
    qemu: QemuStreamFigures  # RAM pages, sync points, the main stream's bytes

    @property
    def rate(self) -> float:
        """Bytes received per second since the first channel (0 before)."""
        seconds = self.elapsed_seconds
        return self.received_bytes / seconds if seconds > 0 else 0.0

    @property
    def connected(self) -> int:
        return sum(channel.id is not None for channel in self.channels)


def build_snapshot(migration: Migration, now: float) -> MigrationSnapshot:
    """``migration`` as every output shows it, at ``now``."""
    m = migration
    started, finished = m.outcome.started, m.outcome.finished
    channels = m.connections.channels
    accepted = [_channel(c) for _, c in sorted(channels.items())]
    handshaking = [
        _channel(c)
        for c in m.connections.by_conn.values()
        if c.state is ChannelState.HANDSHAKE and not c.gone
    ]
    return MigrationSnapshot(
        now=now,
        phase=m.phase,
        status=m.status,
        error=m.error,
        started=started,
        finished=finished,
        elapsed_seconds=0.0 if started is None else (finished or now) - started,
        received_bytes=sum(c.received for c in channels.values()),
        written_bytes=m.reassembly.bytes_written,
        queued_bytes=m.ledger.queued_bytes,
        peak_queued_bytes=m.ledger.peak_queued_bytes,
        spilled_bytes=m.ledger.spilled_bytes,
        paused_seconds=m.paused_seconds(now),
        buffers_allocated=m.ledger.buffers_allocated,
        devices=tuple(_device(d, m.completed_at(d.key)) for d in m.reassembly.devices.values()),
        channels=(*accepted, *handshaking),
        pending_connections=len(m.connections.pending),
        refused_connections=m.connections.refused_count,
        refused_by_reason=tuple(sorted(m.connections.refused_by_reason.items())),
        waiting_for=m.waiting_for(),
        address=m.address,
        tls=m.config.tls,
        reader_threads=m.config.reader_threads,
        qemu=QemuStreamFigures(
            ram=m.config.ram,
            main_stream=m.config.main_stream,
            page_size=m.config.page_size,
            normal_pages=m.ram_pages,
            zero_pages=m.ram_zero_pages,
            sync_points=m.sync_points,
            main_stream_bytes=m.main_bytes,
            queued_bytes=m.ram_queued,
            peak_queued_bytes=m.peak_ram_queued,
        ),
    )


def _channel(c: Connection) -> ChannelSnapshot:
    return ChannelSnapshot(c.channel, c.state, c.received, c.packets, c.peer, c.tls_subject)


def _device(device: DeviceBuffer, completed_at: float | None) -> DeviceSnapshot:
    queued = spilled = 0
    for chunk in device.chunks.values():
        if chunk.state is ChunkState.SPILLED:
            spilled += chunk.size
        else:
            queued += chunk.size
    return DeviceSnapshot(
        device=device.key,
        bytes_written=device.bytes_written,
        chunks_written=device.chunks_written,
        next_idx=device.next_idx,
        last_idx=device.last_idx,
        queued_chunks=len(device.chunks),
        queued_bytes=queued,
        spilled_bytes=spilled,
        complete=device.complete,
        completed_at=completed_at,
    )
