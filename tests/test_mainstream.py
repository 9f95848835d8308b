"""QEMU's main channel parser (core/mainstream.py): every record, every error, any split.

Streams come from the QEMU-10-like encoder (source/qemu_like.py) or are built
record by record from its functions; each error case changes one thing and
expects its ``reason`` and the words that name it.
"""

from __future__ import annotations

import json
import random
import struct

import pytest

from vfio_multifd.core.mainstream import MainStreamParser
from vfio_multifd.core.savevm import (
    BlockList,
    Command,
    CommandEvent,
    Configuration,
    Ended,
    Page,
    RamBlock,
    RamFlag,
    Record,
    Section,
    SyncPoint,
    Unfollowed,
    VfioData,
    ZeroPage,
)
from vfio_multifd.core.wire import ConfigTag, DeviceKey
from vfio_multifd.errors import ProtocolError, Reason
from vfio_multifd.source import savevm_records as q
from vfio_multifd.source.qemu_like import VfioDevice, qemu10_migration

PAGE = 4096
VFIO = DeviceKey("0000:00:02.0/vfio", 0)
DESCRIPTION = json.dumps({"page_size": PAGE, "devices": []}).encode()


def parse(data: bytes, *, chunk: int | None = None, eof: bool = True, **options: object) -> list[object]:
    parser = MainStreamParser(**options)  # type: ignore[arg-type]
    events: list[object] = []
    step = chunk or max(1, len(data))
    for start in range(0, len(data), step):
        parser.receive_data(data[start : start + step])
        while (event := parser.next_event()) is not None:
            events.append(event)
    if eof:
        parser.eof()
        while (event := parser.next_event()) is not None:
            events.append(event)
    return events


def merged(events: list[object]) -> list[object]:
    """VFIO data comes in pieces as it arrives: join consecutive pieces of one device."""
    out: list[object] = []
    for event in events:
        last = out[-1] if out else None
        if (
            isinstance(event, VfioData)
            and isinstance(last, VfioData)
            and (last.idstr, last.instance_id) == (event.idstr, event.instance_id)
        ):
            out[-1] = VfioData(last.idstr, last.instance_id, last.data + event.data)
        else:
            out.append(event)
    return out


def error_of(data: bytes, **options: object) -> ProtocolError:
    with pytest.raises(ProtocolError) as raised:
        parse(data, **options)
    return raised.value


def image(seed: int = 1) -> dict[str, bytes]:
    rng = random.Random(seed)
    ram = bytearray(64 * PAGE)
    for page in (0, 5, 6, 40):
        ram[page * PAGE : (page + 1) * PAGE] = rng.randbytes(PAGE)
    return {"pc.ram": bytes(ram), "/rom@etc/acpi/tables": rng.randbytes(2 * PAGE)}


def ram_start(blocks: dict[str, int] | None = None) -> bytes:
    blocks = blocks or {"pc.ram": 64 * PAGE, "/rom@etc/acpi/tables": 2 * PAGE}
    return (
        q.file_header()
        + q.configuration("pc-i440fx-10.0")
        + q.section_header(Record.SECTION_START, 1, "ram", 0, 4)
        + q.ram_block_list(blocks)
    )


def eos(section_id: int = 1) -> bytes:
    return q.ram_record(0, RamFlag.EOS) + q.footer(section_id)


def ending() -> bytes:
    return q.vm_description(DESCRIPTION)


# -- whole streams ---------------------------------------------------------------------


def test_a_stream_of_ram_and_vfio_sections_is_followed_to_its_end() -> None:
    device = VfioDevice(VFIO, precopy=(b"pre-0", b"pre-1" * 1000), chunks=(b"c0",))
    first, second = image(1), image(2)
    streams = qemu10_migration([first, second, second], devices=[device], opaque_device=False)
    events = parse(streams.main)
    assert events[0] == Configuration("pc-i440fx-10.0")
    assert [e for e in events if isinstance(e, BlockList)] == [
        BlockList((RamBlock("pc.ram", 64 * PAGE), RamBlock("/rom@etc/acpi/tables", 2 * PAGE)))
    ]
    vfio = b"".join(e.data for e in events if isinstance(e, VfioData))
    assert vfio == b"pre-0" + b"pre-1" * 1000
    assert {(e.idstr, e.instance_id) for e in events if isinstance(e, VfioData)} == {(VFIO.idstr, 0)}
    assert [e.number for e in events if isinstance(e, SyncPoint)] == [1, 2, 3, 4]
    assert [e.command for e in events if isinstance(e, CommandEvent)] == [Command.SWITCHOVER_START]
    assert not [e for e in events if isinstance(e, Unfollowed)]
    assert events[-1] == Ended(True, streams.description)
    kinds = [(e.kind, e.idstr) for e in events if isinstance(e, Section)]
    assert kinds[-1] == (Record.SECTION_FULL, VFIO.idstr)


def test_with_an_opaque_device_section_the_end_is_recognised_by_the_tail() -> None:
    streams = qemu10_migration([image()], opaque_device=True)
    events = parse(streams.main)
    (unfollowed,) = [e for e in events if isinstance(e, Unfollowed)]
    assert unfollowed.section == Section(Record.SECTION_FULL, 0, "timer", 0, 2)
    # The offset is where the section's data starts: its header just before it.
    header = q.section_header(Record.SECTION_FULL, 0, "timer", 0, 2)
    assert streams.main[unfollowed.offset - len(header) : unfollowed.offset] == header
    assert events[-1] == Ended(False, streams.description)


@pytest.mark.parametrize("zero_pages", ["multifd", "legacy"])
def test_split_at_every_point_gives_the_same_events(zero_pages: str) -> None:
    device = VfioDevice(VFIO, precopy=(b"p" * 9,))
    streams = qemu10_migration([image(1), image(3)], devices=[device], zero_pages=zero_pages)
    whole = merged(parse(streams.main))
    assert merged(parse(streams.main, chunk=1)) == whole
    for cut in range(1, len(streams.main), 97):
        parser = MainStreamParser()
        events: list[object] = []
        for piece in (streams.main[:cut], streams.main[cut:]):
            parser.receive_data(piece)
            while (event := parser.next_event()) is not None:
                events.append(event)
        parser.eof()
        while (event := parser.next_event()) is not None:
            events.append(event)
        assert merged(events) == whole, f"split at {cut}"


def test_legacy_zero_pages_on_the_main_stream() -> None:
    streams = qemu10_migration([image()], zero_pages="legacy")
    zeros = [e for e in parse(streams.main) if isinstance(e, ZeroPage)]
    assert len(zeros) == 64 - 4  # pc.ram's zero pages; the others travel in RAM packets
    assert {(z.block, z.fill) for z in zeros} == {("pc.ram", 0)}
    assert sorted(z.offset // PAGE for z in zeros) == [p for p in range(64) if p not in (0, 5, 6, 40)]


def test_page_records_and_continue() -> None:
    page = bytes(range(256)) * 16
    data = (
        ram_start()
        + eos()
        + q.section_header(Record.SECTION_PART, 1)
        + q.ram_page(3 * PAGE, "pc.ram", page)
        + q.ram_zero(4 * PAGE, None, fill=0x5A)  # CONTINUE: pc.ram
        + q.ram_zero(0, "/rom@etc/acpi/tables")
        + q.ram_page(PAGE, None, page)  # CONTINUE: the acpi block now
        + eos()
        + ending()
    )
    events = parse(data)
    assert [e for e in events if isinstance(e, Page | ZeroPage)] == [
        Page("pc.ram", 3 * PAGE, page),
        ZeroPage("pc.ram", 4 * PAGE, 0x5A),
        ZeroPage("/rom@etc/acpi/tables", 0, 0),
        Page("/rom@etc/acpi/tables", PAGE, page),
    ]
    assert events[-1] == Ended(True, DESCRIPTION)


def test_continue_refers_to_the_block_named_in_an_earlier_section() -> None:
    data = (
        ram_start()
        + q.ram_zero(PAGE, "/rom@etc/acpi/tables")
        + eos()
        + q.section_header(Record.SECTION_PART, 1)
        + q.ram_zero(0, None)
        + eos()
        + ending()
    )
    zeros = [e for e in parse(data) if isinstance(e, ZeroPage)]
    assert zeros == [ZeroPage("/rom@etc/acpi/tables", PAGE, 0), ZeroPage("/rom@etc/acpi/tables", 0, 0)]


def test_sync_points_at_every_eos_when_no_flush_comes_first() -> None:
    """QEMU 7.2 (and old machine types): each EOS of the ram section is a sync point."""
    data = ram_start() + eos() + q.section_header(Record.SECTION_PART, 1) + eos()
    data += q.section_header(Record.SECTION_END, 1) + eos() + ending()
    assert [e.number for e in parse(data) if isinstance(e, SyncPoint)] == [1, 2, 3]
    # Told otherwise, the EOS records are not sync points.
    assert [e for e in parse(data, sync_at_eos=False) if isinstance(e, SyncPoint)] == []


def test_flush_in_a_stream_that_syncs_at_eos_is_an_error() -> None:
    flush = q.ram_record(0, RamFlag.MULTIFD_FLUSH)
    data = ram_start() + eos() + q.section_header(Record.SECTION_PART, 1) + flush + eos()
    error = error_of(data)
    assert error.reason is Reason.MAIN_RAM
    assert "MULTIFD_FLUSH in a stream whose sync points are its EOS records" in str(error)


def test_configuration_subsections() -> None:
    uuid = bytes(range(16))
    config = (
        q.configuration("pc-q35-10.0", ["validate-uuid-test"])
        + q.subsection("configuration/uuid")
        + uuid
        + q.subsection("configuration/target-page-bits")
        + struct.pack(">I", 12)
    )
    data = q.file_header() + config + ending()
    events = parse(data)
    assert events[0] == Configuration("pc-q35-10.0", ("validate-uuid-test",), uuid)
    assert events[-1] == Ended(True, DESCRIPTION)


def test_vfio_sections_framing() -> None:
    section = q.section_header(Record.SECTION_START, 7, VFIO.idstr, 0, 1)
    data = (
        q.file_header()
        + section
        + q.vfio_tag(ConfigTag.DEV_SETUP_STATE)
        + q.vfio_tag(ConfigTag.END_OF_STATE)
        + q.footer(7)
        + q.section_header(Record.SECTION_PART, 7)
        + q.vfio_data(b"abc")
        + q.vfio_data(b"")
        + q.vfio_data(b"defg")
        + q.vfio_tag(ConfigTag.DEV_INIT_DATA_SENT)
        + q.footer(7)
        + q.section_header(Record.SECTION_END, 7)
        + q.vfio_data(b"h")
        + q.vfio_tag(ConfigTag.END_OF_STATE)
        + q.footer(7)
        + ending()
    )
    events = parse(data, chunk=2)
    assert b"".join(e.data for e in events if isinstance(e, VfioData)) == b"abcdefgh"
    assert events[-1] == Ended(True, DESCRIPTION)


def test_vfio_config_state_in_a_full_section_is_not_followed() -> None:
    data = (
        q.file_header()
        + q.section_header(Record.SECTION_FULL, 7, "vfio", 0, 1)
        + q.vfio_tag(ConfigTag.DEV_CONFIG_STATE)
        + b"pci config vmstate"
        + q.vfio_tag(ConfigTag.END_OF_STATE)
        + q.footer(7)
        + ending()
    )
    events = parse(data)
    assert [e.why for e in events if isinstance(e, Unfollowed)] == [
        "VFIO config state (PCI vmstate without a length prefix)"
    ]
    assert events[-1] == Ended(False, DESCRIPTION)


def test_a_large_vfio_block_comes_in_pieces_as_it_arrives() -> None:
    block = bytes(range(256)) * 4096  # 1 MiB
    data = (
        q.file_header()
        + q.section_header(Record.SECTION_START, 7, VFIO.idstr, 0, 1)
        + q.vfio_data(block)
        + q.vfio_tag(ConfigTag.END_OF_STATE)
        + q.footer(7)
        + ending()
    )
    parser = MainStreamParser()
    pieces = []
    for start in range(0, len(data), 65536):
        parser.receive_data(data[start : start + 65536])
        assert len(parser._buffer) <= 65536 + 64, "the block is not buffered whole"
        while (event := parser.next_event()) is not None:
            if isinstance(event, VfioData):
                pieces.append(event.data)
    assert len(pieces) > 10
    assert b"".join(pieces) == block


def test_a_stream_without_vm_description_ends_at_qemu_vm_eof() -> None:
    data = ram_start() + eos() + bytes([Record.EOF])
    assert parse(data)[-1] == Ended(True, None)


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason", "words"),
    [
        (b"QEVX" + bytes(4), Reason.MAIN_MAGIC, "file magic 51455658, expected 5145564d"),
        (b"QEVM" + struct.pack(">I", 2), Reason.MAIN_VERSION, "file version 2, expected 3"),
        (q.file_header() + b"\x09", Reason.MAIN_RECORD, "offset 8: unknown record type 0x09"),
        (
            q.file_header() + b"\x05",
            Reason.MAIN_RECORD,
            "record type 0x05 (SUBSECTION) where a top-level record must be",
        ),
        (
            q.file_header() + q.vm_description(b"{}")[1:],
            Reason.MAIN_RECORD,
            "record type 0x06 (VMDESCRIPTION) where a top-level record must be",
        ),
        (
            q.file_header() + bytes([Record.CONFIGURATION]) + struct.pack(">I", 257),
            Reason.MAIN_RECORD,
            "machine name of 257 bytes, at most 256",
        ),
        (
            q.file_header() + q.configuration("pc", ["mapped-ram"]),
            Reason.MAIN_UNSUPPORTED,
            "the source uses mapped-ram",
        ),
        (
            q.file_header() + q.configuration("pc", ["x-ignore-shared"]),
            Reason.MAIN_UNSUPPORTED,
            "x-ignore-shared",
        ),
        (
            q.file_header() + q.configuration("pc") + q.subsection("configuration/target-page-bits")
            + struct.pack(">I", 16),
            Reason.MAIN_UNSUPPORTED,
            "target page size 2**16",
        ),
        (
            q.file_header() + q.configuration("pc") + q.subsection("configuration/new"),
            Reason.MAIN_RECORD,
            "unknown configuration subsection 'configuration/new'",
        ),
        (
            q.file_header() + q.section_header(Record.SECTION_PART, 9),
            Reason.MAIN_SECTION,
            "SECTION_PART of section 9, which never started",
        ),
        (
            ram_start() + eos() + q.section_header(Record.SECTION_START, 1, "ram", 0, 4),
            Reason.MAIN_SECTION,
            "SECTION_START of section 1 (ram) again",
        ),
        (
            ram_start() + q.ram_record(0, RamFlag.EOS) + q.footer(2),
            Reason.MAIN_SECTION,
            "section footer names section 2, expected 1",
        ),
        (
            q.file_header() + q.command(Command.OPEN_RETURN_PATH),
            Reason.MAIN_UNSUPPORTED,
            "OPEN_RETURN_PATH: the source uses a return path",
        ),
        (
            q.file_header() + q.command(Command.POSTCOPY_ADVISE, bytes(16)),
            Reason.MAIN_UNSUPPORTED,
            "POSTCOPY_ADVISE: the source uses postcopy",
        ),
        (
            q.file_header() + q.command(Command.ENABLE_COLO),
            Reason.MAIN_UNSUPPORTED,
            "COLO",
        ),
        (
            q.file_header() + bytes([Record.COMMAND]) + struct.pack(">HH", 99, 0),
            Reason.MAIN_RECORD,
            "unknown QEMU_VM_COMMAND 99",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_records_refused(data: bytes, reason: Reason, words: str) -> None:
    error = error_of(data, eof=False)
    assert error.reason is reason
    assert words in str(error)
    assert str(error).startswith("device main channel: main stream offset ")


@pytest.mark.parametrize(
    ("records", "reason", "words"),
    [
        (q.ram_record(0, RamFlag.XBZRLE | RamFlag.PAGE), Reason.MAIN_UNSUPPORTED, "XBZRLE compression"),
        (q.ram_record(0, RamFlag.COMPRESS_PAGE), Reason.MAIN_UNSUPPORTED, "compressed pages"),
        (q.ram_record(0, RamFlag.HOOK), Reason.MAIN_UNSUPPORTED, "RDMA"),
        (q.ram_record(0, RamFlag.FULL), Reason.MAIN_UNSUPPORTED, "obsolete FULL"),
        (q.ram_record(0, 0x400), Reason.MAIN_RAM, "unknown flags 0x400"),
        (q.ram_record(0, 0), Reason.MAIN_RAM, "ram record with flags 0x0"),
        (q.ram_zero(0, None), Reason.MAIN_RAM, "CONTINUE record before any RAMBlock was named"),
        (q.ram_zero(0, "pc.rom"), Reason.MAIN_RAM, "RAMBlock 'pc.rom', which is not in the block list"),
        (q.ram_zero(64 * PAGE, "pc.ram"), Reason.MAIN_RAM, "offset 0x40000 of RAMBlock pc.ram: past its used length 0x40000"),
        (q.ram_block_list({"x": PAGE}), Reason.MAIN_RAM, "a second block list"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_ram_records_refused(records: bytes, reason: Reason, words: str) -> None:
    error = error_of(ram_start() + records, eof=False)
    assert error.reason is reason
    assert words in str(error)
    assert "section 1 (ram)" in str(error)


@pytest.mark.parametrize(
    ("blocks", "words"),
    [
        ([("pc.ram", 3 * PAGE), ("pc.ram", PAGE)], "RAMBlock pc.ram twice in the block list"),
        ([("", PAGE)], "RAMBlock name '' in the block list"),
        ([("a\0b", PAGE)], "RAMBlock name 'a\\x00b'"),
        ([("pc.ram", 100)], "used length 100 is not a non-zero multiple of 4096"),
        ([("pc.ram", 0), ("b", PAGE)], "used length 0 is not a non-zero multiple"),
        ([("pc.ram", 8 * PAGE)], "within the 4096 bytes the block list has left (of 4096)"),
    ],
)
def test_bad_block_lists(blocks: list[tuple[str, int]], words: str) -> None:
    # The total itself is a page multiple (its low bits are the record's flags).
    total = PAGE if "has left (of 4096)" in words or "length 100 " in words else sum(size for _, size in blocks)
    body = q.ram_record(total, RamFlag.MEM_SIZE) + b"".join(
        q.u8_string(name) + struct.pack(">Q", size) for name, size in blocks
    )
    data = q.file_header() + q.section_header(Record.SECTION_START, 1, "ram", 0, 4) + body
    error = error_of(data, eof=False)
    assert error.reason is Reason.MAIN_RAM
    assert words in str(error)


def test_a_block_list_of_too_many_blocks_is_refused_before_more_are_read() -> None:
    blocks = {f"b{n}": PAGE for n in range(1025)}
    data = q.file_header() + q.section_header(Record.SECTION_START, 1, "ram", 0, 4)
    data += q.ram_block_list(blocks)
    error = error_of(data, eof=False)
    assert error.reason is Reason.MAIN_RAM
    assert "block list of more than 1024 RAMBlocks" in str(error)


@pytest.mark.parametrize(
    ("tags", "reason", "words"),
    [
        (q.vfio_tag(ConfigTag.DEV_CONFIG_LOAD_READY), Reason.MAIN_VFIO, "unknown VFIO tag 0xffffffffef100006"),
        (struct.pack(">Q", 0x1234), Reason.MAIN_VFIO, "unknown VFIO tag 0x0000000000001234"),
        (
            q.vfio_tag(ConfigTag.DEV_SETUP_STATE) + q.vfio_tag(ConfigTag.DEV_DATA_STATE),
            Reason.MAIN_VFIO,
            "VFIO SETUP_STATE followed by 0xffffffffef100004, expected END_OF_STATE",
        ),
    ],
)
def test_vfio_tags_refused(tags: bytes, reason: Reason, words: str) -> None:
    data = q.file_header() + q.section_header(Record.SECTION_START, 7, VFIO.idstr, 0, 1) + tags
    error = error_of(data, eof=False)
    assert error.reason is reason
    assert words in str(error)
    assert f"section 7 ({VFIO.idstr})" in str(error)


def test_the_vm_description_is_checked() -> None:
    too_long = ram_start() + eos() + bytes([Record.EOF, Record.VMDESCRIPTION]) + struct.pack(">I", 1001)
    error = error_of(too_long, eof=False, max_description=1000)
    assert error.reason is Reason.MAIN_RECORD
    assert "VM description of 1001 bytes, at most 1000" in str(error)
    not_json = ram_start() + eos() + q.vm_description(b"{nope")
    error = error_of(not_json)
    assert error.reason is Reason.MAIN_RECORD and "VM description: not JSON" in str(error)
    no_devices = ram_start() + eos() + q.vm_description(b'{"page_size": 4096}')
    assert "not a JSON object with a devices list" in str(error_of(no_devices))
    after = ram_start() + eos() + ending() + b"\x00"
    error = error_of(after)
    assert error.reason is Reason.MAIN_END and "bytes after the VM description" in str(error)
    other = ram_start() + eos() + bytes([Record.EOF, Record.SECTION_START])
    error = error_of(other)
    assert error.reason is Reason.MAIN_END
    assert "record type 0x01 after QEMU_VM_EOF" in str(error)


@pytest.mark.parametrize("cut", [0, 3, 8, 20, -1])
def test_a_stream_cut_short_is_truncated(cut: int) -> None:
    data = ram_start() + eos() + ending()
    data = data[:cut] if cut >= 0 else data[: len(data) - len(ending()) + 3]
    error = error_of(data)
    assert error.reason is Reason.MAIN_TRUNCATED
    assert "stream closed in state" in str(error)


def test_a_vfio_block_cut_short_says_how_much_is_missing() -> None:
    data = q.file_header() + q.section_header(Record.SECTION_START, 7, VFIO.idstr, 0, 1)
    data += q.vfio_data(b"x" * 100)[:-40]
    error = error_of(data)
    assert error.reason is Reason.MAIN_TRUNCATED
    assert "(40 VFIO data bytes missing)" in str(error)


@pytest.mark.parametrize(
    "tail",
    [
        b"",  # no VM description at all
        q.vm_description(DESCRIPTION)[:-1],  # cut inside it
        q.vm_description(DESCRIPTION) + b"\x00",  # something after it
        q.vm_description(b"[1, 2]"),  # JSON, but not QEMU's
    ],
    ids=["none", "cut", "after", "not-qemus"],
)
def test_an_unfollowed_stream_must_end_with_a_recognisable_description(tail: bytes) -> None:
    data = (
        ram_start()
        + eos()
        + q.section_header(Record.SECTION_FULL, 0, "timer", 0, 2)
        + bytes(24)
        + q.footer(0)
        + tail
    )
    error = error_of(data)
    assert error.reason is Reason.MAIN_END
    assert "without a recognisable end" in str(error)
    assert f"after {len(data)} bytes" in str(error)


def test_errors_come_after_the_events_before_them_and_again() -> None:
    data = ram_start() + eos() + b"\x09"
    parser = MainStreamParser()
    parser.receive_data(data)
    events = []
    with pytest.raises(ProtocolError):
        while (event := parser.next_event()) is not None:
            events.append(event)
    assert isinstance(events[-1], SyncPoint)
    with pytest.raises(ProtocolError) as again:
        parser.next_event()
    assert again.value.reason is Reason.MAIN_RECORD
    parser.receive_data(b"more")  # ignored: the parser has stopped
    parser.eof()
    with pytest.raises(ProtocolError):
        parser.next_event()


def test_page_size_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        MainStreamParser(page_size=3000)


# -- purity ------------------------------------------------------------------------------

MAIN_STREAM_PARTS = (
    "core/mainstream_cursor",
    "core/mainstream_ram",
    "core/mainstream_records",
    "core/mainstream_tail",
)
PURE_NEW = (
    "core/savevm",
    "core/mainstream",
    *MAIN_STREAM_PARTS,
    "core/ram",
    "source/savevm_records",
    "source/qemu_like",
)


@pytest.mark.parametrize("module", PURE_NEW)
def test_the_parsers_and_the_encoder_import_nothing_that_does_io(module: str) -> None:
    from test_purity import DYNAMIC_IMPORTS, FORBIDDEN_IMPORTS, PACKAGE_DIR, _imports_of

    source = (PACKAGE_DIR / f"{module}.py").read_text()
    absolute, relative = _imports_of(source, module, module.split("/")[:-1])
    assert absolute, f"{module} parsed to no imports at all"
    assert not absolute & (FORBIDDEN_IMPORTS | DYNAMIC_IMPORTS), absolute
    allowed = {"errors", "core/wire", "core/savevm", "core/mainstream", "core/ram"}
    allowed.add("source/savevm_records")  # pure too: checked above
    assert relative <= allowed | set(MAIN_STREAM_PARTS), relative


def test_importing_them_loads_no_io_modules() -> None:
    from test_purity import _REPORT, IO_MODULES, _run

    loaded = _run(
        "import vfio_multifd.core.mainstream, vfio_multifd.core.ram, vfio_multifd.source.qemu_like"
        + _REPORT
    )
    assert loaded == {name: False for name in IO_MODULES}
