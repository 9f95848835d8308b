"""The spill file: its blocks follow the bytes spilled now, its size can be capped, it never loops."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest
import qemu_source as qs
from helpers import IDSTR, final_files, random_bytes, settings, start

from vfio_multifd import DeviceKey, Reason, SessionError
from vfio_multifd.daemon.spill import SpillStore

A = DeviceKey(IDSTR, 0)
CHUNK = 16384


def blocks_bytes(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def test_a_chunk_read_back_frees_its_place_and_its_blocks(tmp_path: Path) -> None:
    store = SpillStore(tmp_path)
    try:
        assert store.fd is not None
        refs = [store.reserve(1 << 20) for _ in range(4)]
        for n, ref in enumerate(refs):
            store.write(ref, memoryview(bytes([n]) * (1 << 20)))
        assert store.held == 4 << 20
        assert blocks_bytes(store.fd) >= 4 << 20
        for n, ref in enumerate(refs[:3]):
            assert store.read(ref) == bytes([n]) * (1 << 20)
            store.release(ref)
        assert store.held == 1 << 20
        # The filesystem got the blocks back (tmp_path's filesystem can punch holes).
        assert blocks_bytes(store.fd) < 2 << 20
        # The next chunk of the same size reuses a freed place: the file does not grow.
        again = store.reserve(1 << 20)
        assert again[0] < 3 << 20 and store.end == 4 << 20
        store.write(again, memoryview(b"\x07" * (1 << 20)))
        assert store.read(again) == b"\x07" * (1 << 20)
        assert store.read(refs[3]) == b"\x03" * (1 << 20), "the chunk still held is intact"
    finally:
        store.close()


def test_a_pwrite_that_writes_nothing_is_an_error_not_a_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SpillStore(tmp_path)
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: 0)
    try:
        with pytest.raises(OSError, match="returned 0"):
            store.write(store.reserve(10), memoryview(b"0123456789"))
    finally:
        store.close()


async def test_max_spill_bytes_fails_naming_device_and_idx(tmp_path: Path) -> None:
    """Reverse order under a small bound must spill; a cap below what it needs fails cleanly."""
    data = random_bytes(64 * CHUNK, 5)
    config = settings(
        tmp_path,
        A,
        channels=2,
        max_packet_size=CHUNK + 4096,
        max_queued_bytes=8 * CHUNK,
        max_spill_bytes=4 * CHUNK,
    )
    running = await start(config)
    streams = qs.build_streams([(IDSTR, 0, data, b"x")], 2, "reverse", chunk_size=CHUNK)

    def send() -> None:
        with contextlib.suppress(OSError):  # the daemon hangs up when it fails
            qs.send_streams(running.address, streams)

    sending = asyncio.create_task(asyncio.to_thread(send))
    with pytest.raises(SessionError) as caught:
        await running.result(timeout=20)
    await sending
    error = caught.value
    assert error.reason is Reason.SPILL_FULL
    assert error.device == str(A) and error.idx is not None and error.channel in (0, 1)
    assert f"over --max-spill-bytes {4 * CHUNK}" in str(error)
    assert f"state buffer {error.idx}" in str(error)
    assert final_files(tmp_path) == []


async def test_spill_under_a_cap_that_suffices_completes(tmp_path: Path) -> None:
    """A cap that the reversed stream fits under changes nothing."""
    data = random_bytes(64 * CHUNK, 6)
    config = settings(
        tmp_path,
        A,
        channels=2,
        max_packet_size=CHUNK + 4096,
        max_queued_bytes=8 * CHUNK,
        max_spill_bytes=len(data),
    )
    running = await start(config)
    streams = qs.build_streams([(IDSTR, 0, data, b"x")], 2, "reverse", chunk_size=CHUNK)
    await asyncio.to_thread(qs.send_streams, running.address, streams)
    result = await running.result(timeout=30)
    assert config.devices[0].data_path.read_bytes() == data
    assert result.spilled_bytes > 0
