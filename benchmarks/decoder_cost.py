"""The decoder's own cost per packet, in process: no socket, no event loop.

    python benchmarks/decoder_cost.py [--packets 20000] [--payload 1000] [--reps 5]

Feeds a ``ChannelDecoder`` (asking for each payload buffer, as the daemon's
does) one channel's packets the way the socket path does when the socket
holds them all: each read fills what the decoder offers (a header; a payload,
and the next header where its buffer has room for it), buffers provided,
every event taken. Prints the best of ``--reps`` runs in microseconds per packet (the
best, since on a shared machine anything slower is interference). A
per-packet figure for the pure code, to compare changes to it; the copies of
the test's own slicing are included and are the same for every version.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from vfio_multifd.core.decoder import ASK, ChannelDecoder
from vfio_multifd.core.reassembly import capacity_of
from vfio_multifd.core.wire import ChannelHandshake, DeviceKey, encode_device_packet


def per_packet(packets: list[bytes], payload: int) -> float:
    decoder = ChannelDecoder(max_packet_size=payload + 64, allocate=ASK)
    decoder.receive_data(ChannelHandshake(0).encode())
    decoder.next_event()
    stream = memoryview(b"".join(packets))
    # One buffer for every payload, as large as the pool's (room for the next header
    # from 64 KiB up): each read is the rest of a header or of a payload (and its room).
    buffer = bytearray(capacity_of(payload))
    pos = 0
    started = time.perf_counter()
    while pos < len(stream):
        target = decoder.get_buffer()
        n = min(len(target), len(stream) - pos)
        target[:n] = stream[pos : pos + n]
        pos += n
        decoder.buffer_updated(n)
        while decoder.next_event() is not None:
            pass
        if decoder.state.value == "awaiting-buffer":
            decoder.provide_buffer(buffer)
    return (time.perf_counter() - started) / len(packets) * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packets", type=int, default=20000)
    parser.add_argument("--payload", type=int, default=1000, help="data bytes per packet")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    device = DeviceKey("0000:00:02.0/vfio", 0)
    data = bytes(args.payload)
    packets = [encode_device_packet(device, idx, data) for idx in range(args.packets)]
    best = min(per_packet(packets, args.payload) for _ in range(args.reps))
    print(
        f"decoder: {best:.1f} us per packet ({args.packets} packets of {args.payload} B, best of {args.reps})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
