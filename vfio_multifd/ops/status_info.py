"""``query-migrate``'s answer: the core's snapshot rendered in QEMU's MigrationInfo names.

Pure rendering: the status server calls it only when asked, so the data path never
pays for it; library users call it on ``Session.snapshot()`` themselves.
"""

from __future__ import annotations

from typing import Any

from ..core.snapshot import ChannelSnapshot, DeviceSnapshot, MigrationSnapshot
from ..results import SessionStatus

JSON = dict[str, Any]


def query_migrate(snapshot: MigrationSnapshot) -> JSON:
    """``query-migrate``'s answer: QEMU's MigrationInfo names, plus devices and channels.

    Times count from the first channel accepted, as the session's own summary does.
    """
    seconds = snapshot.elapsed_seconds
    info: JSON = {
        "status": snapshot.status.value,
        "total-time": round(seconds * 1000),
        "transferred": snapshot.received_bytes,
        # QEMU's mbps is megabits per second; this is the average since the start.
        "mbps": round(snapshot.rate * 8 / 1e6, 3),
    }
    if snapshot.status is SessionStatus.FAILED and snapshot.error is not None:
        info["error-desc"] = str(snapshot.error)
    info.update(
        {
            "address": snapshot.address,
            "queued-bytes": snapshot.queued_bytes,
            "peak-queued-bytes": snapshot.peak_queued_bytes,
            "spilled-bytes": snapshot.spilled_bytes,
            "paused-time": round(snapshot.paused_seconds * 1000),
            "devices": [_device_info(device) for device in snapshot.devices],
            "channels": [_channel_info(channel, snapshot.tls) for channel in snapshot.channels],
            "refused-connections": snapshot.refused_connections,
            "tls": snapshot.tls,
            "reader-threads": snapshot.reader_threads,
        }
    )
    qemu = snapshot.qemu
    if qemu.ram:
        # QEMU's MigrationStats names where the meaning is the same: pages with data
        # (normal), zero pages (duplicate); sync-points and the RAM writer's queue are ours.
        info["ram"] = {
            "normal": qemu.normal_pages,
            "duplicate": qemu.zero_pages,
            "normal-bytes": qemu.normal_bytes,
            "page-size": qemu.page_size,
            "sync-points": qemu.sync_points,
            "queued-bytes": qemu.queued_bytes,
            "peak-queued-bytes": qemu.peak_queued_bytes,
        }
    if qemu.main_stream:
        info["main-stream-bytes"] = qemu.main_stream_bytes
    return info


def _device_info(device: DeviceSnapshot) -> JSON:
    info: JSON = {
        "device": str(device.device),
        "instance-id": device.device.instance_id,
        "bytes-written": device.bytes_written,
        "chunks-written": device.chunks_written,
        "next-idx": device.next_idx,
    }
    if device.last_idx is not None:
        info["last-idx"] = device.last_idx
    info.update(
        {
            "queued-chunks": device.queued_chunks,
            "queued-bytes": device.queued_bytes,
            "spilled-bytes": device.spilled_bytes,
            "complete": device.complete,
        }
    )
    return info


def _channel_info(channel: ChannelSnapshot, tls: bool) -> JSON:
    info: JSON = {
        "id": channel.id,
        "state": channel.state.value,
        "bytes": channel.received_bytes,
        "packets": channel.packets,
        "peer": channel.peer,
    }
    if tls:  # the client certificate's subject as --tls-authz compares it (None: not verified)
        info["tls-subject"] = channel.tls_subject
    return info
