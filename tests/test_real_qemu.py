"""A real QEMU as the source: Debian's 7.2 and 10.0.2 (``tests/qemu/get-qemu.sh`` makes both
available; a QEMU that is not there skips its tests with one line saying so).

QEMU migrates a 64 MiB VM (paused, or running a guest that rewrites 4 MiB over
several rounds) with multifd to ``vfio-multifd receive --main-stream FILE --ram
DIR``, under each event loop, and its ``pc.ram`` image must equal the RAM
``pmemsave`` reads on the source afterwards (guest-physical 0..64 MiB, less
0xa0000-0xfffff). Under uvloop the daemon also records what it received
(``--record``), and the pure parsers rebuild that same memory from the recorded
streams; under the stdlib loop it runs without ``--record``, as it runs by default.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from cli_helpers import Daemon
from qemu.harness import (
    BLOB_ADDR,
    Qemu,
    SourceVm,
    find_qemus,
    make_blob,
    mask_pc_window,
    source_vm,
)
from qemu.reconstruct import channel_units, main_units, reconstruct

from vfio_multifd.core.savevm import BlockList, RamBlock
from vfio_multifd.source.replay import Recording

QEMUS = find_qemus()
BLOB = make_blob(256 << 10)
UUID = "6b8e1a52-3c1d-4f8e-9b1a-22c0ffee0022"
INTEGRATED = True  # the daemon takes --main-stream / --ram (issue 22)
PAGES_PER_PACKET_7_2 = 128  # MULTIFD_PACKET_SIZE (512 KiB) of 4 KiB pages


def qemu(label: str) -> Qemu:
    if label not in QEMUS:
        pytest.skip(f"no QEMU {label}: run tests/qemu/get-qemu.sh (or set QEMU_7_2 / QEMU_10_0)")
    return QEMUS[label]


def migrate(vm: SourceVm, port: int, *, channels: int, running: bool, zero_page_detection: str | None) -> dict[str, object]:
    vm.set_multifd(channels, zero_page_detection=zero_page_detection)
    if running:
        vm.migrate(port, rounds=4)  # once the guest is seen rewriting its pages
    else:
        vm.migrate(port)
    info = vm.wait_migration(120)
    assert info["status"] == "completed", info
    return info


CASES = [
    pytest.param("7.2", 2, False, None, id="7.2-2ch-paused"),
    pytest.param("7.2", 2, True, None, id="7.2-2ch-running", marks=pytest.mark.slow),
    pytest.param("7.2", 4, False, None, id="7.2-4ch-paused"),
    pytest.param("10.0", 4, True, None, id="10.0-4ch-running", marks=pytest.mark.slow),
    pytest.param("10.0", 2, False, None, id="10.0-2ch-paused"),
    pytest.param("10.0", 4, False, None, id="10.0-4ch-paused"),
    pytest.param("10.0", 2, True, None, id="10.0-2ch-running", marks=pytest.mark.slow),
    pytest.param("10.0", 2, False, "legacy", id="10.0-2ch-paused-legacy-zero-pages"),
]


def check_the_parsers_rebuild(
    record: Path, memory: bytes, info: dict[str, object], main_stream: bytes, *, channels: int,
    running: bool,
) -> None:
    """The pure parsers rebuild ``memory`` (the source's RAM, masked) from the streams the
    daemon recorded (``main_stream``: what it wrote to ``--main-stream``).

    That the recorded files hold the bytes the daemon received, and so what QEMU
    sent, is the recorder's own promise (tests/test_record.py and
    tests/test_qemu_streams.py compare them with the bytes sent); ``Recording.load``
    checks each file against its manifest's size and digest.
    """
    manifest = Recording.load(record).manifest
    assert manifest.outcome == "completed" and manifest.complete, manifest
    by_id = {c.id: record / c.file for c in manifest.recorded_channels}  # listed as accepted
    assert sorted(by_id, key=lambda i: -1 if i is None else i) == [None, *range(channels)]
    main = by_id[None].read_bytes()
    assert main == main_stream  # both are the main channel byte for byte
    streams = [by_id[n].read_bytes() for n in range(channels)]  # in channel id order
    assert [s[24] for s in streams] == list(range(channels))  # each said its id in its handshake
    result = reconstruct(main, streams)
    assert mask_pc_window(result.images["pc.ram"]) == memory
    assert result.ended is not None
    assert [s[8:24] for s in streams] == [bytes.fromhex(UUID.replace("-", ""))] * channels
    if running:
        assert info["ram"]["dirty-sync-count"] >= 4  # type: ignore[index]
        assert result.sync_points > 3


def pages_sent_twice_in_a_round(record: Path, channels: int) -> int:
    """How many times the recorded RAM packets repeat a page between the same two sync
    points. QEMU queues a page at most once between two bitmap syncs (queuing clears
    its dirty bit) and 7.2 ends each ram_save_iterate() with a sync point, so every
    repeat within a round is a page it sent twice."""
    by_id = {c.id: record / c.file for c in Recording.load(record).manifest.recorded_channels}
    blocks: dict[str, RamBlock] = {}
    for unit in main_units(by_id[None].read_bytes()):
        if isinstance(unit, BlockList):
            blocks.update((block.name, block) for block in unit.blocks)
    seen: Counter[tuple[int, str, int]] = Counter()
    for channel in range(channels):
        sync_round = 0  # the k-th sync packet of every channel is the same sync point
        for unit in channel_units(by_id[channel].read_bytes(), channel, lambda: blocks):
            seen.update(
                (sync_round, name, offset)
                for name, offset, page in unit.pages
                if not isinstance(page, int)
            )
            sync_round += unit.sync
    return sum(count - 1 for count in seen.values())


@pytest.mark.skipif(not INTEGRATED, reason="needs the daemon's --main-stream/--ram (issue 22 integration)")
@pytest.mark.parametrize(("label", "channels", "running", "zero_page_detection"), CASES)
def test_the_daemon_receives_a_real_qemu(
    tmp_path: Path, cli_loop: str, daemons: list[Daemon], label: str, channels: int, running: bool,
    zero_page_detection: str | None,
) -> None:
    source = qemu(label)
    ram_dir = tmp_path / "ram"
    record = tmp_path / "record"
    recording = ["--record", str(record)] if cli_loop == "uvloop" else []
    if recording:
        record.mkdir(mode=0o700)  # the daemon records only into a directory nobody else may write
    daemon = Daemon(
        tmp_path,
        "--channels", str(channels),
        "--uuid", UUID,
        "--main-stream", str(tmp_path / "main.bin"),
        "--ram", str(ram_dir),
        "--result", str(tmp_path / "result.json"),
        *recording,
    )
    daemons.append(daemon)
    port = int(daemon.address.rsplit(":", 1)[1])
    with source_vm(source, tmp_path / "vm", blob=BLOB, running=running, uuid=UUID) as vm:
        info = migrate(vm, port, channels=channels, running=running,
                       zero_page_detection=zero_page_detection)
        code, _, stderr = daemon.finish(60)
        ram = vm.read_ram()
    assert code == 0, stderr
    image = (ram_dir / "pc.ram").read_bytes()
    memory = mask_pc_window(ram)  # once, for the daemon and the parsers: each mask copies 64 MiB
    assert mask_pc_window(image) == memory
    assert ram[BLOB_ADDR : BLOB_ADDR + len(BLOB)] == BLOB
    main = (tmp_path / "main.bin").read_bytes()
    assert main[:4] == b"QEVM"
    # The daemon counts what the source says it sent: its query-migrate's normal and
    # duplicate (zero) pages, and the main channel's bytes.
    result = json.loads((tmp_path / "result.json").read_text())
    sent = info["ram"]
    assert isinstance(sent, dict)
    assert result["ram_zero_pages"] == sent["duplicate"]
    surplus = result["ram_pages"] - sent["normal"]
    if label == "7.2":
        # QEMU 7.2 sometimes sends a page twice and counts it once. In its
        # migration/multifd.c, multifd_queue_page() hands a full queue of pages to a
        # channel thread and then reads that queue's block again to decide whether
        # the page still fits; if the channel thread (multifd_send_thread()) has
        # already cleared it, the same page is queued again into the next packet,
        # while migration/ram.c ram_save_multifd_page() counted it once. A recording
        # shows each such page twice in one round; without one, only the last page of
        # a full packet can be queued again, so the surplus is at most one page per
        # full packet. (10.0's multifd_queue_page() does not read the handed-over
        # queue again, and its count is exact.)
        if recording:
            assert surplus == pages_sent_twice_in_a_round(record, channels)
        else:
            assert 0 <= surplus <= result["ram_pages"] // PAGES_PER_PACKET_7_2
    else:
        assert surplus == 0
    assert result["main_stream_bytes"] == len(main)
    assert result["sync_points"] > 0
    if recording:
        check_the_parsers_rebuild(record, memory, info, main, channels=channels, running=running)
