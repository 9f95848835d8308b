"""The benchmarks' workload: every channel's QEMU-format stream, encoded before the clock starts.

The data and the order are the sender's own (``vfio_multifd.source.sender``): each
device's chunks are rotations of one random block (``DeviceState``: cheap to
produce, yet every chunk differs, so a misplaced chunk changes the digest),
and ``plan`` deals the packets to the channels as QEMU's source does. Here
they are only encoded ahead of time, handshake first, as batches of buffers
for ``sendmsg``: packet headers as bytes, payloads as views, so replaying a
stream costs next to nothing and the same for every receiver.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

from vfio_multifd.config import Digest
from vfio_multifd.core.wire import ChannelHandshake, DeviceKey, encode_packet_prefix
from vfio_multifd.source.plan import (
    DEFAULT_CHUNK_SIZE,
    DeviceState,
    Packet,
    SourceDevice,
    plan,
)

CHUNK = DEFAULT_CHUNK_SIZE
#: Packets per ``sendmsg`` call of the replay sender (two buffers each).
BATCH_PACKETS = 16

Buffer = bytes | memoryview


def idstr_of(n: int) -> str:
    """The n-th benchmark device: ``0000:00:02.0/vfio``, ``0000:00:03.0/vfio``..."""
    return f"0000:00:{n + 2:02x}.0/vfio"


@dataclass
class Workload:
    devices: list[DeviceState]
    streams: list[list[list[Buffer]]] = field(default_factory=list)  # channel, batch, buffer

    @property
    def channels(self) -> int:
        return len(self.streams)

    @property
    def size(self) -> int:
        """Data bytes over all devices (config blobs and headers not counted)."""
        return sum(state.device.size for state in self.devices)

    @property
    def channel_bytes(self) -> list[int]:
        return [sum(len(b) for batch in stream for b in batch) for stream in self.streams]

    @cached_property
    def expected_digests(self) -> dict[str, str]:
        """Each device's digest as the daemon logs it, by the device's name in its log."""
        return {str(state.key): state.digest(Digest.XXH3_128) for state in self.devices}

    def stream_bytes(self, channel: int) -> bytes:
        """One channel's whole stream as one object (for tests; the sender never joins)."""
        return b"".join(bytes(b) for batch in self.streams[channel] for b in batch)


def device_states(sizes: Sequence[int], *, seed: int = 1, chunk: int = CHUNK) -> list[DeviceState]:
    """Devices ``idstr_of(0)``, ``idstr_of(1)``... of ``sizes`` data bytes each."""
    return [
        DeviceState(SourceDevice(DeviceKey(idstr_of(n)), size=size, seed=seed + n), chunk)
        for n, size in enumerate(sizes)
    ]


def encode(devices: list[DeviceState], per_channel: Sequence[Sequence[Packet]]) -> Workload:
    """Encode the planned packets ``(device, idx)`` of every channel, handshake first."""
    workload = Workload(devices)
    for channel, packets in enumerate(per_channel):
        buffers: list[Buffer] = [ChannelHandshake(channel).encode()]
        for d, idx in packets:
            state = devices[d]
            data = state.chunk(idx)
            buffers += [encode_packet_prefix(state.key, idx, len(data), idx == state.chunks), data]
        step = 2 * BATCH_PACKETS
        workload.streams.append([buffers[i : i + step] for i in range(0, len(buffers), step)])
    return workload


def build_workload(
    sizes: Sequence[int],
    *,
    channels: int,
    order: str = "round-robin",
    seed: int = 1,
    chunk: int = CHUNK,
) -> Workload:
    """Devices of ``sizes`` bytes sent over ``channels`` in the sender's ``order``
    (``round-robin``: the devices interleaved, one packet each, as QEMU sends them)."""
    if channels < 1 or not sizes or min(sizes) < 1:
        raise ValueError("need at least one channel, one device and one byte per device")
    devices = device_states(sizes, seed=seed, chunk=chunk)
    return encode(devices, plan(devices, channels, order, seed))
