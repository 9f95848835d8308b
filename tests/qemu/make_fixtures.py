"""Record real QEMU migration streams as test fixtures (tests/fixtures/qemu/).

    eval "$(tests/qemu/get-qemu.sh)"
    .venv/bin/python tests/qemu/make_fixtures.py [--out tests/fixtures/qemu]

For each QEMU (7.2 and 10.0) a 64 MiB ``-M pc`` VM with a 128 KiB blob at
0x200000 migrates with multifd (2 channels) to the raw capture receiver,
paused and running (the boot sector rewriting 64 KiB over several rounds).
Each fixture directory holds the main channel and each multifd channel
(gzip, in channel-id order) and ``expected.json``: the QEMU, how it was made,
what ``query-migrate`` said, and the guest RAM read back with ``pmemsave``
after completion as the sha256 of every non-zero 4 KiB page of guest-physical
0..64 MiB outside the 0xa0000-0xfffff window (absent pages are zero).

``qemu-10.0-paused-spliced`` is the 10.0 paused capture with device-state
packets (vfio_multifd/core/wire.py's format) of one VFIO device inserted between
its RAM and SYNC packets: QEMU sends none without a VFIO device.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qemu.capture import CaptureReceiver, classify
from qemu.harness import (
    BLOB_ADDR,
    PC_WINDOW,
    RAM_SIZE,
    Qemu,
    find_qemus,
    make_blob,
    page_digests,
    source_vm,
)

from vfio_multifd.core.ram import ram_header_size
from vfio_multifd.core.wire import (
    DEVICE_STATE_HEADER,
    HANDSHAKE,
    DeviceKey,
    PacketFlag,
    encode_config_blob,
    encode_device_packet,
)

BLOB_SIZE = 128 << 10
BLOB_SEED = 22
CHANNELS = 2
#: The running guest rewrites this much (small: every round resends it).
DIRTY = (0x400000, 0x410000)
ROUNDS = 4
ROUNDS_BANDWIDTH = 1 << 20  # bytes/s: the first pass must last over 100 ms
SPLICED_DEVICE = DeviceKey("0000:00:02.0/vfio", 0)
SPLICE_SEED = 10


def gzip_to(path: Path, data: bytes) -> None:
    path.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))


def capture(qemu: Qemu, workdir: Path, *, running: bool) -> dict[str, Any]:
    """Migrate one VM to the capture receiver; the streams and what to expect."""
    receiver = CaptureReceiver(workdir / "streams", CHANNELS + 1)
    options: dict[str, Any] = {"blob": make_blob(BLOB_SIZE, BLOB_SEED), "running": running}
    if running:
        options["dirty"] = DIRTY
    with source_vm(qemu, workdir / "vm", **options) as vm:
        if running:
            time.sleep(0.5)
        vm.set_multifd(CHANNELS)
        started = time.monotonic()
        if running:
            vm.migrate(receiver.port, rounds=ROUNDS, max_bandwidth=ROUNDS_BANDWIDTH)
        else:
            vm.migrate(receiver.port)
        info = vm.wait_migration(120)
        seconds = time.monotonic() - started
        if info["status"] != "completed":
            raise SystemExit(f"QEMU {qemu.label}: migration {info['status']}: {info}")
        paths = receiver.wait(60)
        ram = vm.read_ram()
    main, channels = classify(paths)
    return {
        "main": main.read_bytes(),
        "channels": [path.read_bytes() for path in channels],
        "expected": {
            "qemu": qemu.label,
            "package": qemu.package,
            "machine": "-M pc -m 64 -accel tcg -display none -nodefaults",
            "running": running,
            "dirty": list(DIRTY) if running else None,
            "channels": CHANNELS,
            "blob": {"addr": BLOB_ADDR, "size": BLOB_SIZE, "seed": BLOB_SEED},
            "ram_size": RAM_SIZE,
            "window": [PC_WINDOW.start, PC_WINDOW.stop],
            "seconds": round(seconds, 2),
            "query_migrate": {
                key: info.get(key) for key in ("status", "total-time", "downtime", "setup-time")
            }
            | {"dirty-sync-count": info.get("ram", {}).get("dirty-sync-count")},
            "pc_ram_pages": {str(k): v for k, v in page_digests(ram).items()},
        },
    }


def packet_spans(channel: bytes) -> list[tuple[int, int]]:
    """(start, end) of every packet after the handshake of a multifd channel capture."""
    spans = []
    pos = HANDSHAKE.size
    header = ram_header_size()
    while pos < len(channel):
        (flags,) = struct.unpack_from(">I", channel, pos + 8)
        if flags & PacketFlag.DEVICE_STATE:
            end = pos + DEVICE_STATE_HEADER.size + DEVICE_STATE_HEADER.unpack_from(channel, pos)[5]
        else:
            (normal,) = struct.unpack_from(">I", channel, pos + 16)
            end = pos + header + normal * 4096
        spans.append((pos, end))
        pos = end
    return spans


def splice(channels: list[bytes]) -> tuple[list[bytes], dict[str, Any]]:
    """Insert one device's state (chunks idx 0..5 and its config packet, idx 6) between the
    packets of the channels: even idx on channel 0, odd on channel 1, at spread positions."""
    rng = random.Random(SPLICE_SEED)
    chunks = [rng.randbytes(rng.randrange(1, 6000)) for _ in range(6)]
    config = encode_config_blob(rng.randbytes(300))
    packets = [encode_device_packet(SPLICED_DEVICE, idx, data) for idx, data in enumerate(chunks)]
    packets.append(encode_device_packet(SPLICED_DEVICE, len(chunks), config, config=True))
    spliced = []
    for number, channel in enumerate(channels):
        spans = packet_spans(channel)
        mine = packets[number::2]
        # after packet i * len(spans) // (len(mine) + 1): spread from start to end
        cuts = {
            spans[(i + 1) * len(spans) // (len(mine) + 1) - 1][1]: packet
            for i, packet in enumerate(mine)
        }
        out = bytearray(channel[: HANDSHAKE.size])
        for start, end in spans:
            out += channel[start:end]
            if end in cuts:
                out += cuts[end]
        spliced.append(bytes(out))
    data = b"".join(chunks)
    return spliced, {
        "device": {"idstr": SPLICED_DEVICE.idstr, "instance_id": SPLICED_DEVICE.instance_id},
        "chunks": len(chunks),
        "data_sha256": hashlib.sha256(data).hexdigest(),
        "data_size": len(data),
        "config_sha256": hashlib.sha256(config).hexdigest(),
    }


def write_fixture(out: Path, name: str, main: bytes, channels: list[bytes], expected: dict[str, Any]) -> None:
    directory = out / name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    gzip_to(directory / "main.bin.gz", main)
    for number, channel in enumerate(channels):
        gzip_to(directory / f"channel-{number}.bin.gz", channel)
    (directory / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    sizes = {p.name: p.stat().st_size for p in sorted(directory.iterdir())}
    print(f"{name}: {sum(sizes.values())} bytes {sizes}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "fixtures/qemu")
    options = parser.parse_args()
    qemus = find_qemus()
    missing = {"7.2", "10.0"} - set(qemus)
    if missing:
        raise SystemExit(f"no QEMU {', '.join(sorted(missing))}: run tests/qemu/get-qemu.sh")
    with tempfile.TemporaryDirectory(prefix="qemu-fixtures-") as temporary:
        for label in ("7.2", "10.0"):
            for running in (False, True):
                name = f"qemu-{label}-{'running' if running else 'paused'}"
                made = capture(qemus[label], Path(temporary) / name, running=running)
                write_fixture(options.out, name, made["main"], made["channels"], made["expected"])
                if label == "10.0" and not running:
                    channels, device = splice(made["channels"])
                    expected = made["expected"] | {"spliced": device}
                    write_fixture(options.out, f"{name}-spliced", made["main"], channels, expected)
    return 0


if __name__ == "__main__":
    sys.exit(main())
