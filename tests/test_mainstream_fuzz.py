"""Fuzzing the main-stream parser with streams that know their format.

Random bytes die at the file magic. Here every stream is built from valid
records (a configuration, the ram section's block list and page records,
VFIO sections, commands, an opaque device section or not, the end), fed
split at random points; a mutation changes one field of one record to a value
of a class whose outcome is exact: the error's ``reason`` (and that no event
follows it). Unmutated streams must end verified with the same events however
they are split. A byte flipped anywhere past the header must give either the
events of a valid stream or a ProtocolError with a main-stream reason: never
another exception, never more buffered than one record.
"""

from __future__ import annotations

import itertools
import json
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from test_mainstream import merged

from vfio_multifd.core.mainstream import MainStreamParser
from vfio_multifd.core.savevm import Command, Ended, RamFlag, Record
from vfio_multifd.core.wire import ConfigTag
from vfio_multifd.errors import ProtocolError, Reason
from vfio_multifd.source import savevm_records as q

PAGE = 4096
MAIN_REASONS = {reason for reason in Reason if reason.value.startswith("main-")}
#: Nothing the parser holds is larger than a page record with its block name,
#: a block list of a few blocks, or the VM description (plus one feed).
BUFFER_BOUND = 16 * 1024


@dataclass
class Field:
    name: str  # what it is: "magic", "record type", "footer id", "ram flags"...
    data: bytes
    section_id: int | None = None


@dataclass
class Stream:
    fields: list[Field] = field(default_factory=list)
    blocks: dict[str, int] = field(default_factory=dict)
    opaque_at: int | None = None  # offset where the unfollowed section's data starts

    def add(self, name: str, data: bytes, section_id: int | None = None) -> None:
        self.fields.append(Field(name, data, section_id))

    def bytes(self) -> bytes:
        return b"".join(f.data for f in self.fields)

    def offset_of(self, index: int) -> int:
        return sum(len(f.data) for f in self.fields[:index])


NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz./@-", min_size=1, max_size=20)


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    stream = Stream()
    stream.add("magic", q.file_header()[:4])
    stream.add("version", q.file_header()[4:])
    stream.add("record type", bytes([Record.CONFIGURATION]))
    stream.add("configuration", q.configuration(draw(NAMES))[1:])
    names = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
    stream.blocks = {name: PAGE * draw(st.integers(1, 8)) for name in names}
    ram = 1
    stream.add("record type", bytes([Record.SECTION_START]))
    stream.add("section header", q.section_header(Record.SECTION_START, ram, "ram", 0, 4)[1:], ram)
    stream.add("block list", q.ram_block_list(stream.blocks))
    flush_mode = draw(st.booleans())
    if flush_mode:
        stream.add("flush", q.ram_record(0, RamFlag.MULTIFD_FLUSH))
    end_section(stream, ram)
    vfio_ids: list[int] = []
    for number in range(draw(st.integers(0, 2))):
        section_id = 2 + number
        vfio_ids.append(section_id)
        stream.add("record type", bytes([Record.SECTION_START]))
        header = q.section_header(Record.SECTION_START, section_id, f"0000:00:0{number}.0/vfio", 0, 1)
        stream.add("section header", header[1:], section_id)
        stream.add("vfio tag", q.vfio_tag(ConfigTag.DEV_SETUP_STATE))
        stream.add("vfio end", q.vfio_tag(ConfigTag.END_OF_STATE))
        stream.add("footer id", q.footer(section_id), section_id)
    last_block: str | None = None
    for _ in range(draw(st.integers(0, 3))):
        stream.add("record type", bytes([Record.SECTION_PART]))
        stream.add("part id", q.section_header(Record.SECTION_PART, ram)[1:], ram)
        for _ in range(draw(st.integers(0, 6))):
            name = draw(st.sampled_from(names))
            offset = PAGE * draw(st.integers(0, stream.blocks[name] // PAGE - 1))
            continued = name == last_block and draw(st.booleans())
            block = None if continued else name
            if draw(st.booleans()):
                record = q.ram_zero(offset, block, draw(st.sampled_from([0, 0, 0x55])))
            else:
                record = q.ram_page(offset, block, bytes([draw(st.integers(0, 255))]) * PAGE)
            stream.add("continued page" if continued else "named page", record)
            last_block = name
        if flush_mode:
            stream.add("flush", q.ram_record(0, RamFlag.MULTIFD_FLUSH))
        end_section(stream, ram)
        for section_id in vfio_ids:
            stream.add("record type", bytes([Record.SECTION_PART]))
            stream.add("part id", q.section_header(Record.SECTION_PART, section_id)[1:], section_id)
            stream.add("vfio tag", q.vfio_data(draw(st.binary(max_size=300))))
            stream.add("vfio end", q.vfio_tag(ConfigTag.END_OF_STATE))
            stream.add("footer id", q.footer(section_id), section_id)
    stream.add("record type", bytes([Record.COMMAND]))
    stream.add("command", q.command(Command.SWITCHOVER_START)[1:])
    stream.add("record type", bytes([Record.SECTION_END]))
    stream.add("part id", q.section_header(Record.SECTION_END, ram)[1:], ram)
    end_section(stream, ram)
    if draw(st.booleans()):
        stream.add("record type", bytes([Record.SECTION_FULL]))
        stream.add("section header", q.section_header(Record.SECTION_FULL, 0, "timer", 0, 2)[1:], 0)
        stream.opaque_at = stream.offset_of(len(stream.fields))
        stream.add("opaque", draw(st.binary(max_size=64)) + q.footer(0))
    stream.add("record type", bytes([Record.EOF]))
    description = json.dumps({"page_size": PAGE, "devices": [{"name": n} for n in names]}).encode()
    stream.add("description type", bytes([Record.VMDESCRIPTION]))
    stream.add("description length", struct.pack(">I", len(description)))
    stream.add("description", description)
    return stream


def end_section(stream: Stream, section_id: int) -> None:
    stream.add("eos", q.ram_record(0, RamFlag.EOS))
    stream.add("footer id", q.footer(section_id), section_id)


def feed(data: bytes, cuts: list[int]) -> tuple[list[object], ProtocolError | None]:
    parser = MainStreamParser()
    events: list[object] = []
    error = None
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    try:
        for start, end in itertools.pairwise(bounds):
            parser.receive_data(data[start:end])
            assert len(parser._buffer) <= BUFFER_BOUND + (end - start)
            while (item := parser.next_event()) is not None:
                events.append(item)
        parser.eof()
        while (item := parser.next_event()) is not None:
            events.append(item)
    except ProtocolError as raised:
        error = raised
        with pytest.raises(ProtocolError):  # and again, with nothing after it
            parser.next_event()
    return events, error


CUTS = st.lists(st.integers(0, 1 << 16), max_size=8)
SETTINGS = hsettings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@SETTINGS
@given(streams(), CUTS, CUTS)
def test_valid_streams_end_verified_however_split(stream: Stream, cuts: list[int], other: list[int]) -> None:
    data = stream.bytes()
    events, error = feed(data, cuts)
    assert error is None, error
    assert events[-1] == Ended(stream.opaque_at is None, stream.fields[-1].data)
    again, _ = feed(data, other)
    assert merged(again) == merged(events)


def replaced(stream: Stream, index: int, data: bytes) -> bytes:
    fields = list(stream.fields)
    fields[index] = Field(fields[index].name, data, fields[index].section_id)
    return b"".join(f.data for f in fields)


def indices(stream: Stream, name: str, before_opaque: bool = True) -> list[int]:
    return [
        i for i, f in enumerate(stream.fields)
        if f.name == name and (not before_opaque or stream.opaque_at is None or stream.offset_of(i) < stream.opaque_at)
    ]


MUTATIONS = [
    "magic", "version", "record type", "footer id", "part id", "ram flags", "ram offset",
    "block name", "vfio tag", "description length", "truncate",
]


@hsettings(SETTINGS, max_examples=400)
@given(streams(), st.sampled_from(MUTATIONS), st.data(), CUTS)
def test_one_field_changed_has_its_exact_outcome(stream: Stream, mutation: str, data: st.DataObject, cuts: list[int]) -> None:
    raw = stream.bytes()
    if mutation == "magic":
        mutated = replaced(stream, 0, data.draw(st.binary(min_size=4, max_size=4).filter(lambda b: b != b"QEVM")))
        expected = Reason.MAIN_MAGIC
    elif mutation == "version":
        version = data.draw(st.integers(0, 0xFFFFFFFF).filter(lambda v: v != 3))
        mutated = replaced(stream, 1, struct.pack(">I", version))
        expected = Reason.MAIN_VERSION
    elif mutation == "record type":
        index = data.draw(st.sampled_from(indices(stream, "record type")))
        kind = data.draw(st.integers(0x09, 0xFF).filter(lambda k: k != Record.SECTION_FOOTER))
        mutated = replaced(stream, index, bytes([kind]))
        expected = Reason.MAIN_RECORD
    elif mutation == "footer id":
        index = data.draw(st.sampled_from(indices(stream, "footer id")))
        section_id = stream.fields[index].section_id
        other = data.draw(st.integers(0, 0xFFFFFFFF).filter(lambda v: v != section_id))
        mutated = replaced(stream, index, q.footer(other))
        expected = Reason.MAIN_SECTION
    elif mutation == "part id":
        index = data.draw(st.sampled_from(indices(stream, "part id")))
        mutated = replaced(stream, index, struct.pack(">I", data.draw(st.integers(100, 0xFFFFFFFF))))
        expected = Reason.MAIN_SECTION
    elif mutation in ("ram flags", "ram offset", "block name"):
        candidates = indices(stream, "named page") if mutation == "block name" else indices(stream, "named page") + indices(stream, "continued page")
        if not candidates:
            return
        index = data.draw(st.sampled_from(candidates))
        record = bytearray(stream.fields[index].data)
        (header,) = struct.unpack_from(">Q", record)
        if mutation == "ram flags":
            header |= data.draw(st.sampled_from([RamFlag.XBZRLE, RamFlag.COMPRESS_PAGE, RamFlag.HOOK]))
            expected = Reason.MAIN_UNSUPPORTED
        elif mutation == "ram offset":
            header = (header & 0xFFF) | (data.draw(st.integers(8, 1 << 20)) * PAGE)  # blocks are <= 8 pages
            expected = Reason.MAIN_RAM
        else:
            length = record[8]
            known = set(stream.blocks)
            name = data.draw(st.binary(min_size=length, max_size=length).filter(
                lambda b: b.decode("utf-8", "surrogateescape") not in known))
            record[9 : 9 + length] = name
            expected = Reason.MAIN_RAM
        struct.pack_into(">Q", record, 0, header)
        mutated = replaced(stream, index, bytes(record))
    elif mutation == "vfio tag":
        candidates = indices(stream, "vfio tag") + indices(stream, "vfio end")
        if not candidates:
            return
        index = data.draw(st.sampled_from(candidates))
        tag = data.draw(st.integers(0, (1 << 64) - 1).filter(lambda t: t not in set(ConfigTag)))
        mutated = replaced(stream, index, struct.pack(">Q", tag) + stream.fields[index].data[8:])
        expected = Reason.MAIN_VFIO
    elif mutation == "description length":
        (length,) = struct.unpack(">I", stream.fields[-2].data)
        new = data.draw(st.integers(0, 0xFFFFFFFF).filter(lambda v: v != length))
        mutated = replaced(stream, len(stream.fields) - 2, struct.pack(">I", new))
        if stream.opaque_at is not None:
            expected = Reason.MAIN_END  # the tail no longer ends where its length says
        elif new > 16 << 20:
            expected = Reason.MAIN_RECORD  # over the bound, refused before waiting for it
        elif new > length:
            expected = Reason.MAIN_TRUNCATED  # waits for bytes that never come
        else:
            expected = Reason.MAIN_RECORD  # the JSON is cut short
    else:  # truncate
        cut = data.draw(st.integers(0, len(raw) - 1))
        mutated = raw[:cut]
        expected = Reason.MAIN_END if stream.opaque_at is not None and cut >= stream.opaque_at else Reason.MAIN_TRUNCATED
    event(mutation)
    events, error = feed(mutated, cuts)
    assert error is not None, f"{mutation}: no error; events end with {events[-1:]}"
    assert error.reason is expected, f"{mutation}: {error}"
    assert "main stream" in str(error)


@SETTINGS
@given(streams(), st.data(), CUTS)
def test_any_byte_changed_past_the_header_is_events_or_a_main_stream_error(stream: Stream, data: st.DataObject, cuts: list[int]) -> None:
    raw = bytearray(stream.bytes())
    position = data.draw(st.integers(8, len(raw) - 1))
    raw[position] ^= data.draw(st.integers(1, 255))
    events, error = feed(bytes(raw), cuts)
    event("error" if error else "events")
    if error is not None:
        assert error.reason in MAIN_REASONS, error
    else:
        assert isinstance(events[-1], Ended)
