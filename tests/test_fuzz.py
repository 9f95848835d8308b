"""Fuzzing that knows the format: valid streams, one field changed at a time.

Random bytes almost never match the magic, so fuzzing with them tests the first
four bytes. Here every stream is built from valid handshakes and packets
(several devices, interleaved in any order); a mutation replaces one field of
one of them with a value from a class (a wrong magic, a size under the VFIO
header, an idx the device already has...), and each class has an exact
outcome: the error's ``reason``, or the events (and, over a real session, the
bytes on disk) that the changed stream must give. Unmutated streams must
complete with exactly the bytes sent, split anywhere.

Three levels: the pure decoder (hypothesis, thousands of streams, in the
zero-copy mode the daemon uses); a real session over loopback for each
mutation class; and a stateful test of a session's channels and devices (see
``SessionMachine``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import pytest
import qemu_source as qs
import uvloop
from helpers import (
    IDSTR,
    IDSTR_B,
    FakeTransport,
    assert_outputs,
    connect,
    final_files,
    send_streams_quietly,
    settings,
    start,
)
from hypothesis import HealthCheck, assume, event, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from vfio_multifd import (
    Address,
    DeviceKey,
    DeviceSpec,
    HandshakeError,
    MultifdError,
    ProtocolError,
    Reason,
    ReceiveSettings,
    Session,
    SessionStatus,
)
from vfio_multifd.core.connections import RECENT_REFUSALS
from vfio_multifd.core.decoder import ASK, ChannelDecoder, MainBytes, MainChannel
from vfio_multifd.core.wire import ChannelHandshake, DevicePacket, PacketHeader
from vfio_multifd.daemon.channel import ChannelProtocol

MAGIC = 0x11223344
#: The decoder's bound in these tests: far above any chunk generated here.
MAX_PACKET = 1024
U32 = st.integers(min_value=0, max_value=0xFFFFFFFF)


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


_HIGH = bytes(b | 0x80 for b in range(256))  # a byte with its top bit set: uniform in 0x80-0xff


def high_bytes(rng: random.Random, size: int) -> bytes:
    """Data whose every byte is >= 0x80: no 4-byte window of it, or of its edges with a
    header (whose bytes that could start a magic are < 0x80), reads 0x11223344, so a
    decoder thrown off a packet boundary meets a wrong magic, predictably."""
    return rng.randbytes(size).translate(_HIGH)


# -- streams built from fields ---------------------------------------------------------


@dataclass(frozen=True)
class Packet:
    """One device-state packet, as its fields (PROTOCOL.md 2.3, 2.4)."""

    idstr: str
    instance: int
    idx: int
    data: bytes
    config: bool = False

    @property
    def key(self) -> DeviceKey:
        return DeviceKey(self.idstr, self.instance)

    def __repr__(self) -> str:  # short, for hypothesis's reports
        config = ", config" if self.config else ""
        return f"Packet({self.idstr!r}, {self.instance}, idx {self.idx}, {len(self.data)} bytes{config})"

    def fields(self) -> dict[str, bytes]:
        """Its bytes on the wire, field by field, in order."""
        raw = qs.device_packet(self.idstr, self.instance, self.idx, self.data, self.config)
        return split(raw, PACKET_LAYOUT)


# Each field's name and where it ends (PROTOCOL.md 2.1, 2.3, 2.4); the last runs to the end.
HANDSHAKE_LAYOUT = (("magic", 4), ("version", 8), ("uuid", 24), ("id", 25), ("unused", 64))
PACKET_LAYOUT = (
    ("magic", 4),
    ("version", 8),
    ("flags", 12),
    ("idstr", 268),
    ("instance", 272),
    ("size", 276),
    ("vfio_version", 280),
    ("idx", 284),
    ("vfio_flags", 288),
    ("data", None),
)


def split(raw: bytes, layout: tuple[tuple[str, int | None], ...]) -> dict[str, bytes]:
    fields, start = {}, 0
    for name, end in layout:
        fields[name] = raw[start:end]
        start = end or len(raw)
    return fields


def handshake_fields(channel_id: int, uuid: bytes = bytes(16)) -> dict[str, bytes]:
    return split(qs.handshake(channel_id, uuid), HANDSHAKE_LAYOUT)


@dataclass(frozen=True)
class Mutation:
    """Replace ``field`` of ``unit`` (-1: the handshake; n: the n-th packet) with ``value``."""

    unit: int
    field: str
    value: bytes


def encode(
    channel_id: int, packets: list[Packet], mutation: Mutation | None = None
) -> tuple[bytes, list[int]]:
    """A channel's stream, and where each packet starts in it."""
    units = [handshake_fields(channel_id)] + [p.fields() for p in packets]
    if mutation is not None:
        fields = units[mutation.unit + 1]
        if mutation.field == "data":  # new data, and the size that goes with it
            fields["size"] = u32(12 + len(mutation.value))
        else:
            assert len(mutation.value) == len(fields[mutation.field])
        fields[mutation.field] = mutation.value
    stream, starts = b"", []
    for n, fields in enumerate(units):
        if n:
            starts.append(len(stream))
        stream += b"".join(fields.values())
    return stream, starts


# -- decoding the way the daemon does: zero copy, each payload buffer asked for -------

Event = tuple[object, ...]


def decode(stream: bytes, cuts: list[int]) -> tuple[list[Event], ProtocolError | None]:
    """Feed ``stream`` to a decoder in ``ASK`` mode as ``ChannelProtocol`` does: into
    ``get_buffer``, cut at ``cuts`` (and wherever a unit ends), each payload buffer
    given (larger than asked, as a pool's are) when its header event comes."""
    decoder = ChannelDecoder(max_packet_size=MAX_PACKET, allocate=ASK)
    events: list[Event] = []
    given: list[bytearray] = []

    def drain() -> None:
        while (event := decoder.next_event()) is not None:
            if isinstance(event, ChannelHandshake):
                events.append(("handshake", event.channel_id, event.uuid))
            elif isinstance(event, MainChannel):
                events.append(("main",))
            elif isinstance(event, MainBytes):  # however cut, one run of the stream's bytes
                if events and events[-1][0] == "main-bytes":
                    events[-1] = ("main-bytes", events[-1][1] + event.data)
                else:
                    events.append(("main-bytes", event.data))
            elif isinstance(event, PacketHeader):
                events.append(("header", event.device, event.idx, event.config, event.size))
                given.append(bytearray(b"\xee" * (event.size + 5)))
                decoder.provide_buffer(given[-1])
            else:
                assert isinstance(event, DevicePacket)
                assert event.buffer is given[-1], "the payload went into the buffer given"
                events.append(("packet", event.device, event.idx, event.config, bytes(event.data)))

    points = sorted({cut % (len(stream) + 1) for cut in cuts} | {len(stream)})
    position = 0
    try:
        for end in points:
            while position < end:
                view = decoder.get_buffer()
                n = min(len(view), end - position)
                view[:n] = stream[position : position + n]
                position += n
                decoder.buffer_updated(n)
                drain()
        decoder.eof()
        drain()
    except ProtocolError as error:
        # next_event raises only once every event decoded before the error was taken.
        return events, error
    return events, None


def events_of(channel_id: int, packets: list[Packet], uuid: bytes = bytes(16)) -> list[Event]:
    events: list[Event] = [("handshake", channel_id, uuid)]
    for p in packets:
        events.append(("header", p.key, p.idx, p.config, len(p.data)))
        events.append(("packet", p.key, p.idx, p.config, p.data))
    return events


# -- worlds: devices with chunks and a config blob, their packets interleaved ----------

IDSTRS = (IDSTR, IDSTR_B, "0000:af:00.1/vfio", "vfio-ä")


@st.composite
def packet_lists(draw: st.DrawFn, max_devices: int = 3, max_chunks: int = 4) -> list[Packet]:
    """Every packet of 1..``max_devices`` devices (chunks, then the config packet),
    interleaved in any order."""
    keys = draw(
        st.lists(
            st.tuples(st.sampled_from(IDSTRS), st.integers(0, 2)),
            min_size=1,
            max_size=max_devices,
            unique=True,
        )
    )
    rng = random.Random(draw(st.integers(0, 1 << 32), label="data seed"))
    packets = []
    for idstr, instance in keys:
        sizes = draw(st.lists(st.integers(0, 300), max_size=max_chunks))
        for idx, size in enumerate(sizes):
            packets.append(Packet(idstr, instance, idx, high_bytes(rng, size)))
        blob = qs.config_blob(high_bytes(rng, draw(st.integers(0, 20))))
        packets.append(Packet(idstr, instance, len(sizes), blob, config=True))
    return draw(st.permutations(packets))


def fixed_world(seed: int = 1) -> list[Packet]:
    """Three devices of a few chunks each, one of them empty, interleaved."""
    rng = random.Random(seed)
    packets = []
    for (idstr, instance), sizes in (
        ((IDSTR, 0), [300, 0, 17, 256]),
        ((IDSTR, 1), []),
        ((IDSTR_B, 0), [1, 299]),
    ):
        packets += [
            Packet(idstr, instance, idx, high_bytes(rng, size)) for idx, size in enumerate(sizes)
        ]
        packets.append(Packet(idstr, instance, len(sizes), qs.config_blob(b"\x80\x81"), True))
    rng.shuffle(packets)
    return packets


# -- the decoder: unmutated streams, split everywhere ---------------------------------


def test_a_valid_stream_split_at_every_offset_gives_every_event() -> None:
    packets = fixed_world()
    stream, _ = encode(5, packets)
    expected = events_of(5, packets)
    for cut in range(len(stream) + 1):
        assert decode(stream, [cut]) == (expected, None), cut


def test_a_valid_stream_one_byte_at_a_time_and_copied_in() -> None:
    packets = fixed_world(2)
    stream, _ = encode(0, packets)
    assert decode(stream, list(range(len(stream)))) == (events_of(0, packets), None)
    # The copying interface (receive_data, a decoder that allocates) gives the same packets.
    for step in (1, 7, 288, len(stream)):
        decoder = ChannelDecoder(max_packet_size=MAX_PACKET)
        got = []
        for first in range(0, len(stream), step):
            decoder.receive_data(stream[first : first + step])
            while (event := decoder.next_event()) is not None:
                if isinstance(event, DevicePacket):
                    got.append(("packet", event.device, event.idx, event.config, bytes(event.data)))
        decoder.eof()
        assert got == [e for e in events_of(0, packets) if e[0] == "packet"], step


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    packet_lists(),
    st.integers(0, 255),
    st.lists(st.integers(min_value=0), max_size=8),
)
def test_any_valid_stream_split_anywhere(
    packets: list[Packet], channel: int, cuts: list[int]
) -> None:
    stream, _ = encode(channel, packets)
    assert decode(stream, cuts) == (events_of(channel, packets), None)


# -- the decoder: one field mutated, each class with its exact outcome -----------------

Outcome = tuple[list[Event], Reason | None]


#: The outcome of a stream that starts with ``QEVM``: QEMU's main channel, every byte
#: of it (these four included) passed on as it came; the core decides whether to take it.
MAIN_CHANNEL = "main channel"


@dataclass(frozen=True)
class FieldClass:
    """A class of values for one field, and what a stream carrying one must give."""

    unit: str  # "handshake" or "packet"
    field: str
    values: Callable[[Packet | None], st.SearchStrategy[bytes]]
    #: The outcome from (the events of the unmutated stream up to the mutated unit,
    #: the events of the rest, the mutated value, the mutated packet) - or a Reason.
    outcome: Reason | Callable[..., list[Event]] | str


def _same(
    prefix: list[Event], rest: list[Event], value: bytes, packet: Packet | None
) -> list[Event]:
    return prefix + rest


def _with_packet(change: Callable[[Packet, bytes], Packet]) -> Callable[..., list[Event]]:
    """The events with the mutated packet's own two events rebuilt from its new field."""

    def outcome(
        prefix: list[Event], rest: list[Event], value: bytes, packet: Packet | None
    ) -> list[Event]:
        assert packet is not None
        return prefix + events_of(0, [change(packet, value)])[1:] + rest[2:]

    return outcome


def _rename(packet: Packet, value: bytes) -> Packet:
    return replace(packet, idstr=value[: value.index(0)].decode("utf-8", "surrogateescape"))


def _u32_other_than(*excluded: int) -> st.SearchStrategy[bytes]:
    return U32.filter(lambda v: v not in excluded).map(u32)


def _idstr_values(packet: Packet | None) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=0, max_size=255).map(lambda raw: raw.ljust(256, b"\0")[:255] + b"\0")


def _past_nul(packet: Packet | None) -> st.SearchStrategy[bytes]:
    assert packet is not None
    raw = packet.idstr.encode()
    padding = 255 - len(raw) - 1  # bytes between the NUL after the name and byte 255
    assume(padding > 0)
    return st.tuples(st.integers(0, padding - 1), st.integers(1, 255)).map(
        lambda at: raw + b"\0" + bytes(at[0]) + bytes([at[1]]) + bytes(padding - at[0] - 1) + b"\0"
    )


def _data_byte(packet: Packet | None) -> st.SearchStrategy[bytes]:
    assert packet is not None
    assume(packet.data)
    return st.tuples(st.integers(0, len(packet.data) - 1), st.integers(0, 255)).map(
        lambda at: packet.data[: at[0]] + bytes([at[1]]) + packet.data[at[0] + 1 :]
    )


DECODER_CLASSES: dict[str, FieldClass] = {
    "handshake magic": FieldClass(
        "handshake", "magic", lambda _: _u32_other_than(MAGIC, 0x5145564D), Reason.HANDSHAKE_MAGIC
    ),
    "handshake of a QEMU main channel": FieldClass(
        "handshake", "magic", lambda _: st.just(b"QEVM"), MAIN_CHANNEL
    ),
    "handshake version": FieldClass(
        "handshake", "version", lambda _: _u32_other_than(1), Reason.HANDSHAKE_VERSION
    ),
    # The decoder passes uuid and id on (the session checks them), and ignores the rest.
    "handshake uuid": FieldClass(
        "handshake",
        "uuid",
        lambda _: st.binary(min_size=16, max_size=16),
        lambda prefix, rest, value, _: [("handshake", 0, value), *rest[1:]],
    ),
    "handshake id": FieldClass(
        "handshake",
        "id",
        lambda _: st.binary(min_size=1, max_size=1),
        lambda prefix, rest, value, _: [("handshake", value[0], bytes(16)), *rest[1:]],
    ),
    "handshake unused bytes": FieldClass(
        "handshake", "unused", lambda _: st.binary(min_size=39, max_size=39), _same
    ),
    "packet magic": FieldClass(
        "packet", "magic", lambda _: _u32_other_than(MAGIC), Reason.PACKET_MAGIC
    ),
    "packet version": FieldClass(
        "packet", "version", lambda _: _u32_other_than(1), Reason.PACKET_VERSION
    ),
    "flags without DEVICE_STATE (RAM, SYNC)": FieldClass(
        "packet", "flags", lambda _: U32.map(lambda v: u32(v & ~0x40)), Reason.PACKET_RAM
    ),
    "flags with SYNC on a device-state packet": FieldClass(
        "packet", "flags", lambda _: U32.map(lambda v: u32(v | 0x41)), Reason.PACKET_SYNC
    ),
    "compression bits on a device-state packet": FieldClass(
        "packet",
        "flags",
        # DEVICE_STATE, no SYNC, a non-zero method in 0x3e, any other bits.
        lambda _: st.tuples(U32, st.integers(1, 31)).map(
            lambda vm: u32(((vm[0] & ~0x7F) | 0x40 | (vm[1] << 1)) & 0xFFFFFFFF)
        ),
        Reason.PACKET_COMPRESSION,
    ),
    "unknown flag bits on a device-state packet": FieldClass(
        "packet",
        "flags",
        lambda _: st.integers(1, (1 << 25) - 1).map(lambda high: u32(0x40 | (high << 7))),
        Reason.PACKET_FLAGS,
    ),
    "idstr not NUL-terminated": FieldClass(
        "packet",
        "idstr",
        lambda _: st.binary(min_size=256, max_size=256).filter(lambda raw: raw[255] != 0),
        Reason.PACKET_IDSTR,
    ),
    "idstr renamed": FieldClass("packet", "idstr", _idstr_values, _with_packet(_rename)),
    "idstr bytes after its NUL": FieldClass("packet", "idstr", _past_nul, _same),
    "instance_id": FieldClass(
        "packet",
        "instance",
        lambda _: U32.map(u32),
        _with_packet(lambda p, v: replace(p, instance=int.from_bytes(v, "big"))),
    ),
    "next_packet_size zero": FieldClass(
        "packet", "size", lambda _: st.just(u32(0)), Reason.PACKET_SIZE
    ),
    "next_packet_size over the maximum": FieldClass(
        "packet",
        "size",
        lambda _: st.integers(MAX_PACKET + 1, 0xFFFFFFFF).map(u32),
        Reason.PACKET_SIZE,
    ),
    "next_packet_size under the VFIO header": FieldClass(
        "packet", "size", lambda _: st.integers(1, 11).map(u32), Reason.VFIO_SHORT
    ),
    "VFIO version": FieldClass(
        "packet", "vfio_version", lambda _: _u32_other_than(0), Reason.VFIO_VERSION
    ),
    "idx 0xffffffff": FieldClass(
        "packet", "idx", lambda _: st.just(u32(0xFFFFFFFF)), Reason.VFIO_INVALID_IDX
    ),
    "idx": FieldClass(
        "packet",
        "idx",
        lambda _: _u32_other_than(0xFFFFFFFF),
        _with_packet(lambda p, v: replace(p, idx=int.from_bytes(v, "big"))),
    ),
    # Only bit 0 (CONFIG_STATE) means anything; the other bits are ignored.
    "VFIO flags": FieldClass(
        "packet",
        "vfio_flags",
        lambda _: U32.map(u32),
        _with_packet(lambda p, v: replace(p, config=bool(v[3] & 1))),
    ),
    "a data byte": FieldClass(
        "packet", "data", _data_byte, _with_packet(lambda p, v: replace(p, data=v))
    ),
}


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
@pytest.mark.parametrize("name", sorted(DECODER_CLASSES))
def test_one_field_mutated_gives_its_exact_outcome(name: str, data: st.DataObject) -> None:
    kind = DECODER_CLASSES[name]
    packets = data.draw(packet_lists(), label="packets")
    if kind.unit == "handshake":
        unit, packet = -1, None
    else:
        unit = data.draw(st.integers(0, len(packets) - 1), label="packet")
        packet = packets[unit]
    value = data.draw(kind.values(packet), label="value")
    cuts = data.draw(st.lists(st.integers(min_value=0), max_size=6), label="cuts")
    stream, _ = encode(0, packets, Mutation(unit, kind.field, value))
    events, error = decode(stream, cuts)
    expected = events_of(0, packets)
    # The events before the mutated unit, and from it on (its own first).
    prefix, rest = (
        (expected[: 2 * unit + 1], expected[2 * unit + 1 :]) if unit >= 0 else ([], expected)
    )
    if isinstance(kind.outcome, Reason):
        assert error is not None and error.reason is kind.outcome, error
        assert isinstance(error, HandshakeError) == (kind.unit == "handshake")
        assert events == (prefix if unit >= 0 else []), "only the units before it came out"
    elif kind.outcome == MAIN_CHANNEL:
        assert error is None, error
        assert events == [("main",), ("main-bytes", stream)]
    else:
        assert error is None, error
        assert callable(kind.outcome)
        assert events == kind.outcome(prefix, rest, value, packet)


def lying_size_outcome(
    stream: bytes, starts: list[int], unit: int, size: int, expected: list[Event]
) -> Outcome:
    """What a decoder must make of packet ``unit`` saying ``next_packet_size`` ``size``
    (12..max, not its own): its payload ends elsewhere; it resumes there, in step if
    that is a packet boundary (or the end), else it meets a wrong magic, or the end
    of the stream inside a header."""
    start = starts[unit]
    prefix = expected[: 2 * unit + 1]
    header = expected[2 * unit + 1]
    _, key, idx, config, _ = header
    events = [*prefix, ("header", key, idx, config, size - 12)]
    end = start + 276 + size
    if end > len(stream):
        return events, Reason.PACKET_TRUNCATED
    events.append(("packet", key, idx, config, stream[start + 288 : end]))
    if end == len(stream):
        return events, None
    if end in starts:
        following = starts.index(end)
        return events + expected[2 * following + 1 :], None
    return events, Reason.PACKET_MAGIC if len(stream) - end >= 4 else Reason.PACKET_TRUNCATED


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_lying_next_packet_size_throws_the_decoder_off_predictably(data: st.DataObject) -> None:
    packets = data.draw(packet_lists(max_devices=2), label="packets")
    unit = data.draw(st.integers(0, len(packets) - 1), label="packet")
    true_size = 12 + len(packets[unit].data)
    # Often exactly the next packet(s) swallowed: decoding goes on in step.
    stream, starts = encode(0, packets)
    ends = [s - starts[unit] - 276 for s in [*starts, len(stream)] if s > starts[unit]]
    size = data.draw(
        st.one_of(st.integers(12, MAX_PACKET), st.sampled_from(ends)).filter(
            lambda s: 12 <= s <= MAX_PACKET and s != true_size
        ),
        label="size",
    )
    cuts = data.draw(st.lists(st.integers(min_value=0), max_size=6), label="cuts")
    mutated, _ = encode(0, packets, Mutation(unit, "size", u32(size)))
    events, error = decode(mutated, cuts)
    expected_events, reason = lying_size_outcome(mutated, starts, unit, size, events_of(0, packets))
    assert (error.reason if error else None) is reason, error
    assert events == expected_events


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=700), st.lists(st.integers(min_value=0), max_size=8))
def test_arbitrary_bytes_only_ever_give_events_or_protocol_errors(
    data: bytes, cuts: list[int]
) -> None:
    """The unstructured baseline: whatever the bytes, events or a ProtocolError."""
    with contextlib.suppress(ProtocolError):
        decode(data, cuts)


# -- a real session: each mutation class over loopback, its exact outcome -------------

A = DeviceKey(IDSTR, 0)
B = DeviceKey(IDSTR_B, 0)
SESSION_MAX_PACKET = 8192


def session_world(
    rng: random.Random,
) -> tuple[list[list[Packet]], dict[DeviceKey, tuple[bytes, bytes]]]:
    """Devices A and B, 2-5 chunks each, dealt at random to two channels."""
    per_device = {}
    packets = []
    for key in (A, B):
        chunks = [high_bytes(rng, rng.randrange(1, 3000)) for _ in range(rng.randrange(2, 6))]
        blob = qs.config_blob(high_bytes(rng, rng.randrange(0, 40)))
        per_device[key] = (b"".join(chunks), blob)
        packets += [Packet(key.idstr, key.instance_id, n, c) for n, c in enumerate(chunks)]
        packets.append(Packet(key.idstr, key.instance_id, len(chunks), blob, config=True))
    rng.shuffle(packets)
    return [packets[0::2], packets[1::2]], per_device


World = list[list[Packet]]  # packets per channel
Files = dict[DeviceKey, tuple[bytes, bytes]]  # data and config of each device
#: From a world, its files and a random source: the channel and the mutation, the
#: reason the migration must fail with (None: it completes), and the files then.
SessionMutation = Callable[
    [World, Files, random.Random], tuple[int, Mutation, Reason | None, Files | None]
]


def _pick(packets: World, rng: random.Random, wanted: Callable[[Packet], bool]) -> tuple[int, int]:
    """A random (channel, unit) whose packet is ``wanted``."""
    return rng.choice(
        [(ch, n) for ch, units in enumerate(packets) for n, p in enumerate(units) if wanted(p)]
    )


def _any(p: Packet) -> bool:
    return True


def _data(p: Packet) -> bool:
    return not p.config


def _config(p: Packet) -> bool:
    return p.config


def _packet_field(field: str, value: bytes, reason: Reason) -> SessionMutation:
    def build(packets: World, files: Files, rng: random.Random):  # type: ignore[no-untyped-def]
        channel, unit = _pick(packets, rng, _any)
        return channel, Mutation(unit, field, value), reason, None

    return build


def _idx_of_another(packets: World, files: Files, rng: random.Random):  # type: ignore[no-untyped-def]
    """A data chunk takes the idx of another chunk of its device: one idx twice."""
    channel, unit = _pick(packets, rng, _data)
    packet = packets[channel][unit]
    others = [
        p.idx
        for units in packets
        for p in units
        if p.key == packet.key and not p.config and p.idx != packet.idx
    ]
    return channel, Mutation(unit, "idx", u32(rng.choice(others))), Reason.VFIO_ALREADY_FILLED, None


def _idx_past_config(packets: World, files: Files, rng: random.Random):  # type: ignore[no-untyped-def]
    channel, unit = _pick(packets, rng, _data)
    packet = packets[channel][unit]
    last = next(p.idx for units in packets for p in units if p.key == packet.key and p.config)
    value = u32(last + rng.randrange(1, 5))
    return channel, Mutation(unit, "idx", value), Reason.VFIO_AFTER_CONFIG, None


def _flags_other_bits(packets: World, files: Files, rng: random.Random):  # type: ignore[no-untyped-def]
    channel, unit = _pick(packets, rng, _any)
    value = (rng.getrandbits(32) & ~1) | int(packets[channel][unit].config)
    return channel, Mutation(unit, "vfio_flags", u32(value)), None, files


def _config_flag_cleared(packets: World, files: Files, rng: random.Random):  # type: ignore[no-untyped-def]
    channel, unit = _pick(packets, rng, _config)
    return channel, Mutation(unit, "vfio_flags", u32(0)), Reason.INCOMPLETE, None


def _config_tag(packets: World, files: Files, rng: random.Random):  # type: ignore[no-untyped-def]
    channel, unit = _pick(packets, rng, _config)
    blob = bytearray(packets[channel][unit].data)
    at = rng.choice([rng.randrange(8), len(blob) - 1 - rng.randrange(8)])
    blob[at] ^= 1 << rng.randrange(8)
    return channel, Mutation(unit, "data", bytes(blob)), Reason.VFIO_CONFIG_BLOB, None


def _data_byte_session(packets: World, files: Files, rng: random.Random):  # type: ignore[no-untyped-def]
    """Whatever the data says, it is what the data file holds."""
    channel, unit = _pick(packets, rng, _data)
    packet = packets[channel][unit]
    data = bytearray(packet.data)
    data[rng.randrange(len(data))] ^= 0xFF
    changed = replace(packet, data=bytes(data))
    chunks = sorted(
        (changed if p is packet else p for units in packets for p in units if p.key == packet.key),
        key=lambda p: p.idx,
    )
    result = dict(files)
    result[packet.key] = (b"".join(p.data for p in chunks if not p.config), files[packet.key][1])
    return channel, Mutation(unit, "data", bytes(data)), None, result


def _config_bytes(packets: World, files: Files, rng: random.Random):  # type: ignore[no-untyped-def]
    """Bytes between the config state's two tags: the config file holds them as they are."""
    channel, unit = _pick(packets, rng, _config)
    packet = packets[channel][unit]
    blob = packet.data[:8] + rng.randbytes(rng.randrange(1, 9)) + packet.data[8:]
    result = dict(files)
    result[packet.key] = (files[packet.key][0], blob)
    return channel, Mutation(unit, "data", blob), None, result


def _renamed(field: str, value: bytes) -> SessionMutation:
    def build(packets: World, files: Files, rng: random.Random):  # type: ignore[no-untyped-def]
        channel, unit = _pick(packets, rng, _any)
        return channel, Mutation(unit, field, value), Reason.UNKNOWN_DEVICE, None

    return build


SESSION_PACKET_CLASSES: dict[str, SessionMutation] = {
    "packet magic": _packet_field("magic", u32(0xDEADBEEF), Reason.PACKET_MAGIC),
    "packet version": _packet_field("version", u32(2), Reason.PACKET_VERSION),
    "RAM packet": _packet_field("flags", u32(0), Reason.PACKET_RAM),
    "SYNC bit": _packet_field("flags", u32(0x41), Reason.PACKET_SYNC),
    "zstd compression": _packet_field("flags", u32(0x44), Reason.PACKET_COMPRESSION),
    "unknown flag bit": _packet_field("flags", u32(0x80 | 0x40), Reason.PACKET_FLAGS),
    "idstr not NUL-terminated": _packet_field("idstr", b"y" * 256, Reason.PACKET_IDSTR),
    "next_packet_size zero": _packet_field("size", u32(0), Reason.PACKET_SIZE),
    "next_packet_size over --max-packet-size": _packet_field(
        "size", u32(SESSION_MAX_PACKET + 1), Reason.PACKET_SIZE
    ),
    "next_packet_size under the VFIO header": _packet_field("size", u32(11), Reason.VFIO_SHORT),
    "VFIO version": _packet_field("vfio_version", u32(1), Reason.VFIO_VERSION),
    "idx 0xffffffff": _packet_field("idx", u32(0xFFFFFFFF), Reason.VFIO_INVALID_IDX),
    "unknown idstr": _renamed("idstr", b"0000:99:00.0/vfio".ljust(256, b"\0")),
    "unknown instance": _renamed("instance", u32(7)),
    "idx of another chunk": _idx_of_another,
    "idx past the config packet": _idx_past_config,
    "VFIO flags: other bits": _flags_other_bits,
    "VFIO flags: CONFIG_STATE cleared": _config_flag_cleared,
    "config blob tag": _config_tag,
    "a data byte": _data_byte_session,
    "config bytes": _config_bytes,
}
#: Either of two clashing packets may come second; the error names the one that did.
EITHER_CHANNEL = {Reason.VFIO_ALREADY_FILLED, Reason.VFIO_AFTER_CONFIG}

SESSION_HANDSHAKE_CLASSES: dict[str, tuple[str, bytes, Reason | None]] = {
    "handshake magic": ("magic", u32(0xCAFEBABE), Reason.HANDSHAKE_MAGIC),
    "handshake of a QEMU main channel": ("magic", b"QEVM", Reason.HANDSHAKE_MAIN_CHANNEL),
    "handshake version": ("version", u32(2), Reason.HANDSHAKE_VERSION),
    "handshake uuid": ("uuid", bytes(range(16)), Reason.HANDSHAKE_UUID),
    "handshake id": ("id", bytes([2]), Reason.HANDSHAKE_CHANNEL_ID),
    "handshake unused bytes": ("unused", b"\xff" * 39, None),  # accepted: a channel like any
}


async def run_case(tmp_path: Path, streams: list[bytes], stray: bytes | None = None):  # type: ignore[no-untyped-def]
    config = settings(
        tmp_path, A, B, channels=2, max_packet_size=SESSION_MAX_PACKET, progress_timeout=20.0
    )
    running = await start(config)
    if stray is not None:
        with connect(running.address) as sock:
            sock.sendall(stray)
            sock.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(sock.recv, 10)  # until the daemon hangs up
    sending = asyncio.create_task(asyncio.to_thread(send_streams_quietly, running.address, streams))
    try:
        try:
            result = await running.result(timeout=30)
        except MultifdError as error:
            return config, running, error
        return config, running, result
    finally:
        await asyncio.wait_for(sending, 30)


@pytest.mark.parametrize("name", sorted(SESSION_PACKET_CLASSES))
async def test_each_mutation_class_over_a_real_session(tmp_path: Path, name: str) -> None:
    rng = random.Random(name)
    packets, expected = session_world(rng)
    channel, mutation, reason, files = SESSION_PACKET_CLASSES[name](packets, expected, rng)
    streams = [encode(n, p, mutation if n == channel else None)[0] for n, p in enumerate(packets)]
    config, _, outcome = await run_case(tmp_path, streams)
    if reason is None:
        assert not isinstance(outcome, MultifdError), outcome
        assert files is not None
        assert_outputs(config, [files[A], files[B]])
    else:
        assert isinstance(outcome, MultifdError) and outcome.reason is reason, outcome
        if reason in EITHER_CHANNEL:
            assert outcome.channel in (0, 1), outcome
        elif reason not in (Reason.INCOMPLETE, Reason.VFIO_CONFIG_BLOB):  # no one channel's
            assert outcome.channel == channel, outcome
        assert final_files(tmp_path) == [], "nothing left behind"


@pytest.mark.parametrize("name", sorted(SESSION_HANDSHAKE_CLASSES))
async def test_each_handshake_mutation_over_a_real_session(tmp_path: Path, name: str) -> None:
    field, value, reason = SESSION_HANDSHAKE_CLASSES[name]
    rng = random.Random(name)
    packets, expected = session_world(rng)
    mutation = Mutation(-1, field, value)
    valid = [encode(n, p)[0] for n, p in enumerate(packets)]
    if reason is None:  # the mutated handshake is channel 0's own
        streams = [encode(0, packets[0], mutation)[0], valid[1]]
        config, running, outcome = await run_case(tmp_path, streams)
        assert not running.session.core.connections.refused
    else:  # a stray connection first, refused; then the migration as if nothing happened
        stray = encode(0, packets[0], mutation)[0]
        config, running, outcome = await run_case(tmp_path, valid, stray)
        [(_, refusal)] = running.session.core.connections.refused
        assert refusal.reason is reason, refusal
    assert not isinstance(outcome, MultifdError), outcome
    assert_outputs(config, [expected[A], expected[B]])


@pytest.mark.parametrize("seed", range(4))
async def test_unmutated_streams_complete_with_the_bytes_sent(tmp_path: Path, seed: int) -> None:
    packets, expected = session_world(random.Random(seed))
    config, _, outcome = await run_case(tmp_path, [encode(n, p)[0] for n, p in enumerate(packets)])
    assert not isinstance(outcome, MultifdError), outcome
    assert_outputs(config, [expected[A], expected[B]])
    assert final_files(tmp_path) == ["dev0.bin", "dev0.bin.config", "dev1.bin", "dev1.bin.config"]


def test_every_row_of_protocol_section_4_has_a_class() -> None:
    """Each packet-level reason of PROTOCOL.md section 4 is fuzzed here at both levels
    (the session-level ones over a real session only)."""
    decoder = {k.outcome for k in DECODER_CLASSES.values() if isinstance(k.outcome, Reason)}
    session = {
        SESSION_PACKET_CLASSES[name](*session_world(random.Random(name)), random.Random(name))[2]
        for name in SESSION_PACKET_CLASSES
    } | {reason for _, _, reason in SESSION_HANDSHAKE_CLASSES.values()}
    wire = {r for r in Reason if r.value.startswith(("handshake", "packet", "vfio"))}
    wire -= {  # not a field of one unit: another connection, a clock, the end of a stream
        Reason.HANDSHAKE_DUPLICATE_CHANNEL,
        Reason.HANDSHAKE_CLOSED,
        Reason.HANDSHAKE_SHED,
        Reason.HANDSHAKE_TIMEOUT,
        Reason.PACKET_TRUNCATED,
        Reason.VFIO_SECOND_CONFIG,  # in either order of arrival: the state machine below
    }
    assert wire <= decoder | session, wire - decoder - session
    assert Reason.UNKNOWN_DEVICE in session


# -- a stateful test: a session's channels and devices against a model ----------------
#
# A real Session (the core's admission and memory policy, spill file, loaders, writer threads,
# commit), fed through ChannelProtocol (the seam the daemon's sockets use) with
# fake transports rather than sockets: the machine, not the kernel, decides
# which bytes reach which channel and when, a paused channel is fed nothing (as
# a socket would), and hypothesis can shrink a failing interleaving to a few
# steps. The loopback path itself is covered by the session-level tests above.

T = TypeVar("T")
MACHINE_MAX_PACKET = 4096 + 12
MACHINE_IDSTRS = (IDSTR, IDSTR_B, "0000:af:00.1/vfio")


@dataclass
class ChannelFeed:
    """One channel as the source sends it: its bytes, how many went in, where packets start."""

    protocol: ChannelProtocol
    transport: FakeTransport
    stream: bytes
    starts: list[int]  # offsets of its packets
    packets: list[Packet]  # the packets planned for it (not one slipped in)
    fed: int = 0
    closed: bool = False

    def sent(self) -> list[tuple[Packet, int]]:
        """Its planned packets, each with the offset where it ends (before anything
        is slipped in: there is at most one fault, and this is asked before it)."""
        ends = [*self.starts[1:], len(self.stream)] if self.starts else []
        return list(zip(self.packets, ends, strict=True))


@st.composite
def machine_worlds(
    draw: st.DrawFn,
) -> tuple[int, list[list[Packet]], list[tuple[DeviceKey, bytes, bytes]]]:
    """Channels, the packets each sends in order, and each device's data and config."""
    channels = draw(st.integers(1, 3), label="channels")
    keys = draw(
        st.lists(st.sampled_from(MACHINE_IDSTRS), min_size=1, max_size=3, unique=True),
        label="devices",
    )
    rng = random.Random(draw(st.integers(0, 1 << 32), label="data seed"))
    packets, files = [], []
    for idstr in keys:
        sizes = draw(st.lists(st.integers(0, 4096), max_size=5), label=f"chunks of {idstr}")
        chunks = [high_bytes(rng, size) for size in sizes]
        blob = qs.config_blob(high_bytes(rng, draw(st.integers(0, 16))))
        packets += [Packet(idstr, 0, idx, chunk) for idx, chunk in enumerate(chunks)]
        packets.append(Packet(idstr, 0, len(chunks), blob, config=True))
        files.append((DeviceKey(idstr), b"".join(chunks), blob))
    order = draw(st.permutations(packets), label="order")
    where = draw(
        st.lists(st.integers(0, channels - 1), min_size=len(order), max_size=len(order)),
        label="channel of each packet",
    )
    per_channel: list[list[Packet]] = [[] for _ in range(channels)]
    for packet, channel in zip(order, where, strict=True):
        per_channel[channel].append(packet)
    return channels, per_channel, files


class SessionMachine(RuleBasedStateMachine):
    #: Which event loop runs the session (the subclasses below: both).
    loop_name = "asyncio"

    def __init__(self) -> None:
        super().__init__()
        self.loop = (
            uvloop.new_event_loop() if self.loop_name == "uvloop" else asyncio.new_event_loop()
        )
        self.loop_errors: list[dict[str, object]] = []
        self.loop.set_exception_handler(lambda _, context: self.loop_errors.append(context))
        self.directory = Path(tempfile.mkdtemp(prefix="vfio-machine-"))
        self.task: asyncio.Task[object] | None = None
        self.feeds: list[ChannelFeed] = []
        self.fault: Reason | None = None  # the one fault put in, by the reason it must give
        self.strays = 0
        self.ready = False  # set up completely (else teardown only cleans up)
        self.faults_allowed = False

    # -- setting up -----------------------------------------------------------------

    @initialize(
        world=machine_worlds(),
        bound=st.sampled_from(["none", "smallest", "roomy"]),
        faults=st.booleans(),
    )
    def start(
        self,
        world: tuple[int, list[list[Packet]], list[tuple[DeviceKey, bytes, bytes]]],
        bound: str,
        faults: bool,
    ) -> None:
        """``faults``: whether this case may put a fault in (else it must complete)."""
        channels, per_channel, self.files = world
        self.faults_allowed = faults
        devices = tuple(
            DeviceSpec(key, self.directory / f"{n}.bin", self.directory / f"{n}.cfg")
            for n, (key, _, _) in enumerate(self.files)
        )
        base = ReceiveSettings(
            devices=devices,
            listen=Address("tcp", "127.0.0.1", 0),
            channels=channels,
            max_packet_size=MACHINE_MAX_PACKET,
            max_queued_bytes=None,
            handshake_timeout=600.0,
            progress_timeout=None,
            fsync=False,
        )
        smallest = base.smallest_bound
        limit = {"none": None, "smallest": smallest, "roomy": smallest + 5 * 4096}[bound]
        self.settings = replace(base, max_queued_bytes=limit)
        self.session = Session(self.settings)
        self.task = self.loop.create_task(self.session.run())
        self.loop.run_until_complete(asyncio.wait_for(self.session.listening.wait(), 10))
        self.packets = [p for packets in per_channel for p in packets]
        for channel, packets in enumerate(per_channel):
            stream, starts = encode(channel, packets)
            protocol, transport = self._in_loop(self._connect)
            self.feeds.append(ChannelFeed(protocol, transport, stream, starts, packets))
        self.ready = True

    def _connect(self, peer: str = "source") -> tuple[ChannelProtocol, FakeTransport]:
        """A connection, as the listener's factory makes one."""
        protocol = self.session.connection(peer)
        transport = FakeTransport(protocol, peer)
        protocol.connection_made(transport)  # type: ignore[arg-type]
        return protocol, transport

    def _in_loop(self, call: Callable[[], T]) -> T:
        """Run ``call`` on the loop, as transports call protocols: from a callback."""

        async def inside() -> T:
            return call()

        return self.loop.run_until_complete(inside())

    def _step(self, seconds: float = 0.0) -> None:
        """Let the loop run: readers, loaders, and what writer and spill threads finished."""
        self.loop.run_until_complete(asyncio.sleep(seconds))
        self.loop.run_until_complete(asyncio.sleep(0))

    def _open(self, feed: ChannelFeed) -> bool:
        transport = feed.transport
        return not feed.closed and transport.reading and not transport.aborted

    @property
    def running(self) -> bool:
        session = self.session
        return (
            self.task is not None
            and not self.task.done()
            and session.error is None
            and session.status in (SessionStatus.SETUP, SessionStatus.ACTIVE)
            and session.core.phase.running
        )

    # -- what the source does ----------------------------------------------------------

    @rule(channel=st.integers(0, 2), size=st.integers(1, 6000))
    def send_bytes(self, channel: int, size: int) -> None:
        """Up to ``size`` more bytes of a channel, as many as it reads now."""
        feed = self.feeds[channel % len(self.feeds)]
        if self._open(feed) and feed.fed < len(feed.stream):
            transport = feed.transport
            chunk = feed.stream[feed.fed : feed.fed + size]
            feed.fed += self._in_loop(lambda: transport.feed(chunk))
        self._step()

    @rule(channel=st.integers(0, 2))
    def send_to_a_packet_boundary(self, channel: int) -> None:
        feed = self.feeds[channel % len(self.feeds)]
        ends = [s for s in [*feed.starts, len(feed.stream)] if s > feed.fed]
        if self._open(feed) and ends:
            transport = feed.transport
            chunk = feed.stream[feed.fed : ends[0]]
            feed.fed += self._in_loop(lambda: transport.feed(chunk))
        self._step()

    @rule(milliseconds=st.sampled_from([0, 1, 5, 30]))
    def time_passes(self, milliseconds: int) -> None:
        """Writes finish, spills land, a memory grace (25 ms) may run out."""
        self._step(milliseconds / 1000)

    # Each kind of bad packet is a rule of its own (so each is tried as often), and
    # every value is drawn up front: whether a rule can act depends on how far the
    # session got, which depends on threads, while hypothesis needs the same draws
    # each time it replays a case. (So: no preconditions either.)

    @rule(channel=st.integers(0, 2))
    def slip_in_an_unknown_device(self, channel: int) -> None:
        bad = qs.device_packet("0000:99:00.0/vfio", 0, 0, b"\x90")
        self._slip_in(channel, bad, Reason.UNKNOWN_DEVICE)

    @rule(channel=st.integers(0, 2), which=st.integers(0, 1 << 16))
    def slip_in_a_duplicate(self, channel: int, which: int) -> None:
        """A copy of a packet the daemon has whole already: the copy comes second."""
        if self.fault is not None:
            return
        sent = [p for f in self.feeds for p, end in f.sent() if end <= f.fed]
        devices = self.session.core.reassembly.devices
        queued = [p for p in sent if p.idx in devices[p.key].chunks]
        if which % 2 and queued:  # half the time, of one not written yet
            sent = queued
        if sent:
            bad = encode(0, [sent[which % len(sent)]])[0][64:]
            self._slip_in(channel, bad, Reason.VFIO_ALREADY_FILLED)

    @rule(channel=st.integers(0, 2), which=st.integers(0, 1 << 16), past=st.integers(1, 3))
    def slip_in_a_chunk_past_the_config(self, channel: int, which: int, past: int) -> None:
        key, last = self._device(which, config_came=bool(which % 2))
        bad = qs.device_packet(key.idstr, 0, last + past, b"\x91")
        self._slip_in(channel, bad, Reason.VFIO_AFTER_CONFIG)

    @rule(channel=st.integers(0, 2), which=st.integers(0, 1 << 16), past=st.integers(1, 3))
    def slip_in_a_second_config(self, channel: int, which: int, past: int) -> None:
        key, last = self._device(which, config_came=bool(which % 2))
        bad = qs.device_packet(key.idstr, 0, last + past, qs.config_blob(b"\x92"), config=True)
        self._slip_in(channel, bad, Reason.VFIO_SECOND_CONFIG)

    @rule(channel=st.integers(0, 2), which=st.integers(0, 1 << 16))
    def slip_in_a_bad_magic(self, channel: int, which: int) -> None:
        key, _ = self._device(which)
        bad = u32(0x12345678) + qs.device_packet(key.idstr, 0, 0, b"")[4:]
        self._slip_in(channel, bad, Reason.PACKET_MAGIC)

    def _device(self, which: int, *, config_came: bool = False) -> tuple[DeviceKey, int]:
        """A device (if ``config_came``, one whose config packet came, where there is
        one: the other order of arrival), and the idx of its config packet."""
        keys = [key for key, _, _ in self.files]
        if config_came:
            devices = self.session.core.reassembly.devices
            keys = [key for key in keys if devices[key].last_idx is not None] or keys
        key = keys[which % len(keys)]
        return key, next(p.idx for p in self.packets if p.key == key and p.config)

    def _slip_in(self, channel: int, bad: bytes, reason: Reason) -> None:
        """Put ``bad`` at the channel's next packet boundary, ahead of a packet the
        migration needs (so it cannot complete first): the one fault of this case."""
        feed = self.feeds[channel % len(self.feeds)]
        boundaries = [s for s in feed.starts if s >= feed.fed]
        if not self.faults_allowed or self.fault is not None:
            return
        if feed.closed or not boundaries or not self.running:
            return
        at = boundaries[0]
        following = feed.starts.index(at)
        feed.stream = feed.stream[:at] + bad + feed.stream[at:]
        feed.starts = [s if s < at else s + len(bad) for s in feed.starts]
        feed.starts.insert(following, at)
        self.fault = reason
        event(f"slipped in: {reason.value}")

    @rule(channel=st.integers(0, 2))
    def close_early(self, channel: int) -> None:
        """The source closes a channel before its last packet: mid-packet or between two."""
        feed = self.feeds[channel % len(self.feeds)]
        if not self.faults_allowed or self.fault is not None or not self.running:
            return
        if not self._open(feed) or feed.fed < 64 or feed.fed == len(feed.stream):
            return  # inside the handshake it would only be refused, and never joined
        transport = feed.transport
        if not self._in_loop(transport.eof):  # paused or hung up on meanwhile
            return
        feed.closed = True
        at_boundary = feed.fed in feed.starts
        self.fault = Reason.INCOMPLETE if at_boundary else Reason.PACKET_TRUNCATED
        self._step()

    @rule(kind=st.sampled_from(["magic", "version", "uuid", "channel id", "duplicate id", "QEVM"]))
    def stray_connection(self, kind: str) -> None:
        """Another connection with a bad handshake: refused, and the migration goes on."""
        if not self.running:
            return
        accepted = sorted(self.session.core.connections.channels)
        channel = accepted[0] if kind == "duplicate id" and accepted else 0
        if kind == "duplicate id" and not accepted:
            return
        handshake = bytearray(qs.handshake(channel))
        reason = {
            "magic": Reason.HANDSHAKE_MAGIC,
            "version": Reason.HANDSHAKE_VERSION,
            "uuid": Reason.HANDSHAKE_UUID,
            "channel id": Reason.HANDSHAKE_CHANNEL_ID,
            "duplicate id": Reason.HANDSHAKE_DUPLICATE_CHANNEL,
            "QEVM": Reason.HANDSHAKE_MAIN_CHANNEL,
        }[kind]
        if kind == "magic":
            handshake[0] ^= 0x80
        elif kind == "version":
            handshake[7] = 2
        elif kind == "uuid":
            handshake[8] = 1
        elif kind == "channel id":
            handshake[24] = self.settings.channels
        elif kind == "QEVM":
            handshake[0:4] = b"QEVM"
        self.strays += 1
        peer = f"stray {self.strays}"
        _, transport = self._in_loop(lambda: self._connect(peer))
        self._in_loop(lambda: transport.feed(bytes(handshake)))
        assert transport.aborted, "refused connections are hung up on"
        [error] = [e for p, e in self.session.core.connections.refused if p == peer]
        if error.reason is Reason.HANDSHAKE_CLOSED:
            # The session ended (a fault put in earlier) while this connected: hung up on.
            assert not self.running
        else:
            assert error.reason is reason, error
        self._step()

    # -- what must hold at every step ----------------------------------------------------

    @invariant()
    def memory_stays_under_the_bound(self) -> None:
        if self.task is None:
            return
        reassembly = self.session.core.reassembly
        assert reassembly.queued_bytes >= 0
        if reassembly.max_queued_bytes is not None:
            assert reassembly.queued_bytes <= reassembly.max_queued_bytes

    @invariant()
    def nothing_fails_without_a_fault(self) -> None:
        if self.task is None:
            return
        assert self.loop_errors == []
        if self.fault is None:
            assert self.session.error is None, self.session.error
            assert self.session.status is not SessionStatus.FAILED
        # Only the stray connections are refused (a channel that never sent its
        # handshake is hung up on when the migration ends: handshake-closed).
        strays = [p for p, e in self.session.core.connections.refused if p.startswith("stray")]
        # The core keeps the last RECENT_REFUSALS refusals (and counts them all).
        assert len(strays) == min(self.strays, RECENT_REFUSALS)

    # -- the end: everything still to send is sent, then the outcome is the model's -------

    def teardown(self) -> None:
        try:
            if self.ready:
                self._finish()
        finally:
            self._close()

    def _finish(self) -> None:
        assert self.task is not None
        deadline = time.monotonic() + 20
        while not self.task.done():
            for feed in self.feeds:
                if self._open(feed):
                    transport = feed.transport
                    if feed.fed < len(feed.stream):
                        rest = feed.stream[feed.fed :]
                        feed.fed += self._in_loop(lambda: transport.feed(rest))  # noqa: B023
                    elif self._in_loop(transport.eof):
                        feed.closed = True
            self._step(0.001)
            assert time.monotonic() < deadline, (
                f"no end: {[(f.fed, len(f.stream), f.closed) for f in self.feeds]}, "
                f"status {self.session.status}"
            )
        assert self.loop_errors == []
        error = self.task.exception()
        # What the cases covered (pytest --hypothesis-show-statistics).
        event(f"outcome: {error.reason.value if isinstance(error, MultifdError) else 'completed'}")
        reassembly = self.session.core.reassembly
        event(f"memory bound: {'none' if reassembly.max_queued_bytes is None else 'set'}")
        if reassembly.spilled_bytes:
            event("spilled")
        if self.session.snapshot().paused_seconds:
            event("a channel waited for memory")
        if self.fault is None:
            assert error is None, error
            for spec, (_, data, blob) in zip(self.settings.devices, self.files, strict=True):
                assert spec.data_path.read_bytes() == data
                assert spec.config_path.read_bytes() == blob
            assert self.session.core.reassembly.queued_bytes == 0
        else:
            assert isinstance(error, MultifdError) and error.reason is self.fault, error
            assert sorted(p.name for p in self.directory.iterdir()) == [], "nothing left behind"

    def _close(self) -> None:
        loop = self.loop
        try:
            if self.task is not None and not self.task.done():
                self.task.cancel()
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(self.task)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()
            shutil.rmtree(self.directory, ignore_errors=True)


class SessionMachineAsyncio(SessionMachine):
    loop_name = "asyncio"


class SessionMachineUvloop(SessionMachine):
    loop_name = "uvloop"


MACHINE_SETTINGS = hsettings(
    max_examples=80,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestSessionMachineAsyncio = SessionMachineAsyncio.TestCase
TestSessionMachineAsyncio.settings = MACHINE_SETTINGS
TestSessionMachineUvloop = SessionMachineUvloop.TestCase
TestSessionMachineUvloop.settings = MACHINE_SETTINGS
