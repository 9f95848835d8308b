"""QEMU's multifd device-state wire format: constants, layouts, values, encoders, checks.

Pure: no sockets, no files, no event loop. The incremental decoder that reads
a channel with these is ``decoder.py``.

Layouts are in PROTOCOL.md section 2; all integers are big-endian, all
structures packed.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import HandshakeError, ProtocolError, Reason

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer as PayloadBuffer

# --- constants -----------------------------------------------------------------

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
VFIO_STATE_VERSION = 0
QEMU_VM_FILE_MAGIC = b"QEVM"  # first bytes of a QEMU *main* migration channel
INVALID_IDX = 0xFFFFFFFF
IDSTR_SIZE = 256
MAX_IDSTR_LEN = IDSTR_SIZE - 1  # byte 255 is always NUL
UUID_SIZE = 16

#: The largest chunk of device data QEMU's source puts in one packet.
QEMU_MAX_CHUNK = 1 << 20


class PacketFlag(enum.IntFlag):
    SYNC = 0x01
    COMPRESSION = 0x3E  # MULTIFD_FLAG_COMPRESSION_MASK: the method, a 5-bit field
    DEVICE_STATE = 0x40


#: QEMU's compression methods by their value in the COMPRESSION bits (none implemented here).
COMPRESSION_METHODS = {0x02: "zlib", 0x04: "zstd", 0x08: "qpl", 0x10: "uadk", 0x20: "qatzip"}
#: The packet flags this destination implements.
KNOWN_PACKET_FLAGS = int(PacketFlag.SYNC | PacketFlag.COMPRESSION | PacketFlag.DEVICE_STATE)


class VfioFlag(enum.IntFlag):
    CONFIG_STATE = 0x1


class ConfigTag(enum.IntEnum):
    """The be64 tags of VFIO's migration stream (PROTOCOL.md section 2.5)."""

    END_OF_STATE = 0xFFFFFFFFEF100001
    DEV_CONFIG_STATE = 0xFFFFFFFFEF100002
    DEV_SETUP_STATE = 0xFFFFFFFFEF100003
    DEV_DATA_STATE = 0xFFFFFFFFEF100004
    DEV_INIT_DATA_SENT = 0xFFFFFFFFEF100005
    DEV_CONFIG_LOAD_READY = 0xFFFFFFFFEF100006


# magic, version, uuid, channel id, 7 unused bytes, four unused u64
HANDSHAKE = struct.Struct(">II16sB7x32x")
# magic, version, flags
PACKET_HEADER = struct.Struct(">III")
# packet header, idstr, instance_id, next_packet_size
DEVICE_STATE_HEADER = struct.Struct(">III256sII")
# version, idx, flags
VFIO_HEADER = struct.Struct(">III")
#: Our default bound on ``next_packet_size``: QEMU's largest packet (a chunk and its VFIO
#: header), so that round memory bounds (``--max-queued-bytes 4M``) are enough.
DEFAULT_MAX_PACKET_SIZE = QEMU_MAX_CHUNK + VFIO_HEADER.size
CONFIG_TAG = struct.Struct(">Q")

#: Bytes before a device-state packet's data: the 276-byte device-state header
#: and the 12-byte VFIO header. Every valid packet is at least this long.
PACKET_PREFIX_SIZE = DEVICE_STATE_HEADER.size + VFIO_HEADER.size
#: The whole packet prefix in one layout, and its fields by name, in order.
PACKET_PREFIX = struct.Struct(DEVICE_STATE_HEADER.format + VFIO_HEADER.format.lstrip(">"))
PACKET_PREFIX_FIELDS = (
    "magic",
    "version",
    "flags",
    "idstr",
    "instance_id",
    "next_packet_size",
    "vfio_version",
    "idx",
    "vfio_flags",
)
#: The handshake's fields by name, in order (the unused bytes are padding).
HANDSHAKE_FIELDS = ("magic", "version", "uuid", "channel_id")

# Offsets in the packet prefix by which a field is complete and can be checked.
IDSTR_END = PACKET_HEADER.size + IDSTR_SIZE  # 268: byte 255 of idstr
VFIO_IDX_END = DEVICE_STATE_HEADER.size + 8  # 284

assert HANDSHAKE.size == 64
assert PACKET_PREFIX.size == PACKET_PREFIX_SIZE
assert DEVICE_STATE_HEADER.size == 276
assert PACKET_PREFIX_SIZE == 288


# --- values ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceKey:
    """A device is named by its ``idstr`` plus its ``instance_id``."""

    idstr: str
    instance_id: int = 0

    def __str__(self) -> str:
        # A non-UTF-8 idstr decodes with surrogate escapes; show its bytes as \\xNN.
        idstr = self.idstr.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        if self.instance_id == 0:
            return idstr
        return f"{idstr} instance {self.instance_id}"


@dataclass(frozen=True, slots=True)
class ChannelHandshake:
    channel_id: int
    uuid: bytes = bytes(UUID_SIZE)

    def encode(self) -> bytes:
        return HANDSHAKE.pack(MULTIFD_MAGIC, MULTIFD_VERSION, self.uuid, self.channel_id)


@dataclass(frozen=True, slots=True)
class PacketHeader:
    """A packet's header is complete: its payload (``size`` bytes) needs a buffer.

    Emitted only by a decoder without an allocator, which then waits for
    :meth:`ChannelDecoder.provide_buffer`: whoever owns the memory decides
    before a single payload byte is read.
    """

    device: DeviceKey
    idx: int
    config: bool
    size: int


@dataclass(frozen=True, slots=True)
class DevicePacket:
    """One complete device-state packet: a chunk of a device's state.

    ``buffer`` owns the bytes (it may be larger than the data, and may come
    from a pool); ``data`` is the chunk itself, ``size`` bytes long.
    """

    device: DeviceKey
    idx: int
    config: bool
    buffer: PayloadBuffer
    size: int

    @property
    def data(self) -> memoryview:
        return memoryview(self.buffer)[: self.size]


def encode_idstr(idstr: str) -> bytes:
    raw = idstr.encode("utf-8", "surrogateescape")
    if not raw or len(raw) > MAX_IDSTR_LEN or b"\0" in raw:
        raise ValueError(f"idstr must be 1..{MAX_IDSTR_LEN} bytes without NUL: {idstr!r}")
    return raw


def encode_packet_prefix(device: DeviceKey, idx: int, data_size: int, config: bool) -> bytes:
    """The 288 bytes that precede a chunk's data on the wire."""
    flags = VfioFlag.CONFIG_STATE if config else 0
    return DEVICE_STATE_HEADER.pack(
        MULTIFD_MAGIC,
        MULTIFD_VERSION,
        PacketFlag.DEVICE_STATE,
        encode_idstr(device.idstr),
        device.instance_id,
        VFIO_HEADER.size + data_size,
    ) + VFIO_HEADER.pack(VFIO_STATE_VERSION, idx, flags)


def encode_device_packet(device: DeviceKey, idx: int, data: bytes, config: bool = False) -> bytes:
    return encode_packet_prefix(device, idx, len(data), config) + bytes(data)


def encode_config_blob(config_bytes: bytes) -> bytes:
    return (
        CONFIG_TAG.pack(ConfigTag.DEV_CONFIG_STATE)
        + bytes(config_bytes)
        + CONFIG_TAG.pack(ConfigTag.END_OF_STATE)
    )


def check_config_blob(blob: bytes | memoryview, device: DeviceKey, idx: int) -> None:
    """Raise unless ``blob`` starts with DEV_CONFIG_STATE and ends with END_OF_STATE."""
    size = CONFIG_TAG.size
    if len(blob) < 2 * size:
        raise ProtocolError(
            Reason.VFIO_CONFIG_BLOB,
            f"config state of {len(blob)} bytes is too short for its two tags (idx {idx})",
            device=str(device),
            idx=idx,
        )
    (first,) = CONFIG_TAG.unpack_from(blob, 0)
    (last,) = CONFIG_TAG.unpack_from(blob, len(blob) - size)
    if first != ConfigTag.DEV_CONFIG_STATE:
        raise ProtocolError(
            Reason.VFIO_CONFIG_BLOB,
            f"config state (idx {idx}) starts with {first:#018x}, "
            f"expected DEV_CONFIG_STATE {ConfigTag.DEV_CONFIG_STATE:#018x}",
            device=str(device),
            idx=idx,
        )
    if last != ConfigTag.END_OF_STATE:
        raise ProtocolError(
            Reason.VFIO_CONFIG_BLOB,
            f"config state (idx {idx}) ends with {last:#018x}, "
            f"expected END_OF_STATE {ConfigTag.END_OF_STATE:#018x}",
            device=str(device),
            idx=idx,
        )


def check_handshake(handshake: ChannelHandshake, *, uuid: bytes, channels: int) -> None:
    """The session-level checks of a decoded handshake (PROTOCOL.md section 3.1)."""
    if handshake.uuid != uuid:
        raise HandshakeError(
            Reason.HANDSHAKE_UUID,
            f"handshake uuid {handshake.uuid.hex()} differs from the expected {uuid.hex()}",
        )
    # QEMU checks id > channels, an off-by-one; ids run 0 .. channels-1.
    if handshake.channel_id >= channels:
        raise HandshakeError(
            Reason.HANDSHAKE_CHANNEL_ID,
            f"handshake channel id {handshake.channel_id} is not below the "
            f"{channels} expected channels",
        )
