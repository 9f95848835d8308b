"""``receive --metrics-listen``: ``GET /metrics`` in Prometheus' text format.

In-process tests run a real session and its metrics server in one event loop
(under both loops), the sender on threads, and scrape over 127.0.0.1; the
exposition is parsed with ``prometheus_client``'s own parser. CLI tests run
the daemon as a subprocess. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest
import qemu_source as qs
from cli_helpers import Daemon, receive_usage_error, send_to, wait_for
from helpers import IDSTR, IDSTR_B, ChannelGate, connect, random_bytes, settings, start
from prometheus_client.parser import text_string_to_metric_families

from vfio_multifd import Address, Cancelled, DeviceKey, ProtocolError
from vfio_multifd.ops.metrics import (
    CONTENT_TYPE,
    MAX_CLIENTS,
    MAX_REQUEST_BYTES,
    MetricsServer,
    render,
)
from vfio_multifd.source.plan import SourceDevice
from vfio_multifd.source.sender import send

A = DeviceKey(IDSTR, 0)
B = DeviceKey(IDSTR_B, 0)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def http_get(address: Address, path: str = "/metrics", method: str = "GET") -> bytes:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(address.host, address.port), 5
    )
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n\r\n".encode())
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def exchange(
    address: Address, request: bytes, timeout: float = 5, *, eof: bool = False
) -> bytes:
    """Send ``request`` as it is (then a FIN if ``eof``); everything the server sends
    until it closes."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(address.host, address.port), 5
    )
    try:
        writer.write(request)
        if eof:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def parse(response: bytes) -> Samples:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
    assert f"Content-Type: {CONTENT_TYPE}".encode() in head
    assert f"Content-Length: {len(body)}".encode() in head
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def scrape(address: Address) -> Samples:
    return parse(await http_get(address))


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def status_of(samples: Samples) -> str:
    current = [
        dict(labels)["status"]
        for (name, labels), v in samples.items()
        if name == "vfio_multifd_migration_status" and v == 1
    ]
    assert len(current) == 1, current
    return current[0]


async def test_scrapes_before_during_and_after_a_migration(tmp_path: Path) -> None:
    sizes = (4 << 20, (2 << 20) + 1000)
    running = await start(settings(tmp_path, A, B, channels=3))
    # Each channel's thread stops after its fifth chunk, until the gate opens.
    progress = ChannelGate(channels=3, after=5)

    async with MetricsServer(running.session, Address("tcp", "127.0.0.1", 0)) as server:
        assert server.bound is not None
        before = await scrape(server.bound)
        sending = asyncio.create_task(
            asyncio.to_thread(
                send,
                Address.parse(running.address),
                [SourceDevice(A, size=sizes[0], seed=1), SourceDevice(B, size=sizes[1], seed=2)],
                channels=3,
                chunk_size=65536,
                order="random",
                progress=progress,
            )
        )
        try:
            assert await asyncio.to_thread(progress.paused.wait, 20), "the sender never paused"
            deadline = time.monotonic() + 10
            while True:  # what the paused sender sent arrives (kernel buffers drain)
                during = await scrape(server.bound)
                out = progress.sent()
                received = total(during, "vfio_multifd_received_bytes_total")
                if received >= out and total(during, "vfio_multifd_written_bytes_total"):
                    break
                assert time.monotonic() < deadline, during
                await asyncio.sleep(0.01)
        finally:
            progress.open()
        sent = await asyncio.wait_for(sending, 60)
        await running.result()
        after = await scrape(server.bound)  # the server outlives the session

    assert status_of(before) == "setup"
    assert total(before, "vfio_multifd_received_bytes_total") == 0
    assert value(before, "vfio_multifd_written_bytes_total", device=str(A)) == 0
    assert value(before, "vfio_multifd_channels", state="active") == 0
    assert value(before, "vfio_multifd_queued_bytes") == 0

    assert status_of(during) == "active"
    assert out == 15 * 65536
    assert out < total(during, "vfio_multifd_received_bytes_total") < sent.bytes_sent
    assert value(during, "vfio_multifd_channels", state="active") == 3
    assert total(during, "vfio_multifd_written_bytes_total") < sum(sizes)

    assert status_of(after) == "completed"
    for channel, nbytes in enumerate(sent.channel_bytes):
        assert value(after, "vfio_multifd_received_bytes_total", channel=str(channel)) == nbytes
    assert total(after, "vfio_multifd_received_bytes_total") == sent.bytes_sent
    for key, size in zip((A, B), sizes, strict=True):
        assert value(after, "vfio_multifd_written_bytes_total", device=str(key)) == size
        chunks = value(after, "vfio_multifd_chunks_written_total", device=str(key))
        assert chunks == -(-size // 65536)
    assert value(after, "vfio_multifd_queued_bytes") == 0
    assert value(after, "vfio_multifd_peak_queued_bytes") > 0
    assert value(after, "vfio_multifd_spilled_bytes_total") == 0
    assert value(after, "vfio_multifd_channels", state="closed") == 3
    # 6 MiB under the default 64 MiB bound: no channel ever waited for memory
    assert value(after, "vfio_multifd_paused_seconds_total") == 0.0
    assert total(after, "vfio_multifd_refused_connections_total") == 0


async def test_refused_connections_by_reason_and_a_failed_status(tmp_path: Path) -> None:
    running = await start(settings(tmp_path, A, channels=1, handshake_timeout=5.0))
    async with MetricsServer(running.session, Address("tcp", "127.0.0.1", 0)) as server:
        assert server.bound is not None
        for _ in range(2):
            # In a thread: the daemon on this loop must read the stray to refuse it.
            await asyncio.to_thread(_send_a_stray, running.address)
        samples = await scrape(server.bound)
        assert value(samples, "vfio_multifd_refused_connections_total", reason="handshake-magic") == 2
        assert status_of(samples) == "setup"
        running.session.cancel("cancelled by the test")
        with pytest.raises(Exception, match="cancelled by the test"):
            await running.result()
        assert status_of(await scrape(server.bound)) == "cancelled"


def _send_a_stray(address: str) -> None:
    """A connection whose handshake has no magic: the daemon refuses it with a reset."""
    with connect(address) as stray:
        stray.sendall(bytes(64))
        stray.settimeout(5)
        with pytest.raises(ConnectionResetError):
            stray.recv(1)


async def test_other_paths_and_methods(tmp_path: Path) -> None:
    running = await start(settings(tmp_path, A, channels=1))
    async with MetricsServer(running.session, Address("tcp", "127.0.0.1", 0)) as server:
        assert server.bound is not None
        assert (await http_get(server.bound, "/")).startswith(b"HTTP/1.1 404 ")
        assert (await http_get(server.bound, method="POST")).startswith(b"HTTP/1.1 405 ")
        head = await http_get(server.bound, method="HEAD")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
        assert (await http_get(server.bound, "/metrics?x=1")).startswith(b"HTTP/1.1 200 ")
    running.session.cancel()
    with pytest.raises(Exception, match="cancelled"):
        await running.result()


def head_of(size: int) -> bytes:
    """A GET /metrics request head of exactly ``size`` bytes, its empty line included."""
    start, end = b"GET /metrics HTTP/1.1\r\nX-Pad: ", b"\r\n\r\n"
    return start + b"p" * (size - len(start) - len(end)) + end


async def test_a_request_head_is_at_most_8_kib_within_the_deadline(tmp_path: Path) -> None:
    """The head limits, at their edges: 8 KiB is answered, one byte more gets a 400 and
    the connection closed; a head that never ends is cut at the deadline, unanswered.
    (The deadline is 5 s in the daemon; here half a second, passed in.)"""
    running = await start(settings(tmp_path, A, channels=1))
    limit = MAX_REQUEST_BYTES
    assert limit == 8 << 10
    address = Address("tcp", "127.0.0.1", 0)
    async with MetricsServer(running.session, address, request_timeout=0.5) as server:
        assert server.bound is not None
        assert status_of(parse(await exchange(server.bound, head_of(limit)))) == "setup"
        too_long = await exchange(server.bound, head_of(limit + 1))
        assert too_long.startswith(b"HTTP/1.1 400 Bad Request\r\n"), too_long
        assert too_long.endswith(b"\r\n\r\nrequest head longer than 8192 bytes\n"), too_long
        cut = await exchange(server.bound, b"GET /metrics HTTP/1.1\r\nX: y\r\n", eof=True)
        assert cut.startswith(b"HTTP/1.1 400 Bad Request\r\n"), cut
        assert cut.endswith(b"request head cut: the connection ended before the empty line\n")
        reader, writer = await asyncio.open_connection(server.bound.host, server.bound.port)
        try:
            began = time.monotonic()
            writer.write(b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 100)  # and no end
            assert await asyncio.wait_for(reader.read(), 5) == b"", "a slow head is not answered"
            waited = time.monotonic() - began
        finally:
            writer.close()
        # The deadline passed in, not the default 5 s. (uvloop's clock is libuv's, in
        # whole milliseconds and read once a loop iteration: its 0.5 s can end a
        # millisecond early on time.monotonic().)
        assert 0.49 <= waited < 4.0, waited
        assert (await http_get(server.bound)).startswith(b"HTTP/1.1 200 ")  # the server goes on
    running.session.cancel()
    with pytest.raises(Cancelled):
        await running.result()


async def test_at_most_16_scrapers_at_once(tmp_path: Path) -> None:
    """16 scrapers that have not finished their heads hold every place: a 17th is hung
    up on, unanswered; the 16 are then all answered, and their places are free again."""
    running = await start(settings(tmp_path, A, channels=1))
    address = Address("tcp", "127.0.0.1", 0)
    async with MetricsServer(running.session, address, request_timeout=30) as server:
        bound = server.bound
        assert bound is not None and MAX_CLIENTS == 16
        holders = [await asyncio.open_connection(bound.host, bound.port) for _ in range(16)]
        try:
            for _, writer in holders:
                writer.write(b"GET /metrics HTTP/1.1\r\n")  # the empty line comes later
            # Accepted after the 16 (one listening socket accepts in order): refused.
            try:
                refused = await exchange(bound, b"GET /metrics HTTP/1.1\r\n\r\n")
            except ConnectionResetError:
                refused = b""
            assert refused == b"", refused
            for reader, writer in holders:
                writer.write(b"\r\n")
                answer = await asyncio.wait_for(reader.read(), 5)
                assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
        finally:
            for _, writer in holders:
                writer.close()
        assert status_of(await scrape(bound)) == "setup"  # the places are free again
    running.session.cancel()
    with pytest.raises(Cancelled):
        await running.result()


async def test_paused_and_spilled_are_counted(tmp_path: Path) -> None:
    """One device sent in reverse under a bound of 8 chunks: every chunk but the last
    comes early, so memory fills, chunks spill and the channels wait for the spill
    writes. The counters say so, with the session's own figures."""
    chunk = 16384
    data = random_bytes(64 * chunk, 6)
    config = settings(
        tmp_path, A, channels=2, max_packet_size=chunk + 4096, max_queued_bytes=8 * chunk
    )
    running = await start(config)
    streams = qs.build_streams([(IDSTR, 0, data, b"x")], 2, "reverse", chunk_size=chunk)
    async with MetricsServer(running.session, Address("tcp", "127.0.0.1", 0)) as server:
        assert server.bound is not None
        await asyncio.to_thread(qs.send_streams, running.address, streams)
        result = await running.result(timeout=30)
        after = await scrape(server.bound)
    assert config.devices[0].data_path.read_bytes() == data
    assert result.spilled_bytes > 0 and result.paused_seconds > 0
    assert value(after, "vfio_multifd_spilled_bytes_total") == result.spilled_bytes
    assert value(after, "vfio_multifd_paused_seconds_total") == result.paused_seconds
    assert 0 < value(after, "vfio_multifd_peak_queued_bytes") <= 8 * chunk


async def test_channels_by_state_handshake_active_failed(tmp_path: Path) -> None:
    """Connections still in their handshake, channels active, then failed: counted."""
    running = await start(settings(tmp_path, A, channels=2, handshake_timeout=30.0))
    async with MetricsServer(running.session, Address("tcp", "127.0.0.1", 0)) as server:
        bound = server.bound
        assert bound is not None

        async def channels_become(**expected: int) -> None:
            deadline = time.monotonic() + 10
            while True:
                samples = await scrape(bound)
                seen = {
                    dict(labels)["state"]: count
                    for (name, labels), count in samples.items()
                    if name == "vfio_multifd_channels"
                }
                if seen == expected:
                    return
                assert time.monotonic() < deadline, (seen, expected)
                await asyncio.sleep(0.01)

        socks = [await asyncio.to_thread(connect, running.address) for _ in range(3)]
        try:
            socks[2].sendall(qs.handshake(0)[:10])  # and never the rest
            await channels_become(handshake=3, active=0, closed=0, failed=0)
            socks[0].sendall(qs.handshake(0) + qs.device_packet(IDSTR, 0, 0, b"x" * 100))
            socks[1].sendall(qs.handshake(1))
            await channels_become(handshake=1, active=2, closed=0, failed=0)
            socks[1].sendall(qs.device_packet(IDSTR, 0, 0, b"y" * 100))  # idx 0 twice
            with pytest.raises(ProtocolError, match="state buffer 0 already filled"):
                await running.result()
            # The migration failed: both channels are reset, the stray is dropped.
            await channels_become(handshake=0, active=0, closed=0, failed=2)
        finally:
            for sock in socks:
                sock.close()


async def test_a_request_with_bare_lf_line_ends_is_answered(tmp_path: Path) -> None:
    """Issue 20 item 12: LF-only line ends (or mixed with CRLF), as most servers accept
    them, get an answer at once; they used to wait for CRLF CRLF until the 5 s timeout
    and be dropped unanswered."""
    running = await start(settings(tmp_path, A, channels=1))
    async with MetricsServer(running.session, Address("tcp", "127.0.0.1", 0)) as server:
        assert server.bound is not None
        for request in (
            b"GET /metrics HTTP/1.1\nHost: x\n\n",
            b"GET /metrics HTTP/1.0\r\nHost: x\n\r\n",
            b"GET /metrics HTTP/1.1\nHost: x\r\n\n",
        ):
            response = await exchange(server.bound, request, timeout=2)  # well under 5 s
            assert status_of(parse(response)) == "setup", request
        head = await exchange(server.bound, b"HEAD /metrics HTTP/1.1\n\n", timeout=2)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
        missing = await exchange(server.bound, b"GET /nothing HTTP/1.1\n\n", timeout=2)
        assert missing.startswith(b"HTTP/1.1 404 ")
    running.session.cancel()
    with pytest.raises(Cancelled):
        await running.result()


async def test_label_values_are_escaped(tmp_path: Path) -> None:
    odd = DeviceKey('a"b\\c\nd', 0)
    running = await start(settings(tmp_path, odd, channels=1))
    families = list(text_string_to_metric_families(render(running.session.snapshot())))
    devices = [s.labels["device"] for f in families for s in f.samples if "device" in s.labels]
    assert devices == [str(odd), str(odd)]
    running.session.cancel()
    with pytest.raises(Exception, match="cancelled"):
        await running.result()


# -- the command line ---------------------------------------------------------------


def test_port_in_use_is_a_usage_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        line = receive_usage_error(
            tmp_path, "--listen", "tcp:127.0.0.1:0", "--metrics-listen", f"tcp:127.0.0.1:{port}"
        )
    assert f"cannot listen on --metrics-listen tcp:127.0.0.1:{port}" in line
    assert "in use" in line
    assert not (tmp_path / "a.bin").exists()


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("unix:/tmp/m.sock", "not a TCP address"),
        ("tcp:127.0.0.1:99999", "not an address"),
        ("8080", "not an address"),
    ],
)
def test_bad_metrics_address_is_a_usage_error(tmp_path: Path, address: str, expected: str) -> None:
    line = receive_usage_error(tmp_path, "--metrics-listen", address)
    assert "--metrics-listen" in line and expected in line


def test_unbindable_host_is_a_usage_error(tmp_path: Path) -> None:
    line = receive_usage_error(
        tmp_path, "--listen", "tcp:127.0.0.1:0", "--metrics-listen", "tcp:192.0.2.1:0"
    )
    assert "cannot listen on --metrics-listen tcp:192.0.2.1:0" in line


def test_daemon_serves_metrics(tmp_path: Path, daemons: list[Daemon]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    daemon = Daemon(
        tmp_path,
        "--channels",
        "2",
        "--metrics-listen",
        "tcp:127.0.0.1:0",
        "--device",
        f"idstr={IDSTR},data={out / 'a.bin'}",
    )
    daemons.append(daemon)
    listening = [e for e in daemon.events() if e["event"] == "metrics_listening"]
    assert len(listening) == 1
    address = Address.parse(str(listening[0]["address"]))
    samples = asyncio.run(scrape(address))
    assert status_of(samples) == "setup"
    sent = send_to(daemon.address, 2, f"idstr={IDSTR},size=300000,seed=3")
    assert sent.returncode == 0, sent.stderr
    code, _, stderr = daemon.finish()
    assert code == 0, stderr
    wait_for(lambda: _refused(address), what="the metrics port to close with the daemon")


def _refused(address: Address) -> bool:
    try:
        socket.create_connection((address.host, address.port), timeout=1).close()
    except OSError:
        return True
    return False
