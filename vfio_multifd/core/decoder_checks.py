"""The channel decoder's checks field by field, for the slow path.

Pure. ``decoder.py`` takes a whole valid packet prefix in one unpack; when a
prefix arrives in pieces, or something in it is wrong, these check its fields
in order so that the first bad field is the one reported, each raising the
:class:`ProtocolError` (or :class:`HandshakeError`) that names it.
"""

from __future__ import annotations

import struct

from ..errors import HandshakeError, ProtocolError, Reason
from .wire import (
    COMPRESSION_METHODS,
    DEFAULT_MAX_PACKET_SIZE,
    DEVICE_STATE_HEADER,
    HANDSHAKE,
    IDSTR_END,
    INVALID_IDX,
    KNOWN_PACKET_FLAGS,
    MAX_IDSTR_LEN,
    MULTIFD_MAGIC,
    MULTIFD_VERSION,
    PACKET_PREFIX_SIZE,
    VFIO_HEADER,
    VFIO_STATE_VERSION,
    DeviceKey,
    PacketFlag,
)

_DEVICE_STATE_ONLY = int(PacketFlag.DEVICE_STATE)


def _check_magic_version(
    buf: bytearray, filled: int, checked: int, what: str, handshake: bool
) -> int:
    """A handshake's or packet's magic and version, once their bytes are in; returns how
    many of its bytes are checked."""
    error = HandshakeError if handshake else ProtocolError
    if filled >= 4 and checked < 4:
        (magic,) = struct.unpack_from(">I", buf, 0)
        if magic != MULTIFD_MAGIC:
            reason = Reason.HANDSHAKE_MAGIC if handshake else Reason.PACKET_MAGIC
            raise error(reason, f"{what} magic {magic:#010x}, expected {MULTIFD_MAGIC:#010x}")
        checked = 4
    if filled >= 8 and checked < 8:
        (version,) = struct.unpack_from(">I", buf, 4)
        if version != MULTIFD_VERSION:
            reason = Reason.HANDSHAKE_VERSION if handshake else Reason.PACKET_VERSION
            raise error(reason, f"{what} version {version}, expected {MULTIFD_VERSION}")
        checked = 8
    return checked


def check_handshake(buf: bytearray, filled: int, checked: int) -> int:
    """Checks a multifd handshake's magic and version; returns how many bytes are checked."""
    return _check_magic_version(buf, filled, checked, "handshake", handshake=True)


def handshake_closed(filled: int) -> HandshakeError:
    return HandshakeError(
        Reason.HANDSHAKE_CLOSED,
        f"connection closed inside the handshake after {filled} of {HANDSHAKE.size} bytes",
    )


def check_packet_header(buf: bytearray, filled: int, checked: int, ram: bool) -> int | None:
    """Checks a packet's magic, version and flags once their bytes are in; returns how
    many of its bytes are checked, or None for a RAM or SYNC packet to be taken (``ram``)."""
    checked = _check_magic_version(buf, filled, checked, "packet", handshake=False)
    if filled >= 12 and checked < 12:
        if _is_ram_packet(buf, ram):
            return None
        checked = 12
    return checked


def check_idstr(buf: bytearray) -> None:
    if buf[IDSTR_END - 1] != 0:
        raise ProtocolError(
            Reason.PACKET_IDSTR,
            f"idstr is not NUL-terminated (byte {MAX_IDSTR_LEN} is {buf[IDSTR_END - 1]:#04x})",
        )


def _is_ram_packet(buf: bytearray, ram: bool) -> bool:
    """Whether the packet whose flags are in ``buf`` is a RAM or SYNC packet to be taken
    (``ram``: --ram was given); False for a device-state packet; raises for the rest."""
    (flags,) = struct.unpack_from(">I", buf, 8)
    if not flags & _DEVICE_STATE_ONLY:
        if ram:
            return True
        kind = "SYNC" if flags & PacketFlag.SYNC else "RAM"
        raise ProtocolError(
            Reason.PACKET_RAM,
            f"{kind} packet (flags {flags:#x}); give --ram DIR (or --ram discard) to "
            "take QEMU's RAM pages: without it this destination receives only "
            f"device-state packets (flag {PacketFlag.DEVICE_STATE:#x})",
        )
    if flags & PacketFlag.SYNC:
        raise ProtocolError(
            Reason.PACKET_SYNC,
            f"SYNC bit set on a device-state packet (flags {flags:#x})",
        )
    if flags & PacketFlag.COMPRESSION:
        method = COMPRESSION_METHODS.get(flags & PacketFlag.COMPRESSION, "unknown")
        raise ProtocolError(
            Reason.PACKET_COMPRESSION,
            f"{method} compression bits set on a device-state packet (flags {flags:#x}); "
            "this destination implements no compression (QEMU sends device state "
            "uncompressed)",
        )
    if flags & ~KNOWN_PACKET_FLAGS:
        raise ProtocolError(
            Reason.PACKET_FLAGS,
            f"unknown packet flag bits {flags & ~KNOWN_PACKET_FLAGS:#x} (flags {flags:#x}); "
            f"this destination implements only DEVICE_STATE {PacketFlag.DEVICE_STATE:#x}",
        )
    return False


def device_state_header(buf: bytearray, max_packet_size: int) -> tuple[DeviceKey, int]:
    """The device and payload size (past the VFIO header) of a device-state header."""
    _, _, _, raw_idstr, instance_id, size = DEVICE_STATE_HEADER.unpack_from(buf)
    idstr = raw_idstr[: raw_idstr.index(0)].decode("utf-8", "surrogateescape")
    device = DeviceKey(idstr, instance_id)
    if size == 0:
        raise ProtocolError(
            Reason.PACKET_SIZE, "next_packet_size 0: a packet has a payload", device=str(device)
        )
    if size > max_packet_size:
        raise ProtocolError(
            Reason.PACKET_SIZE,
            f"next_packet_size {size} is over --max-packet-size {max_packet_size} "
            f"(QEMU's largest is {DEFAULT_MAX_PACKET_SIZE}: a 1 MiB chunk and its VFIO "
            "header; for a source that sends larger ones, raise --max-packet-size)",
            device=str(device),
        )
    if size < VFIO_HEADER.size:
        raise ProtocolError(
            Reason.VFIO_SHORT,
            f"payload of {size} bytes is shorter than the {VFIO_HEADER.size}-byte VFIO header",
            device=str(device),
        )
    return device, size - VFIO_HEADER.size


def vfio_idx(buf: bytearray, device: DeviceKey | None) -> int:
    """The VFIO header's idx, its version checked with it (so that its error names the idx)."""
    version, idx = struct.unpack_from(">II", buf, DEVICE_STATE_HEADER.size)
    if version != VFIO_STATE_VERSION:
        raise ProtocolError(
            Reason.VFIO_VERSION,
            f"VFIO state version {version}, expected {VFIO_STATE_VERSION} (idx {idx})",
            device=str(device),
            idx=idx,
        )
    if idx == INVALID_IDX:
        raise ProtocolError(
            Reason.VFIO_INVALID_IDX,
            f"idx {INVALID_IDX:#x} is invalid",
            device=str(device),
            idx=idx,
        )
    return int(idx)


def truncated(
    state: str,
    ram: bool,
    in_payload: bool,
    received: int,
    idx: int,
    payload_size: int,
    device: DeviceKey | None,
) -> ProtocolError:
    """The error for a stream that ends in ``state`` with ``received`` bytes of the unit
    being read: inside a RAM packet, a device-state payload (``in_payload``), or a header."""
    if ram:
        return ProtocolError(
            Reason.PACKET_TRUNCATED,
            f"stream closed inside a RAM packet ({state}, {received} bytes of it received)",
        )
    if in_payload:
        return ProtocolError(
            Reason.PACKET_TRUNCATED,
            f"stream closed inside state buffer {idx}: {received} of "
            f"{payload_size} data bytes received",
            device=str(device),
            idx=idx,
        )
    return ProtocolError(
        Reason.PACKET_TRUNCATED,
        f"stream closed inside a packet header: {received} of {PACKET_PREFIX_SIZE} bytes received",
        device=None if device is None else str(device),
    )
