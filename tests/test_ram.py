"""RAM packets (core/ram.py): the header's checks, and the sync barrier that orders rounds.

The barrier test that matters: one channel held back while the others run
ahead, and a page sent again in a later round on another channel must still
be the copy that stays, for every way of holding a channel back; writing in
arrival order instead gets it wrong (so the test can fail).
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from qemu.reconstruct import reconstruct

from vfio_multifd.core.ram import (
    MAIN,
    RAM_FIELDS,
    SyncBarrier,
    encode_ram_packet,
    parse_ram_packet,
    ram_header_size,
)
from vfio_multifd.core.savevm import RamBlock
from vfio_multifd.errors import ProtocolError, Reason
from vfio_multifd.source.qemu_like import qemu10_migration

PAGE = 4096
BLOCKS = {"pc.ram": RamBlock("pc.ram", 64 * PAGE), "/rom@etc/acpi/tables": RamBlock("/rom@etc/acpi/tables", 2 * PAGE)}
HEADER = ram_header_size()


def header_of(packet: bytes) -> bytes:
    return packet[:HEADER]


def with_field(packet: bytes, offset: int, value: bytes) -> bytes:
    return packet[:offset] + value + packet[offset + len(value) :]


def test_the_header_is_1344_bytes_on_x86() -> None:
    assert HEADER == 320 + 8 * 128 == 1344
    assert ram_header_size(16384) == 320 + 8 * 32


def test_normal_then_zero_pages() -> None:
    data = [bytes([n]) * PAGE for n in (1, 2)]
    packet = encode_ram_packet(
        block="pc.ram", normal=[(5 * PAGE, data[0]), (0, data[1])], zero=[7 * PAGE], packet_num=42
    )
    assert len(packet) == HEADER + 2 * PAGE
    parsed = parse_ram_packet(header_of(packet), BLOCKS)
    assert parsed.block == BLOCKS["pc.ram"]
    assert parsed.normal == (5 * PAGE, 0)
    assert parsed.zero == (7 * PAGE,)
    assert parsed.data_size == 2 * PAGE
    assert parsed.packet_num == 42 and parsed.pages_alloc == 128 and not parsed.sync
    assert packet[HEADER:] == b"".join(data)


def test_a_sync_packet_of_qemu_10_has_no_pages_and_pages_alloc_0() -> None:
    parsed = parse_ram_packet(header_of(encode_ram_packet(sync=True, packet_num=9)), BLOCKS)
    assert parsed.sync and parsed.block is None and parsed.data_size == 0
    assert parsed.pages_alloc == 0 and parsed.normal == () and parsed.zero == ()


def test_qemu_7_2_packets_stale_next_packet_size_and_sync_with_pages() -> None:
    """7.2: the zero_pages word is unused (zero), next_packet_size is left from an earlier
    packet, and the SYNC flag may ride on a packet with pages: the size is normal_pages x 4 KiB."""
    packet = encode_ram_packet(
        block="pc.ram", normal=[(PAGE, bytes(PAGE))], sync=True, next_packet_size=77 * PAGE
    )
    parsed = parse_ram_packet(header_of(packet), BLOCKS)
    assert parsed.sync and parsed.normal == (PAGE,) and parsed.data_size == PAGE
    assert parsed.next_packet_size == 77 * PAGE


def test_pages_of_a_block_named_in_the_block_list_only() -> None:
    packet = encode_ram_packet(block="pc.rom", zero=[0])
    with pytest.raises(ProtocolError) as raised:
        parse_ram_packet(header_of(packet), BLOCKS)
    assert raised.value.reason is Reason.RAM_BLOCK
    assert "RAMBlock 'pc.rom' is not in the main stream's block list" in str(raised.value)


@pytest.mark.parametrize(
    ("offset", "good"),
    [(0, True), (63 * PAGE, True), (64 * PAGE, False), (100, False), (1 << 63, False)],
)
def test_page_offsets_within_the_blocks_used_length(offset: int, good: bool) -> None:
    packet = encode_ram_packet(block="pc.ram", zero=[0, offset])
    if good:
        assert parse_ram_packet(header_of(packet), BLOCKS).zero == (0, offset)
        return
    with pytest.raises(ProtocolError) as raised:
        parse_ram_packet(header_of(packet), BLOCKS)
    assert raised.value.reason is Reason.RAM_OFFSET
    assert f"page offset {offset:#x} of RAMBlock pc.ram" in str(raised.value)
    assert "used length 0x40000" in str(raised.value)


FIELDS = 12  # the RAM fields start after the common header


@pytest.mark.parametrize(
    ("pages_alloc", "normal", "zero", "words"),
    [
        (129, 0, 0, "pages_alloc 129, at most 128"),
        (0xFFFFFFFF, 0, 0, "pages_alloc 4294967295, at most 128"),
        (4, 5, 0, "5 normal and 0 zero pages do not fit its pages_alloc 4"),
        (4, 2, 3, "2 normal and 3 zero pages do not fit its pages_alloc 4"),
        (128, 0xFFFFFFFF, 0, "4294967295 normal"),
    ],
)
def test_counts_are_checked_before_anything_is_read(pages_alloc: int, normal: int, zero: int, words: str) -> None:
    packet = encode_ram_packet(block="pc.ram", zero=[0])
    packet = with_field(packet, FIELDS, struct.pack(">II", pages_alloc, normal))
    packet = with_field(packet, FIELDS + 20, struct.pack(">I", zero))
    with pytest.raises(ProtocolError) as raised:
        parse_ram_packet(header_of(packet), BLOCKS)
    assert raised.value.reason is Reason.RAM_PACKET
    assert words in str(raised.value)


def test_ramblock_must_be_nul_terminated() -> None:
    packet = encode_ram_packet(block="pc.ram", zero=[0])
    packet = with_field(packet, FIELDS + RAM_FIELDS.size - 256, b"x" * 256)
    with pytest.raises(ProtocolError) as raised:
        parse_ram_packet(header_of(packet), BLOCKS)
    assert raised.value.reason is Reason.RAM_PACKET
    assert "ramblock is not NUL-terminated" in str(raised.value)


@pytest.mark.parametrize(
    ("flags", "reason", "words"),
    [
        (0x02, Reason.PACKET_COMPRESSION, "compressed with zlib"),
        (0x04, Reason.PACKET_COMPRESSION, "compressed with zstd"),
        (0x08 | 0x01, Reason.PACKET_COMPRESSION, "compressed with qpl"),
        (0x20, Reason.PACKET_COMPRESSION, "compressed with qatzip"),
        (0x80, Reason.PACKET_FLAGS, "unknown RAM packet flag bits 0x80"),
        (0x100, Reason.PACKET_FLAGS, "unknown RAM packet flag bits 0x100"),
    ],
)
def test_flags_refused_by_name(flags: int, reason: Reason, words: str) -> None:
    packet = with_field(encode_ram_packet(block="pc.ram", zero=[0]), 8, struct.pack(">I", flags))
    with pytest.raises(ProtocolError) as raised:
        parse_ram_packet(header_of(packet), BLOCKS)
    assert raised.value.reason is reason
    assert words in str(raised.value)


def test_misuse_is_a_value_error() -> None:
    packet = encode_ram_packet(block="pc.ram", zero=[0])
    with pytest.raises(ValueError, match="device-state packet"):
        parse_ram_packet(header_of(with_field(packet, 8, struct.pack(">I", 0x40))), BLOCKS)
    with pytest.raises(ValueError, match="1344 bytes"):
        parse_ram_packet(packet[:100], BLOCKS)


# -- the barrier ------------------------------------------------------------------------


def test_every_party_waits_until_all_reached_the_sync_point() -> None:
    barrier = SyncBarrier(2)
    assert barrier.reached(1) is None
    assert barrier.reached(MAIN) is None
    assert barrier.held == (1, MAIN)
    released = barrier.reached(0)
    assert released is not None and released.number == 1 and set(released.parties) == {1, MAIN}
    assert barrier.held == () and barrier.completed == 1
    assert barrier.reached(0) is None  # sync point 2
    with pytest.raises(ValueError, match="channel 0 is held at sync point 2"):
        barrier.reached(0)
    with pytest.raises(ValueError, match="no party 5"):
        barrier.reached(5)


def test_a_party_that_closes_while_others_wait_fails_the_migration() -> None:
    barrier = SyncBarrier(2)
    barrier.reached(0)
    with pytest.raises(ProtocolError) as raised:
        barrier.closed(1)
    assert raised.value.reason is Reason.RAM_SYNC
    assert "channel 1 closed after 0 sync points while channel 0 waited at sync point 1" in str(raised.value)
    later = SyncBarrier(2, main=False)
    later.closed(1)
    with pytest.raises(ProtocolError) as raised:
        later.reached(0)
    assert "channel 0 reached sync point 1, which channel 1 closed without reaching" in str(raised.value)


def running_guest(rounds: int, seed: int) -> list[dict[str, bytes]]:
    """A guest that rewrites the same pages every round (so each is resent every round)."""
    rng = random.Random(seed)
    images = []
    ram = bytearray(32 * PAGE)
    for number in range(rounds):
        for page in (1, 2, 3, 17, 30):
            ram[page * PAGE : page * PAGE + 8] = struct.pack(">II", number + 1, rng.getrandbits(32))
        images.append({"pc.ram": bytes(ram)})
    return images


def held_back(party: int):  # type: ignore[no-untyped-def]
    def pick(readable: list[int]) -> int:
        others = [p for p in readable if p != party]
        return others[0] if others else party
    return pick


@pytest.mark.parametrize("zero_pages", ["multifd", "legacy"])
@pytest.mark.parametrize("channels", [2, 3])
def test_a_page_sent_again_in_a_later_round_wins_when_a_channel_lags(channels: int, zero_pages: str) -> None:
    images = running_guest(4, seed=channels)
    streams = qemu10_migration(images, channels=channels, zero_pages=zero_pages)
    final = images[-1]["pc.ram"]
    wrong_in_arrival_order = 0
    for party in [MAIN, *range(channels)]:
        result = reconstruct(streams.main, streams.channels, held_back(party))
        assert result.images["pc.ram"] == final, f"{party} held back"
        assert result.sync_points == streams.sync_points == 5
        naive = reconstruct(streams.main, streams.channels, held_back(party), barrier=False)
        wrong_in_arrival_order += naive.images["pc.ram"] != final
    assert wrong_in_arrival_order, "no schedule broke the arrival-order writer: the test shows nothing"


@hsettings(max_examples=60, deadline=None)
@given(st.integers(2, 4), st.integers(1, 4), st.randoms(use_true_random=False))
def test_any_arrival_order_through_the_barrier_gives_the_last_round(channels: int, rounds: int, rng: random.Random) -> None:
    images = running_guest(rounds, seed=rounds)
    streams = qemu10_migration(images, channels=channels)
    result = reconstruct(streams.main, streams.channels, lambda readable: rng.choice(readable))
    assert result.images["pc.ram"] == images[-1]["pc.ram"]
