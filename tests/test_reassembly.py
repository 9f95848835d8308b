"""The pure reassembly buffer (vfio_multifd.core.reassembly), without any event loop.

One behaviour per test; each asserts the result and the buffer's internal state
(chunks by idx, next_idx, last_idx, max_idx, byte accounting). A hypothesis
state machine then compares the buffer against a trivial model.
"""

from __future__ import annotations

import sys
import tracemalloc
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vfio_multifd.core.reassembly import Chunk, ChunkState, DeviceBuffer, ReassemblyBuffer
from vfio_multifd.core.wire import DeviceKey, DevicePacket, PacketHeader
from vfio_multifd.errors import ProtocolError, Reason

IDSTR = "0000:00:02.0/vfio"
IDSTR_B = "0000:00:03.0/vfio"
KEY = DeviceKey(IDSTR)
KEY_B = DeviceKey(IDSTR_B, 1)


def chunk(idx: int, size: int = 4, config: bool = False, key: DeviceKey = KEY) -> Chunk:
    return Chunk(key, idx, size, config, bytearray([idx & 0xFF]) * size)


def packet(idx: int, size: int = 4, config: bool = False, key: DeviceKey = KEY) -> DevicePacket:
    return DevicePacket(key, idx, config, bytearray([idx & 0xFF]) * size, size)


def header(idx: int, size: int = 4, config: bool = False, key: DeviceKey = KEY) -> PacketHeader:
    return PacketHeader(key, idx, config, size)


def device_with(*idxs: int, config_at: int | None = None) -> DeviceBuffer:
    device = DeviceBuffer(KEY)
    for idx in idxs:
        device.insert(chunk(idx))
    if config_at is not None:
        device.insert(chunk(config_at, config=True))
    return device


def raises(reason: Reason, call: Callable[..., object], *args: object) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        call(*args)
    assert info.value.reason is reason
    return info.value


# --- DeviceBuffer: order -------------------------------------------------------------


def test_in_order_insert_then_take() -> None:
    device = DeviceBuffer(KEY)
    first = chunk(0)
    device.insert(first)
    assert device.ready
    assert device.max_idx == 0
    assert device.take_ready(1 << 20) == [first]
    assert first.state is ChunkState.TAKEN
    assert device.next_idx == 1
    assert device.chunks == {}
    assert not device.ready


def test_take_ready_with_nothing_ready_returns_nothing() -> None:
    device = DeviceBuffer(KEY)
    assert device.take_ready(1 << 20) == []
    assert device.next_idx == 0


def test_out_of_order_chunks_wait_for_the_missing_one() -> None:
    device = device_with(2, 1)
    assert not device.ready
    assert device.take_ready(1 << 20) == []
    assert sorted(device.chunks) == [1, 2]
    assert device.next_idx == 0
    assert device.max_idx == 2
    device.insert(chunk(0))
    assert [c.idx for c in device.take_ready(1 << 20)] == [0, 1, 2]
    assert device.next_idx == 3
    assert device.chunks == {}


def test_take_ready_stops_at_a_gap() -> None:
    device = device_with(0, 1, 3)
    assert [c.idx for c in device.take_ready(1 << 20)] == [0, 1]
    assert device.next_idx == 2
    assert list(device.chunks) == [3]


# --- DeviceBuffer: what is illegal ---------------------------------------------------


def test_duplicate_of_a_queued_idx_is_already_filled() -> None:
    device = device_with(3)
    original = device.chunks[3]
    error = raises(Reason.VFIO_ALREADY_FILLED, device.insert, chunk(3))
    assert (error.device, error.idx) == (IDSTR, 3)
    assert str(error) == f"device {IDSTR}: state buffer 3 already filled"
    assert device.chunks == {3: original}


def test_duplicate_of_a_written_idx_is_already_filled() -> None:
    device = device_with(0, 1)
    device.take_ready(1 << 20)
    error = raises(Reason.VFIO_ALREADY_FILLED, device.insert, chunk(0))
    assert (error.device, error.idx) == (IDSTR, 0)
    assert "state buffer 0 already filled" in str(error)
    assert device.chunks == {}
    assert device.next_idx == 2


def test_config_at_an_already_filled_idx_is_already_filled() -> None:
    device = device_with(2)
    raises(Reason.VFIO_ALREADY_FILLED, device.insert, chunk(2, config=True))
    assert device.last_idx is None
    assert device.chunks[2].config is False


def test_chunk_after_the_config_is_refused() -> None:
    device = device_with(0, config_at=2)
    error = raises(Reason.VFIO_AFTER_CONFIG, device.insert, chunk(3))
    assert (error.device, error.idx) == (IDSTR, 3)
    assert "state buffer 3" in str(error) and "idx 2" in str(error)
    assert sorted(device.chunks) == [0, 2]
    assert device.max_idx == 2


def test_chunk_after_a_written_config_is_refused() -> None:
    device = device_with(0, config_at=1)
    device.take_ready(1 << 20)
    device.take_ready(1 << 20)
    assert device.next_idx == 2
    error = raises(Reason.VFIO_AFTER_CONFIG, device.insert, chunk(5))
    assert error.idx == 5


def test_config_below_an_idx_already_seen_is_refused() -> None:
    device = device_with(0, 6)
    error = raises(Reason.VFIO_AFTER_CONFIG, device.insert, chunk(4, config=True))
    assert (error.device, error.idx) == (IDSTR, 6)
    assert "state buffer 6" in str(error) and "idx 4" in str(error)
    assert device.last_idx is None
    assert sorted(device.chunks) == [0, 6]


def test_config_at_a_written_idx_is_already_filled() -> None:
    device = device_with(0, 1, 2)
    device.take_ready(1 << 20)
    error = raises(Reason.VFIO_ALREADY_FILLED, device.insert, chunk(1, config=True))
    assert error.idx == 1
    assert device.last_idx is None
    assert device.next_idx == 3


def test_config_right_after_written_data_is_accepted() -> None:
    device = device_with(0, 1, 2)
    device.take_ready(1 << 20)
    device.insert(chunk(3, config=True))
    assert device.last_idx == 3
    assert device.ready


def test_second_config_is_refused() -> None:
    device = device_with(config_at=4)
    error = raises(Reason.VFIO_SECOND_CONFIG, device.insert, chunk(5, config=True))
    assert (error.device, error.idx) == (IDSTR, 5)
    assert "second config" in str(error) and "idx 4" in str(error)
    assert device.last_idx == 4
    assert list(device.chunks) == [4]


def test_second_config_below_the_first_is_refused() -> None:
    device = device_with(config_at=4)
    error = raises(Reason.VFIO_SECOND_CONFIG, device.insert, chunk(2, config=True))
    assert error.idx == 2
    assert device.last_idx == 4
    assert device.max_idx == 4


def test_config_first_then_data() -> None:
    device = device_with(config_at=3)
    assert device.last_idx == 3
    assert device.max_idx == 3
    assert not device.ready
    for idx in (1, 0, 2):
        device.insert(chunk(idx))
    assert [c.idx for c in device.take_ready(1 << 20)] == [0, 1, 2]
    (config,) = device.take_ready(1 << 20)
    assert (config.idx, config.config) == (3, True)
    assert device.next_idx == 4
    assert device.chunks == {}


def test_config_at_idx_0_for_a_device_without_data() -> None:
    device = device_with(config_at=0)
    assert device.ready
    (config,) = device.take_ready(1 << 20)
    assert config.config and device.next_idx == 1


# --- DeviceBuffer: batching ----------------------------------------------------------


def test_take_ready_respects_max_bytes() -> None:
    device = DeviceBuffer(KEY)
    for idx in range(5):
        device.insert(chunk(idx, size=10))
    assert [c.idx for c in device.take_ready(25)] == [0, 1]
    assert [c.idx for c in device.take_ready(30)] == [2, 3, 4]
    assert device.next_idx == 5


def test_take_ready_takes_one_chunk_even_over_max_bytes() -> None:
    device = device_with(0, 1)
    assert [c.idx for c in device.take_ready(1)] == [0]
    assert device.next_idx == 1
    assert list(device.chunks) == [1]


def test_config_chunk_is_taken_alone() -> None:
    device = device_with(0, 1, config_at=2)
    assert [c.idx for c in device.take_ready(1 << 30)] == [0, 1]
    assert list(device.chunks) == [2]
    batch = device.take_ready(1 << 30)
    assert [(c.idx, c.config) for c in batch] == [(2, True)]
    assert device.take_ready(1 << 30) == []


def test_spilling_chunk_is_not_ready() -> None:
    device = device_with(0, 1)
    device.chunks[0].state = ChunkState.SPILLING
    assert not device.ready
    assert device.take_ready(1 << 20) == []
    device.chunks[0].state = ChunkState.SPILLED
    assert device.ready
    taken = device.take_ready(1 << 20)
    assert [c.idx for c in taken] == [0, 1]
    assert taken[0].state is ChunkState.SPILLED  # the adapter reads it back from disk
    assert taken[1].state is ChunkState.TAKEN


def test_batch_stops_before_a_spilling_chunk() -> None:
    device = device_with(0, 1, 2)
    device.chunks[1].state = ChunkState.SPILLING
    assert [c.idx for c in device.take_ready(1 << 20)] == [0]
    assert device.next_idx == 1


# --- DeviceBuffer: memory does not grow with idx ---------------------------------------


def test_huge_idx_costs_constant_memory() -> None:
    device = DeviceBuffer(KEY)
    tracemalloc.start()
    try:
        device.insert(chunk(2**32 - 2, size=8))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    assert len(device.chunks) == 1
    assert sys.getsizeof(device.chunks) < 4096
    assert device.max_idx == 2**32 - 2
    assert device.take_ready(1 << 20) == []


def test_huge_idx_through_the_reassembly_buffer() -> None:
    buffer = ReassemblyBuffer([KEY])
    tracemalloc.start()
    try:
        buffer.insert(packet(2**32 - 2, size=8, config=True))
        buffer.insert(packet(2**31, size=8))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    assert sorted(buffer.devices[KEY].chunks) == [2**31, 2**32 - 2]
    assert buffer.queued_bytes == 16


# --- DeviceBuffer: missing() -----------------------------------------------------------


def test_missing_ranges_and_the_config_state() -> None:
    device = device_with(3, 4, 6)
    assert device.missing() == (
        "missing 4 chunks (idx 0-2, 5: about 16 bytes at 4 bytes a chunk), and the config "
        "state packet never came, nor anything after idx 6 (the highest received)"
    )


def test_missing_with_nothing_received() -> None:
    assert DeviceBuffer(KEY).missing() == "nothing came: no chunk and no config state packet"


def test_missing_only_the_config_state() -> None:
    """Issue 16: was "missing idx the config state packet (after idx 2)"."""
    device = device_with(0, 1, 2)
    device.take_ready(1 << 20)
    assert device.missing() == (
        "the config state packet never came, nor anything after idx 2 "
        "(the highest received; every chunk up to it came)"
    )


def test_missing_after_the_config_came() -> None:
    device = device_with(0, 2, 5, config_at=7)
    device.take_ready(1 << 20)
    assert device.missing() == "missing 4 of 7 chunks (idx 1, 3-4, 6: about 16 bytes at 4 bytes a chunk)"


def test_missing_bytes_at_the_size_written_when_none_is_held() -> None:
    device = device_with(0, 1, config_at=4)
    device.take_ready(1 << 20)
    device.bytes_written, device.chunks_written = 2 * 1000, 2  # as ReassemblyBuffer.release
    assert device.missing() == "missing 2 of 4 chunks (idx 2-3: about 2000 bytes at 1000 bytes a chunk)"


def test_missing_chunks_of_unknown_size() -> None:
    device = device_with(config_at=3)
    assert device.missing() == "missing 3 of 3 chunks (idx 0-2)"


def test_missing_one_chunk_of_several_and_one_of_one() -> None:
    assert device_with(1, config_at=2).missing() == (
        "missing 1 of 2 chunks (idx 0: about 4 bytes at 4 bytes a chunk)"
    )
    assert device_with(config_at=1).missing() == "missing 1 of 1 chunk (idx 0)"
    assert device_with(1).missing() == (
        "missing 1 chunk (idx 0: about 4 bytes at 4 bytes a chunk), and the config state "
        "packet never came, nor anything after idx 1 (the highest received)"
    )


def test_missing_lists_the_first_ranges_and_counts_the_rest() -> None:
    device = device_with(*range(0, 40, 2))
    assert device.missing() == (
        "missing 19 chunks (idx 1, 3, 5, 7, 9, 11, 13, 15 and 11 more ranges: about 76 bytes "
        "at 4 bytes a chunk), and the config state packet never came, nor anything after "
        "idx 38 (the highest received)"
    )


def test_missing_of_a_complete_device_is_empty() -> None:
    device = device_with(0, config_at=1)
    device.take_ready(1 << 20)
    device.take_ready(1 << 20)
    assert device.missing() == ""


@pytest.mark.timeout(10)
def test_missing_with_a_huge_gap_is_fast() -> None:
    """The message walks the chunks held, not the indices absent (a hang would time out)."""
    device = DeviceBuffer(KEY)
    device.insert(chunk(2**32 - 2))
    assert device.missing() == (
        "missing 4294967294 chunks (idx 0-4294967293: about 17179869176 bytes at 4 bytes a "
        "chunk), and the config state packet never came, nor anything after idx 4294967294 "
        "(the highest received)"
    )


# --- ReassemblyBuffer: routing and accounting ------------------------------------------


def test_unknown_device_is_refused() -> None:
    buffer = ReassemblyBuffer([KEY, KEY_B])
    stranger = DeviceKey("0000:00:09.0/vfio", 2)
    with pytest.raises(ProtocolError) as info:
        buffer.insert(packet(0, key=stranger))
    error = info.value
    assert error.reason is Reason.UNKNOWN_DEVICE
    assert error.device == str(stranger)
    assert "(idstr '0000:00:09.0/vfio', instance 2)" in str(error)
    assert IDSTR in str(error) and IDSTR_B in str(error)  # what was expected
    assert buffer.queued_bytes == 0
    assert set(buffer.devices) == {KEY, KEY_B}


def test_same_idstr_other_instance_is_unknown() -> None:
    buffer = ReassemblyBuffer([KEY])
    with pytest.raises(ProtocolError) as info:
        buffer.device(DeviceKey(IDSTR, 1))
    assert info.value.reason is Reason.UNKNOWN_DEVICE


def test_devices_have_independent_idx_sequences() -> None:
    buffer = ReassemblyBuffer([KEY, KEY_B])
    buffer.insert(packet(0, key=KEY))
    buffer.insert(packet(0, key=KEY_B))
    assert list(buffer.devices[KEY].chunks) == [0]
    assert list(buffer.devices[KEY_B].chunks) == [0]
    assert buffer.queued_bytes == 8


def test_insert_returns_the_queued_chunk() -> None:
    buffer = ReassemblyBuffer([KEY])
    pkt = packet(2, size=6)
    queued = buffer.insert(pkt)
    assert (queued.device, queued.idx, queued.size, queued.config) == (KEY, 2, 6, False)
    assert queued.buffer is pkt.buffer  # no copy
    assert queued.state is ChunkState.MEMORY
    assert buffer.devices[KEY].chunks == {2: queued}


def test_queued_bytes_through_insert_and_release() -> None:
    buffer = ReassemblyBuffer([KEY])
    for idx, size in enumerate((10, 20, 30)):
        buffer.insert(packet(idx, size=size))
    assert (buffer.queued_bytes, buffer.peak_queued_bytes) == (60, 60)
    device = buffer.devices[KEY]
    taken = buffer.take(device, 30)
    assert [c.idx for c in taken] == [0, 1]
    assert buffer.queued_bytes == 60  # taken but not yet written still counts
    assert buffer.taken_bytes == 30
    buffer.release(taken)
    assert (buffer.queued_bytes, buffer.peak_queued_bytes) == (30, 60)
    assert buffer.taken_bytes == 0
    assert (device.bytes_written, device.chunks_written) == (30, 2)
    assert all(c.buffer is None for c in taken)
    buffer.insert(packet(3, size=5))
    assert (buffer.queued_bytes, buffer.peak_queued_bytes) == (35, 60)


def test_refused_insert_does_not_count_bytes() -> None:
    buffer = ReassemblyBuffer([KEY])
    buffer.insert(packet(0, size=10))
    with pytest.raises(ProtocolError):
        buffer.insert(packet(0, size=10))
    assert (buffer.queued_bytes, buffer.peak_queued_bytes) == (10, 10)


def test_release_of_the_config_completes_the_device() -> None:
    buffer = ReassemblyBuffer([KEY, KEY_B])
    buffer.insert(packet(0, size=10))
    buffer.insert(packet(1, size=24, config=True))
    device = buffer.devices[KEY]
    buffer.release(buffer.take(device, 1 << 20))
    assert not device.complete
    buffer.release(buffer.take(device, 1 << 20))
    assert device.complete
    assert (device.bytes_written, device.chunks_written) == (10, 1)  # config not counted as data
    assert buffer.queued_bytes == 0
    assert buffer.incomplete_devices() == [buffer.devices[KEY_B]]


def test_buffer_complete_when_every_device_is() -> None:
    buffer = ReassemblyBuffer([KEY, KEY_B])
    for key in (KEY, KEY_B):
        buffer.insert(packet(0, config=True, key=key))
        buffer.release(buffer.take(buffer.devices[key], 1))
    assert buffer.incomplete_devices() == []


# --- limits ----------------------------------------------------------------------


def test_fits_without_a_bound() -> None:
    buffer = ReassemblyBuffer([KEY])
    buffer.insert(packet(0, size=1000))
    assert buffer.fits(1 << 40)


def test_fits_against_the_bound() -> None:
    buffer = ReassemblyBuffer([KEY], max_queued_bytes=100)
    buffer.insert(packet(0, size=60))
    assert buffer.fits(40)
    assert not buffer.fits(41)
    assert buffer.fits(0)


def test_queue_full_error_names_device_idx_and_bound() -> None:
    buffer = ReassemblyBuffer([KEY_B], max_queued_bytes=100)
    buffer.insert(packet(0, size=60, key=KEY_B))
    assert not buffer.fits(41)
    error = buffer.queue_full_error(packet(7, size=41, key=KEY_B))
    assert error.reason is Reason.QUEUE_FULL
    assert (error.device, error.idx) == (str(KEY_B), 7)
    text = str(error)
    assert IDSTR_B in text
    assert "state buffer 7" in text
    assert "101" in text and "100" in text
    assert buffer.queued_bytes == 60
    assert list(buffer.devices[KEY_B].chunks) == [0]


# --- spilling ----------------------------------------------------------------------


def test_spill_victim_is_furthest_from_its_device_next_idx() -> None:
    buffer = ReassemblyBuffer([KEY, KEY_B])
    # KEY: next 0, holds 1 and 5 (distances 1, 5)
    buffer.insert(packet(1, key=KEY))
    buffer.insert(packet(5, key=KEY))
    # KEY_B: next 10 after writing 0..9, holds 10 (distance 0) and 12 (distance 2)
    for idx in range(10):
        buffer.insert(packet(idx, key=KEY_B))
    buffer.release(buffer.take(buffer.devices[KEY_B], 1 << 20))
    buffer.insert(packet(10, key=KEY_B))
    buffer.insert(packet(12, key=KEY_B))
    victim = buffer.spill_victim()
    assert victim is not None
    assert (victim.device, victim.idx) == (KEY, 5)


def test_spill_victim_uses_distance_not_absolute_idx() -> None:
    buffer = ReassemblyBuffer([KEY, KEY_B])
    buffer.insert(packet(3, key=KEY))  # distance 3
    for idx in range(10):
        buffer.insert(packet(idx, key=KEY_B))
    buffer.release(buffer.take(buffer.devices[KEY_B], 1 << 20))
    buffer.insert(packet(12, key=KEY_B))  # idx 12 but distance 2
    victim = buffer.spill_victim()
    assert victim is not None
    assert (victim.device, victim.idx) == (KEY, 3)


def test_spill_victim_never_the_next_needed_chunk() -> None:
    buffer = ReassemblyBuffer([KEY, KEY_B])
    buffer.insert(packet(0, size=1 << 20, key=KEY))
    buffer.insert(packet(0, size=1 << 20, key=KEY_B))
    assert buffer.spill_victim() is None
    buffer.insert(packet(1, size=1, key=KEY))
    victim = buffer.spill_victim()
    assert victim is not None and (victim.device, victim.idx) == (KEY, 1)


def test_spill_victim_skips_chunks_not_in_memory() -> None:
    buffer = ReassemblyBuffer([KEY])
    for idx in (2, 4):
        buffer.insert(packet(idx))
    far = buffer.devices[KEY].chunks[4]
    buffer.spill_started(far)
    victim = buffer.spill_victim()
    assert victim is not None and victim.idx == 2
    buffer.spill_done(far, "ref")
    victim = buffer.spill_victim()
    assert victim is not None and victim.idx == 2


def test_spill_victim_of_an_empty_buffer() -> None:
    assert ReassemblyBuffer([KEY]).spill_victim() is None


def test_spill_started_keeps_bytes_in_memory_and_blocks_taking() -> None:
    buffer = ReassemblyBuffer([KEY])
    queued = buffer.insert(packet(0, size=10))
    buffer.spill_started(queued)
    assert queued.state is ChunkState.SPILLING
    assert buffer.queued_bytes == 10
    assert buffer.spilling_bytes == 10
    assert (buffer.spilled_bytes, buffer.spilled_now) == (0, 0)
    assert not buffer.devices[KEY].ready


def test_spill_done_moves_bytes_out_of_memory() -> None:
    buffer = ReassemblyBuffer([KEY])
    buffer.insert(packet(0, size=10))
    queued = buffer.insert(packet(3, size=30))
    original = queued.buffer
    buffer.spill_started(queued)
    freed = buffer.spill_done(queued, ("spill-file", 0))
    assert freed is original
    assert queued.buffer is None
    assert queued.spill_ref == ("spill-file", 0)
    assert queued.state is ChunkState.SPILLED
    assert buffer.queued_bytes == 10
    assert buffer.peak_queued_bytes == 40
    assert buffer.spilling_bytes == 0
    assert (buffer.spilled_bytes, buffer.spilled_now) == (30, 30)


def test_release_of_a_spilled_chunk() -> None:
    buffer = ReassemblyBuffer([KEY])
    queued = buffer.insert(packet(0, size=30))
    buffer.spill_started(queued)
    buffer.spill_done(queued, "ref")
    taken = buffer.take(buffer.devices[KEY], 1 << 20)
    assert taken == [queued]
    assert buffer.taken_bytes == 0  # read back from disk, not held in memory
    buffer.release(taken)
    assert buffer.queued_bytes == 0
    assert (buffer.spilled_bytes, buffer.spilled_now) == (30, 0)
    assert buffer.devices[KEY].bytes_written == 30


def test_insert_spilled_counts_on_disk_not_in_memory() -> None:
    buffer = ReassemblyBuffer([KEY], max_queued_bytes=10)
    queued = buffer.insert_spilled(packet(2, size=50), "ref")
    assert (queued.state, queued.buffer, queued.spill_ref) == (ChunkState.SPILLED, None, "ref")
    assert (buffer.queued_bytes, buffer.peak_queued_bytes) == (0, 0)
    assert (buffer.spilled_bytes, buffer.spilled_now) == (50, 50)
    assert buffer.devices[KEY].chunks == {2: queued}
    with pytest.raises(ProtocolError) as info:
        buffer.insert_spilled(packet(2, size=50), "ref2")
    assert info.value.reason is Reason.VFIO_ALREADY_FILLED
    assert buffer.spilled_now == 50


# --- issue 20 item 5: an idx is reserved by its header ------------------------------------


@pytest.mark.parametrize("queued_first", [False, True], ids=["announced", "queued"])
def test_a_second_header_for_an_idx_is_refused_whichever_came_first(queued_first: bool) -> None:
    buffer = ReassemblyBuffer([KEY])
    if queued_first:  # channel 1's chunk 0 is already queued
        buffer.announce(header(0), 1)
        buffer.insert(packet(0), 1)
    else:  # channel 1's header came, its payload has not (or never will)
        buffer.announce(header(0), 1)
    error = raises(Reason.VFIO_ALREADY_FILLED, buffer.announce, header(0), 0)
    assert (error.device, error.idx) == (str(KEY), 0)
    assert "state buffer 0 already filled" in error.message
    if not queued_first:
        assert "channel 1 announced it first" in error.message
    assert buffer.devices[KEY].announced == ({} if queued_first else {0: 1})


def test_a_packet_of_an_idx_another_channel_announced_is_refused() -> None:
    buffer = ReassemblyBuffer([KEY])
    buffer.announce(header(0), 1)
    raises(Reason.VFIO_ALREADY_FILLED, buffer.insert, packet(0), 0)
    assert buffer.devices[KEY].chunks == {} and buffer.queued_bytes == 0
    queued = buffer.insert(packet(0), 1)  # its own header's: queued, reservation gone
    assert buffer.devices[KEY].chunks == {0: queued}
    assert buffer.devices[KEY].announced == {}


def test_an_announced_config_packet_counts_as_the_config() -> None:
    buffer = ReassemblyBuffer([KEY])
    buffer.announce(header(3, config=True), 0)
    device = buffer.devices[KEY]
    assert (device.last_idx, device.announced_last) == (None, 3)
    raises(Reason.VFIO_AFTER_CONFIG, buffer.announce, header(4), 1)
    raises(Reason.VFIO_SECOND_CONFIG, buffer.announce, header(5, config=True), 1)
    buffer.announce(header(2), 1)  # before the config: legal
    buffer.insert(packet(3, config=True), 0)
    assert (device.last_idx, device.announced_last, device.announced) == (3, None, {2: 1})


def test_a_config_header_below_an_announced_idx_is_refused() -> None:
    buffer = ReassemblyBuffer([KEY])
    buffer.announce(header(7), 1)
    error = raises(Reason.VFIO_AFTER_CONFIG, buffer.announce, header(5, config=True), 0)
    assert error.idx == 7
    assert buffer.devices[KEY].announced == {7: 1}


def test_a_second_header_for_an_announced_idx_is_refused_even_from_its_channel() -> None:
    buffer = ReassemblyBuffer([KEY])
    buffer.announce(header(3, config=True), 1)
    error = raises(Reason.VFIO_ALREADY_FILLED, buffer.announce, header(3), 1)
    assert str(error).endswith("state buffer 3 already filled")
    device = buffer.devices[KEY]
    assert (device.announced, device.announced_last) == ({3: 1}, 3)  # still the config's


def test_a_refused_header_reserves_nothing() -> None:
    buffer = ReassemblyBuffer([KEY])
    buffer.insert(packet(0))
    raises(Reason.VFIO_ALREADY_FILLED, buffer.announce, header(0), 1)
    raises(Reason.UNKNOWN_DEVICE, buffer.announce, header(1, key=KEY_B), 1)
    assert buffer.devices[KEY].announced == {}


def test_a_failed_channels_reservations_are_dropped() -> None:
    buffer = ReassemblyBuffer([KEY, KEY_B])
    buffer.announce(header(0), 1)
    buffer.announce(header(1), 0)
    buffer.announce(header(0, config=True, key=KEY_B), 1)
    buffer.channel_failed(1)
    assert buffer.devices[KEY].announced == {1: 0}
    assert (buffer.devices[KEY_B].announced, buffer.devices[KEY_B].announced_last) == ({}, None)
    buffer.announce(header(0), 0)  # nobody else will bring it now
    buffer.announce(header(0, config=True, key=KEY_B), 0)
    assert buffer.devices[KEY].announced == {0: 0, 1: 0}


# --- a model-based check -----------------------------------------------------------

DEVICES = (KEY, KEY_B)


class Model:
    """What a device's queue must be, in the plainest terms."""

    def __init__(self) -> None:
        self.received: dict[int, int] = {}  # idx -> size, every accepted chunk
        self.config_idx: int | None = None
        self.next_idx = 0
        self.written = 0
        self.written_chunks = 0
        self.complete = False
        self.announced: dict[int, tuple[int, bool]] = {}  # idx -> (channel, config), not queued

    def outcome(self, idx: int, config: bool, channel: int | None = None) -> Reason | None:
        """Announced chunks count as received, except ``idx``'s own (by ``channel``)."""
        if idx in self.received:
            return Reason.VFIO_ALREADY_FILLED
        if idx in self.announced and self.announced[idx][0] != channel:
            return Reason.VFIO_ALREADY_FILLED
        others = {i: cfg for i, (_, cfg) in self.announced.items() if i != idx}
        config_idx = self.config_idx
        if config_idx is None:
            config_idx = next((i for i, cfg in others.items() if cfg), None)
        if config:
            if config_idx is not None:
                return Reason.VFIO_SECOND_CONFIG
            if max([*self.received, *others], default=-1) > idx:
                return Reason.VFIO_AFTER_CONFIG
            return None
        if config_idx is not None and idx > config_idx:
            return Reason.VFIO_AFTER_CONFIG
        return None

    def waiting(self) -> set[int]:
        return {idx for idx in self.received if idx >= self.next_idx}

    def missing(self) -> str:
        highest = max(self.received, default=-1)
        end = highest if self.config_idx is None else self.config_idx
        absent = [i for i in range(self.next_idx, end + 1) if i not in self.received]
        spans: list[list[int]] = []
        for idx in absent:
            if spans and spans[-1][1] == idx - 1:
                spans[-1][1] = idx
            else:
                spans.append([idx, idx])
        text = ""
        if absent:
            shown = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans[:8])
            if len(spans) > 8:
                shown += f" and {len(spans) - 8} more ranges"
            held = [
                size
                for idx, size in self.received.items()
                if idx >= self.next_idx and idx != self.config_idx
            ]
            size = max(held) if held else None
            if size is None and self.written_chunks:
                size = -(-self.written // self.written_chunks)
            about = "" if size is None else f": about {len(absent) * size} bytes at {size} bytes a chunk"
            of = "" if self.config_idx is None else f" of {self.config_idx}"
            total = len(absent) if self.config_idx is None else self.config_idx
            plural = "s" if total != 1 else ""
            text = f"missing {len(absent)}{of} chunk{plural} (idx {shown}{about})"
        if self.config_idx is not None:
            return text
        if highest < 0:
            return "nothing came: no chunk and no config state packet"
        tail = f"the config state packet never came, nor anything after idx {highest} (the highest received"
        tail += ")" if absent else "; every chunk up to it came)"
        return f"{text}, and {tail}" if text else tail


class ReassemblyMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.buffer = ReassemblyBuffer(DEVICES)
        self.models = {key: Model() for key in DEVICES}
        self.in_memory = 0  # bytes accepted and not yet released
        self.peak = 0
        self.unreleased: list[Chunk] = []

    @rule(
        key=st.sampled_from(DEVICES),
        idx=st.integers(0, 12),
        config=st.booleans(),
        size=st.integers(0, 40),
    )
    def insert(self, key: DeviceKey, idx: int, config: bool, size: int) -> None:
        model = self.models[key]
        expected = model.outcome(idx, config)
        if expected is None:
            queued = self.buffer.insert(packet(idx, size=size, config=config, key=key))
            assert (queued.idx, queued.size, queued.config) == (idx, size, config)
            self._queued(model, idx, size, config)
        else:
            with pytest.raises(ProtocolError) as info:
                self.buffer.insert(packet(idx, size=size, config=config, key=key))
            assert info.value.reason is expected
            assert info.value.device == str(key)

    @rule(
        key=st.sampled_from(DEVICES),
        idx=st.integers(0, 12),
        config=st.booleans(),
        channel=st.integers(0, 2),
    )
    def announce(self, key: DeviceKey, idx: int, config: bool, channel: int) -> None:
        model = self.models[key]
        expected = model.outcome(idx, config, channel)
        if idx in model.announced:  # a second header for it, even from its own channel
            expected = Reason.VFIO_ALREADY_FILLED
        if expected is None:
            self.buffer.announce(header(idx, config=config, key=key), channel)
            model.announced[idx] = (channel, config)
        else:
            with pytest.raises(ProtocolError) as info:
                self.buffer.announce(header(idx, config=config, key=key), channel)
            assert info.value.reason is expected
            assert (info.value.device, info.value.idx is not None) == (str(key), True)

    @precondition(lambda self: any(m.announced for m in self.models.values()))
    @rule(data=st.data(), size=st.integers(0, 40))
    def insert_announced(self, data: st.DataObject, size: int) -> None:
        """An announced chunk's payload came: it is queued, whatever came meanwhile."""
        key = data.draw(st.sampled_from([k for k, m in self.models.items() if m.announced]))
        model = self.models[key]
        idx = data.draw(st.sampled_from(sorted(model.announced)))
        channel, config = model.announced.pop(idx)
        self.buffer.insert(packet(idx, size=size, config=config, key=key), channel)
        self._queued(model, idx, size, config)

    def _queued(self, model: Model, idx: int, size: int, config: bool) -> None:
        model.received[idx] = size
        if config:
            model.config_idx = idx
        self.in_memory += size
        self.peak = max(self.peak, self.in_memory)

    @rule(channel=st.integers(0, 2))
    def channel_failed(self, channel: int) -> None:
        self.buffer.channel_failed(channel)
        for model in self.models.values():
            model.announced = {i: a for i, a in model.announced.items() if a[0] != channel}

    @rule(idx=st.integers(0, 3))
    def insert_unknown_device(self, idx: int) -> None:
        with pytest.raises(ProtocolError) as info:
            self.buffer.insert(packet(idx, key=DeviceKey("nobody")))
        assert info.value.reason is Reason.UNKNOWN_DEVICE

    @rule(key=st.sampled_from(DEVICES), max_bytes=st.integers(0, 100))
    def take_ready(self, key: DeviceKey, max_bytes: int) -> None:
        model = self.models[key]
        expected: list[int] = []
        total = 0
        idx = model.next_idx
        while idx in model.received:
            is_config = idx == model.config_idx
            if expected and (total + model.received[idx] > max_bytes or is_config):
                break
            expected.append(idx)
            total += model.received[idx]
            idx += 1
            if is_config:
                break
        taken = self.buffer.take(self.buffer.devices[key], max_bytes)
        assert [c.idx for c in taken] == expected
        assert all(c.state is ChunkState.TAKEN for c in taken)
        model.next_idx += len(expected)
        self.unreleased.extend(taken)

    @precondition(lambda self: self.unreleased)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        count = data.draw(st.integers(1, len(self.unreleased)))
        batch, self.unreleased = self.unreleased[:count], self.unreleased[count:]
        self.buffer.release(batch)
        for c in batch:
            self.in_memory -= c.size
            model = self.models[c.device]
            if c.config:
                model.complete = True
            else:
                model.written += c.size
                model.written_chunks += 1

    @invariant()
    def matches_the_model(self) -> None:
        assert self.buffer.queued_bytes == self.in_memory
        assert self.buffer.peak_queued_bytes == self.peak
        assert self.buffer.taken_bytes == sum(c.size for c in self.unreleased)
        assert self.buffer.spilling_bytes == 0
        for key, model in self.models.items():
            device = self.buffer.devices[key]
            assert device.next_idx == model.next_idx
            assert device.last_idx == model.config_idx
            assert device.max_idx == max(model.received, default=-1)
            assert set(device.chunks) == model.waiting()
            assert device.ready == (model.next_idx in model.received)
            assert device.bytes_written == model.written
            assert device.complete == model.complete
            assert device.missing() == model.missing()
            assert device.announced == {i: c for i, (c, _) in model.announced.items()}
        incomplete = {d.key for d in self.buffer.incomplete_devices()}
        assert incomplete == {k for k, m in self.models.items() if not m.complete}


ReassemblyMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestReassemblyAgainstModel = ReassemblyMachine.TestCase
