"""A test-local destination: captured (or encoded) streams in, RAM images out.

Drives the pure parsers (``core/mainstream.py``, ``core/ram.py``) the way the
daemon will: the main stream and every multifd channel are read unit by unit
in an order the caller chooses (``schedule``), each party stops at its sync
point until :class:`SyncBarrier` releases it, and pages are applied to
in-memory images in the order they get through. No files, no sockets.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from vfio_multifd.core.mainstream import MainStreamParser
from vfio_multifd.core.ram import MAIN, SyncBarrier, parse_ram_packet, ram_header_size
from vfio_multifd.core.savevm import BlockList, Ended, Page, RamBlock, SyncPoint, VfioData, ZeroPage
from vfio_multifd.core.wire import DEVICE_STATE_HEADER, HANDSHAKE, PacketFlag

PAGE = 4096


@dataclass
class Unit:
    """One thing a party delivers: pages to apply, then possibly a sync point."""

    party: int
    pages: list[tuple[str, int, bytes | int]] = field(default_factory=list)  # data, or a fill
    sync: bool = False
    device_state: bytes = b""  # a whole device-state packet, kept for the tests to look at
    vfio: list[VfioData] = field(default_factory=list)


def main_units(data: bytes, chunk: int = 65536) -> Iterator[Unit | BlockList | Ended]:
    """The main stream's units; the block list and the end as they come."""
    parser = MainStreamParser()
    unit = Unit(MAIN)
    starts = range(0, len(data), chunk)
    for start in [*starts, None]:
        if start is None:
            parser.eof()
        else:
            parser.receive_data(data[start : start + chunk])
        while (event := parser.next_event()) is not None:
            if isinstance(event, ZeroPage):
                unit.pages.append((event.block, event.offset, event.fill))
            elif isinstance(event, Page):
                unit.pages.append((event.block, event.offset, event.data))
            elif isinstance(event, VfioData):
                unit.vfio.append(event)
            elif isinstance(event, SyncPoint):
                unit.sync = True
                yield unit
                unit = Unit(MAIN)
            elif isinstance(event, BlockList | Ended):
                if unit.pages or unit.vfio:
                    yield unit
                    unit = Unit(MAIN)
                yield event
    if unit.pages or unit.vfio:
        yield unit


def channel_units(
    data: bytes, channel: int, blocks: Callable[[], dict[str, RamBlock]]
) -> Iterator[Unit]:
    """A multifd channel's packets: RAM/SYNC packets parsed, device-state packets kept whole."""
    header_size = ram_header_size(PAGE)
    pos = HANDSHAKE.size
    while pos < len(data):
        (flags,) = struct.unpack_from(">I", data, pos + 8)
        if flags & PacketFlag.DEVICE_STATE:
            size = DEVICE_STATE_HEADER.unpack_from(data, pos)[5]
            end = pos + DEVICE_STATE_HEADER.size + size
            yield Unit(channel, device_state=data[pos:end])
            pos = end
            continue
        packet = parse_ram_packet(data[pos : pos + header_size], blocks())
        pos += header_size
        unit = Unit(channel, sync=packet.sync)
        if packet.block is not None:
            for index, offset in enumerate(packet.normal):
                page = data[pos + index * PAGE : pos + (index + 1) * PAGE]
                unit.pages.append((packet.block.name, offset, page))
            unit.pages += [(packet.block.name, offset, 0) for offset in packet.zero]
        pos += packet.data_size
        if pos > len(data):
            raise ValueError(f"channel {channel}: stream ends inside a packet's pages")
        yield unit


@dataclass
class Result:
    images: dict[str, bytearray]
    ended: Ended | None
    sync_points: int
    device_state: dict[int, list[bytes]]
    vfio: list[VfioData]
    order: list[int]  # the party of every unit applied, in order


def reconstruct(
    main: bytes,
    channels: Sequence[bytes],
    schedule: Callable[[list[int]], int] | None = None,
    *,
    barrier: bool = True,
) -> Result:
    """Apply every page in the order ``schedule`` picks among the parties that may be
    read (default: round robin); with ``barrier=False``, ignore sync points (the
    arrival-order writer the barrier exists to prevent)."""
    images: dict[str, bytearray] = {}
    block_table: dict[str, RamBlock] = {}
    result = Result(images, None, 0, {c: [] for c in range(len(channels))}, [], [])
    sources: dict[int, Iterator[Unit | BlockList | Ended]] = {MAIN: main_units(main)}
    for index, data in enumerate(channels):
        sources[index] = channel_units(data, index, lambda: block_table)
    sync = SyncBarrier(len(channels))
    held: set[int] = set()
    turn = 0
    while sources:
        # A channel cannot name a block before the main stream listed them.
        readable = sorted(p for p in sources if p not in held and (block_table or p == MAIN))
        if not readable:
            raise AssertionError(f"deadlock: every party is held ({sorted(held)})")
        if schedule is None:
            party = readable[turn % len(readable)]
            turn += 1
        else:
            party = schedule(readable)
        item = next(sources[party], None)
        if item is None:
            del sources[party]
            if barrier:
                sync.closed(party)
            continue
        if isinstance(item, BlockList):
            for block in item.blocks:
                block_table[block.name] = block
                images[block.name] = bytearray(block.used_length)
            continue
        if isinstance(item, Ended):
            result.ended = item
            continue
        result.order.append(party)
        for name, offset, page in item.pages:
            images[name][offset : offset + PAGE] = bytes([page]) * PAGE if isinstance(page, int) else page
        if item.device_state:
            result.device_state[party].append(item.device_state)
        result.vfio += item.vfio
        if item.sync and barrier:
            released = sync.reached(party)
            if released is None:
                held.add(party)
            else:
                held.difference_update(released.parties)
                result.sync_points = released.number
    return result
