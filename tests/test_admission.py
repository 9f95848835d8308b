"""Admission's waits for memory: a change cannot be missed (issue 10 item 9)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from vfio_multifd.admission import Admission
from vfio_multifd.memory import MemoryPolicy
from vfio_multifd.pool import QEMU_CHUNK
from vfio_multifd.reassembly import ReassemblyBuffer, capacity_of
from vfio_multifd.spill import Spiller
from vfio_multifd.wire import DeviceKey, DevicePacket, PacketHeader

KEY = DeviceKey("dev", 0)


def admission(tmp_path: Path, bound: int = 1 << 20, staging: int = 1 << 16) -> Admission:
    buffer = ReassemblyBuffer([KEY], max_queued_bytes=bound)
    return Admission(
        buffer,
        MemoryPolicy(buffer, fail_when_full=False),
        Spiller(tmp_path),
        bound=bound,
        staging_size=staging,
        reading_channels=lambda: 2,
    )


async def test_a_change_right_after_a_wait_begins_wakes_it(tmp_path: Path) -> None:
    """A release scheduled just before a channel starts its grace wait must wake it.

    With ``wait_for(event.wait(), t)`` and a set-then-clear pulse, the pulse ran
    before the wrapped wait registered, and the channel slept the whole grace.
    """
    subject = admission(tmp_path)
    asyncio.get_running_loop().call_soon(subject.memory_changed)
    woken = await subject._wait_for_memory(time.monotonic() + 30)
    assert woken is True, "woken by the change (False: it slept until the deadline)"


async def test_a_deadline_without_a_change_expires(tmp_path: Path) -> None:
    subject = admission(tmp_path)
    assert await subject._wait_for_memory(time.monotonic() + 0.01) is False
    assert subject.paused_seconds > 0


async def test_one_change_wakes_every_waiter(tmp_path: Path) -> None:
    subject = admission(tmp_path)
    waits = [asyncio.ensure_future(subject._wait_for_memory(None)) for _ in range(3)]
    await asyncio.sleep(0)
    subject.memory_changed()
    assert await asyncio.wait_for(asyncio.gather(*waits), 5) == [True, True, True]


async def test_idle_pooled_buffers_are_trimmed_when_the_bound_has_no_room(tmp_path: Path) -> None:
    """Idle buffers are memory too: kept while the bound has room for them, let go
    as soon as queued chunks need that room (else the two together exceed the bound)."""
    subject = admission(tmp_path)  # bound 1 MiB
    reassembly, pool = subject.reassembly, subject.pool
    size = 128 << 10
    for idx in range(4):
        buffer = subject.allocate_now(PacketHeader(KEY, idx, False, size), 0)
        assert buffer is not None
        await subject.deliver(DevicePacket(KEY, idx, False, buffer, size), 0)
    subject.release_written(reassembly.take(reassembly.devices[KEY], 1 << 20))
    assert (reassembly.queued_bytes, pool.idle_bytes) == (0, 4 * capacity_of(size))  # kept
    big = (1 << 20) - (64 << 10)
    assert subject.allocate_now(PacketHeader(KEY, 4, False, big), 0) is not None
    assert reassembly.queued_bytes == capacity_of(big)
    assert pool.idle_bytes == 0, f"{pool.idle_bytes} idle bytes beside {big} queued, bound 1 MiB"
    # A buffer freed while the bound has no room for it is not kept either.
    subject._release_buffer(pool.acquire(size))
    assert pool.idle_bytes == 0


async def test_written_buffers_are_reused_not_mapped_anew(tmp_path: Path) -> None:
    """In order, the buffers of written chunks go back to the pool and come out again:
    a fresh mapping per chunk (page faults on every byte) cost two thirds of the rate."""
    import qemu_source as qs
    from helpers import IDSTR, random_bytes, settings, start

    from vfio_multifd import DeviceKey

    data = random_bytes(64 << 20, 3)
    config = settings(tmp_path, DeviceKey(IDSTR, 0), channels=2, max_queued_bytes=16 << 20)
    running = await start(config)
    streams = qs.build_streams([(IDSTR, 0, data, b"c")], 2, "round-robin")
    await asyncio.to_thread(qs.send_streams, running.address, streams)
    result = await running.result()
    assert config.devices[0].data_path.read_bytes() == data
    assert result.devices[0].chunks == 64
    misses = running.session.admission.pool.misses
    assert misses <= 20, f"{misses} of 64 chunks got a new buffer"


async def test_the_pool_is_warmed_for_qemus_chunks_within_the_bound(tmp_path: Path) -> None:
    """Warm buffers for QEMU's 1 MiB chunks, as many as idle buffers may take under the
    bound: the first chunks then come from the pool, not from fresh pages."""
    subject = admission(tmp_path, bound=8 << 20, staging=4 << 20)
    capacity = capacity_of(QEMU_CHUNK)
    await subject.warm_pool(4 << 20, after=0)
    assert subject.pool.idle_bytes == (8 << 20) // capacity * capacity == 7 * capacity
    for idx in range(7):
        assert subject.allocate_now(PacketHeader(KEY, idx, False, QEMU_CHUNK), 0) is not None
    assert subject.pool.misses == 0
    assert subject.allocate_now(PacketHeader(KEY, 7, False, QEMU_CHUNK), 0) is None  # the bound
    # Smaller packets allowed: buffers of the largest payload; too small to pool: none.
    small = admission(tmp_path)  # bound 1 MiB: no room for a 1 MiB chunk's buffer
    await small.warm_pool(4 << 20, after=0)
    assert small.pool.idle_bytes == 0
    await small.warm_pool(200 << 10, after=0)
    assert small.pool.idle_bytes == (1 << 20) // capacity_of(200 << 10) * capacity_of(200 << 10)
    tiny = admission(tmp_path)
    await tiny.warm_pool(1 << 10, after=0)
    assert tiny.pool.idle_bytes == 0


async def test_warming_stops_at_the_first_payload(tmp_path: Path) -> None:
    """Warm buffers are made only while no channel sends: once a payload was asked for,
    buffers are made as needed and the bound counts them."""
    subject = admission(tmp_path)  # bound 1 MiB
    assert subject.allocate_now(PacketHeader(KEY, 0, False, 100 << 10), 0) is not None
    await subject.warm_pool(200 << 10, after=0)
    assert subject.pool.idle_bytes == 0
