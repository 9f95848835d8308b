"""The parsers on real bytes: streams recorded from QEMU 7.2.22 and 10.0.2 (tests/fixtures/qemu/).

The RAM rebuilt from each recording by the parsers (main stream, RAM packets,
the sync barrier) and a test-local writer must equal the source's memory as
``pmemsave`` read it after the migration, page by page; the blob must be
byte for byte the one placed at 0x200000. With a running guest the same pages
come in several rounds: holding one channel back must not let an older copy win.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
from qemu.fixtures import NAMES, Recorded, load
from qemu.harness import BLOB_ADDR, PAGE_SIZE, make_blob, page_digests
from qemu.reconstruct import channel_units, reconstruct

from vfio_multifd.core.mainstream import MainStreamParser
from vfio_multifd.core.ram import MAIN
from vfio_multifd.core.savevm import (
    BlockList,
    Command,
    CommandEvent,
    Configuration,
    Ended,
    Record,
    Section,
    SyncPoint,
    Unfollowed,
    ZeroPage,
    description_problem,
)
from vfio_multifd.core.wire import (
    DEVICE_STATE_HEADER,
    VFIO_HEADER,
    DeviceKey,
    VfioFlag,
    check_config_blob,
)
from vfio_multifd.daemon.ram_images import RamImages

RECORDED = {name: load(name) for name in NAMES}


def events_of(main: bytes, chunk: int) -> list[object]:
    parser = MainStreamParser()
    events: list[object] = []
    for start in range(0, len(main), chunk):
        parser.receive_data(main[start : start + chunk])
        while (event := parser.next_event()) is not None:
            events.append(event)
    parser.eof()
    while (event := parser.next_event()) is not None:
        events.append(event)
    return events


def pages_of(image: bytearray) -> dict[int, str]:
    return page_digests(bytes(image))


@pytest.mark.parametrize("name", NAMES)
def test_rebuilt_ram_equals_the_sources_memory(name: str) -> None:
    recorded = RECORDED[name]
    result = reconstruct(recorded.main, recorded.channels)
    assert pages_of(result.images["pc.ram"]) == recorded.pc_ram_pages
    blob = recorded.expected["blob"]
    assert blob["addr"] == BLOB_ADDR
    start = blob["addr"]
    assert result.images["pc.ram"][start : start + blob["size"]] == make_blob(blob["size"], blob["seed"])
    assert result.ended is not None and result.ended.followed is False
    # One SYNC packet on every channel for each sync point of the main stream.
    syncs = [sum(u.sync for u in channel_units(data, n, lambda: blocks_of(recorded))) for n, data in enumerate(recorded.channels)]
    assert syncs == [result.sync_points] * len(recorded.channels)


def blocks_of(recorded: Recorded) -> dict[str, object]:
    events = events_of(recorded.main, len(recorded.main))
    (block_list,) = [e for e in events if isinstance(e, BlockList)]
    return {block.name: block for block in block_list.blocks}


@pytest.mark.parametrize("chunk", [1, 7, PAGE_SIZE + 1, 1 << 20])
@pytest.mark.parametrize("name", ["qemu-7.2-paused", "qemu-10.0-running"])
def test_main_stream_events_do_not_depend_on_how_the_bytes_are_split(name: str, chunk: int) -> None:
    main = RECORDED[name].main
    assert events_of(main, chunk) == events_of(main, len(main))


@pytest.mark.parametrize("name", ["qemu-7.2-paused", "qemu-10.0-paused"])
def test_main_stream_of_a_real_qemu(name: str) -> None:
    recorded = RECORDED[name]
    events = events_of(recorded.main, 65536)
    version = recorded.expected["qemu"]
    (config,) = [e for e in events if isinstance(e, Configuration)]
    assert config.machine == f"pc-i440fx-{version.rsplit('.', 1)[0]}"
    (block_list,) = [e for e in events if isinstance(e, BlockList)]
    blocks = {b.name: b.used_length for b in block_list.blocks}
    assert blocks["pc.ram"] == 64 << 20
    assert blocks["pc.bios"] == 256 << 10
    assert "/rom@etc/acpi/tables" in blocks
    sections = [(e.kind, e.idstr) for e in events if isinstance(e, Section)]
    assert sections[:3] == [
        (Record.SECTION_START, "ram"),
        (Record.SECTION_PART, "ram"),
        (Record.SECTION_END, "ram"),
    ]
    # The first device section sent whole is vmstate: not followed, the end found by the tail.
    unfollowed = [e for e in events if isinstance(e, Unfollowed)]
    assert [u.section.idstr for u in unfollowed] == ["timer"]
    assert unfollowed[0].section.kind == Record.SECTION_FULL
    ended = events[-1]
    assert isinstance(ended, Ended) and not ended.followed
    assert ended.description is not None and not description_problem(ended.description)
    assert recorded.main.endswith(ended.description)
    assert sum(isinstance(e, SyncPoint) for e in events) == 3
    zero_pages = sum(isinstance(e, ZeroPage) for e in events)
    commands = [e.command for e in events if isinstance(e, CommandEvent)]
    if version.startswith("7.2"):
        # 7.2 sends zero pages on the main stream, with a fill byte; no switchover command.
        assert zero_pages > 16000
        assert commands == []
    else:
        assert zero_pages == 0  # inside the RAM packets
        assert commands == [Command.SWITCHOVER_START]


def hold_back(channel: int) -> Callable[[list[int]], int]:
    """Read every other party first: ``channel`` is read only when nothing else can be."""
    def pick(readable: list[int]) -> int:
        others = [p for p in readable if p != channel]
        return others[-1] if others else channel
    return pick


@pytest.mark.parametrize("name", ["qemu-7.2-running", "qemu-10.0-running"])
def test_a_channel_held_back_cannot_make_an_older_page_win(name: str) -> None:
    recorded = RECORDED[name]
    expected = recorded.pc_ram_pages
    wrong_without_barrier = 0
    for channel in range(len(recorded.channels)):
        with_barrier = reconstruct(recorded.main, recorded.channels, hold_back(channel))
        assert pages_of(with_barrier.images["pc.ram"]) == expected, f"channel {channel} held"
        assert with_barrier.sync_points > 3  # several rounds
        arrival_order = reconstruct(
            recorded.main, recorded.channels, hold_back(channel), barrier=False
        )
        got = pages_of(arrival_order.images["pc.ram"])
        wrong_without_barrier += sum(got.get(page) != digest for page, digest in expected.items())
    # The test means something: writing in arrival order gets pages wrong.
    assert wrong_without_barrier >= 16


def test_device_state_spliced_between_real_ram_packets() -> None:
    recorded = RECORDED["qemu-10.0-paused-spliced"]
    spliced = recorded.expected["spliced"]
    result = reconstruct(recorded.main, recorded.channels)
    assert pages_of(result.images["pc.ram"]) == recorded.pc_ram_pages
    packets = [p for channel in result.device_state.values() for p in channel]
    assert len(packets) == spliced["chunks"] + 1
    key = DeviceKey(spliced["device"]["idstr"], spliced["device"]["instance_id"])
    chunks: dict[int, bytes] = {}
    config = b""
    for packet in packets:
        _, _, _, idstr, instance_id, size = DEVICE_STATE_HEADER.unpack_from(packet)
        assert idstr.rstrip(b"\0").decode() == key.idstr and instance_id == key.instance_id
        _, idx, vfio_flags = VFIO_HEADER.unpack_from(packet, DEVICE_STATE_HEADER.size)
        data = packet[DEVICE_STATE_HEADER.size + VFIO_HEADER.size :]
        assert len(data) == size - VFIO_HEADER.size
        if vfio_flags & VfioFlag.CONFIG_STATE:
            config = data
        else:
            chunks[idx] = data
    assert sorted(chunks) == list(range(spliced["chunks"]))
    data = b"".join(chunks[idx] for idx in sorted(chunks))
    assert hashlib.sha256(data).hexdigest() == spliced["data_sha256"]
    check_config_blob(config, key, spliced["chunks"])
    assert hashlib.sha256(config).hexdigest() == spliced["config_sha256"]
    # Both channels carry device state between their RAM packets.
    assert all(result.device_state[c] for c in (0, 1))
    assert result.order.count(MAIN) > 0


@pytest.mark.parametrize("name", ["qemu-7.2-running", "qemu-10.0-paused"])
def test_ram_images_written_from_a_real_stream(name: str, tmp_path: Path) -> None:
    """The RAM image files, written page by page in barrier order: pc.ram's file is the
    source's memory, zero pages stay holes, nothing is at the final paths before the commit."""
    recorded = RECORDED[name]
    rebuilt = reconstruct(recorded.main, recorded.channels)
    images = RamImages(tmp_path / "ram", fsync=False)
    events = events_of(recorded.main, len(recorded.main))
    (block_list,) = [e for e in events if isinstance(e, BlockList)]
    images.create(block_list.blocks)
    for name_, image in rebuilt.images.items():
        for offset in range(0, len(image), PAGE_SIZE):
            page = image[offset : offset + PAGE_SIZE]
            if page.count(0) == PAGE_SIZE:
                images.zero_page(name_, offset)
            else:
                images.write_page(name_, offset, page)
    assert not (tmp_path / "ram" / "pc.ram").exists()
    images.finish()
    images.commit()
    files = {p.name for p in (tmp_path / "ram").iterdir()}
    assert files == {"pc.ram", "pc.bios", "pc.rom", "%2From@etc%2Facpi%2Ftables",
                     "%2From@etc%2Ftable-loader", "%2From@etc%2Facpi%2Frsdp"}
    ram = (tmp_path / "ram" / "pc.ram").read_bytes()
    assert len(ram) == 64 << 20
    assert page_digests(ram) == recorded.pc_ram_pages
    used = (tmp_path / "ram" / "pc.ram").stat().st_blocks * 512
    window_pages = 0x60  # 0xa0000-0xfffff: not compared, may hold data
    data_pages = len(recorded.pc_ram_pages) + window_pages
    assert used <= (data_pages + 64) * PAGE_SIZE, f"{used} bytes allocated: zero pages are not holes"
