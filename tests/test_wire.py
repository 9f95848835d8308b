"""The pure codec (vfio_multifd.core.wire): exact bytes, round trips, the incremental
decoder fed whole / byte by byte / split at every point / through get_buffer,
and every error the decoder owns (PROTOCOL.md section 4), raised as soon as the
offending bytes are there and before any payload is allocated.

``qemu_source`` is an independent encoder written from PROTOCOL.md; it is the
reference every encoding here is checked against.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

import pytest
import qemu_source as qs

from vfio_multifd.core.decoder import ChannelDecoder, DecoderState
from vfio_multifd.core.wire import (
    DEFAULT_MAX_PACKET_SIZE,
    HANDSHAKE,
    INVALID_IDX,
    PACKET_PREFIX_SIZE,
    ChannelHandshake,
    ConfigTag,
    DeviceKey,
    DevicePacket,
    check_config_blob,
    check_handshake,
    encode_config_blob,
    encode_device_packet,
    encode_idstr,
)
from vfio_multifd.errors import HandshakeError, ProtocolError, Reason

IDSTR = "0000:00:02.0/vfio"
IDSTR_B = "0000:00:03.0/vfio"
KEY = DeviceKey(IDSTR)
UUID = bytes(range(1, 17))

# Offsets of the fields inside one device-state packet (PROTOCOL.md 2.2 - 2.4).
OFF_MAGIC = 0
OFF_VERSION = 4
OFF_FLAGS = 8
OFF_IDSTR = 12
OFF_INSTANCE = 268
OFF_SIZE = 272
OFF_VFIO_VERSION = 276
OFF_IDX = 280
OFF_VFIO_FLAGS = 284

#: PROTOCOL.md 2.6, written out byte by byte from the dump (not from any encoder).
WORKED_EXAMPLE = (
    bytes.fromhex("11 22 33 44 00 00 00 01 00 00 00 40 30 30 30 30")
    + bytes.fromhex("3a 30 30 3a 30 32 2e 30 2f 76 66 69 6f 00 00 00")
    + bytes(0x10C - 0x20)  # NUL padding up to offset 0x10b
    + bytes.fromhex("00 00 00 00")  # instance_id 0
    + bytes.fromhex("00 00 00 10 00 00 00 00 00 00 00 05 00 00 00 00")
    + bytes.fromhex("de ad be ef")
)


# --- helpers ---------------------------------------------------------------------


class RecordingAllocator:
    """An ``allocate`` callable that remembers every size it was asked for."""

    def __init__(self, slack: int = 0) -> None:
        self.calls: list[int] = []
        self.buffers: list[bytearray] = []
        self.slack = slack

    def __call__(self, size: int) -> bytearray:
        self.calls.append(size)
        buffer = bytearray(size + self.slack)
        self.buffers.append(buffer)
        return buffer


def drain(decoder: ChannelDecoder) -> list[ChannelHandshake | DevicePacket]:
    events = []
    while (event := decoder.next_event()) is not None:
        events.append(event)
    return events


def error_of(decoder: ChannelDecoder) -> list[object]:
    """Every event left, then the error that stopped the decoder (it must have one),
    as ``next_event`` gives them: the error last, raised, and raised again after."""
    out: list[object] = []
    while True:
        try:
            event = decoder.next_event()
        except ProtocolError as error:
            out.append(error)
            break
        assert event is not None, "the decoder was expected to have stopped on an error"
        out.append(event)
    with pytest.raises(ProtocolError) as again:
        decoder.next_event()
    assert again.value is out[-1]
    return out


def summary(events: list[ChannelHandshake | DevicePacket]) -> list[tuple[object, ...]]:
    """Events as plain tuples (DevicePacket holds a bytearray and a memoryview)."""
    out: list[tuple[object, ...]] = []
    for event in events:
        if isinstance(event, ChannelHandshake):
            out.append(("handshake", event.channel_id, event.uuid))
        else:
            out.append(("packet", event.device, event.idx, event.config, bytes(event.data)))
    return out


def feed_whole(stream: bytes) -> tuple[ChannelDecoder, list[tuple[object, ...]]]:
    decoder = ChannelDecoder()
    decoder.receive_data(stream)
    return decoder, summary(drain(decoder))


def feed_bytewise(stream: bytes) -> tuple[ChannelDecoder, list[tuple[object, ...]]]:
    decoder = ChannelDecoder()
    events = []
    for i in range(len(stream)):
        decoder.receive_data(stream[i : i + 1])
        events.extend(drain(decoder))
    return decoder, summary(events)


def feed_split(stream: bytes, at: int) -> tuple[ChannelDecoder, list[tuple[object, ...]]]:
    decoder = ChannelDecoder()
    events = []
    for piece in (stream[:at], stream[at:]):
        decoder.receive_data(piece)
        events.extend(drain(decoder))
    return decoder, summary(events)


def feed_zero_copy(
    stream: bytes, rng: random.Random, max_chunk: int = 97, slack: int = 0
) -> tuple[ChannelDecoder, list[tuple[object, ...]]]:
    """As a BufferedProtocol would: write into get_buffer(), then buffer_updated()
    (payload buffers ``slack`` bytes longer than their payloads)."""
    decoder = ChannelDecoder(allocate=RecordingAllocator(slack))
    events = []
    pos = 0
    while pos < len(stream):
        target = decoder.get_buffer()
        assert len(target) > 0, "get_buffer() must never be empty"
        n = min(len(target), rng.randint(1, max_chunk), len(stream) - pos)
        target[:n] = stream[pos : pos + n]
        pos += n
        decoder.buffer_updated(n)
        events.extend(drain(decoder))
    return decoder, summary(events)


def expected_events(
    channel_id: int, packets: list[tuple[DeviceKey, int, bool, bytes]], uuid: bytes = bytes(16)
) -> list[tuple[object, ...]]:
    return [("handshake", channel_id, uuid)] + [
        ("packet", key, idx, config, data) for key, idx, config, data in packets
    ]


def stream_of(
    channel_id: int, packets: list[tuple[DeviceKey, int, bool, bytes]], uuid: bytes = bytes(16)
) -> bytes:
    """A channel's bytes built with the reference encoder (qemu_source)."""
    out = qs.handshake(channel_id, uuid)
    for key, idx, config, data in packets:
        out += qs.device_packet(key.idstr, key.instance_id, idx, data, config)
    return out


def good_prefix(size: int = 4, idx: int = 3) -> bytearray:
    """The 288-byte prefix of a valid packet with ``size`` data bytes."""
    return bytearray(qs.device_packet(IDSTR, 0, idx, bytes(size))[:PACKET_PREFIX_SIZE])


def after_handshake(allocate: Callable[[int], bytearray] | None = None, **kwargs: int) -> ChannelDecoder:
    decoder = ChannelDecoder(**kwargs) if allocate is None else ChannelDecoder(allocate=allocate, **kwargs)
    decoder.receive_data(qs.handshake(0))
    assert summary(drain(decoder)) == [("handshake", 0, bytes(16))]
    assert decoder.state is DecoderState.HEADER
    return decoder


# --- the worked example (PROTOCOL.md 2.6) ------------------------------------------


def test_worked_example_encodes_to_the_exact_bytes() -> None:
    encoded = encode_device_packet(KEY, 5, bytes.fromhex("deadbeef"))
    assert len(WORKED_EXAMPLE) == 292
    assert encoded == WORKED_EXAMPLE
    assert encoded == qs.device_packet(IDSTR, 0, 5, bytes.fromhex("deadbeef"))


def test_worked_example_decodes() -> None:
    allocate = RecordingAllocator()
    decoder = after_handshake(allocate)
    decoder.receive_data(WORKED_EXAMPLE)
    (packet,) = drain(decoder)
    assert isinstance(packet, DevicePacket)
    assert packet.device == DeviceKey("0000:00:02.0/vfio", 0)
    assert packet.idx == 5
    assert packet.config is False
    assert packet.size == 4
    assert bytes(packet.data) == bytes.fromhex("deadbeef")
    # zero-copy: the packet owns the very buffer the decoder allocated for it
    assert allocate.calls == [4]
    assert packet.buffer is allocate.buffers[0]
    assert decoder.state is DecoderState.HEADER
    assert decoder.packets == 1
    assert decoder.bytes_received == 64 + 292


# --- handshake -----------------------------------------------------------------------


def test_handshake_encodes_to_the_reference_bytes() -> None:
    encoded = ChannelHandshake(3, UUID).encode()
    assert encoded == qs.handshake(3, UUID)
    assert len(encoded) == 64
    assert encoded[:8] == bytes.fromhex("11223344 00000001")
    assert encoded[8:24] == UUID
    assert encoded[24] == 3
    assert encoded[25:] == bytes(39)


def test_handshake_default_uuid_is_all_zero() -> None:
    assert ChannelHandshake(0).uuid == bytes(16)
    assert ChannelHandshake(0).encode() == qs.handshake(0)


def test_handshake_decodes() -> None:
    decoder = ChannelDecoder()
    decoder.receive_data(qs.handshake(5, UUID))
    assert drain(decoder) == [ChannelHandshake(5, UUID)]
    assert decoder.state is DecoderState.HEADER
    assert decoder.bytes_received == 64
    assert decoder.packets == 0


def test_handshake_event_appears_exactly_at_its_last_byte() -> None:
    decoder = ChannelDecoder()
    data = qs.handshake(1, UUID)
    decoder.receive_data(data[:63])
    assert decoder.next_event() is None
    assert decoder.state is DecoderState.HANDSHAKE
    decoder.receive_data(data[63:])
    assert decoder.next_event() == ChannelHandshake(1, UUID)
    assert decoder.state is DecoderState.HEADER


# --- round trips ---------------------------------------------------------------------

ROUND_TRIPS = [
    pytest.param(KEY, 0, b"\x01\x02\x03", False, id="idx-0"),
    pytest.param(KEY, 0xFFFFFFFE, b"large", False, id="largest-valid-idx"),
    pytest.param(KEY, 1 << 31, b"x", False, id="idx-2**31"),
    pytest.param(KEY, 7, b"", False, id="zero-length-data"),
    pytest.param(KEY, 9, qs.config_blob(b"cfg-bytes"), True, id="config-flag"),
    pytest.param(KEY, 0, b"", True, id="config-flag-empty"),
    pytest.param(DeviceKey(IDSTR, 7), 2, b"inst", False, id="instance-7"),
    pytest.param(DeviceKey(IDSTR, 0xFFFFFFFF), 2, b"inst", False, id="instance-max"),
    pytest.param(DeviceKey("v" * 255, 1), 4, b"long", False, id="idstr-255-bytes"),
    pytest.param(DeviceKey("d"), 1, bytes(range(256)) * 5, False, id="idstr-1-byte"),
]


@pytest.mark.parametrize(("key", "idx", "data", "config"), ROUND_TRIPS)
def test_encoding_matches_the_reference_encoder(
    key: DeviceKey, idx: int, data: bytes, config: bool
) -> None:
    ours = encode_device_packet(key, idx, data, config)
    assert ours == qs.device_packet(key.idstr, key.instance_id, idx, data, config)
    assert len(ours) == PACKET_PREFIX_SIZE + len(data)
    (size,) = struct.unpack_from(">I", ours, OFF_SIZE)
    assert size == 12 + len(data)


@pytest.mark.parametrize(("key", "idx", "data", "config"), ROUND_TRIPS)
def test_round_trip(key: DeviceKey, idx: int, data: bytes, config: bool) -> None:
    allocate = RecordingAllocator()
    decoder = after_handshake(allocate)
    decoder.receive_data(encode_device_packet(key, idx, data, config))
    (packet,) = drain(decoder)
    assert isinstance(packet, DevicePacket)
    assert (packet.device, packet.idx, packet.config) == (key, idx, config)
    assert packet.size == len(data)
    assert bytes(packet.data) == data
    assert decoder.state is DecoderState.HEADER
    assert decoder.packets == 1


def test_round_trip_into_a_larger_pooled_buffer() -> None:
    allocate = RecordingAllocator(slack=100)
    decoder = after_handshake(allocate)
    decoder.receive_data(encode_device_packet(KEY, 1, b"abc"))
    (packet,) = drain(decoder)
    assert isinstance(packet, DevicePacket)
    assert len(packet.buffer) == 103
    assert packet.size == 3
    assert bytes(packet.data) == b"abc"


def test_config_blob_encoding_matches_reference() -> None:
    assert encode_config_blob(b"abc") == qs.config_blob(b"abc")
    assert encode_config_blob(b"")[:8] == struct.pack(">Q", ConfigTag.DEV_CONFIG_STATE)
    assert encode_config_blob(b"")[8:] == struct.pack(">Q", ConfigTag.END_OF_STATE)


@pytest.mark.parametrize("idstr", ["", "x" * 256, "a\0b"])
def test_encode_idstr_rejects_what_cannot_be_sent(idstr: str) -> None:
    with pytest.raises(ValueError, match="idstr"):
        encode_idstr(idstr)


def test_encode_idstr_accepts_255_bytes() -> None:
    assert encode_idstr("x" * 255) == b"x" * 255


# --- one channel's stream, however it is cut ---------------------------------------

STREAMS = {
    "one-device": (
        2,
        [
            (KEY, 0, False, b"first chunk"),
            (KEY, 2, False, bytes(range(200))),
            (KEY, 1, False, b""),
            (KEY, 3, True, qs.config_blob(b"\x00config\xff")),
        ],
    ),
    "two-devices": (
        0,
        [
            (DeviceKey(IDSTR_B, 3), 4, False, b"b" * 33),
            (KEY, 0, False, b"a" * 17),
            (DeviceKey(IDSTR_B, 3), 5, True, qs.config_blob(b"")),
            (DeviceKey("z" * 255), 0xFFFFFFFE, False, b"\x11"),
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_stream_fed_whole(name: str) -> None:
    channel, packets = STREAMS[name]
    decoder, events = feed_whole(stream_of(channel, packets))
    assert events == expected_events(channel, packets)
    assert decoder.state is DecoderState.HEADER
    assert decoder.packets == len(packets)


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_stream_fed_byte_by_byte(name: str) -> None:
    channel, packets = STREAMS[name]
    stream = stream_of(channel, packets)
    decoder, events = feed_bytewise(stream)
    assert events == expected_events(channel, packets)
    assert decoder.bytes_received == len(stream)
    assert decoder.packets == len(packets)


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_each_event_appears_exactly_at_its_last_byte(name: str) -> None:
    channel, packets = STREAMS[name]
    stream = stream_of(channel, packets)
    ends = [64]
    for key, idx, config, data in packets:
        ends.append(ends[-1] + len(qs.device_packet(key.idstr, key.instance_id, idx, data, config)))
    decoder = ChannelDecoder()
    seen_at = []
    for i in range(len(stream)):
        decoder.receive_data(stream[i : i + 1])
        for _ in drain(decoder):
            seen_at.append(i + 1)
    assert seen_at == ends


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_stream_split_at_every_point(name: str) -> None:
    channel, packets = STREAMS[name]
    stream = stream_of(channel, packets)
    expected = expected_events(channel, packets)
    for at in range(len(stream) + 1):
        decoder, events = feed_split(stream, at)
        assert events == expected, f"split at {at}"
        assert decoder.state is DecoderState.HEADER, f"split at {at}"


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", sorted(STREAMS))
def test_stream_through_get_buffer_in_random_chunks(name: str, seed: int) -> None:
    channel, packets = STREAMS[name]
    stream = stream_of(channel, packets)
    decoder, events = feed_zero_copy(stream, random.Random(seed))
    assert events == expected_events(channel, packets)
    assert decoder.bytes_received == len(stream)
    decoder.eof()
    assert decoder.state is DecoderState.CLOSED


def test_get_buffer_of_a_payload_is_the_allocated_buffer() -> None:
    allocate = RecordingAllocator()
    decoder = after_handshake(allocate)
    decoder.receive_data(good_prefix(size=1000))
    assert allocate.calls == [1000]
    assert decoder.state is DecoderState.PAYLOAD
    data = bytes(range(250)) * 4
    # the whole rest of the payload is offered at once, in the chunk's own buffer
    target = decoder.get_buffer()
    assert len(target) == 1000
    assert target.obj is allocate.buffers[0]
    target[:300] = data[:300]
    decoder.buffer_updated(300)
    assert decoder.next_event() is None
    target = decoder.get_buffer()
    assert len(target) == 700
    target[:700] = data[300:]
    decoder.buffer_updated(700)
    (packet,) = drain(decoder)
    assert isinstance(packet, DevicePacket)
    assert packet.buffer is allocate.buffers[0]
    assert bytes(allocate.buffers[0]) == data
    assert decoder.state is DecoderState.HEADER


@pytest.mark.parametrize("slack", [1, 287, 288, 4096])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", sorted(STREAMS))
def test_stream_through_payload_buffers_with_room_for_the_next_header(
    name: str, seed: int, slack: int
) -> None:
    channel, packets = STREAMS[name]
    stream = stream_of(channel, packets)
    decoder, events = feed_zero_copy(stream, random.Random(seed), max_chunk=600, slack=slack)
    assert events == expected_events(channel, packets)
    assert decoder.bytes_received == len(stream)


def test_a_payload_read_takes_the_next_header_into_the_buffers_room() -> None:
    """One read fills the payload and the next packet's header (the buffer has room
    for it): the packet is complete, its data exact, and the next header decoded."""
    allocate = RecordingAllocator(slack=4096)
    decoder = after_handshake(allocate)
    first = encode_device_packet(KEY, 1, bytes(range(200)) * 5)
    second = encode_device_packet(KEY, 2, b"next")
    decoder.receive_data(first[:PACKET_PREFIX_SIZE])
    target = decoder.get_buffer()
    assert len(target) == 1000 + PACKET_PREFIX_SIZE  # the payload and a header's room
    rest = first[PACKET_PREFIX_SIZE:] + second[:PACKET_PREFIX_SIZE]
    target[: len(rest)] = rest
    decoder.buffer_updated(len(rest))
    (packet,) = drain(decoder)
    assert isinstance(packet, DevicePacket) and packet.buffer is allocate.buffers[0]
    assert bytes(packet.data) == bytes(range(200)) * 5 and packet.size == 1000
    assert allocate.calls == [1000, 4]  # the next header was decoded: its buffer asked for
    assert decoder.state is DecoderState.PAYLOAD and decoder.needed == 4
    decoder.receive_data(second[PACKET_PREFIX_SIZE:])
    assert summary(drain(decoder)) == [("packet", KEY, 2, False, b"next")]
    assert decoder.bytes_received == 64 + len(first) + len(second)


def test_a_partial_header_read_ahead_is_completed_by_the_next_read() -> None:
    decoder = after_handshake(RecordingAllocator(slack=PACKET_PREFIX_SIZE))
    first, second = (encode_device_packet(KEY, idx, b"x" * 100) for idx in (1, 2))
    decoder.receive_data(first[:PACKET_PREFIX_SIZE])
    target = decoder.get_buffer()
    target[:200] = first[PACKET_PREFIX_SIZE:] + second[:100]
    decoder.buffer_updated(200)
    assert summary(drain(decoder)) == [("packet", KEY, 1, False, b"x" * 100)]
    assert decoder.state is DecoderState.HEADER
    assert len(decoder.get_buffer()) == decoder.needed == PACKET_PREFIX_SIZE - 100
    decoder.receive_data(second[100:])
    assert summary(drain(decoder)) == [("packet", KEY, 2, False, b"x" * 100)]


def test_bad_bytes_read_ahead_stop_the_decoder_after_the_packet() -> None:
    decoder = after_handshake(RecordingAllocator(slack=PACKET_PREFIX_SIZE))
    first = encode_device_packet(KEY, 1, b"abc")
    decoder.receive_data(first[:PACKET_PREFIX_SIZE])
    target = decoder.get_buffer()
    target[:7] = first[PACKET_PREFIX_SIZE:] + b"\xde\xad\xbe\xef"  # not the magic
    decoder.buffer_updated(7)
    packet, error = error_of(decoder)
    assert isinstance(packet, DevicePacket) and bytes(packet.data) == b"abc"
    assert isinstance(error, ProtocolError) and error.reason is Reason.PACKET_MAGIC


def test_get_buffer_of_a_header_is_the_rest_of_the_prefix() -> None:
    decoder = ChannelDecoder()
    assert len(decoder.get_buffer()) == 64
    decoder.receive_data(qs.handshake(0)[:10])
    assert len(decoder.get_buffer()) == 54
    decoder.receive_data(qs.handshake(0)[10:] + WORKED_EXAMPLE[:100])
    assert len(decoder.get_buffer()) == PACKET_PREFIX_SIZE - 100


def test_trailing_partial_packet_is_kept_for_later() -> None:
    _, packets = STREAMS["one-device"]
    stream = stream_of(0, packets)
    trailing = encode_device_packet(KEY, 4, b"tail")
    decoder = ChannelDecoder()
    decoder.receive_data(stream + trailing[:100])
    assert summary(drain(decoder)) == expected_events(0, packets)
    assert decoder.state is DecoderState.HEADER
    decoder.receive_data(trailing[100:])
    assert summary(drain(decoder)) == [("packet", KEY, 4, False, b"tail")]


def test_trailing_bytes_after_a_packet_do_not_delay_it() -> None:
    decoder = after_handshake()
    decoder.receive_data(WORKED_EXAMPLE + WORKED_EXAMPLE[:1])
    events = summary(drain(decoder))
    assert events == [("packet", KEY, 5, False, bytes.fromhex("deadbeef"))]
    assert decoder.state is DecoderState.HEADER
    assert decoder.bytes_received == 64 + 293


# --- the reference source's streams decode to exactly what it sent -----------------

DEVICES = [
    (IDSTR, 0, random.Random(1).randbytes(5000), random.Random(2).randbytes(64)),
    (IDSTR_B, 3, random.Random(3).randbytes(2048), b""),
    ("empty/vfio", 1, b"", random.Random(4).randbytes(10)),
]


@pytest.mark.parametrize("order", qs.ORDERS)
def test_reference_streams_decode_to_what_was_sent(order: str) -> None:
    streams = qs.build_streams(DEVICES, 3, order, seed=7, chunk_size=1024, uuid=UUID)
    received: dict[DeviceKey, dict[int, DevicePacket]] = {}
    for channel_id, stream in enumerate(streams):
        decoder = ChannelDecoder()
        decoder.receive_data(stream)
        events = drain(decoder)
        decoder.eof()
        assert decoder.state is DecoderState.CLOSED
        assert events[0] == ChannelHandshake(channel_id, UUID)
        reencoded = ChannelHandshake(channel_id, UUID).encode()
        for packet in events[1:]:
            assert isinstance(packet, DevicePacket)
            slot = received.setdefault(packet.device, {})
            assert packet.idx not in slot
            slot[packet.idx] = packet
            reencoded += encode_device_packet(packet.device, packet.idx, packet.data, packet.config)
        # our encoder reproduces the reference source's bytes exactly
        assert reencoded == stream
    assert set(received) == {DeviceKey(n, i) for n, i, _, _ in DEVICES}
    for idstr, instance, data, config in DEVICES:
        by_idx = received[DeviceKey(idstr, instance)]
        last = max(by_idx)
        assert sorted(by_idx) == list(range(last + 1))
        assert [by_idx[i].config for i in range(last + 1)] == [False] * last + [True]
        assert b"".join(bytes(by_idx[i].data) for i in range(last)) == data
        blob = bytes(by_idx[last].data)
        assert blob == qs.config_blob(config)
        check_config_blob(blob, DeviceKey(idstr, instance), last)
        assert blob[8:-8] == config


# --- end of stream ---------------------------------------------------------------------


def test_eof_right_after_the_handshake_is_clean() -> None:
    decoder = after_handshake()
    decoder.eof()
    assert decoder.state is DecoderState.CLOSED


def test_eof_at_a_packet_boundary_is_clean() -> None:
    decoder = after_handshake()
    decoder.receive_data(WORKED_EXAMPLE * 2)
    assert len(drain(decoder)) == 2
    decoder.eof()
    assert decoder.state is DecoderState.CLOSED
    with pytest.raises(RuntimeError, match="closed"):
        decoder.get_buffer()


@pytest.mark.parametrize("received", [0, 1, 4, 8, 63])
def test_eof_inside_the_handshake(received: int) -> None:
    decoder = ChannelDecoder()
    decoder.receive_data(qs.handshake(0)[:received])
    decoder.eof()  # never raises: next_event does
    [error] = error_of(decoder)
    assert isinstance(error, HandshakeError)
    assert error.reason is Reason.HANDSHAKE_CLOSED
    assert f"{received} of 64" in str(error)
    assert decoder.state is DecoderState.ERROR


@pytest.mark.parametrize("received", [1, 12, 275])
def test_eof_inside_a_header_before_the_device_is_known(received: int) -> None:
    decoder = after_handshake()
    decoder.receive_data(WORKED_EXAMPLE[:received])
    decoder.eof()
    [error] = error_of(decoder)
    assert isinstance(error, ProtocolError) and not isinstance(error, HandshakeError)
    assert error.reason is Reason.PACKET_TRUNCATED
    assert error.device is None
    assert f"{received} of 288" in str(error)
    assert decoder.state is DecoderState.ERROR


@pytest.mark.parametrize("received", [276, 287])
def test_eof_inside_a_header_names_the_device(received: int) -> None:
    decoder = after_handshake()
    decoder.receive_data(WORKED_EXAMPLE[:received])
    decoder.eof()
    [error] = error_of(decoder)
    assert isinstance(error, ProtocolError)
    assert error.reason is Reason.PACKET_TRUNCATED
    assert error.device == IDSTR
    assert IDSTR in str(error)
    assert decoder.state is DecoderState.ERROR


@pytest.mark.parametrize("received", [288, 290, 291])
def test_eof_inside_a_payload_names_device_and_idx(received: int) -> None:
    decoder = after_handshake()
    decoder.receive_data(WORKED_EXAMPLE[:received])
    assert decoder.state is DecoderState.PAYLOAD
    decoder.eof()
    [error] = error_of(decoder)
    assert isinstance(error, ProtocolError)
    assert error.reason is Reason.PACKET_TRUNCATED
    assert (error.device, error.idx) == (IDSTR, 5)
    assert IDSTR in str(error)
    assert "state buffer 5" in str(error)
    assert f"{received - 288} of 4" in str(error)
    assert decoder.state is DecoderState.ERROR


def test_eof_after_an_error_does_not_raise_again() -> None:
    decoder = ChannelDecoder()
    decoder.receive_data(b"\0\0\0\0")
    decoder.eof()
    assert decoder.state is DecoderState.ERROR
    [error] = error_of(decoder)  # the first error, not a second one from eof
    assert isinstance(error, HandshakeError) and error.reason is Reason.HANDSHAKE_MAGIC


# --- handshake errors, each as soon as its bytes are there ------------------------------


def _bad_handshake(offset: int, value: bytes) -> bytes:
    data = bytearray(qs.handshake(0))
    data[offset : offset + len(value)] = value
    return bytes(data)


HANDSHAKE_ERRORS = [
    pytest.param(_bad_handshake(0, b"\x11\x22\x33\x45"), 4, Reason.HANDSHAKE_MAGIC, "0x11223345", id="magic"),
    pytest.param(b"GET / HTTP/1.1\r\n" + bytes(48), 4, Reason.HANDSHAKE_MAGIC, "0x47455420", id="stray-http-client"),
    pytest.param(_bad_handshake(4, b"\0\0\0\x02"), 8, Reason.HANDSHAKE_VERSION, "version 2", id="version-2"),
    pytest.param(_bad_handshake(4, b"\0\0\0\0"), 8, Reason.HANDSHAKE_VERSION, "version 0", id="version-0"),
]


@pytest.mark.parametrize(("data", "at", "reason", "text"), HANDSHAKE_ERRORS)
def test_handshake_error_raised_as_soon_as_the_field_is_complete(
    data: bytes, at: int, reason: Reason, text: str
) -> None:
    decoder = ChannelDecoder()
    decoder.receive_data(data[: at - 1])
    assert decoder.state is DecoderState.HANDSHAKE
    assert decoder.next_event() is None
    decoder.receive_data(data[at - 1 : at])  # feeding never raises
    assert decoder.state is DecoderState.ERROR
    [error] = error_of(decoder)
    assert isinstance(error, HandshakeError)
    assert error.reason is reason
    assert text in str(error)
    with pytest.raises(RuntimeError, match="error"):
        decoder.get_buffer()


@pytest.mark.parametrize(("data", "at", "reason", "text"), HANDSHAKE_ERRORS)
def test_handshake_error_when_fed_whole(data: bytes, at: int, reason: Reason, text: str) -> None:
    decoder = ChannelDecoder()
    decoder.receive_data(data + WORKED_EXAMPLE)
    assert at <= decoder.bytes_received <= 64  # nothing past the handshake was consumed
    [error] = error_of(decoder)
    assert isinstance(error, HandshakeError)
    assert error.reason is reason


def test_handshake_unused_bytes_are_not_checked() -> None:
    data = bytearray(qs.handshake(1, UUID))
    data[25:64] = b"\xff" * 39
    decoder = ChannelDecoder()
    decoder.receive_data(data)
    assert drain(decoder) == [ChannelHandshake(1, UUID)]


# --- packet and VFIO errors ---------------------------------------------------------------


def _patched(offset: int, value: bytes, size: int = 4) -> bytes:
    prefix = good_prefix(size=size)
    prefix[offset : offset + len(value)] = value
    return bytes(prefix) + bytes(size)


def _with_size(next_packet_size: int) -> bytes:
    return _patched(OFF_SIZE, struct.pack(">I", next_packet_size))


# (stream after the handshake, offset at which the error is first decidable,
#  reason, device named, idx named, text in the message)
PACKET_ERRORS = [
    pytest.param(_patched(OFF_MAGIC, b"\x44\x33\x22\x11"), 4, Reason.PACKET_MAGIC, None, None, "0x44332211", id="magic"),
    pytest.param(_patched(OFF_VERSION, b"\0\0\0\x02"), 8, Reason.PACKET_VERSION, None, None, "version 2", id="version"),
    pytest.param(_patched(OFF_FLAGS, b"\0\0\0\0"), 12, Reason.PACKET_RAM, None, None, "RAM", id="ram-packet"),
    pytest.param(_patched(OFF_FLAGS, b"\0\0\0\x02"), 12, Reason.PACKET_RAM, None, None, "RAM", id="ram-zlib-packet"),
    pytest.param(_patched(OFF_FLAGS, b"\0\0\0\x01"), 12, Reason.PACKET_RAM, None, None, "SYNC", id="sync-packet"),
    pytest.param(_patched(OFF_FLAGS, b"\0\0\0\x41"), 12, Reason.PACKET_SYNC, None, None, "SYNC", id="sync-on-device-state"),
    pytest.param(_patched(OFF_FLAGS, b"\0\0\0\x42"), 12, Reason.PACKET_COMPRESSION, None, None, "zlib", id="zlib-on-device-state"),
    pytest.param(_patched(OFF_FLAGS, b"\0\0\0\x44"), 12, Reason.PACKET_COMPRESSION, None, None, "zstd", id="zstd-on-device-state"),
    pytest.param(_patched(OFF_FLAGS, b"\0\0\0\x48"), 12, Reason.PACKET_COMPRESSION, None, None, "qpl", id="qpl-on-device-state"),
    pytest.param(_patched(OFF_FLAGS, b"\0\0\0\x50"), 12, Reason.PACKET_COMPRESSION, None, None, "uadk", id="uadk-on-device-state"),
    pytest.param(_patched(OFF_FLAGS, b"\0\0\0\x60"), 12, Reason.PACKET_COMPRESSION, None, None, "qatzip", id="qatzip-on-device-state"),
    pytest.param(_patched(OFF_FLAGS, b"\0\0\0\x7e"), 12, Reason.PACKET_COMPRESSION, None, None, "0x7e", id="all-compression-bits"),
    pytest.param(_patched(OFF_FLAGS, b"\0\0\0\xc0"), 12, Reason.PACKET_FLAGS, None, None, "0x80", id="unknown-flag-bit"),
    pytest.param(_patched(OFF_FLAGS, b"\x80\0\0\x40"), 12, Reason.PACKET_FLAGS, None, None, "0x80000000", id="unknown-high-flag-bit"),
    pytest.param(
        _patched(OFF_IDSTR, b"x" * 256), OFF_INSTANCE, Reason.PACKET_IDSTR, None, None, "NUL", id="idstr-not-terminated",
    ),
    pytest.param(_with_size(0), 276, Reason.PACKET_SIZE, IDSTR, None, "next_packet_size 0", id="size-0"),
    pytest.param(
        _with_size(DEFAULT_MAX_PACKET_SIZE + 1), 276, Reason.PACKET_SIZE, IDSTR, None,
        f"next_packet_size {DEFAULT_MAX_PACKET_SIZE + 1}", id="size-over-max",
    ),
    pytest.param(_with_size(0xFFFFFFFF), 276, Reason.PACKET_SIZE, IDSTR, None, "4294967295", id="size-4GiB"),
    pytest.param(_with_size(11), 276, Reason.VFIO_SHORT, IDSTR, None, "11 bytes", id="payload-11"),
    pytest.param(_with_size(1), 276, Reason.VFIO_SHORT, IDSTR, None, "1 bytes", id="payload-1"),
    pytest.param(
        _patched(OFF_VFIO_VERSION, b"\0\0\0\x01"), OFF_VFIO_FLAGS, Reason.VFIO_VERSION, IDSTR, 3, "version 1", id="vfio-version",
    ),
    pytest.param(
        _patched(OFF_IDX, b"\xff\xff\xff\xff"), OFF_VFIO_FLAGS, Reason.VFIO_INVALID_IDX, IDSTR, INVALID_IDX, "0xffffffff",
        id="invalid-idx",
    ),
]

# Fields checked as soon as their last byte is in (the VFIO version with the idx,
# four bytes later, so that its error can name the idx).
PACKET_ERRORS_BY_PREFIX = [
    pytest.param(_patched(OFF_IDSTR, b"x" * 256), OFF_IDSTR + 256, Reason.PACKET_IDSTR, None, None, "NUL", id="idstr-not-terminated"),
    pytest.param(_patched(OFF_IDSTR + 255, b"\x01"), OFF_IDSTR + 256, Reason.PACKET_IDSTR, None, None, "0x01", id="idstr-byte-255"),
    pytest.param(_patched(OFF_VFIO_VERSION, b"\0\0\0\x01"), OFF_VFIO_FLAGS, Reason.VFIO_VERSION, IDSTR, 3, "version 1", id="vfio-version"),
    pytest.param(
        _patched(OFF_IDX, b"\xff\xff\xff\xff"), OFF_VFIO_FLAGS, Reason.VFIO_INVALID_IDX, IDSTR, INVALID_IDX, "0xffffffff", id="invalid-idx"
    ),
]


def _check_packet_error(
    data: bytes, at: int, reason: Reason, device: str | None, idx: int | None, text: str
) -> None:
    allocate = RecordingAllocator()
    decoder = after_handshake(allocate)
    decoder.receive_data(data[: at - 1])
    assert decoder.state is DecoderState.HEADER
    decoder.receive_data(data[at - 1 : at])
    [error] = error_of(decoder)
    assert isinstance(error, ProtocolError)
    assert not isinstance(error, HandshakeError)
    assert error.reason is reason
    assert error.device == device
    assert error.idx == idx
    assert text in str(error)
    if device is not None:
        assert device in str(error)
    if idx is not None:
        assert f"idx {idx}" in str(error) or f"{idx:#x}" in str(error)
    assert allocate.calls == [], "no payload buffer may be allocated for a bad packet"
    assert decoder.state is DecoderState.ERROR
    assert decoder.packets == 0


@pytest.mark.parametrize(("data", "at", "reason", "device", "idx", "text"), PACKET_ERRORS)
def test_packet_error_raised_as_soon_as_the_field_is_complete(
    data: bytes, at: int, reason: Reason, device: str | None, idx: int | None, text: str
) -> None:
    _check_packet_error(data, at, reason, device, idx, text)


@pytest.mark.parametrize(("data", "at", "reason", "device", "idx", "text"), PACKET_ERRORS_BY_PREFIX)
def test_packet_error_raised_by_the_end_of_the_prefix(
    data: bytes, at: int, reason: Reason, device: str | None, idx: int | None, text: str
) -> None:
    _check_packet_error(data, at, reason, device, idx, text)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(p.values[0], p.values[2], id=p.id)
        for p in [*PACKET_ERRORS, *PACKET_ERRORS_BY_PREFIX]
    ],
)
def test_packet_error_when_fed_whole_allocates_nothing(data: bytes, reason: Reason) -> None:
    allocate = RecordingAllocator()
    decoder = after_handshake(allocate)
    decoder.receive_data(data + WORKED_EXAMPLE)
    [error] = error_of(decoder)
    assert isinstance(error, ProtocolError) and error.reason is reason
    assert allocate.calls == []
    assert decoder.bytes_received <= 64 + PACKET_PREFIX_SIZE
    assert decoder.state is DecoderState.ERROR


def test_packet_error_after_good_packets_keeps_them() -> None:
    """h11's rule: the error comes from next_event, after every event before it."""
    decoder = after_handshake()
    decoder.receive_data(WORKED_EXAMPLE * 2 + _with_size(0))
    *events, error = error_of(decoder)
    assert summary(events) == [("packet", KEY, 5, False, bytes.fromhex("deadbeef"))] * 2  # type: ignore[arg-type]
    assert isinstance(error, ProtocolError) and error.reason is Reason.PACKET_SIZE
    assert decoder.packets == 2


def test_handshake_then_a_bad_packet_in_one_read_gives_the_handshake_first() -> None:
    """Through get_buffer/buffer_updated, as a protocol reads: one call, two units."""
    decoder = ChannelDecoder()
    stream = qs.handshake(1) + _with_size(0)
    pos = 0
    while decoder.state is not DecoderState.ERROR:
        target = decoder.get_buffer()
        n = min(len(target), len(stream) - pos)
        target[:n] = stream[pos : pos + n]
        pos += n
        decoder.buffer_updated(n)
    handshake, error = error_of(decoder)
    assert handshake == ChannelHandshake(1)
    assert isinstance(error, ProtocolError) and error.reason is Reason.PACKET_SIZE


def test_error_names_device_with_instance_id() -> None:
    data = bytearray(_with_size(0))
    data[OFF_INSTANCE : OFF_INSTANCE + 4] = struct.pack(">I", 7)
    decoder = after_handshake()
    decoder.receive_data(data)
    [error] = error_of(decoder)
    assert isinstance(error, ProtocolError) and error.device == str(DeviceKey(IDSTR, 7))
    assert IDSTR in str(error)
    assert "7" in error.device


def test_next_packet_size_equal_to_the_maximum_is_accepted() -> None:
    allocate = RecordingAllocator()
    decoder = after_handshake(allocate, max_packet_size=100)
    decoder.receive_data(encode_device_packet(KEY, 0, bytes(88)))
    (packet,) = drain(decoder)
    assert isinstance(packet, DevicePacket)
    assert packet.size == 88
    assert allocate.calls == [88]


def test_next_packet_size_one_over_a_custom_maximum_is_refused_unallocated() -> None:
    allocate = RecordingAllocator()
    decoder = after_handshake(allocate, max_packet_size=100)
    decoder.receive_data(encode_device_packet(KEY, 0, bytes(89)))
    [error] = error_of(decoder)
    assert isinstance(error, ProtocolError) and error.reason is Reason.PACKET_SIZE
    assert "101" in str(error) and "100" in str(error)
    assert allocate.calls == []


def test_max_packet_size_below_the_vfio_header_is_refused() -> None:
    with pytest.raises(ValueError, match="12"):
        ChannelDecoder(max_packet_size=11)
    assert ChannelDecoder(max_packet_size=12).max_packet_size == 12


def test_unknown_vfio_flag_bits_are_ignored() -> None:
    data = bytearray(encode_device_packet(KEY, 2, b"zz"))
    data[OFF_VFIO_FLAGS : OFF_VFIO_FLAGS + 4] = struct.pack(">I", 0xFFFFFFFE)
    decoder = after_handshake()
    decoder.receive_data(data)
    assert summary(drain(decoder)) == [("packet", KEY, 2, False, b"zz")]


def test_config_flag_among_other_vfio_flag_bits() -> None:
    data = bytearray(encode_device_packet(KEY, 2, b"zz"))
    data[OFF_VFIO_FLAGS : OFF_VFIO_FLAGS + 4] = struct.pack(">I", 0x80000001)
    decoder = after_handshake()
    decoder.receive_data(data)
    assert summary(drain(decoder)) == [("packet", KEY, 2, True, b"zz")]


# --- check_config_blob ---------------------------------------------------------------


@pytest.mark.parametrize("config", [b"", b"x", bytes(range(256)) * 4])
def test_check_config_blob_accepts_a_good_blob(config: bytes) -> None:
    blob = qs.config_blob(config)
    check_config_blob(blob, KEY, 3)
    check_config_blob(memoryview(blob), KEY, 3)
    check_config_blob(bytearray(blob), KEY, 3)


def _tag(value: int) -> bytes:
    return struct.pack(">Q", value)


BAD_BLOBS = [
    pytest.param(_tag(ConfigTag.DEV_SETUP_STATE) + b"cfg" + _tag(ConfigTag.END_OF_STATE), "DEV_CONFIG_STATE", id="no-dev-config-state"),
    pytest.param(b"cfg-bytes-only!!" + _tag(ConfigTag.END_OF_STATE), "DEV_CONFIG_STATE", id="untagged-start"),
    pytest.param(_tag(ConfigTag.DEV_CONFIG_STATE) + b"cfg" + _tag(ConfigTag.DEV_DATA_STATE), "END_OF_STATE", id="no-end-of-state"),
    pytest.param(_tag(ConfigTag.DEV_CONFIG_STATE) + b"config bytes", "END_OF_STATE", id="truncated-end"),
    pytest.param(b"", "too short", id="empty"),
    pytest.param(_tag(ConfigTag.DEV_CONFIG_STATE), "too short", id="8-bytes"),
    pytest.param(_tag(ConfigTag.DEV_CONFIG_STATE) + _tag(ConfigTag.END_OF_STATE)[:7], "too short", id="15-bytes"),
]


@pytest.mark.parametrize(("blob", "text"), BAD_BLOBS)
def test_check_config_blob_rejects(blob: bytes, text: str) -> None:
    key = DeviceKey(IDSTR, 2)
    with pytest.raises(ProtocolError) as info:
        check_config_blob(blob, key, 9)
    error = info.value
    assert error.reason is Reason.VFIO_CONFIG_BLOB
    assert (error.device, error.idx) == (str(key), 9)
    assert text in str(error)
    assert IDSTR in str(error)
    assert "idx 9" in str(error)


# --- check_handshake -----------------------------------------------------------------


def test_check_handshake_accepts_the_expected_uuid_and_ids() -> None:
    for channel_id in range(4):
        check_handshake(ChannelHandshake(channel_id, UUID), uuid=UUID, channels=4)


def test_check_handshake_accepts_the_last_channel_id() -> None:
    check_handshake(ChannelHandshake(1, UUID), uuid=UUID, channels=2)


def test_check_handshake_refuses_id_equal_to_channels() -> None:
    # QEMU checks id > channels; ids run 0 .. channels-1, so id == channels is refused.
    with pytest.raises(HandshakeError) as info:
        check_handshake(ChannelHandshake(2, UUID), uuid=UUID, channels=2)
    assert info.value.reason is Reason.HANDSHAKE_CHANNEL_ID
    assert "channel id 2" in str(info.value)
    assert "2 expected channels" in str(info.value)


def test_check_handshake_refuses_a_large_id() -> None:
    with pytest.raises(HandshakeError) as info:
        check_handshake(ChannelHandshake(255, UUID), uuid=UUID, channels=2)
    assert info.value.reason is Reason.HANDSHAKE_CHANNEL_ID
    assert "255" in str(info.value)


def test_check_handshake_refuses_another_uuid() -> None:
    with pytest.raises(HandshakeError) as info:
        check_handshake(ChannelHandshake(0, bytes(16)), uuid=UUID, channels=2)
    assert info.value.reason is Reason.HANDSHAKE_UUID
    assert UUID.hex() in str(info.value)
    assert bytes(16).hex() in str(info.value)


def test_check_handshake_checks_uuid_before_the_id() -> None:
    with pytest.raises(HandshakeError) as info:
        check_handshake(ChannelHandshake(9, bytes(16)), uuid=UUID, channels=2)
    assert info.value.reason is Reason.HANDSHAKE_UUID


def test_decoded_handshake_passes_the_session_checks() -> None:
    decoder = ChannelDecoder()
    decoder.receive_data(qs.handshake(1, UUID))
    (handshake,) = drain(decoder)
    assert isinstance(handshake, ChannelHandshake)
    check_handshake(handshake, uuid=UUID, channels=2)
    with pytest.raises(HandshakeError):
        check_handshake(handshake, uuid=UUID, channels=1)


def test_handshake_struct_is_64_bytes() -> None:
    assert HANDSHAKE.size == 64
    assert PACKET_PREFIX_SIZE == 288


@pytest.mark.parametrize("step", [1, 3, 64, 1000])
def test_a_qevm_connection_is_a_main_channel_whose_bytes_go_up_as_they_come(step: int) -> None:
    """The decoder only says what the connection is; the core takes or refuses it."""
    from vfio_multifd.core.decoder import MainBytes, MainChannel

    stream = b"QEVM\x00\x00\x00\x03" + bytes(range(256)) * 3
    decoder = ChannelDecoder()
    events = []
    for start in range(0, len(stream), step):
        decoder.receive_data(stream[start : start + step])
        while (event := decoder.next_event()) is not None:
            events.append(event)
    decoder.eof()
    assert decoder.next_event() is None
    assert events[0] == MainChannel()
    assert all(isinstance(event, MainBytes) for event in events[1:])
    assert b"".join(event.data for event in events[1:]) == stream
