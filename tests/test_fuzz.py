"""Arbitrary and corrupted input: only packets, "need more", or the project's own errors.

The decoder is fuzzed with hypothesis; the whole daemon is run over loopback
on valid streams with one random byte corrupted, and every run must end, in
bounded time, either complete with the right bytes or with a clean error.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from pathlib import Path

import pytest
import qemu_source as qs
from helpers import IDSTR, final_files, random_bytes, settings, start
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from vfio_multifd import DeviceKey, MultifdError, ProtocolError
from vfio_multifd.decoder import ChannelDecoder
from vfio_multifd.wire import ChannelHandshake, DevicePacket

VALID = qs.handshake(0) + b"".join(
    qs.device_packet(IDSTR, 0, idx, bytes([idx]) * (idx * 7)) for idx in range(4)
)


def feed(data: bytes, cuts: list[int], max_packet_size: int = 4096) -> list[object]:
    decoder = ChannelDecoder(max_packet_size=max_packet_size)
    events: list[object] = []
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for first, end in itertools.pairwise(points):
        decoder.receive_data(data[first:end])
        while (event := decoder.next_event()) is not None:
            events.append(event)
    return events


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=700), st.lists(st.integers(min_value=0), max_size=8))
def test_arbitrary_bytes_only_ever_give_events_or_protocol_errors(
    data: bytes, cuts: list[int]
) -> None:
    try:
        events = feed(data, cuts)
    except ProtocolError:
        return
    assert all(isinstance(e, ChannelHandshake | DevicePacket) for e in events)


@hsettings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=0, max_value=len(VALID) - 1),
    st.integers(min_value=0, max_value=255),
    st.lists(st.integers(min_value=0), max_size=6),
)
def test_valid_stream_with_one_byte_changed(offset: int, value: int, cuts: list[int]) -> None:
    """After a valid handshake the fuzzing reaches every header field."""
    data = bytearray(VALID)
    data[offset] = value
    try:
        events = feed(bytes(data), cuts)
    except ProtocolError:
        return
    packets = [e for e in events if isinstance(e, DevicePacket)]
    assert len(packets) <= 4
    for packet in packets:
        assert packet.size == len(packet.data)


@hsettings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=600), st.lists(st.integers(min_value=0), max_size=8))
def test_garbage_after_a_valid_handshake(tail: bytes, cuts: list[int]) -> None:
    decoder_input = qs.handshake(3) + tail
    try:
        events = feed(decoder_input, cuts)
    except ProtocolError as error:
        assert error.reason.value.startswith(("packet", "vfio"))
        return
    assert isinstance(events[0], ChannelHandshake) and events[0].channel_id == 3


MUTATIONS = 24


def packet_starts(stream: bytes) -> list[int]:
    starts, start = [], 64
    while start < len(stream):
        starts.append(start)
        start += 276 + int.from_bytes(stream[start + 272 : start + 276], "big")
    return starts


@pytest.mark.parametrize("seed", range(MUTATIONS))
async def test_corrupted_stream_ends_cleanly_in_bounded_time(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    data = random_bytes(6 * 2048 + 5, seed)
    streams = qs.build_streams([(IDSTR, 0, data, b"cfg")], 2, "random", seed, chunk_size=2048)
    target = rng.randrange(2)
    corrupted = bytearray(streams[target])
    # Half the flips land in a handshake or header, where they matter most.
    headers = list(range(64)) + [
        o for start in packet_starts(corrupted) for o in range(start, start + 288)
    ]
    offset = rng.choice(headers) if seed % 2 else rng.randrange(len(corrupted))
    corrupted[offset] ^= 1 << rng.randrange(8)
    streams[target] = bytes(corrupted)
    config = settings(
        tmp_path,
        DeviceKey(IDSTR, 0),
        channels=2,
        max_packet_size=8192,
        accept_timeout=1.0,
        handshake_timeout=1.0,
        progress_timeout=1.0,
    )
    running = await start(config)

    def send() -> None:
        with contextlib.suppress(OSError):
            qs.send_streams(running.address, streams)

    sending = asyncio.create_task(asyncio.to_thread(send))
    try:
        result = await running.result(timeout=20)
    except MultifdError as error:
        assert str(error), "an error always says what happened"
        assert final_files(tmp_path) == [], f"nothing left behind after: {error}"
    else:
        # The flip hit data bytes or ignored bits: the file holds what was sent.
        written = config.devices[0].data_path.read_bytes()
        assert len(written) == len(data) and result.devices[0].bytes == len(data)
        differing = [i for i in range(len(data)) if written[i] != data[i]]
        assert len(differing) <= 1
    await asyncio.wait_for(sending, 20)
