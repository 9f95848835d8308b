"""Independent QEMU-format multifd VFIO device-state *source*.

Written only from /work/shared/PROTOCOL.md to cross-check the project's own codec
and sender. It deliberately imports nothing from ``vfio_multifd``.
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import socket
import struct
import threading
import time

MAGIC = 0x11223344
VERSION = 1
FLAG_DEVICE_STATE = 0x40
VFIO_FLAG_CONFIG_STATE = 0x1
DEV_CONFIG_STATE = 0xFFFFFFFFEF100002
END_OF_STATE = 0xFFFFFFFFEF100001
IDSTR_LEN = 256
ORDERS = ("round-robin", "reverse", "random")


def handshake(channel_id: int, uuid: bytes = bytes(16)) -> bytes:
    """Return the 64-byte channel handshake (§2.1)."""
    if len(uuid) != 16:
        raise ValueError(f"uuid must be 16 bytes, got {len(uuid)}")
    if not 0 <= channel_id <= 0xFF:
        raise ValueError(f"channel id {channel_id} does not fit in one byte")
    # magic, version, uuid, id, 7 unused bytes, four unused u64
    return struct.pack(">II16sB7x32x", MAGIC, VERSION, uuid, channel_id)


def _idstr_field(idstr: str) -> bytes:
    raw = idstr.encode("utf-8")
    if b"\0" in raw:
        raise ValueError("idstr must not contain NUL")
    if len(raw) > IDSTR_LEN - 1:
        raise ValueError(f"idstr is {len(raw)} bytes, at most {IDSTR_LEN - 1} fit")
    return raw.ljust(IDSTR_LEN, b"\0")


def device_packet(idstr: str, instance_id: int, idx: int, data: bytes,
                  config: bool = False, *, flags: int = FLAG_DEVICE_STATE) -> bytes:
    """Return one complete device-state packet: 276-byte header + VFIO payload (§2.3, §2.4)."""
    vfio_flags = VFIO_FLAG_CONFIG_STATE if config else 0
    payload = struct.pack(">III", 0, idx, vfio_flags) + bytes(data)
    header = struct.pack(">III", MAGIC, VERSION, flags) + _idstr_field(idstr)
    header += struct.pack(">II", instance_id, len(payload))
    return header + payload


def config_blob(config_bytes: bytes) -> bytes:
    """Wrap config bytes in DEV_CONFIG_STATE ... END_OF_STATE (§2.5)."""
    return struct.pack(">Q", DEV_CONFIG_STATE) + bytes(config_bytes) + struct.pack(">Q", END_OF_STATE)


def device_chunks(data: bytes, chunk_size: int = 1 << 20) -> list[bytes]:
    """Split data into chunks of at most chunk_size bytes; empty data gives no chunks."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    return [bytes(data[i:i + chunk_size]) for i in range(0, len(data), chunk_size)]


def _device_packets(idstr: str, instance_id: int, data: bytes, config_bytes: bytes,
                    chunk_size: int) -> list[bytes]:
    """All packets of one device in idx order: data chunks, then the config packet."""
    chunks = device_chunks(data, chunk_size)
    packets = [device_packet(idstr, instance_id, i, c) for i, c in enumerate(chunks)]
    packets.append(device_packet(idstr, instance_id, len(chunks), config_blob(config_bytes), True))
    return packets


def _interleave(per_device: list[list[bytes]]) -> list[bytes]:
    """Take one packet from each device in turn until all lists are exhausted."""
    out: list[bytes] = []
    for i in range(max((len(p) for p in per_device), default=0)):
        out.extend(p[i] for p in per_device if i < len(p))
    return out


def build_streams(devices: list[tuple[str, int, bytes, bytes]], channels: int,
                  order: str = "round-robin", seed: int = 0, chunk_size: int = 1 << 20,
                  uuid: bytes = bytes(16)) -> list[bytes]:
    """Return one byte stream per channel: handshake(i) followed by that channel's packets."""
    if channels < 1:
        raise ValueError("need at least one channel")
    per_device = [_device_packets(n, inst, d, c, chunk_size) for n, inst, d, c in devices]
    if order == "round-robin":
        sequence = _interleave(per_device)
    elif order == "reverse":
        sequence = _interleave([p[::-1] for p in per_device])
    elif order == "random":
        sequence = [pkt for p in per_device for pkt in p]
        random.Random(seed).shuffle(sequence)
    else:
        raise ValueError(f"unknown order {order!r}, expected one of {ORDERS}")
    streams = [bytearray(handshake(i, uuid)) for i in range(channels)]
    for n, pkt in enumerate(sequence):
        streams[n % channels] += pkt
    return [bytes(s) for s in streams]


def _parse_address(address: str) -> tuple[int, object]:
    """Return (address family, sockaddr) for 'tcp:HOST:PORT' or 'unix:PATH'."""
    kind, sep, rest = address.partition(":")
    if not sep or not rest:
        raise ValueError(f"bad address {address!r}")
    if kind == "unix":
        return socket.AF_UNIX, rest
    if kind != "tcp":
        raise ValueError(f"bad address {address!r}: expected tcp: or unix:")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"bad tcp address {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return socket.AF_INET6 if ":" in host else socket.AF_INET, (host, int(port))


def _connect(address: str, deadline: float) -> socket.socket:
    """Connect, retrying while refused or the unix socket is missing, until deadline."""
    family, sockaddr = _parse_address(address)
    while True:
        try:
            if family == socket.AF_UNIX:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(sockaddr)
                except BaseException:
                    sock.close()
                    raise
                return sock
            host, port = sockaddr  # type: ignore[misc]
            return socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
        except (ConnectionRefusedError, FileNotFoundError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def send_streams(address: str, streams: list[bytes], *, connect_timeout: float = 10.0) -> None:
    """Open one connection per stream, send all concurrently, half-close, close."""
    deadline = time.monotonic() + connect_timeout
    socks: list[socket.socket] = []
    try:
        for _ in streams:
            sock = _connect(address, deadline)
            sock.settimeout(None)
            socks.append(sock)
        errors: list[BaseException] = []
        lock = threading.Lock()

        def run(sock: socket.socket, data: bytes) -> None:
            try:
                sock.sendall(data)
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError as e:
                    if e.errno != errno.ENOTCONN:
                        raise
            except BaseException as e:
                with lock:
                    errors.append(e)

        threads = [threading.Thread(target=run, args=(s, d), name=f"qemu-source-{i}", daemon=True)
                   for i, (s, d) in enumerate(zip(socks, streams, strict=True))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
    finally:
        for sock in socks:
            sock.close()


def _device_arg(text: str) -> tuple[str, int, int]:
    """Parse IDSTR,INSTANCE,SIZE (idstr may itself contain commas)."""
    parts = text.rsplit(",", 2)
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected IDSTR,INSTANCE,SIZE, got {text!r}")
    return parts[0], int(parts[1], 0), int(parts[2], 0)


def main(argv: list[str] | None = None) -> int:
    """CLI: generate deterministic devices, write their data to --out-dir, send them."""
    ap = argparse.ArgumentParser(description="QEMU-format multifd VFIO device-state source")
    ap.add_argument("--connect", help="tcp:HOST:PORT or unix:PATH (omit to only write files)")
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--order", choices=ORDERS, default="round-robin")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", type=_device_arg, action="append", required=True,
                    metavar="IDSTR,INSTANCE,SIZE")
    ap.add_argument("--chunk-size", type=int, default=1 << 20)
    ap.add_argument("--config-size", type=int, default=64)
    ap.add_argument("--uuid", default="0" * 32, help="32 hex digits")
    ap.add_argument("--connect-timeout", type=float, default=10.0)
    ap.add_argument("--out-dir", help="writes <n>.bin (data) and <n>.config.bin per device")
    args = ap.parse_args(argv)

    devices: list[tuple[str, int, bytes, bytes]] = []
    for idstr, instance, size in args.device:
        data = random.Random(f"{args.seed}:{idstr}:{instance}").randbytes(size)
        config = random.Random(f"{args.seed}:{idstr}:{instance}:config").randbytes(args.config_size)
        devices.append((idstr, instance, data, config))
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        for n, (_, _, data, config) in enumerate(devices):
            with open(os.path.join(args.out_dir, f"{n}.bin"), "wb") as f:
                f.write(data)
            with open(os.path.join(args.out_dir, f"{n}.config.bin"), "wb") as f:
                f.write(config)
    streams = build_streams(devices, args.channels, args.order, args.seed, args.chunk_size,
                            bytes.fromhex(args.uuid))
    if args.connect:
        send_streams(args.connect, streams, connect_timeout=args.connect_timeout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
