"""What the source sends: each device's chunks, and which channel sends which.

Each device's state is cut into chunks of at most ``chunk_size`` bytes,
numbered from 0, followed by the config-state packet (``idx`` = number of
chunks). The packets are put in the chosen order and dealt to the channels
round-robin, as QEMU's source picks channels.

Generated data (``size=``) is a random block of ``chunk_size`` bytes per
device, and chunk ``idx`` is a rotation of it by an offset drawn from
``idx``: every chunk differs and misplacing one changes the digest, yet
producing it costs no CPU.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import Digest, parse_device_key, parse_fields, parse_size
from ..core.wire import DeviceKey, encode_config_blob
from ..digest import format_digest, new_hasher
from ..errors import UsageError

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
        self.config = rng.randbytes(CONFIG_SIZE)  # the config state, before its blob
        self.config_blob = encode_config_blob(self.config)
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
