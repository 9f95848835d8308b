"""The daemon takes a QEMU-10-like migration (``source/qemu_like.py``) over loopback: the
main channel, RAM and SYNC packets mixed with device-state packets, several rounds of a
running guest. The RAM image must equal the last round's memory even when one channel is
held back (the sync points order the rounds: with the barrier switched off, the held-back
cases fail on pc.ram, a page of an early round written over its later copy), and the
device's files its bytes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from cli_helpers import Daemon
from helpers import settings, start
from prometheus_client.parser import text_string_to_metric_families

from vfio_multifd.cli.report import print_receive_summary
from vfio_multifd.config import Address, ReceiveSettings
from vfio_multifd.core.wire import DeviceKey
from vfio_multifd.daemon.ram_sink import RamSink
from vfio_multifd.ops.metrics import render
from vfio_multifd.ops.status_server import query_migrate
from vfio_multifd.source.qemu_like import VfioDevice, device_state_migration, qemu10_migration

UUID = "6b8e1a52-3c1d-4f8e-9b1a-22c0ffee0022"
PAGE = 4096
SIZE = 2 << 20  # bytes of pc.ram


def rounds(count: int) -> list[dict[str, bytes]]:
    """A guest's RAM over ``count`` rounds: each round rewrites some pages (some to zero)."""
    rng = random.Random(22)
    ram = bytearray(SIZE)
    for page in range(0, SIZE // PAGE, 3):
        ram[page * PAGE : (page + 1) * PAGE] = rng.randbytes(PAGE)
    images = [{"pc.ram": bytes(ram), "vga.vram": bytes(64 * PAGE)}]
    for number in range(1, count):
        for page in rng.sample(range(SIZE // PAGE), 64):
            ram[page * PAGE : (page + 1) * PAGE] = (
                bytes(PAGE) if page % 5 == 0 else bytes([number]) * PAGE
            )
        images.append({"pc.ram": bytes(ram), "vga.vram": bytes(64 * PAGE)})
    return images


def send(
    port: int, main: bytes, channels: list[bytes], *, lag: int | None, main_lag: float = 0.0
) -> None:
    """Connect the main channel and every channel; channel ``lag`` sends its first half
    only after the others have sent everything they could (then are held at a sync point);
    the main channel sends after ``main_lag`` seconds."""
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(len(channels) + 1)]

    def run(sock: socket.socket, data: bytes, delay: float) -> None:
        time.sleep(delay)
        with contextlib.suppress(OSError):  # the daemon may have reset it
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)

    threads = [threading.Thread(target=run, args=(sockets[0], main, main_lag))]
    for index, data in enumerate(channels):
        delay = 1.0 if index == lag else 0.0
        threads.append(threading.Thread(target=run, args=(sockets[index + 1], data, delay)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for sock in sockets:
        sock.settimeout(30)
        with contextlib.suppress(OSError):
            sock.recv(1)  # the daemon's verdict: a close
        sock.close()


@pytest.mark.parametrize("lag", [None, 1], ids=["together", "one-channel-held-back"])
@pytest.mark.parametrize("zero_pages", ["multifd", "legacy"])
def test_a_qemu10_like_migration_through_the_daemon(
    tmp_path: Path, daemons: list[Daemon], lag: int | None, zero_pages: str
) -> None:
    images = rounds(4)
    device = VfioDevice(
        DeviceKey("0000:00:02.0/vfio", 0),
        precopy=(b"pre" * 100,),
        chunks=tuple(bytes([n]) * 70000 for n in range(5)),
        config=b"config-bytes",
    )
    streams = qemu10_migration(
        images,
        channels=3,
        uuid=bytes.fromhex(UUID.replace("-", "")),
        devices=[device],
        zero_pages=zero_pages,
    )
    assert streams.sync_points >= 4
    data = tmp_path / "dev.bin"
    daemon = Daemon(
        tmp_path,
        "--channels", "3",
        "--uuid", UUID,
        "--main-stream", str(tmp_path / "main.bin"),
        "--ram", str(tmp_path / "ram"),
        "--device", f"idstr={device.key.idstr},data={data}",
        "--result", str(tmp_path / "result.json"),
    )
    daemons.append(daemon)
    port = int(daemon.address.rsplit(":", 1)[1])
    send(port, streams.main, streams.channels, lag=lag)
    code, summary, stderr = daemon.finish(60)
    assert code == 0, stderr
    assert (tmp_path / "ram" / "pc.ram").read_bytes() == images[-1]["pc.ram"]
    assert (tmp_path / "ram" / "vga.vram").read_bytes() == images[-1]["vga.vram"]
    assert (tmp_path / "main.bin").read_bytes() == streams.main
    assert data.read_bytes() == b"".join(device.precopy + device.chunks)
    # The figures are what was sent: pages by kind, sync points, the main stream's bytes.
    result = json.loads((tmp_path / "result.json").read_text())
    assert (
        result["ram_pages"], result["ram_zero_pages"], result["sync_points"],
        result["main_stream_bytes"],
    ) == (streams.normal_pages, streams.zero_pages, streams.sync_points, len(streams.main))
    assert (
        f"ram: {streams.normal_pages} pages ({streams.normal_pages * PAGE} bytes), "
        f"{streams.zero_pages} zero pages, {streams.sync_points} sync points; "
        f"main stream {len(streams.main)} bytes\n"
    ) in summary


@pytest.mark.parametrize("switchover_start", [True, False], ids=["switchover", "section-end"])
def test_precopy_data_goes_first_even_when_the_main_channel_comes_last(
    tmp_path: Path, daemons: list[Daemon], switchover_start: bool
) -> None:
    """Every device-state packet is in before the main channel sends its first byte: the
    loader waits with idx 0 until the main stream can bring no more pre-copy data
    (the switchover, or the end of the device's SECTION_END), so the data file is the
    pre-copy blocks in main-stream order, then the chunks."""
    device = VfioDevice(
        DeviceKey("0000:00:02.0/vfio", 0),
        precopy=(b"first" * 1000, b"second" * 30000, b"third"),
        chunks=tuple(bytes([n]) * 70000 for n in range(5)),
        config=b"config-bytes",
    )
    streams = device_state_migration(
        [device], channels=2, uuid=bytes.fromhex(UUID.replace("-", "")),
        switchover_start=switchover_start,
    )  # fmt: skip
    data = tmp_path / "dev.bin"
    daemon = Daemon(
        tmp_path,
        "--channels", "2",
        "--uuid", UUID,
        "--main-stream", str(tmp_path / "main.bin"),
        "--device", f"idstr={device.key.idstr},data={data}",
    )  # fmt: skip
    daemons.append(daemon)
    send(int(daemon.address.rsplit(":", 1)[1]), streams.main, streams.channels, lag=None,
         main_lag=1.0)  # fmt: skip
    code, _, stderr = daemon.finish(60)
    assert code == 0, stderr
    assert data.read_bytes() == b"".join(device.precopy + device.chunks)
    assert (tmp_path / "main.bin").read_bytes() == streams.main


def test_a_ram_only_migration_has_its_result(tmp_path: Path, daemons: list[Daemon]) -> None:
    """--result without --device: it failed on the missing device list (exit 1)."""
    streams = qemu10_migration(rounds(2), channels=2, uuid=bytes.fromhex(UUID.replace("-", "")))
    daemon = Daemon(
        tmp_path,
        "--channels", "2",
        "--uuid", UUID,
        "--main-stream", "/dev/null",
        "--ram", str(tmp_path / "ram"),
        "--result", str(tmp_path / "result.json"),
    )  # fmt: skip
    daemons.append(daemon)
    send(int(daemon.address.rsplit(":", 1)[1]), streams.main, streams.channels, lag=None)
    code, _, stderr = daemon.finish(60)
    assert code == 0, stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["outcome"], result["devices"]) == ("completed", [])
    assert (result["ram_pages"], result["ram_zero_pages"], result["sync_points"]) == (
        streams.normal_pages, streams.zero_pages, streams.sync_points,
    )  # fmt: skip
    assert (tmp_path / "ram" / "pc.ram").read_bytes() == rounds(2)[-1]["pc.ram"]


async def test_zero_pages_of_the_main_stream_reach_the_ram_writer_many_to_a_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU 7.2 (and 10.0 with zero-page-detection=legacy) sends every zero page as a
    record of the main stream: the driver hands a whole read's records to the core
    before carrying out its commands, so they reach the RAM writer as a few jobs of
    many pages, not one job (a thread hand-off) each."""
    images = rounds(2)
    uuid = bytes.fromhex(UUID.replace("-", ""))
    streams = qemu10_migration(images, channels=2, uuid=uuid, devices=[], zero_pages="legacy")
    assert streams.zero_pages > 200
    jobs: list[int] = []  # pages in each job of the RAM writer that carries pages
    write = RamSink.write

    def counted(sink: RamSink, pages: Sequence[tuple[str, int, memoryview | int]], main: bytes) -> None:
        if pages:
            jobs.append(len(pages))
        write(sink, pages, main)

    monkeypatch.setattr(RamSink, "write", counted)
    running = await start(
        ReceiveSettings(
            devices=(), listen=Address("tcp", "127.0.0.1", 0), channels=2, fsync=False,
            uuid=uuid, main_stream=tmp_path / "main.bin", ram=tmp_path / "ram",
        )
    )  # fmt: skip
    port = int(running.address.rsplit(":", 1)[1])
    await asyncio.wait_for(
        # The main channel last: its records come in reads of its own (not released
        # by another channel reaching a sync point, inside that channel's commands).
        asyncio.to_thread(send, port, streams.main, streams.channels, lag=None, main_lag=0.3),
        60,
    )
    await asyncio.wait_for(running.task, 60)
    assert (tmp_path / "ram" / "pc.ram").read_bytes() == images[-1]["pc.ram"]
    assert sum(jobs) == streams.normal_pages + streams.zero_pages  # each page written once
    assert len(jobs) * 4 < streams.zero_pages, jobs  # one job per page: as many as pages


async def test_status_and_metrics_count_what_qemu_sent(tmp_path: Path) -> None:
    """query-migrate's ``ram`` (QEMU's names), /metrics and the summary line, in process."""
    images = rounds(3)
    key = DeviceKey("0000:00:02.0/vfio", 0)
    device = VfioDevice(key, chunks=(b"c" * 5000,), config=b"cfg")
    uuid = bytes.fromhex(UUID.replace("-", ""))
    streams = qemu10_migration(
        images, channels=2, uuid=uuid, devices=[device], zero_pages="legacy"
    )
    assert streams.normal_pages and streams.zero_pages  # both kinds are counted
    running = await start(
        settings(
            tmp_path, key, channels=2, uuid=uuid, main_stream=tmp_path / "main.bin",
            ram=tmp_path / "ram",
        )
    )  # fmt: skip
    port = int(running.address.rsplit(":", 1)[1])
    await asyncio.wait_for(
        asyncio.to_thread(send, port, streams.main, streams.channels, lag=None), 60
    )
    result = await asyncio.wait_for(running.task, 60)
    snapshot = running.session.snapshot()
    info = query_migrate(snapshot)
    assert info["status"] == "completed"
    assert info["ram"] == {
        "normal": streams.normal_pages,
        "duplicate": streams.zero_pages,
        "normal-bytes": streams.normal_pages * PAGE,
        "page-size": PAGE,
        "sync-points": streams.sync_points,
        "queued-bytes": 0,
        "peak-queued-bytes": info["ram"]["peak-queued-bytes"],
    }
    assert 0 < info["ram"]["peak-queued-bytes"] <= running.session.core.layout.ram
    assert info["main-stream-bytes"] == len(streams.main)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(render(snapshot))
        for sample in family.samples
    }
    assert samples[("vfio_multifd_ram_pages_total", (("kind", "normal"),))] == (
        streams.normal_pages
    )
    assert samples[("vfio_multifd_ram_pages_total", (("kind", "zero"),))] == streams.zero_pages
    assert samples[("vfio_multifd_sync_points_total", ())] == streams.sync_points
    assert samples[("vfio_multifd_main_stream_bytes_total", ())] == len(streams.main)
    out = io.StringIO()
    print_receive_summary(result, out)
    assert (
        f"ram: {streams.normal_pages} pages ({streams.normal_pages * PAGE} bytes), "
        f"{streams.zero_pages} zero pages, {streams.sync_points} sync points; "
        f"main stream {len(streams.main)} bytes\n"
    ) in out.getvalue()
    assert (tmp_path / "ram" / "pc.ram").read_bytes() == images[-1]["pc.ram"]


def test_without_ram_a_ram_packet_fails_naming_the_option(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    streams = qemu10_migration(rounds(1), channels=2, uuid=bytes.fromhex(UUID.replace("-", "")))
    daemon = Daemon(
        tmp_path,
        "--channels", "2",
        "--uuid", UUID,
        "--main-stream", "/dev/null",
        "--device", f"idstr=dev,data={tmp_path / 'dev.bin'}",
    )
    daemons.append(daemon)
    port = int(daemon.address.rsplit(":", 1)[1])
    send(port, streams.main, streams.channels, lag=None)
    code, _, stderr = daemon.finish(60)
    assert code == 1
    assert "give --ram DIR (or --ram discard)" in stderr
    assert not (tmp_path / "dev.bin").exists()


def test_record_keeps_the_main_channel_and_replay_sends_it_again(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """--record writes main-channel.bin beside the channel files (id null in the
    manifest); a replay to another daemon gives the same RAM image and main stream."""
    from cli_helpers import run

    images = rounds(3)
    uuid = bytes.fromhex(UUID.replace("-", ""))
    streams = qemu10_migration(images, channels=2, uuid=uuid)
    record = tmp_path / "record"

    def daemon(name: str, *extra: str) -> Daemon:
        workdir = tmp_path / name
        workdir.mkdir()
        started = Daemon(
            workdir,
            "--channels", "2",
            "--uuid", UUID,
            "--main-stream", str(workdir / "main.bin"),
            "--ram", str(workdir / "ram"),
            *extra,
        )  # fmt: skip
        daemons.append(started)
        return started

    first = daemon("first", "--record", str(record))
    send(int(first.address.rsplit(":", 1)[1]), streams.main, streams.channels, lag=None)
    code, _, stderr = first.finish(60)
    assert code == 0, stderr
    assert (record / "main-channel.bin").read_bytes() == streams.main
    manifest = json.loads((record / "manifest.json").read_text())
    assert sorted(
        (c["id"] is None, c["file"], c["bytes"]) for c in manifest["recorded_channels"]
    ) == [
        (False, "channel-0.bin", len(streams.channels[0])),
        (False, "channel-1.bin", len(streams.channels[1])),
        (True, "main-channel.bin", len(streams.main)),
    ]

    second = daemon("second")
    replayed = run(["replay", str(record), "--connect", second.address])
    assert replayed.returncode == 0, replayed.stderr
    assert "2 of 2 channels and the main channel" in replayed.stdout
    assert f"main channel: sent {len(streams.main)} of {len(streams.main)} bytes" in (
        replayed.stdout
    )
    code, _, stderr = second.finish(60)
    assert code == 0, stderr
    assert (tmp_path / "second" / "ram" / "pc.ram").read_bytes() == images[-1]["pc.ram"]
    assert (tmp_path / "second" / "main.bin").read_bytes() == streams.main
