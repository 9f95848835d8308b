"""The memory ledger and the core's waits for memory: a change cannot be missed.

(Issue 10 item 9: a release scheduled just as a channel began to wait woke
nobody. In the core a wait and its wake-up are two inputs on one thread: the
header waits in the call that found no memory, and every later change looks
at every waiting header again.)
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from vfio_multifd.core import commands as cmd
from vfio_multifd.core.config import MigrationConfig
from vfio_multifd.core.ledger import Ledger, MemoryLayout
from vfio_multifd.core.memory import SPILL_GRACE
from vfio_multifd.core.migration import Migration
from vfio_multifd.core.reassembly import CHUNK_OVERHEAD, ReassemblyBuffer, capacity_of
from vfio_multifd.core.wire import ChannelHandshake, DeviceKey, DevicePacket, PacketHeader
from vfio_multifd.daemon.pool import BufferPool

KEY = DeviceKey("dev", 0)
CHUNK = 64 << 10


def ledger(bound: int = 1 << 20) -> Ledger:
    layout = MemoryLayout(bound=bound, staging=0, queue_bound=bound, reserve=0, chunk_overhead=0)
    return Ledger(layout.reassembly([KEY]), layout, BufferPool(), fail_when_full=False)


def test_idle_pooled_buffers_are_trimmed_when_the_bound_has_no_room() -> None:
    """Idle buffers are memory too: kept while the bound has room for them, let go
    as soon as queued chunks need that room (else the two together exceed the bound)."""
    subject = ledger()  # bound 1 MiB
    reassembly, pool = subject.reassembly, subject.buffers
    size = 128 << 10
    for idx in range(4):
        header = PacketHeader(KEY, idx, False, size)
        reassembly.announce(header, 0)
        charged = subject.charge(header)
        assert charged is not None
        reassembly.insert(DevicePacket(KEY, idx, False, charged[0], size), 0, allocated=True)
    subject.release_written(reassembly.take(reassembly.devices[KEY], 1 << 20))
    # Room for them: kept (each as large as it really is: the next header's room, paged).
    assert (reassembly.queued_bytes, pool.idle_bytes) == (0, 4 * capacity_of(size))
    big = (1 << 20) - (64 << 10)
    assert subject.charge(PacketHeader(KEY, 4, False, big)) is not None
    assert reassembly.queued_bytes == capacity_of(big)
    assert pool.idle_bytes == 0, f"{pool.idle_bytes} idle bytes beside {big} queued, bound 1 MiB"
    # A buffer freed while the bound has no room for it is not kept either.
    subject._release_buffer(pool.acquire(size))
    assert pool.idle_bytes == 0


def test_the_layout_splits_the_bound_once() -> None:
    spills = MemoryLayout.of(1 << 20, max_payload_size=CHUNK, fail_when_full=False)
    assert (spills.staging, spills.reserve) == (capacity_of(CHUNK), capacity_of(CHUNK) + 256)
    assert spills.queue_bound == (1 << 20) - capacity_of(CHUNK)
    fails = MemoryLayout.of(1 << 20, max_payload_size=CHUNK, fail_when_full=True)
    assert (fails.staging, fails.reserve, fails.queue_bound) == (0, 0, 1 << 20)
    unbounded = MemoryLayout.of(None, max_payload_size=CHUNK, fail_when_full=False)
    assert (unbounded.queue_bound, unbounded.chunk_overhead, unbounded.staging) == (None, 0, 0)
    assert isinstance(unbounded.reassembly([KEY]), ReassemblyBuffer)


def waiting_migration(channels: int) -> tuple[Migration, list[int]]:
    """``channels`` channels, memory full of early chunks, each channel's next
    header waiting for memory (the grace: others are still reading)."""
    cost = capacity_of(CHUNK) + CHUNK_OVERHEAD
    bound = 2 * capacity_of(CHUNK) + CHUNK_OVERHEAD + 2 * cost  # two early chunks' room
    core = Migration(
        MigrationConfig(
            devices=(KEY,), channels=channels + 1, max_queued_bytes=bound, max_payload_size=CHUNK
        ),
        BufferPool(),
    )
    for conn in range(channels + 1):
        core.connection_made(conn, f"peer {conn}", 0.0)
        core.handshake(conn, ChannelHandshake(conn), 0.0)
    for idx in (10, 11):
        header = PacketHeader(KEY, idx, False, CHUNK)
        buffer = core.header(0, header, 0.0)
        assert buffer is not None
        core.packet(0, DevicePacket(KEY, idx, False, buffer, CHUNK), 0.0)
    conns = list(range(channels))
    for conn in conns:
        assert core.header(conn, PacketHeader(KEY, 20 + conn, False, CHUNK), 0.0) is None
    core.pop_commands()
    return core, conns


def test_one_change_wakes_every_waiting_header() -> None:
    core, conns = waiting_migration(3)
    assert core.waiting_headers == 3
    # The loader's next chunk comes on the last channel (into the reserve) and is
    # written: the memory it frees is looked at by every waiting header.
    buffer = core.header(3, PacketHeader(KEY, 0, False, CHUNK), 0.001)
    assert buffer is not None
    core.packet(3, DevicePacket(KEY, 0, False, buffer, CHUNK), 0.001)
    core.written(KEY, core.take_batch(KEY, 1 << 20), 0.002)
    # Each looked again (and, others still reading, waits its grace from now).
    deadlines = [core.connections.by_conn[conn].wait_deadline for conn in conns]
    assert deadlines == [0.002 + SPILL_GRACE] * 3, "a change did not reach every waiting header"


def test_a_wait_with_a_deadline_ends_at_it_and_counts_as_paused() -> None:
    core, _ = waiting_migration(1)
    assert core.next_deadline() == SPILL_GRACE
    core.tick(SPILL_GRACE / 2)  # nothing changed, nothing due: still waiting
    assert core.connections.by_conn[0].waiting
    core.tick(SPILL_GRACE)
    assert [type(c) for c in core.pop_commands()] in (
        [cmd.ProvideBuffer, cmd.ResumeReading],
        [cmd.Spill],
    )
    assert core.snapshot(SPILL_GRACE).paused_seconds > 0


async def test_written_buffers_are_reused_not_mapped_anew(tmp_path: Path) -> None:
    """In order, the buffers of written chunks go back to the pool and come out again:
    a fresh mapping per chunk (page faults on every byte) cost two thirds of the rate."""
    import qemu_source as qs
    from helpers import IDSTR, random_bytes, settings, start

    data = random_bytes(64 << 20, 3)
    config = settings(tmp_path, DeviceKey(IDSTR, 0), channels=2, max_queued_bytes=16 << 20)
    running = await start(config)
    streams = qs.build_streams([(IDSTR, 0, data, b"c")], 2, "round-robin")
    await asyncio.to_thread(qs.send_streams, running.address, streams)
    result = await running.result()
    assert config.devices[0].data_path.read_bytes() == data
    assert result.devices[0].chunks == 64
    misses = running.session.snapshot().buffers_allocated
    assert misses <= 20, f"{misses} of 64 chunks got a new buffer"
