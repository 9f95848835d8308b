"""Disk stays under its bounds: reservations ahead of the data never cause a false "disk full".

The end-to-end cases need a small filesystem of their own: a tmpfs mounted
for the test (root only; skipped where mounting is not allowed).
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import qemu_source as qs
from helpers import IDSTR, IDSTR_B, assert_outputs, random_bytes, settings, start

from vfio_multifd import DeviceKey
from vfio_multifd.daemon.output import MAX_RESERVE_AHEAD, Output

A = DeviceKey(IDSTR, 0)
B = DeviceKey(IDSTR_B, 0)
MiB = 1 << 20


@pytest.fixture
def small_fs() -> Iterator[Path]:
    """A 100 MiB tmpfs, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    directory = Path(tempfile.mkdtemp(prefix="vfio-fs-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(directory)],
        capture_output=True,
        timeout=10,
    )
    if mounted.returncode != 0:
        directory.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], timeout=10, check=False)
        directory.rmdir()


async def test_small_device_waiting_for_config_does_not_fill_the_disk(small_fs: Path) -> None:
    """Device a writes 1 KiB and keeps its config for last while b sends 50 MiB:
    51 MiB fit in 100 MiB, so the migration completes (it failed with ENOSPC
    when every output reserved 64 MiB ahead)."""
    config = settings(small_fs, A, B, channels=1)
    data_a = random_bytes(1024, 1)
    data_b = random_bytes(50 * MiB, 2)
    packets = [qs.device_packet(IDSTR, 0, 0, data_a)]
    chunks_b = qs.device_chunks(data_b)
    packets += [qs.device_packet(IDSTR_B, 0, idx, c) for idx, c in enumerate(chunks_b)]
    packets.append(
        qs.device_packet(IDSTR_B, 0, len(chunks_b), qs.config_blob(b"cb"), config=True)
    )
    packets.append(qs.device_packet(IDSTR, 0, 1, qs.config_blob(b"ca"), config=True))
    running = await start(config)
    await asyncio.to_thread(qs.send_streams, running.address, [qs.handshake(0) + b"".join(packets)])
    await running.result()
    assert_outputs(config, [(data_a, qs.config_blob(b"ca")), (data_b, qs.config_blob(b"cb"))])


def test_reservation_ahead_never_exceeds_what_the_file_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reserved: list[tuple[int, int]] = []
    real = os.posix_fallocate

    def spy(fd: int, offset: int, length: int) -> None:
        reserved.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", spy)
    output = Output(tmp_path / "d.bin", device="d", what="data file", fsync=False)
    output.open()
    written = 0
    for size in (1024, 1024, 100 * 1024, MiB, 3 * MiB, 7 * MiB):
        output.write([b"x" * size])
        written += size
        assert output.allocated - written <= min(written, MAX_RESERVE_AHEAD)
    assert reserved and reserved[0] == (0, 2048), "the first reservation is twice the first write"
    output.finish()
    assert (tmp_path / "d.bin").exists() is False  # not committed: still the .part file
    assert output.temp_path is not None and output.temp_path.stat().st_size == written
    output.discard()


def test_enospc_from_a_reservation_falls_back_to_plain_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    output = Output(tmp_path / "d.bin", device="d", what="data file", fsync=False)
    output.open()
    output.write([b"abc"])
    output.write([b"def"])
    assert not output.reserving
    output.finish()
    assert output.temp_path is not None and output.temp_path.read_bytes() == b"abcdef"
    output.discard()
