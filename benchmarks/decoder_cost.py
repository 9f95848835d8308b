"""The decoder's own cost per packet, in process: no socket, no event loop.

    python benchmarks/decoder_cost.py [--packets 20000] [--payload 1000] [--reps 5]

Feeds a ``ChannelDecoder`` (asking for each payload buffer, as the daemon's
does) one channel's packets the way the socket path does: each 288-byte
header in one read, its buffer provided, the payload in one read, every event
taken. Prints the best of ``--reps`` runs in microseconds per packet (the
best, since on a shared machine anything slower is interference). A
per-packet figure for the pure code, to compare changes to it; the copies of
the test's own slicing are included and are the same for every version.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from vfio_multifd.core.decoder import ASK, ChannelDecoder
from vfio_multifd.core.wire import ChannelHandshake, DeviceKey, encode_device_packet


def per_packet(packets: list[bytes], payload: int) -> float:
    decoder = ChannelDecoder(max_packet_size=payload + 64, allocate=ASK)
    decoder.receive_data(ChannelHandshake(0).encode())
    decoder.next_event()
    buffer = bytearray(payload + 12)
    started = time.perf_counter()
    for packet in packets:
        for _ in range(2):  # the header, then (its buffer provided) the payload
            target = decoder.get_buffer()
            n = len(target)
            target[:n] = packet[:n]
            packet = packet[n:]
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
