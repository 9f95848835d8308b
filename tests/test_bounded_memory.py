"""--max-queued-bytes: memory stays under the bound for any arrival order, no deadlock.

Each test asserts, from the daemon's own accounting, that the chunk bytes
held in memory never exceeded the bound, and that the bytes on disk equal
the bytes sent. Chunks are small so that a small bound means many chunks.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from pathlib import Path

import pytest
import qemu_source as qs
from helpers import (
    IDSTR,
    IDSTR_B,
    assert_outputs,
    final_files,
    random_bytes,
    send_streams_quietly,
    settings,
    start,
    streams_of,
)

from vfio_multifd import DeviceKey, QueueFullPolicy, Reason, SessionError

A = DeviceKey(IDSTR, 0)
B = DeviceKey(IDSTR_B, 0)
CHUNK = 16384
MAX_PACKET = CHUNK + 4096
BOUND = 8 * CHUNK  # 128 KiB: a small fraction of each device's state


def bounded(tmp_path: Path, *keys: DeviceKey, channels: int, **extra: object):  # type: ignore[no-untyped-def]
    return settings(
        tmp_path,
        *keys,
        channels=channels,
        max_packet_size=MAX_PACKET,
        max_queued_bytes=BOUND,
        **extra,
    )


def packets(idstr: str, data: bytes, cfg: bytes, instance: int = 0) -> list[bytes]:
    chunks = qs.device_chunks(data, CHUNK)
    out = [qs.device_packet(idstr, instance, idx, c) for idx, c in enumerate(chunks)]
    return [*out, qs.device_packet(idstr, instance, len(chunks), qs.config_blob(cfg), config=True)]


async def run(config, streams):  # type: ignore[no-untyped-def]
    running = await start(config)
    await asyncio.to_thread(qs.send_streams, running.address, streams)
    result = await running.result()
    assert result.peak_queued_bytes <= BOUND
    assert running.session.core.reassembly.queued_bytes == 0
    return result


@pytest.mark.parametrize("order", ["reverse", "random"])
async def test_reverse_and_random_order_stay_under_the_bound(tmp_path: Path, order: str) -> None:
    data = random_bytes(64 * CHUNK + 5, 1)
    config = bounded(tmp_path, A, channels=4)
    streams = qs.build_streams([(IDSTR, 0, data, b"cfg")], 4, order, seed=3, chunk_size=CHUNK)
    result = await run(config, streams)
    assert_outputs(config, [(data, qs.config_blob(b"cfg"))])
    assert result.spilled_bytes > 0, "most of a reversed stream cannot fit in memory"
    assert final_files(tmp_path) == ["dev0.bin", "dev0.bin.config"], "no spill file left behind"


async def test_first_chunk_last(tmp_path: Path) -> None:
    data = random_bytes(40 * CHUNK, 2)
    p = packets(IDSTR, data, b"c")
    config = bounded(tmp_path, A, channels=2)
    ordered = p[1:] + p[:1]
    result = await run(config, streams_of([ordered[0::2], ordered[1::2]]))
    assert_outputs(config, [(data, qs.config_blob(b"c"))])
    assert result.spilled_bytes > 0


async def test_two_devices_crossing_on_two_channels(tmp_path: Path) -> None:
    """Channel 0: second half of A then first half of B; channel 1: the mirror.

    Pausing a channel until its device's next chunk comes would deadlock here,
    since each device's first half is behind the other device's second half.
    """
    a, b = random_bytes(32 * CHUNK, 3), random_bytes(32 * CHUNK, 4)
    pa, pb = packets(IDSTR, a, b"A"), packets(IDSTR_B, b, b"B")
    half = len(pa) // 2
    config = bounded(tmp_path, A, B, channels=2)
    await run(config, streams_of([pa[half:] + pb[:half], pb[half:] + pa[:half]]))
    assert_outputs(config, [(a, qs.config_blob(b"A")), (b, qs.config_blob(b"B"))])


async def test_many_devices_on_many_channels_random(tmp_path: Path) -> None:
    keys = [DeviceKey(f"0000:00:{n:02x}.0/vfio", 0) for n in range(6)]
    datas = [random_bytes(random.Random(n).randint(5, 30) * CHUNK + n, 10 + n) for n in range(6)]
    config = bounded(tmp_path, *keys, channels=5)
    streams = qs.build_streams(
        [(k.idstr, 0, d, k.idstr.encode()) for k, d in zip(keys, datas, strict=True)],
        5,
        "random",
        seed=11,
        chunk_size=CHUNK,
    )
    await run(config, streams)
    assert_outputs(
        config, [(d, qs.config_blob(k.idstr.encode())) for k, d in zip(keys, datas, strict=True)]
    )


async def test_in_order_with_a_stalled_disk_pauses_instead_of_spilling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the loader is the bottleneck, waiting frees memory; spilling would only add I/O.

    The disk is stalled outright (the data file's writes wait for a gate): memory
    fills with chunks the loader has taken or can take, the channel pauses, and
    nothing is spilled. Then the disk runs again and the migration completes.
    One channel, so that no chunk can arrive early (with two, one channel running
    ahead may rightly spill a chunk or two, after the grace, on a loaded machine).
    """
    from vfio_multifd.daemon import output

    real_writev = os.writev
    gate = threading.Event()

    def stalled_writev(fd: int, buffers: list[memoryview]) -> int:
        gate.wait(30)
        return real_writev(fd, buffers)

    monkeypatch.setattr(output.os, "writev", stalled_writev)
    data = random_bytes(80 * CHUNK, 5)
    config = bounded(tmp_path, A, channels=1)
    running = await start(config)
    streams = qs.build_streams([(IDSTR, 0, data, b"s")], 1, chunk_size=CHUNK)
    sending = asyncio.create_task(asyncio.to_thread(qs.send_streams, running.address, streams))
    session = running.session
    try:
        # The channel ends up waiting for memory (a state, however long it takes).
        for _ in range(2000):
            if session.core.waiting_headers:
                break
            await asyncio.sleep(0.005)
        assert session.core.waiting_headers == 1, "the channel never paused"
        reassembly = session.core.reassembly
        assert reassembly.spilled_bytes == 0 and session.spiller.store is None
        assert reassembly.bytes_written == 0 and reassembly.drainable()
    finally:
        gate.set()
    await asyncio.wait_for(sending, 30)
    result = await running.result()
    assert_outputs(config, [(data, qs.config_blob(b"s"))])
    assert result.peak_queued_bytes <= BOUND
    assert result.spilled_bytes == 0
    assert result.paused_seconds > 0


async def test_fail_policy_is_qemus(tmp_path: Path) -> None:
    data = random_bytes(64 * CHUNK, 6)
    config = bounded(tmp_path, A, channels=2, on_queue_full=QueueFullPolicy.FAIL)
    config.devices[0].data_path.write_bytes(b"previous")
    streams = qs.build_streams([(IDSTR, 0, data, b"f")], 2, "reverse", chunk_size=CHUNK)
    running = await start(config)
    sending = asyncio.create_task(asyncio.to_thread(qs.send_streams, running.address, streams))
    with pytest.raises(SessionError) as caught:
        await running.result()
    await asyncio.gather(sending, return_exceptions=True)
    error = caught.value
    assert error.reason is Reason.QUEUE_FULL
    assert error.device == IDSTR and error.idx is not None
    assert f"bound of {BOUND}" in str(error) and f"state buffer {error.idx}" in str(error)
    assert config.devices[0].data_path.read_bytes() == b"previous"
    assert final_files(tmp_path) == ["dev0.bin"]


async def test_a_spill_that_fails_fails_the_migration_with_its_errno(tmp_path: Path) -> None:
    """No directory to spill to (removed after the start-up check): a clean error, not a hang."""
    from vfio_multifd import DeviceIOError

    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    data = random_bytes(64 * CHUNK, 7)
    config = bounded(tmp_path, A, channels=2, spill_dir=spill_dir)
    running = await start(config)
    spill_dir.rmdir()
    streams = qs.build_streams([(IDSTR, 0, data, b"x")], 2, "reverse", chunk_size=CHUNK)
    sending = asyncio.create_task(asyncio.to_thread(send_streams_quietly, running.address, streams))
    with pytest.raises(DeviceIOError) as caught:
        await running.result(timeout=20)
    await asyncio.gather(sending)
    assert caught.value.errno == 2 and "cannot spill state buffer" in str(caught.value)
    assert caught.value.idx is not None and caught.value.channel in (0, 1)
    assert final_files(tmp_path) == []


async def test_zero_length_chunks_count_against_the_bound(tmp_path: Path) -> None:
    """Each chunk held costs memory besides its data: a flood of empty early chunks is bounded too."""
    from vfio_multifd.core.reassembly import CHUNK_OVERHEAD

    count = 3 * BOUND // CHUNK_OVERHEAD  # three times what fits in memory
    packets = [qs.device_packet(IDSTR, 0, idx, b"") for idx in range(count)]
    packets.append(qs.device_packet(IDSTR, 0, count, qs.config_blob(b"z"), config=True))
    packets.reverse()
    config = bounded(tmp_path, A, channels=2)
    result = await run(config, streams_of([packets[0::2], packets[1::2]]))
    assert_outputs(config, [(b"", qs.config_blob(b"z"))])
    assert result.devices[0].chunks == count
    assert BOUND // 2 < result.peak_queued_bytes <= BOUND
