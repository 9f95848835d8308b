"""Self-checks of tests/qemu_source.py against PROTOCOL.md (no vfio_multifd import)."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qemu_source as qs

IDSTR = "0000:00:02.0/vfio"


def test_worked_example_byte_for_byte() -> None:
    pkt = qs.device_packet(IDSTR, 0, 5, bytes.fromhex("deadbeef"))
    assert len(pkt) == 292
    assert pkt[0x00:0x0C] == bytes.fromhex("11223344 00000001 00000040")
    assert pkt[0x0C:0x0C + 17] == b"0000:00:02.0/vfio"
    assert pkt[0x0C + 17:0x10C] == bytes(256 - 17)  # NUL padding incl. byte 255
    assert pkt[0x10C:0x110] == bytes(4)  # instance_id 0
    assert pkt[0x110:0x120] == bytes.fromhex("00000010 00000000 00000005 00000000")
    assert pkt[0x120:] == bytes.fromhex("deadbeef")
    # The dump rows from §2.6, verbatim.
    assert pkt[0x00:0x10] == bytes.fromhex("11 22 33 44 00 00 00 01 00 00 00 40 30 30 30 30")
    assert pkt[0x10:0x20] == bytes.fromhex("3a 30 30 3a 30 32 2e 30 2f 76 66 69 6f 00 00 00")
    expected = (bytes.fromhex("112233440000000100000040") + b"0000:00:02.0/vfio".ljust(256, b"\0")
                + bytes.fromhex("00000000 00000010 00000000 00000005 00000000 deadbeef"))
    assert pkt == expected


def test_device_packet_config_and_flags() -> None:
    pkt = qs.device_packet("d", 7, 3, b"xy", True, flags=0x41)
    assert struct.unpack_from(">I", pkt, 8)[0] == 0x41
    assert struct.unpack_from(">IIIII", pkt, 268) == (7, 14, 0, 3, 1)
    with pytest.raises(ValueError):
        qs.device_packet("x" * 256, 0, 0, b"")
    qs.device_packet("x" * 255, 0, 0, b"")  # 255 bytes + terminating NUL fit


def test_handshake_layout() -> None:
    uuid = bytes(range(1, 17))
    hs = qs.handshake(3, uuid)
    assert len(hs) == 64
    assert hs[0:4] == bytes.fromhex("11223344")
    assert hs[4:8] == bytes.fromhex("00000001")
    assert hs[8:24] == uuid
    assert hs[24] == 3
    assert hs[25:64] == bytes(39)
    assert qs.handshake(0) == bytes.fromhex("1122334400000001") + bytes(56)


def test_config_blob_and_chunks() -> None:
    assert qs.config_blob(b"ab") == bytes.fromhex("ffffffffef100002") + b"ab" + bytes.fromhex("ffffffffef100001")
    assert qs.device_chunks(b"") == []
    assert qs.device_chunks(b"abcde", 2) == [b"ab", b"cd", b"e"]
    assert qs.device_chunks(b"abcd", 2) == [b"ab", b"cd"]


def parse_stream(stream: bytes) -> tuple[dict, list[tuple[str, int, int, int, bytes]]]:
    """Tiny local parser: handshake, then (idstr, instance, idx, vfio_flags, data) packets."""
    magic, version, uuid, chan = struct.unpack_from(">II16sB", stream, 0)
    assert (magic, version) == (qs.MAGIC, 1) and stream[25:64] == bytes(39)
    packets, off = [], 64
    while off < len(stream):
        magic, version, flags = struct.unpack_from(">III", stream, off)
        assert (magic, version, flags) == (qs.MAGIC, 1, 0x40)
        raw_id = stream[off + 12:off + 268]
        assert raw_id[255] == 0
        instance, size = struct.unpack_from(">II", stream, off + 268)
        vver, idx, vflags = struct.unpack_from(">III", stream, off + 276)
        assert vver == 0 and size >= 12
        data = stream[off + 288:off + 276 + size]
        assert len(data) == size - 12, "truncated packet"
        packets.append((raw_id.split(b"\0", 1)[0].decode(), instance, idx, vflags, data))
        off += 276 + size
    return {"uuid": uuid, "id": chan}, packets


DEVICES = [
    (IDSTR, 0, bytes(range(256)) * 10, b"cfg-a"),  # 2560 bytes -> 5 chunks of 512 + config
    ("0000:00:03.0/vfio", 1, b"z" * 1000, b"cfg-b"),  # 2 chunks + config
    ("empty/vfio", 0, b"", b""),  # zero chunks, config at idx 0
]


@pytest.mark.parametrize("order", qs.ORDERS)
@pytest.mark.parametrize("channels", [1, 3, 20])
def test_build_streams_every_packet_exactly_once(order: str, channels: int) -> None:
    uuid = bytes(range(16))
    streams = qs.build_streams(DEVICES, channels, order, seed=4, chunk_size=512, uuid=uuid)
    assert len(streams) == channels
    seen: dict[tuple[str, int, int], tuple[int, bytes]] = {}
    for i, s in enumerate(streams):
        hs, packets = parse_stream(s)
        assert hs == {"uuid": uuid, "id": i}
        for idstr, inst, idx, vflags, data in packets:
            key = (idstr, inst, idx)
            assert key not in seen, f"{key} sent twice"
            seen[key] = (vflags, data)
    for idstr, inst, data, cfg in DEVICES:
        chunks = qs.device_chunks(data, 512)
        for idx, chunk in enumerate(chunks):
            assert seen.pop((idstr, inst, idx)) == (0, chunk)
        assert seen.pop((idstr, inst, len(chunks))) == (1, qs.config_blob(cfg))
    assert not seen, f"unexpected packets {sorted(seen)}"


def _global_sequence(streams: list[bytes]) -> list[tuple[str, int, int]]:
    per = [parse_stream(s)[1] for s in streams]
    out = []
    for i in range(max(len(p) for p in per)):
        out.extend(p[i][:3] for p in per if i < len(p))
    return out


def test_orders() -> None:
    rr = _global_sequence(qs.build_streams(DEVICES, 3, "round-robin", chunk_size=512))
    assert rr[:6] == [(IDSTR, 0, 0), ("0000:00:03.0/vfio", 1, 0), ("empty/vfio", 0, 0),
                      (IDSTR, 0, 1), ("0000:00:03.0/vfio", 1, 1), (IDSTR, 0, 2)]
    rev = _global_sequence(qs.build_streams(DEVICES, 3, "reverse", chunk_size=512))
    assert rev[:3] == [(IDSTR, 0, 5), ("0000:00:03.0/vfio", 1, 2), ("empty/vfio", 0, 0)]
    a = qs.build_streams(DEVICES, 3, "random", seed=1, chunk_size=512)
    assert a == qs.build_streams(DEVICES, 3, "random", seed=1, chunk_size=512)
    with pytest.raises(ValueError):
        qs.build_streams(DEVICES, 3, "sideways")


def _receiver(listener: socket.socket, count: int, out: list[bytes]) -> threading.Thread:
    """Accept `count` connections and read each to EOF (on its own thread)."""
    def read_all(conn: socket.socket, slot: int) -> None:
        with conn:
            buf = bytearray()
            while chunk := conn.recv(65536):
                buf += chunk
            out[slot] = bytes(buf)

    def run() -> None:
        readers = []
        for slot in range(count):
            conn, _ = listener.accept()
            t = threading.Thread(target=read_all, args=(conn, slot))
            t.start()
            readers.append(t)
        for t in readers:
            t.join()
        listener.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_send_streams_tcp_and_unix(tmp_path) -> None:
    streams = qs.build_streams(DEVICES, 3, "random", seed=2, chunk_size=512)
    lst = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = [b""] * 3
    t = _receiver(lst, 3, got)
    qs.send_streams(f"tcp:127.0.0.1:{lst.getsockname()[1]}", streams)
    t.join(10)
    assert sorted(got) == sorted(streams)

    # unix socket appearing only after the sender started (exercises the retry)
    path = str(tmp_path / "sock")
    got2: list[bytes] = [b""] * 3
    done: list[threading.Thread] = []

    def late_server() -> None:
        time.sleep(0.3)
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ls.bind(path)
        ls.listen(8)
        done.append(_receiver(ls, 3, got2))

    server = threading.Thread(target=late_server)
    server.start()
    qs.send_streams(f"unix:{path}", streams, connect_timeout=5)
    server.join(10)
    done[0].join(10)
    assert sorted(got2) == sorted(streams)


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_send_streams_ipv6_literal() -> None:
    try:
        lst = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no ::1")
    got: list[bytes] = [b""]
    t = _receiver(lst, 1, got)
    qs.send_streams(f"tcp:[::1]:{lst.getsockname()[1]}", [b"hello"])
    t.join(10)
    assert got == [b"hello"]


def test_cli_writes_data_and_sends(tmp_path) -> None:
    lst = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = [b""] * 2
    t = _receiver(lst, 2, got)
    out = tmp_path / "out"
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qemu_source.py")
    subprocess.run([sys.executable, script, "--connect", f"tcp:127.0.0.1:{lst.getsockname()[1]}",
                    "--channels", "2", "--order", "random", "--seed", "1", "--chunk-size", "4096",
                    "--device", f"{IDSTR},0,10000", "--device", "b/vfio,2,0",
                    "--out-dir", str(out)], check=True, timeout=30)
    t.join(10)
    data0 = (out / "0.bin").read_bytes()
    assert len(data0) == 10000 and (out / "1.bin").read_bytes() == b""
    received: dict[tuple[str, int], dict[int, bytes]] = {}
    for s in got:
        for idstr, inst, idx, _, data in parse_stream(s)[1]:
            received.setdefault((idstr, inst), {})[idx] = data
    dev0 = received[(IDSTR, 0)]
    assert sorted(dev0) == [0, 1, 2, 3]
    assert hashlib.sha256(b"".join(dev0[i] for i in range(3))).digest() == hashlib.sha256(data0).digest()
    assert dev0[3] == qs.config_blob((out / "0.config.bin").read_bytes())
    assert list(received[("b/vfio", 2)]) == [0]
