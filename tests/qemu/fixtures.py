"""The recorded real streams under tests/fixtures/qemu/ (see its README.md)."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "qemu"
NAMES = (
    "qemu-7.2-paused",
    "qemu-7.2-running",
    "qemu-10.0-paused",
    "qemu-10.0-running",
    "qemu-10.0-paused-spliced",
)


@dataclass(frozen=True)
class Recorded:
    name: str
    main: bytes
    channels: list[bytes]
    expected: dict[str, Any]

    @property
    def pc_ram_pages(self) -> dict[int, str]:
        return {int(k): v for k, v in self.expected["pc_ram_pages"].items()}


def load(name: str) -> Recorded:
    directory = FIXTURES / name
    channels = sorted(directory.glob("channel-*.bin.gz"), key=lambda p: int(p.name.split("-")[1].split(".")[0]))
    return Recorded(
        name,
        gzip.decompress((directory / "main.bin.gz").read_bytes()),
        [gzip.decompress(path.read_bytes()) for path in channels],
        json.loads((directory / "expected.json").read_text()),
    )
