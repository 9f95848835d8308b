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

import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .config import Address, Digest, parse_device_key, parse_fields, parse_size
from .errors import UsageError
from .loader import format_digest, new_hasher
from .wire import ChannelHandshake, DeviceKey, encode_config_blob, encode_packet_prefix

ORDERS = ("round-robin", "reverse", "random")
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
            with_suppress_recv(sock)
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


def with_suppress_recv(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except OSError:
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
) -> SendResult:
    if not 1 <= channels <= 256:
        raise UsageError(f"--channels must be 1..256, not {channels}")
    if chunk_size <= 0:
        raise UsageError("--chunk-size must be positive")
    states = [DeviceState(device, chunk_size) for device in devices]
    try:
        digests = [state.digest(digest) for state in states]
        per_channel = plan(states, channels, order, seed)

        def stream(channel_id: int) -> ChannelStream:
            def run(sock: socket.socket) -> int:
                total = send_all(sock, [ChannelHandshake(channel_id, uuid).encode()])
                for d, idx in per_channel[channel_id]:
                    state = states[d]
                    data = state.chunk(idx)
                    prefix = encode_packet_prefix(state.key, idx, len(data), idx == state.chunks)
                    total += send_all(sock, [prefix, data])
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
