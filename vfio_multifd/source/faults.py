"""Faults ``vfio-multifd send --inject`` puts into channel 0's stream, to show each error.

A damaged field is named, not placed: the handshake and the packet prefix
are unpacked with ``wire.py``'s layouts, the field changed, and packed again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..core.wire import (
    DEVICE_STATE_HEADER,
    HANDSHAKE,
    HANDSHAKE_FIELDS,
    IDSTR_SIZE,
    INVALID_IDX,
    PACKET_PREFIX,
    PACKET_PREFIX_FIELDS,
    QEMU_VM_FILE_MAGIC,
    ChannelHandshake,
    DeviceKey,
    PacketFlag,
)
from .plan import DeviceState, Packet

#: Faults ``--inject`` can put into channel 0's stream, to show each error.
FAULTS = {
    "handshake-magic": "channel 0's handshake has a wrong magic (refused)",
    "handshake-version": "channel 0's handshake has version 2 (refused)",
    "handshake-uuid": "channel 0's handshake carries another VM's uuid (refused)",
    "handshake-id": "channel 0 claims id = --channels (refused)",
    "main-channel": "channel 0 starts like QEMU's main channel, QEVM (refused)",
    "bad-magic": "the first packet has a wrong magic",
    "bad-version": "the first packet has version 2",
    "ram": "a RAM packet (flags 0) instead of the first packet",
    "sync": "the first packet has the SYNC bit set",
    "idstr-unterminated": "the first packet's idstr fills all 256 bytes",
    "zero-size": "the first packet says next_packet_size 0",
    "oversize": "the first packet says next_packet_size 2 GiB",
    "short-vfio": "the first packet's payload is shorter than the VFIO header",
    "vfio-version": "the first packet has VFIO version 1",
    "invalid-idx": "the first packet has idx 0xffffffff",
    "duplicate": "the first packet is sent twice",
    "unknown-device": "an extra packet for a device the destination does not know",
    "after-config": "channel 0 first sends a chunk of the first device with an idx beyond "
    "its config packet's",
    "second-config": "channel 0 first sends a second config packet (another idx) of the "
    "first device",
    "bad-config": "the first device's config blob lacks its tags",
    "missing": "the first device's chunk 0 is never sent",
    "truncate": "channel 0 closes in the middle of its first packet",
}

Fields = dict[str, Any]

#: What each handshake fault changes.
_HANDSHAKE_FAULTS: dict[str, Callable[[Fields, int], None]] = {
    "handshake-magic": lambda f, _: f.update(magic=0xDEADBEEF),
    "handshake-version": lambda f, _: f.update(version=2),
    "handshake-uuid": lambda f, _: f.update(
        uuid=bytes(range(1, 17)) if f["uuid"] != bytes(range(1, 17)) else bytes(16)
    ),
    "handshake-id": lambda f, channels: f.update(channel_id=channels),
    # The first 8 bytes of QEMU's main channel: QEVM and the file format version 3.
    "main-channel": lambda f, _: f.update(magic=int.from_bytes(QEMU_VM_FILE_MAGIC), version=3),
}

#: What each fault of the first packet changes in its prefix (PROTOCOL.md 2.3, 2.4).
_PREFIX_FAULTS: dict[str, Callable[[Fields], None]] = {
    "bad-magic": lambda f: f.update(magic=0x12345678),
    "bad-version": lambda f: f.update(version=2),
    "ram": lambda f: f.update(flags=0),
    "sync": lambda f: f.update(flags=f["flags"] | PacketFlag.SYNC),
    "idstr-unterminated": lambda f: f.update(idstr=b"x" * IDSTR_SIZE),
    "zero-size": lambda f: f.update(next_packet_size=0),
    "oversize": lambda f: f.update(next_packet_size=0x80000000),
    "short-vfio": lambda f: f.update(next_packet_size=8),
    "vfio-version": lambda f: f.update(vfio_version=1),
    "invalid-idx": lambda f: f.update(idx=INVALID_IDX),
}


def handshake_bytes(handshake: ChannelHandshake, fault: str | None, channels: int) -> bytes:
    """Channel 0's handshake, damaged as ``fault`` says (if it is a handshake fault)."""
    change = _HANDSHAKE_FAULTS.get(fault or "")
    if change is None:
        return handshake.encode()
    fields = dict(zip(HANDSHAKE_FIELDS, HANDSHAKE.unpack(handshake.encode()), strict=True))
    change(fields, channels)
    return HANDSHAKE.pack(*(fields[name] for name in HANDSHAKE_FIELDS))


def corrupt(
    fault: str, prefix: bytes, data: bytes | memoryview
) -> tuple[bytes, bytes | memoryview]:
    """Damage the first packet of channel 0: its prefix, and for ``short-vfio`` its length."""
    change = _PREFIX_FAULTS.get(fault)
    if change is None:
        return prefix, data
    fields = dict(zip(PACKET_PREFIX_FIELDS, PACKET_PREFIX.unpack(prefix), strict=True))
    change(fields)
    raw = PACKET_PREFIX.pack(*(fields[name] for name in PACKET_PREFIX_FIELDS))
    if fault == "short-vfio":  # the packet ends where its size says: inside the VFIO header
        return raw[: DEVICE_STATE_HEADER.size + fields["next_packet_size"]], b""
    return raw, data


UNKNOWN_DEVICE = DeviceKey("0000:99:00.0/unknown", 0)


def packet_of(
    states: Sequence[DeviceState], d: int, idx: int, fault: str | None
) -> tuple[DeviceKey, bytes | memoryview, bool]:
    """Device, data and CONFIG_STATE flag of planned packet (d, idx)."""
    if d < 0:
        return UNKNOWN_DEVICE, b"who am I", False
    state = states[d]
    if idx > state.chunks:  # an injected packet after the config packet
        second = fault == "second-config"
        return state.key, state.config_blob if second else b"late chunk", second
    if fault == "bad-config" and d == 0 and idx == state.chunks:
        return state.key, bytes(24), True
    return state.key, state.chunk(idx), idx == state.chunks


def plan_fault(
    fault: str, states: Sequence[DeviceState], per_channel: list[list[Packet]]
) -> list[list[Packet]]:
    """Faults that add or remove whole packets change the plan of channel 0."""
    first = [list(packets) for packets in per_channel]
    channel0 = first[0]
    last = states[0].chunks
    if fault == "duplicate" and channel0:
        channel0.insert(1, channel0[0])
    elif fault in ("after-config", "second-config"):
        # An idx beyond the config packet's, first on channel 0: ahead of packets
        # the device needs, so the destination sees it before the device can
        # complete (sent last, it could complete first and the fault show nothing).
        channel0.insert(0, (0, last + 1))
    elif fault == "missing":
        first = [[p for p in packets if p != (0, 0)] for packets in first]
    elif fault == "unknown-device":
        channel0.insert(0, (-1, 0))
    return first
