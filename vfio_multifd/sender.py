"""The multi-channel source: a stand-in for QEMU's sending side.

Used by tests, ``make demo`` and the benchmarks. Each device's state is cut
into chunks of at most ``chunk_size`` bytes, numbered from 0, followed by the
config-state packet (``idx`` = number of chunks). The packets are put in the
chosen order and dealt to the channels round-robin, as QEMU's source picks
channels; each channel is a thread with a blocking socket that sends a
packet's header and data with one ``sendmsg`` (no copy of the data).

Generated data (``size=``) is a random block of ``chunk_size`` bytes per
device, and chunk ``idx`` is a rotation of it by an offset drawn from
``idx``: every chunk differs and misplacing one changes the digest, yet
producing it costs no CPU.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .config import (
    Address,
    Digest,
    check_channels,
    parse_device_key,
    parse_fields,
    parse_size,
)
from .digest import format_digest, new_hasher
from .errors import UsageError
from .wire import ChannelHandshake, DeviceKey, encode_config_blob, encode_packet_prefix

ORDERS = ("round-robin", "reverse", "random")

#: Faults ``--inject`` can put into channel 0's stream, to show each error.
FAULTS = {
    "handshake-magic": "channel 0's handshake has a wrong magic (refused)",
    "handshake-version": "channel 0's handshake has version 2 (refused)",
    "handshake-uuid": "channel 0's handshake carries another VM's uuid (refused)",
    "handshake-id": "channel 0 claims id = --channels (refused)",
    "main-channel": "channel 0 starts like QEMU's main channel, QEVM (refused)",
    "bad-magic": "the first packet has a wrong magic",
    "bad-version": "the first packet has version 2",
    "ram": "a RAM packet (flags 0) instead of the first packet",
    "sync": "the first packet has the SYNC bit set",
    "idstr-unterminated": "the first packet's idstr fills all 256 bytes",
    "zero-size": "the first packet says next_packet_size 0",
    "oversize": "the first packet says next_packet_size 2 GiB",
    "short-vfio": "the first packet's payload is shorter than the VFIO header",
    "vfio-version": "the first packet has VFIO version 1",
    "invalid-idx": "the first packet has idx 0xffffffff",
    "duplicate": "the first packet is sent twice",
    "unknown-device": "an extra packet for a device the destination does not know",
    "after-config": "channel 0 first sends a chunk of the first device with an idx beyond "
    "its config packet's",
    "second-config": "channel 0 first sends a second config packet (another idx) of the "
    "first device",
    "bad-config": "the first device's config blob lacks its tags",
    "missing": "the first device's chunk 0 is never sent",
    "truncate": "channel 0 closes in the middle of its first packet",
}
DEFAULT_CHUNK_SIZE = 1 << 20
CONFIG_SIZE = 256


@dataclass(frozen=True, slots=True)
class SourceDevice:
    """``idstr=ID,instance=I,(source=FILE | size=BYTES[,seed=S])``."""

    key: DeviceKey
    source: Path | None = None
    size: int = 0
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> SourceDevice:
        fields = parse_fields(
            text, what="device", allowed={"idstr", "instance", "source", "size", "seed"}
        )
        key = parse_device_key(fields, text)
        if ("source" in fields) == ("size" in fields):
            raise UsageError(f"device {text!r}: give exactly one of source=FILE or size=BYTES")
        seed = fields.get("seed", "0")
        if not seed.isdigit():
            raise UsageError(f"device {text!r}: seed must be a number, not {seed!r}")
        if "source" in fields:
            path = Path(fields["source"])
            try:
                size = path.stat().st_size
            except OSError as error:
                raise UsageError(f"device {text!r}: cannot read {path}: {error.strerror}") from None
            return cls(key, path, size, int(seed))
        return cls(key, None, parse_size(fields["size"]), int(seed))


class DeviceState:
    """One device's chunks and config blob, produced on demand."""

    def __init__(self, device: SourceDevice, chunk_size: int) -> None:
        self.device = device
        self.key = device.key
        self.chunk_size = chunk_size
        self.chunks = -(-device.size // chunk_size)  # the config packet's idx
        rng = random.Random(f"{device.seed}:{device.key.idstr}:{device.key.instance_id}")
        self.config_blob = encode_config_blob(rng.randbytes(CONFIG_SIZE))
        self._fd: int | None = None
        self._block: memoryview | None = None
        if device.source is not None:
            self._fd = os.open(device.source, os.O_RDONLY | os.O_CLOEXEC)
        else:
            block = rng.randbytes(min(chunk_size, max(device.size, 1)))
            self._block = memoryview(block + block)
        self._rotation = rng.getrandbits(64)

    def chunk(self, idx: int) -> bytes | memoryview:
        """The data of chunk ``idx`` (the config blob for the last idx)."""
        if idx == self.chunks:
            return self.config_blob
        offset = idx * self.chunk_size
        size = min(self.chunk_size, self.device.size - offset)
        if self._fd is not None:
            return os.pread(self._fd, size, offset)
        block = self._block
        assert block is not None
        period = len(block) // 2
        start = ((idx + 1) * self._rotation >> 7) % period
        return block[start : start + size]

    def digest(self, digest: Digest) -> str:
        hasher = new_hasher(digest)
        for idx in range(self.chunks):
            hasher.update(self.chunk(idx))
        return format_digest(digest, hasher)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


Packet = tuple[int, int]  # (device index, idx)


def plan(
    devices: Sequence[DeviceState], channels: int, order: str, seed: int
) -> list[list[Packet]]:
    """Which packets each channel sends, in the order it sends them."""
    sequences = [[(d, idx) for idx in range(state.chunks + 1)] for d, state in enumerate(devices)]
    if order == "reverse":
        sequences = [list(reversed(seq)) for seq in sequences]
    packets = list(_interleave(sequences))
    if order == "random":
        random.Random(seed).shuffle(packets)
    elif order not in ORDERS:
        raise UsageError(f"unknown --order {order!r} (one of {', '.join(ORDERS)})")
    per_channel: list[list[Packet]] = [[] for _ in range(channels)]
    for n, packet in enumerate(packets):
        per_channel[n % channels].append(packet)
    return per_channel


def _interleave(sequences: list[list[Packet]]) -> Iterator[Packet]:
    """One packet of each device in turn, as concurrent per-device send threads would."""
    longest = max((len(seq) for seq in sequences), default=0)
    for n in range(longest):
        for seq in sequences:
            if n < len(seq):
                yield seq[n]


def _handshake_bytes(handshake: ChannelHandshake, fault: str | None, channels: int) -> bytes:
    raw = bytearray(handshake.encode())
    if fault == "handshake-magic":
        raw[0:4] = b"\xde\xad\xbe\xef"
    elif fault == "handshake-version":
        raw[4:8] = (2).to_bytes(4, "big")
    elif fault == "handshake-uuid":
        raw[8:24] = bytes(range(1, 17)) if raw[8:24] != bytes(range(1, 17)) else bytes(16)
    elif fault == "handshake-id":
        raw[24] = channels
    elif fault == "main-channel":
        raw[0:8] = b"QEVM\x00\x00\x00\x03"
    return bytes(raw)


def _corrupt(
    fault: str, prefix: bytes, data: bytes | memoryview
) -> tuple[bytes, bytes | memoryview]:
    """Damage the first packet of channel 0 (the header fields at PROTOCOL.md 2.3/2.4 offsets)."""
    raw = bytearray(prefix)
    if fault == "bad-magic":
        raw[0:4] = b"\x12\x34\x56\x78"
    elif fault == "bad-version":
        raw[4:8] = (2).to_bytes(4, "big")
    elif fault == "ram":
        raw[8:12] = bytes(4)
    elif fault == "sync":
        raw[11] |= 0x01
    elif fault == "idstr-unterminated":
        raw[12:268] = b"x" * 256
    elif fault == "zero-size":
        raw[272:276] = bytes(4)
    elif fault == "oversize":
        raw[272:276] = (0x80000000).to_bytes(4, "big")
    elif fault == "short-vfio":
        raw[272:276] = (8).to_bytes(4, "big")
        return bytes(raw[:284]), b""
    elif fault == "vfio-version":
        raw[276:280] = (1).to_bytes(4, "big")
    elif fault == "invalid-idx":
        raw[280:284] = (0xFFFFFFFF).to_bytes(4, "big")
    return bytes(raw), data


UNKNOWN_DEVICE = DeviceKey("0000:99:00.0/unknown", 0)


def _packet(
    states: Sequence[DeviceState], d: int, idx: int, fault: str | None
) -> tuple[DeviceKey, bytes | memoryview, bool]:
    """Device, data and CONFIG_STATE flag of planned packet (d, idx)."""
    if d < 0:
        return UNKNOWN_DEVICE, b"who am I", False
    state = states[d]
    if idx > state.chunks:  # an injected packet after the config packet
        second = fault == "second-config"
        return state.key, state.config_blob if second else b"late chunk", second
    if fault == "bad-config" and d == 0 and idx == state.chunks:
        return state.key, bytes(24), True
    return state.key, state.chunk(idx), idx == state.chunks


def _plan_fault(
    fault: str, states: Sequence[DeviceState], per_channel: list[list[Packet]]
) -> list[list[Packet]]:
    """Faults that add or remove whole packets change the plan of channel 0."""
    first = [list(packets) for packets in per_channel]
    channel0 = first[0]
    last = states[0].chunks
    if fault == "duplicate" and channel0:
        channel0.insert(1, channel0[0])
    elif fault in ("after-config", "second-config"):
        # An idx beyond the config packet's, first on channel 0: ahead of packets
        # the device needs, so the destination sees it before the device can
        # complete (sent last, it could complete first and the fault show nothing).
        channel0.insert(0, (0, last + 1))
    elif fault == "missing":
        first = [[p for p in packets if p != (0, 0)] for packets in first]
    elif fault == "unknown-device":
        channel0.insert(0, (-1, 0))
    return first


@dataclass(slots=True)
class SendResult:
    devices: list[tuple[DeviceKey, int, int, str]]  # key, bytes, chunks, digest
    seconds: float
    bytes_sent: int
    channel_bytes: list[int] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return sum(d[1] for d in self.devices) / 1e6 / self.seconds if self.seconds else 0.0


def connect(address: Address, timeout: float) -> socket.socket:
    """Connect, retrying while the daemon is not listening yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if address.kind == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(address.path)
                except BaseException:
                    sock.close()
                    raise
                return sock
            sock = socket.create_connection((address.host, address.port), timeout=timeout)
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except (ConnectionRefusedError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def send_all(sock: socket.socket, buffers: list[bytes | memoryview]) -> int:
    """``sendmsg`` until every byte of ``buffers`` is out."""
    total = sum(len(b) for b in buffers)
    sent = sock.sendmsg(buffers)
    if sent < total:  # rare on a blocking socket: finish the rest plainly
        rest = b"".join(bytes(b) for b in buffers)[sent:]
        sock.sendall(rest)
    return total


ChannelStream = Callable[[socket.socket], int]


def run_channels(address: Address, streams: Sequence[ChannelStream], timeout: float) -> list[int]:
    """Connect every channel, then run each stream on its own thread; bytes sent per channel."""
    socks = [connect(address, timeout) for _ in streams]
    sent = [0] * len(streams)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        sock = socks[n]
        try:
            sent[n] = streams[n](sock)
            sock.shutdown(socket.SHUT_WR)
            # Wait for the daemon to close, so "sent" means "received by the daemon".
            sock.settimeout(timeout)
            _drain_until_closed(sock)
        except BaseException as error:  # reported by the caller
            errors.append(error)
        finally:
            sock.close()

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(len(streams))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return sent


def _drain_until_closed(sock: socket.socket) -> None:
    """The destination answers nothing; its close (or a reset) is the end."""
    with contextlib.suppress(OSError):
        while sock.recv(4096):
            pass


def send(
    address: Address,
    devices: Sequence[SourceDevice],
    *,
    channels: int = 2,
    uuid: bytes = bytes(16),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    order: str = "round-robin",
    seed: int = 0,
    digest: Digest = Digest.XXH3_128,
    connect_timeout: float = 30.0,
    inject: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SendResult:
    """Send ``devices`` over ``channels`` connections to ``address``.

    ``progress(device_index, nbytes)`` is called after each data chunk is sent,
    from the channel's own thread (so it must be thread-safe).
    """
    check_channels(channels)
    if chunk_size <= 0:
        raise UsageError("--chunk-size must be positive")
    states = [DeviceState(device, chunk_size) for device in devices]
    try:
        digests = [state.digest(digest) for state in states]
        per_channel = plan(states, channels, order, seed)
        if inject is not None and inject not in FAULTS:
            raise UsageError(f"unknown --inject {inject!r} (one of {', '.join(FAULTS)})")
        if inject is not None:
            per_channel = _plan_fault(inject, states, per_channel)

        def stream(channel_id: int) -> ChannelStream:
            def run(sock: socket.socket) -> int:
                fault = inject if channel_id == 0 else None
                handshake = ChannelHandshake(channel_id, uuid)
                total = send_all(sock, [_handshake_bytes(handshake, fault, channels)])
                for n, (d, idx) in enumerate(per_channel[channel_id]):
                    key, data, config = _packet(states, d, idx, inject)
                    prefix = encode_packet_prefix(key, idx, len(data), config)
                    if n == 0 and fault is not None:
                        if fault == "truncate":
                            return total + send_all(sock, [prefix[: len(prefix) // 2]])
                        prefix, data = _corrupt(fault, prefix, data)
                    total += send_all(sock, [prefix, data])
                    if progress is not None and d >= 0 and idx < states[d].chunks:
                        progress(d, len(data))
                return total

            return run

        started = time.monotonic()
        sent = run_channels(address, [stream(n) for n in range(channels)], connect_timeout)
        seconds = time.monotonic() - started
    finally:
        for state in states:
            state.close()
    return SendResult(
        devices=[
            (state.key, state.device.size, state.chunks, digests[n])
            for n, state in enumerate(states)
        ],
        seconds=seconds,
        bytes_sent=sum(sent),
        channel_bytes=sent,
    )
