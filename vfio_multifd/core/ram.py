"""RAM packets on multifd channels, and the sync points that order them.

Pure: no sockets, no files, no event loop. The packet is QEMU's
``MultiFDPacket_t`` (``migration/multifd.h``; PROTOCOL.md section 7): after
the common 12-byte header (magic, version, flags), be32 ``pages_alloc``,
``normal_pages``, ``next_packet_size``, be64 ``packet_num``, 32 bytes
(QEMU 10: be32 ``zero_pages``, then reserved; QEMU 7.2: all unused and zero,
which reads as no zero pages), ``ramblock[256]``, then the page offsets:
always room for a whole packet's worth (512 KiB of pages: 128 on x86, so a
1344-byte header) whatever ``pages_alloc`` says. ``normal_pages x page size``
bytes of page data follow, in offset order. ``next_packet_size`` is not
trusted: QEMU 7.2 leaves it stale on packets without pages.

Sync points: the same page is sent again in a later round when the guest
dirtied it, possibly on another channel, and a channel can lag. QEMU's
destination keeps the rounds apart by making every channel (and its main
stream) wait at each sync point until all have reached it;
:class:`SyncBarrier` is that rule as a pure class. It was chosen over
per-page sync epochs because it needs no memory per page (an epoch per page
is 256 MiB of counters for a 1 TiB guest) and is what QEMU does, so a source
can never rely on anything looser. It cannot deadlock: a source sends the
SYNC packet on every channel before it queues a page of the next round, so
every party the barrier waits for has its sync point already on the wire.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import ProtocolError, Reason
from .savevm import DEFAULT_PAGE_SIZE, RamBlock
from .wire import COMPRESSION_METHODS, PACKET_HEADER, PacketFlag

#: Bytes of pages one packet can carry (MULTIFD_PACKET_SIZE): sets the offset array's size.
MULTIFD_PACKET_SIZE = 512 * 1024
RAMBLOCK_SIZE = 256
# After the common 12-byte header: pages_alloc, normal_pages, next_packet_size,
# packet_num, zero_pages, 4 reserved, 3 x be64 reserved, ramblock.
RAM_FIELDS = struct.Struct(">IIIQI4x24x256s")
OFFSET = struct.Struct(">Q")
assert PACKET_HEADER.size + RAM_FIELDS.size == 320


def pages_per_packet(page_size: int = DEFAULT_PAGE_SIZE) -> int:
    return MULTIFD_PACKET_SIZE // page_size


def ram_header_size(page_size: int = DEFAULT_PAGE_SIZE) -> int:
    """The whole header before the page data, common 12 bytes included (1344 on x86)."""
    return PACKET_HEADER.size + RAM_FIELDS.size + OFFSET.size * pages_per_packet(page_size)


@dataclass(frozen=True, slots=True)
class RamPacket:
    """A RAM (or SYNC) packet's header, checked. ``normal`` are the offsets (in
    ``block``) of the pages whose data follows, in that order; ``zero`` the
    offsets of pages that are all zero (no data). ``block`` is None when the
    packet carries no pages."""

    flags: int
    packet_num: int
    pages_alloc: int
    next_packet_size: int
    block: RamBlock | None
    normal: tuple[int, ...]
    zero: tuple[int, ...]
    data_size: int

    @property
    def sync(self) -> bool:
        return bool(self.flags & PacketFlag.SYNC)


def parse_ram_packet(
    header: bytes | bytearray | memoryview,
    blocks: Mapping[str, RamBlock],
    *,
    page_size: int = DEFAULT_PAGE_SIZE,
) -> RamPacket:
    """Check and decode a RAM packet's header (``ram_header_size(page_size)`` bytes,
    magic and version already checked); ``blocks`` is the main stream's block list."""
    size = ram_header_size(page_size)
    if len(header) != size:
        raise ValueError(f"a RAM packet header is {size} bytes, not {len(header)}")
    (flags,) = struct.unpack_from(">I", header, 8)
    _check_flags(flags)
    pages_alloc, normal_pages, next_packet_size, packet_num, zero_pages, raw_block = (
        RAM_FIELDS.unpack_from(header, PACKET_HEADER.size)
    )
    limit = pages_per_packet(page_size)
    if pages_alloc > limit:
        raise ProtocolError(
            Reason.RAM_PACKET,
            f"RAM packet {packet_num}: pages_alloc {pages_alloc}, at most {limit}",
        )
    if normal_pages > pages_alloc or zero_pages > pages_alloc - normal_pages:
        raise ProtocolError(
            Reason.RAM_PACKET,
            f"RAM packet {packet_num}: {normal_pages} normal and {zero_pages} zero pages "
            f"do not fit its pages_alloc {pages_alloc}",
        )
    if normal_pages + zero_pages == 0:
        return RamPacket(flags, packet_num, pages_alloc, next_packet_size, None, (), (), 0)
    end = raw_block.find(0)
    if end == -1:
        raise ProtocolError(
            Reason.RAM_PACKET,
            f"RAM packet {packet_num}: ramblock is not NUL-terminated",
        )
    name = raw_block[:end].decode("utf-8", "surrogateescape")
    block = blocks.get(name)
    if block is None:
        raise ProtocolError(
            Reason.RAM_BLOCK,
            f"RAM packet {packet_num}: RAMBlock {name!r} is not in the main stream's block list",
        )
    offsets = _offsets(header, normal_pages + zero_pages, block, page_size, packet_num)
    return RamPacket(
        flags,
        packet_num,
        pages_alloc,
        next_packet_size,
        block,
        offsets[:normal_pages],
        offsets[normal_pages:],
        normal_pages * page_size,
    )


def _offsets(
    header: bytes | bytearray | memoryview, count: int, block: RamBlock, page_size: int,
    packet_num: int,
) -> tuple[int, ...]:
    """The first ``count`` page offsets, each a page within the block."""
    offsets: tuple[int, ...] = struct.unpack_from(
        f">{count}Q", header, PACKET_HEADER.size + RAM_FIELDS.size
    )
    for offset in offsets:
        if offset % page_size or offset + page_size > block.used_length:
            raise ProtocolError(
                Reason.RAM_OFFSET,
                f"RAM packet {packet_num}: page offset {offset:#x} of RAMBlock {block.name} is "
                f"not a {page_size}-byte page within its used length {block.used_length:#x}",
            )
    return offsets


def _check_flags(flags: int) -> None:
    if flags & PacketFlag.DEVICE_STATE:
        raise ValueError("a device-state packet is not a RAM packet")
    if flags & PacketFlag.COMPRESSION:
        method = COMPRESSION_METHODS.get(flags & PacketFlag.COMPRESSION, "unknown")
        raise ProtocolError(
            Reason.PACKET_COMPRESSION,
            f"RAM packet compressed with {method} (flags {flags:#x}); this destination "
            "takes only uncompressed pages (multifd-compression none)",
        )
    if flags & ~int(PacketFlag.SYNC):
        raise ProtocolError(
            Reason.PACKET_FLAGS,
            f"unknown RAM packet flag bits {flags & ~int(PacketFlag.SYNC):#x} (flags {flags:#x})",
        )


def encode_ram_packet(
    *,
    block: str = "",
    normal: Sequence[tuple[int, bytes]] = (),
    zero: Sequence[int] = (),
    packet_num: int = 0,
    sync: bool = False,
    pages_alloc: int | None = None,
    next_packet_size: int | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
) -> bytes:
    """A RAM packet as QEMU 10 sends it: header, offsets (normal, then zero), page data."""
    limit = pages_per_packet(page_size)
    count = len(normal) + len(zero)
    if count > limit:
        raise ValueError(f"{count} pages do not fit one packet ({limit})")
    if pages_alloc is None:
        pages_alloc = limit if count else 0
    raw_block = block.encode("utf-8", "surrogateescape")
    if len(raw_block) >= RAMBLOCK_SIZE or b"\0" in raw_block:
        raise ValueError(f"RAMBlock name {block!r} does not fit ramblock[256]")
    data = b"".join(bytes(page) for _, page in normal)
    if any(len(page) != page_size for _, page in normal):
        raise ValueError(f"every page is {page_size} bytes")
    if next_packet_size is None:
        next_packet_size = len(data)
    flags = int(PacketFlag.SYNC) if sync else 0
    offsets = [offset for offset, _ in normal] + list(zero)
    header = PACKET_HEADER.pack(0x11223344, 1, flags) + RAM_FIELDS.pack(
        pages_alloc, len(normal), next_packet_size, packet_num, len(zero), raw_block
    )
    offset_area = struct.pack(f">{len(offsets)}Q", *offsets).ljust(OFFSET.size * limit, b"\0")
    return header + offset_area + data


# --- sync points ---------------------------------------------------------------------

MAIN = -1  # the main stream's party number in a SyncBarrier


class SyncDecision(enum.Enum):
    HOLD = "hold"  # stop reading this party until it is released
    RELEASE = "release"  # everyone reached the sync point: resume every party held


@dataclass(frozen=True, slots=True)
class Released:
    """The sync point ``number`` is complete; ``parties`` were held and resume now."""

    number: int
    parties: tuple[int, ...]


class SyncBarrier:
    """Every party (each multifd channel, and the main stream if there is one) waits at
    each sync point until all have reached it.

    The driver reports :meth:`reached` when a party's next unit is its sync
    point (a channel: a SYNC packet, after the pages that packet carries; the
    main stream: a :class:`~.mainstream.SyncPoint`) and stops reading that
    party while it is held. Pages must reach their files in the order the
    barrier lets them through: one writer, first in first out (or the driver
    waits for the writes before releasing).
    """

    def __init__(self, channels: int, *, main: bool = True) -> None:
        if channels < 1:
            raise ValueError("a barrier needs at least one channel")
        self.parties: tuple[int, ...] = tuple(range(channels)) + ((MAIN,) if main else ())
        self.completed = 0  # sync points every party has passed
        self._held: list[int] = []  # parties waiting at sync point completed + 1
        self._closed: set[int] = set()

    @property
    def held(self) -> tuple[int, ...]:
        return tuple(self._held)

    def reached(self, party: int) -> Released | None:
        """``party`` reached its next sync point: None means hold it; otherwise the
        point is complete and :class:`Released` names every party to resume."""
        self._check_party(party)
        if party in self._held:
            raise ValueError(f"{_name(party)} is held at sync point {self.completed + 1}")
        if party in self._closed:
            raise ValueError(f"{_name(party)} is closed")
        if self._closed:
            raise ProtocolError(
                Reason.RAM_SYNC,
                f"{_name(party)} reached sync point {self.completed + 1}, which "
                f"{', '.join(map(_name, sorted(self._closed)))} closed without reaching",
            )
        self._held.append(party)
        if len(self._held) < len(self.parties):
            return None
        self.completed += 1
        released = tuple(p for p in self._held if p != party)
        self._held.clear()
        return Released(self.completed, released)

    def closed(self, party: int) -> None:
        """``party`` ended cleanly: it must not leave others waiting at a sync point."""
        self._check_party(party)
        self._closed.add(party)
        if self._held:
            raise ProtocolError(
                Reason.RAM_SYNC,
                f"{_name(party)} closed after {self.completed} sync points while "
                f"{', '.join(map(_name, self._held))} waited at sync point {self.completed + 1}",
            )

    def _check_party(self, party: int) -> None:
        if party not in self.parties:
            raise ValueError(f"no party {party} in this barrier")


def _name(party: int) -> str:
    return "the main stream" if party == MAIN else f"channel {party}"
