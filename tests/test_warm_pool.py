"""The pool warmed while the daemon waits for its channels: buffers for QEMU's 1 MiB
chunks, as many as the bound leaves room for, and none once a payload was asked for."""

from __future__ import annotations

from vfio_multifd.core.ledger import Ledger, MemoryLayout
from vfio_multifd.core.reassembly import capacity_of
from vfio_multifd.core.wire import DeviceKey, PacketHeader
from vfio_multifd.daemon.pool import QEMU_CHUNK, BufferPool, warm_buffers

KEY = DeviceKey("dev", 0)


def ledger(bound: int, max_payload: int = QEMU_CHUNK) -> tuple[Ledger, BufferPool]:
    layout = MemoryLayout.of(bound, max_payload_size=max_payload, fail_when_full=False)
    pool = BufferPool()
    return Ledger(layout.reassembly([KEY]), layout, pool, fail_when_full=False), pool


def test_warm_buffers_fill_the_room_and_serve_the_first_chunks() -> None:
    subject, pool = ledger(16 << 20)
    capacity = capacity_of(QEMU_CHUNK)
    count = subject.warm_count(capacity)
    assert count == (16 << 20) // capacity == 15  # the staging buffer is not made yet
    buffers = warm_buffers(capacity, count)
    assert [len(b) for b in buffers] == [capacity] * count
    subject.add_idle(buffers)
    assert pool.idle_bytes == 15 * capacity and subject.warm_count(capacity) == 0
    charged = 0
    while subject.charge(PacketHeader(KEY, 0, False, QEMU_CHUNK)) is not None:
        charged += 1
    assert charged == 14  # what the bound allows beside the spill's staging buffer
    assert pool.misses == 0  # every one came warm from the pool


def test_no_warming_once_a_payload_was_asked_for() -> None:
    subject, _ = ledger(16 << 20)
    assert subject.charge(PacketHeader(KEY, 0, False, 100 << 10)) is not None
    assert subject.warm_count(capacity_of(QEMU_CHUNK)) == 0


def test_warm_buffers_beyond_the_room_are_let_go() -> None:
    """A chunk charged while a batch was being made: what no longer fits is not kept."""
    subject, pool = ledger(4 << 20)
    capacity = capacity_of(QEMU_CHUNK)
    buffers = warm_buffers(capacity, subject.warm_count(capacity))
    assert len(buffers) == 3
    assert subject.charge(PacketHeader(KEY, 0, False, QEMU_CHUNK)) is not None
    subject.add_idle(buffers)
    assert pool.idle_bytes == 2 * capacity <= (4 << 20) - subject.queued_bytes
