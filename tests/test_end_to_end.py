"""The whole data path over real loopback sockets: bytes in, the same bytes on disk.

Streams come from ``qemu_source`` (an independent encoder written from
PROTOCOL.md) or from hand-built packet lists, so the daemon is not only checked
against its own sender.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
from pathlib import Path

import pytest
import qemu_source as qs
import xxhash
from helpers import (
    IDSTR,
    IDSTR_B,
    assert_outputs,
    connect,
    final_files,
    random_bytes,
    settings,
    start,
    streams_of,
)

from vfio_multifd import Address, DeviceKey
from vfio_multifd.source.plan import DeviceState, SourceDevice
from vfio_multifd.source.sender import send

A = DeviceKey(IDSTR, 0)
B = DeviceKey(IDSTR_B, 0)


@pytest.mark.parametrize("order", ["round-robin", "reverse", "random"])
async def test_independent_source_every_order_two_devices(tmp_path: Path, order: str) -> None:
    config = settings(tmp_path, A, B, channels=3)
    data_a = random_bytes(5 * 65536 + 123, 1)
    data_b = random_bytes(3 * 65536, 2)
    cfg_a, cfg_b = b"config A" * 9, b"config B"
    streams = qs.build_streams(
        [(IDSTR, 0, data_a, cfg_a), (IDSTR_B, 0, data_b, cfg_b)],
        channels=3,
        order=order,
        seed=7,
        chunk_size=65536,
    )
    running = await start(config)
    await asyncio.to_thread(qs.send_streams, running.address, streams)
    result = await running.result()
    assert_outputs(config, [(data_a, qs.config_blob(cfg_a)), (data_b, qs.config_blob(cfg_b))])
    assert [d.bytes for d in result.devices] == [len(data_a), len(data_b)]
    assert [d.chunks for d in result.devices] == [6, 3]
    assert result.devices[0].digest == "xxh3-128:" + xxhash.xxh3_128(data_a).hexdigest()
    assert final_files(tmp_path) == sorted(
        ["dev0.bin", "dev0.bin.config", "dev1.bin", "dev1.bin.config"]
    )


async def test_random_order_with_zero_length_chunks(tmp_path: Path) -> None:
    rng = random.Random(3)
    chunks = [rng.randbytes(rng.choice([0, 0, 1, 100, 4096])) for _ in range(60)]
    packets = [qs.device_packet(IDSTR, 0, idx, chunk) for idx, chunk in enumerate(chunks)]
    blob = qs.config_blob(b"cfg")
    packets.append(qs.device_packet(IDSTR, 0, len(chunks), blob, config=True))
    rng.shuffle(packets)
    config = settings(tmp_path, A, channels=4)
    running = await start(config)
    await asyncio.to_thread(
        qs.send_streams, running.address, streams_of([packets[n::4] for n in range(4)])
    )
    result = await running.result()
    assert_outputs(config, [(b"".join(chunks), blob)])
    assert result.devices[0].chunks == 60


async def test_config_packet_first_then_data(tmp_path: Path) -> None:
    chunks = [random_bytes(1000 + n, n) for n in range(5)]
    blob = qs.config_blob(b"early config")
    packets = [qs.device_packet(IDSTR, 0, 5, blob, config=True)]
    packets += [qs.device_packet(IDSTR, 0, idx, c) for idx, c in enumerate(chunks)]
    config = settings(tmp_path, A, channels=1)
    running = await start(config)
    await asyncio.to_thread(qs.send_streams, running.address, streams_of([packets]))
    await running.result()
    assert_outputs(config, [(b"".join(chunks), blob)])


async def test_two_devices_crossing_on_two_channels(tmp_path: Path) -> None:
    """Channel 0: second half of A, then first half of B; channel 1 the mirror."""

    def packets(idstr: str, data: list[bytes], cfg: bytes) -> list[bytes]:
        out = [qs.device_packet(idstr, 0, idx, c) for idx, c in enumerate(data)]
        return [*out, qs.device_packet(idstr, 0, len(data), qs.config_blob(cfg), config=True)]

    a = [random_bytes(30000, n) for n in range(8)]
    b = [random_bytes(20000, 100 + n) for n in range(8)]
    pa, pb = packets(IDSTR, a, b"A"), packets(IDSTR_B, b, b"B")
    config = settings(tmp_path, A, B, channels=2)
    running = await start(config)
    await asyncio.to_thread(
        qs.send_streams, running.address, streams_of([pa[4:] + pb[:4], pb[4:] + pa[:4]])
    )
    await running.result()
    assert_outputs(
        config, [(b"".join(a), qs.config_blob(b"A")), (b"".join(b), qs.config_blob(b"B"))]
    )


async def test_two_instances_of_one_idstr(tmp_path: Path) -> None:
    config = settings(tmp_path, DeviceKey(IDSTR, 0), DeviceKey(IDSTR, 1), channels=2)
    d0, d1 = random_bytes(70000, 10), random_bytes(50000, 11)
    streams = qs.build_streams(
        [(IDSTR, 0, d0, b"zero"), (IDSTR, 1, d1, b"one")], channels=2, chunk_size=8192
    )
    running = await start(config)
    await asyncio.to_thread(qs.send_streams, running.address, streams)
    await running.result()
    assert_outputs(config, [(d0, qs.config_blob(b"zero")), (d1, qs.config_blob(b"one"))])


async def test_device_with_no_data_only_config(tmp_path: Path) -> None:
    config = settings(tmp_path, A, channels=1)
    streams = qs.build_streams([(IDSTR, 0, b"", b"c")], channels=1)
    running = await start(config)
    await asyncio.to_thread(qs.send_streams, running.address, streams)
    result = await running.result()
    assert_outputs(config, [(b"", qs.config_blob(b"c"))])
    assert result.devices[0].chunks == 0


@pytest.mark.parametrize("order", ["round-robin", "reverse", "random"])
async def test_own_sender_over_unix_socket(tmp_path: Path, order: str) -> None:
    source_a = tmp_path / "source-a"
    source_a.write_bytes(random_bytes(3 * 65536 + 17, 21))
    config = settings(
        tmp_path, A, B, channels=3, listen=Address("unix", path=str(tmp_path / "mig.sock"))
    )
    running = await start(config)
    devices = [
        SourceDevice(A, source=source_a, size=source_a.stat().st_size),
        SourceDevice(B, size=200000, seed=5),
    ]
    sent = await asyncio.to_thread(
        send,
        config.listen,
        devices,
        channels=3,
        chunk_size=65536,
        order=order,
        seed=9,
    )
    result = await running.result()
    # Bytes, read back: device B's generated data too, not only its digest.
    expected = []
    for device in devices:
        state = DeviceState(device, 65536)
        data = b"".join(bytes(state.chunk(idx)) for idx in range(state.chunks))
        expected.append((data, bytes(state.config_blob)))
        state.close()
    assert expected[0][0] == source_a.read_bytes()
    assert_outputs(config, expected)
    assert [d.digest for d in result.devices] == [d[3] for d in sent.devices]
    assert [d.bytes for d in result.devices] == [source_a.stat().st_size, 200000]
    assert not (tmp_path / "mig.sock").exists(), "the unix socket is removed at the end"


async def test_ipv6_loopback(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no ::1 here")
    config = settings(tmp_path, A, channels=2, listen=Address("tcp", "::1", 0))
    data = random_bytes(100000, 4)
    running = await start(config)
    await asyncio.to_thread(
        qs.send_streams,
        running.address,
        qs.build_streams([(IDSTR, 0, data, b"x")], 2, chunk_size=4096),
    )
    await running.result()
    assert_outputs(config, [(data, qs.config_blob(b"x"))])


async def test_short_writes_are_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The data file's writev writes at most 777 bytes a call: every byte still lands, in order."""
    from vfio_multifd.daemon import output

    real_writev = os.writev
    calls = 0

    def short_writev(fd: int, buffers: list[memoryview]) -> int:
        nonlocal calls
        calls += 1
        first = bytes(buffers[0][:777])
        return real_writev(fd, [first])

    monkeypatch.setattr(output.os, "writev", short_writev)
    config = settings(tmp_path, A, channels=2)
    data = random_bytes(200001, 8)
    running = await start(config)
    await asyncio.to_thread(
        qs.send_streams,
        running.address,
        qs.build_streams([(IDSTR, 0, data, b"s")], 2, "random", 1, 9000),
    )
    await running.result()
    assert_outputs(config, [(data, qs.config_blob(b"s"))])
    assert calls >= len(data) // 777


async def test_existing_file_replaced_only_on_success(tmp_path: Path) -> None:
    """Mid-transfer - every data chunk written, the config packet held back - the old
    file is still at the final path, untouched; the new one replaces it at the end."""
    config = settings(tmp_path, A, channels=1)
    config.devices[0].data_path.write_bytes(b"old contents")
    chunks = qs.device_chunks(random_bytes(50000, 1), 8192)
    blob = qs.config_blob(b"n")
    running = await start(config)
    device = running.session.core.reassembly.devices[A]
    with connect(running.address) as sock:
        sock.sendall(qs.handshake(0))
        for idx, chunk in enumerate(chunks):
            sock.sendall(qs.device_packet(IDSTR, 0, idx, chunk))
        for _ in range(1000):
            if device.bytes_written == 50000:
                break
            await asyncio.sleep(0.01)
        assert device.bytes_written == 50000 and not device.complete
        assert config.devices[0].data_path.read_bytes() == b"old contents"
        assert len([n for n in final_files(tmp_path) if n.endswith(".part")]) == 2
        sock.sendall(qs.device_packet(IDSTR, 0, len(chunks), blob, config=True))
        sock.shutdown(socket.SHUT_WR)
        await running.result()
    assert_outputs(config, [(b"".join(chunks), blob)])
    assert final_files(tmp_path) == ["dev0.bin", "dev0.bin.config"]
