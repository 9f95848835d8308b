"""Hostile peers, stray signals and operator mistakes (issue 15).

Each test here failed on the code before the fix it guards. In-process tests
run under both event loops; the CLI tests run the daemon as a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import resource
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import qemu_source as qs
import structlog
from cli_helpers import (
    TOOL,
    TRACEBACK,
    Daemon,
    one_device_daemon,
    run,
    send_to,
    usage_error,
    wait_for,
    with_event_loop,
)
from helpers import IDSTR, IDSTR_B, FakeTransport, connect, random_bytes, settings, start, until

from vfio_multifd import (
    Cancelled,
    DeviceIOError,
    DeviceKey,
    ProtocolError,
    Reason,
    SessionError,
    logconfig,
)
from vfio_multifd.core.decoder import DecoderState
from vfio_multifd.daemon.channel import ChannelProtocol, ChannelState
from vfio_multifd.daemon.output import Output
from vfio_multifd.ops.status_client import query
from vfio_multifd.ops.status_server import StatusServer

A = DeviceKey(IDSTR, 0)


# -- item 13: a channel that failed, a handshake that completes too late -------------------


def feed(protocol: ChannelProtocol, data: bytes) -> None:
    """As the event loop does: into get_buffer, then buffer_updated."""
    while data:
        target = protocol.get_buffer(-1)
        n = min(len(target), len(data))
        target[:n] = data[:n]
        data = data[n:]
        protocol.buffer_updated(n)


async def test_a_failed_migration_queues_nothing_its_channels_still_send(
    tmp_path: Path,
) -> None:
    running = await start(settings(tmp_path, A, channels=2))
    session = running.session
    protocol = session.connection("fake")
    transport = FakeTransport(protocol)
    protocol.connection_made(transport)  # type: ignore[arg-type]
    feed(protocol, qs.handshake(0) + qs.device_packet(IDSTR, 0, 1, b"ab"))
    assert session.core.connections.channels[0].state is ChannelState.ACTIVE
    session.fail(ProtocolError(Reason.PACKET_MAGIC, "bad"))
    assert transport.aborted
    # A header read before the reset landed gets no buffer: its payload is never read.
    feed(protocol, qs.device_packet(IDSTR, 0, 2, b"cd")[:288])
    assert protocol.decoder.state is DecoderState.AWAITING_BUFFER
    assert sorted(session.core.reassembly.devices[A].chunks) == [1]
    with pytest.raises(ProtocolError):
        await running.result()


async def test_a_handshake_completing_once_the_migration_failed_is_refused(
    tmp_path: Path,
) -> None:
    running = await start(settings(tmp_path, A, channels=2))
    session = running.session
    session.fail(SessionError(Reason.PROGRESS_TIMEOUT, "stopped"))
    # Same loop iteration: nothing of the shutdown has run yet.
    protocol = session.connection("late")
    transport = FakeTransport(protocol)
    protocol.connection_made(transport)  # type: ignore[arg-type]
    feed(protocol, qs.handshake(0))
    connections = session.core.connections
    assert connections.refused_by_reason == {Reason.HANDSHAKE_CLOSED.value: 1}
    assert connections.late_count == 1  # late: it did not cause the failure
    assert connections.channels == {}
    assert transport.aborted
    with pytest.raises(SessionError):
        await running.result()


# -- item 12: bad values are usage errors (exit 2), odd paths do not end in a traceback ----


@pytest.mark.parametrize(
    ("options", "text"),
    [
        (["--device", "idstr=a,instance=\u00b2,data=/tmp/x"], "instance must be 0..4294967295"),
        (["--device", "idstr=a,data=/tmp/x", "--listen", "tcp:127.0.0.1:\u00b2"], "address"),
        (["--device", "idstr=a,data=/tmp/x", "--ready-fd", "99999999999999999999"], "descriptor"),
        (["--device", "idstr=a,data=/tmp/x", "--ready-fd", "1"], "standard output"),
        (["--device", "idstr=a,data=/tmp/x", "--ready-fd", "0"], "standard input"),
        (["--device", "idstr=a,data=/tmp/x", "--ready-fd", "2"], "standard error"),
        (["--device", "idstr=a,data=/tmp/x", "--ready-fd", "\u00b3"], "descriptor"),
        (
            [
                "--device",
                "idstr=a,data=/tmp/x",
                "--max-spill-bytes",
                "\u0663",
                "--accept-timeout",
                "0.5",
            ],
            "not a size",
        ),
    ],
)
def test_bad_values_are_usage_errors(options: list[str], text: str) -> None:
    args = ["receive", *options, "--log-format", "json"]
    if options[-2:] in (["--ready-fd", "0"], ["--ready-fd", "1"], ["--ready-fd", "2"]):
        # In a process of its own: were it taken, it would be written to and closed.
        result = run(args, timeout=20)
        assert result.returncode == 2, result.stderr
        assert TRACEBACK not in result.stderr
        assert text in result.stderr.splitlines()[-1]
    else:
        assert text in usage_error(args)


def test_a_data_path_that_is_not_utf8_is_received_and_summarized(
    tmp_path: Path, one_loop_daemons: list[Daemon]
) -> None:
    path = tmp_path / "dev\udcff.bin"  # the byte 0xff, as os.fsdecode gives it
    daemon = Daemon(tmp_path, "--channels", "1", "--device", f"idstr={IDSTR},data={path}")
    one_loop_daemons.append(daemon)
    source = tmp_path / "source.bin"
    source.write_bytes(random_bytes(10000, 3))
    sent = send_to(daemon.address, 1, f"idstr={IDSTR},source={source}")
    assert sent.returncode == 0, sent.stderr
    code, out, err = daemon.finish()
    assert code == 0, err
    assert TRACEBACK not in err
    assert "dev\\xff.bin" in out
    with open(os.fsencode(path), "rb") as received:
        assert received.read() == source.read_bytes()


def test_a_symlinked_data_path_is_refused_and_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "real.bin"
    target.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    line = usage_error(["receive", "--listen", "tcp:127.0.0.1:0", "--device", f"idstr=a,data={link}"])
    assert "symbolic link" in line
    assert link.is_symlink() and target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["link.bin", "real.bin"]


# -- item 14: trace lines only when asked for ----------------------------------------------


async def test_an_unconfigured_library_user_gets_no_line_per_packet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    structlog.reset_defaults()
    config = settings(tmp_path, A, channels=1)
    running = await start(config)
    data = random_bytes(8 * 4096, 2)
    streams = [
        qs.handshake(0)
        + b"".join(
            qs.device_packet(IDSTR, 0, idx, chunk)
            for idx, chunk in enumerate(qs.device_chunks(data, 4096))
        )
        + qs.device_packet(IDSTR, 0, 8, qs.config_blob(b"c"), config=True)
    ]
    await asyncio.to_thread(qs.send_streams, running.address, streams)
    await running.result()
    out = capsys.readouterr().out
    assert "channel_accepted" in out  # structlog's defaults print info lines...
    for trace in ("buffer_incoming", "load_start", "load_starved"):
        assert trace not in out  # ...but not one per packet


def test_debug_is_enabled_by_configure_without_is_enabled_for(restore_logging: None) -> None:
    """structlog before 25.1: loggers have no is_enabled_for; the level configured counts."""

    class OldLogger:  # what a bound logger of structlog 24.x offers
        def debug(self, *args: object, **kwargs: object) -> None:
            pass

    logconfig.configure(log_format="json", level="debug", stream=io.StringIO())
    assert logconfig.debug_enabled(OldLogger())
    logconfig.configure(log_format="json", level="info", stream=io.StringIO())
    assert not logconfig.debug_enabled(OldLogger())
    assert not logconfig.debug_enabled(structlog.get_logger("x"))


# -- items 1-3: connections that never finish a handshake ---------------------------------

FLOOD = Path(__file__).parent / "flood.py"


def limit_descriptors(n: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

    return apply


def host_port(address: str) -> tuple[str, str]:
    host, _, port = address.removeprefix("tcp:").rpartition(":")
    return host.strip("[]"), port


class Flood:
    """``flood.py hold``: ``n`` silent connections held open by another process."""

    def __init__(self, address: str, n: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(FLOOD), "hold", *host_port(address), str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        readable, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if readable else ""
        assert line.strip() == f"held {n}", line

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def refusal_lines(daemon: Daemon) -> list[dict[str, object]]:
    return [e for e in daemon.events() if e["event"] == "channel_refused"]


def test_a_flood_larger_than_the_descriptor_limit_does_not_keep_the_channels_out(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Issue item 2: 128 descriptors, 300 silent connections held, then the source."""
    daemon, data_path = one_device_daemon(tmp_path, daemons, 2, preexec_fn=limit_descriptors(128))
    source = tmp_path / "source.bin"
    source.write_bytes(random_bytes(8 << 20, 4))
    flood = Flood(daemon.address, 300)
    try:
        started = time.monotonic()
        sent = send_to(
            daemon.address,
            2,
            f"idstr={IDSTR},source={source}",
            "--connect-timeout",
            "20",
            timeout=40,
        )
        code, _, err = daemon.finish(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        flood.close()
    print(f"300 connections held under RLIMIT_NOFILE 128: the migration took {elapsed:.2f} s")
    assert sent.returncode == 0, sent.stderr
    assert code == 0, err
    assert elapsed < 8, f"the real channels took {elapsed:.1f} s (the handshake timeout is 10 s)"
    shed = [e for e in refusal_lines(daemon) if e["reason"] == "handshake-shed"]
    assert shed, "strangers were shed to make room"
    assert data_path.read_bytes() == source.read_bytes()


def test_a_flood_after_the_channels_connected_does_not_fail_the_spill(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Issue item 1: channels in, then a flood held open, then chunks in reverse (a spill)."""
    daemon, data_path = one_device_daemon(
        tmp_path,
        daemons,
        2,
        "--max-packet-size",
        "1048588",
        "--max-queued-bytes",
        "3M",
        preexec_fn=limit_descriptors(128),
    )
    data = random_bytes(12 << 20, 9)
    streams = qs.build_streams([(IDSTR, 0, data, b"cfg")], channels=2, order="reverse")
    socks = [connect(daemon.address) for _ in streams]
    for sock, stream in zip(socks, streams, strict=True):
        sock.sendall(stream[:64])
    wait_for(
        lambda: sum(e["event"] == "channel_accepted" for e in daemon.events()) == 2,
        what="both channels accepted",
    )
    flood = Flood(daemon.address, 300)
    try:

        def send_rest(sock: socket.socket, stream: bytes) -> None:
            sock.sendall(stream[64:])
            sock.shutdown(socket.SHUT_WR)

        threads = [
            threading.Thread(target=send_rest, args=pair, daemon=True)
            for pair in zip(socks, streams, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        code, summary, err = daemon.finish(timeout=30)
    finally:
        flood.close()
        for sock in socks:
            sock.close()
    assert code == 0, err
    spilled = int(re.search(r"spilled (\d+) bytes", summary).group(1))  # type: ignore[union-attr]
    assert spilled > 0
    assert data_path.read_bytes() == data


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_refused_connections_are_counted_not_kept_and_their_lines_rate_limited(
    tmp_path: Path, short_dir: Path, daemons: list[Daemon]
) -> None:
    """Issue item 3: thousands of bad handshakes cost no memory and few log lines."""
    status = short_dir / "status"
    daemon, _ = one_device_daemon(tmp_path, daemons, 1, "--status-socket", str(status))
    count = 6000
    # Warm up (first connections allocate the loop's and the allocator's structures;
    # a daemon waiting for its channels fills its buffer pool, within the bound).
    subprocess.run(
        [sys.executable, str(FLOOD), "refuse", *host_port(daemon.address), "200"],
        check=True,
        timeout=60,
        capture_output=True,
    )
    wait_for(
        lambda: any(e["event"] == "pool_warmed" for e in daemon.events()),
        what="the buffer pool warmed",
    )
    before = vm_rss(daemon.proc.pid)
    started = time.monotonic()
    subprocess.run(
        [sys.executable, str(FLOOD), "refuse", *host_port(daemon.address), str(count)],
        check=True,
        timeout=120,
        capture_output=True,
    )
    elapsed = time.monotonic() - started
    wait_for(
        lambda: query(str(status))["return"]["refused-connections"] == count + 200,
        what="every refusal counted",
    )
    grown = vm_rss(daemon.proc.pid) - before
    print(
        f"refused {count} in {elapsed:.1f} s; RSS grew {grown} bytes, {grown / count:.0f} per refusal"
    )
    assert grown < 4 << 20, f"RSS grew {grown} bytes for {count} refusals"
    sent = send_to(daemon.address, 1, f"idstr={IDSTR},size=64K")
    assert sent.returncode == 0, sent.stderr
    code, _, err = daemon.finish()
    assert code == 0, err
    lines = refusal_lines(daemon)
    assert len(lines) <= 10 + elapsed + 3, f"{len(lines)} channel_refused lines"
    tail = [e for e in daemon.events() if e["event"] == "channel_refused_suppressed"]
    reported = len(lines) + sum(int(str(e["suppressed"])) for e in lines + tail)
    assert reported == count + 200  # every refusal is a line or counted in one


def good_streams(channels: int) -> tuple[list[bytes], bytes]:
    data = random_bytes(6 * 4096 + 3, 4)
    return qs.build_streams([(IDSTR, 0, data, b"c")], channels=channels, chunk_size=4096), data


async def strangers_shed(running: Any, n: int, shed: int) -> list[socket.socket]:
    """Open ``n`` silent connections; return once ``shed`` of them were shed."""
    connections, listener = running.session.core.connections, running.session.listener

    def made() -> bool:  # every handshaking connection has its transport
        return all(
            listener.connections[conn].transport is not None for conn in connections.pending
        )

    strangers = await asyncio.to_thread(lambda: [connect(running.address) for _ in range(n)])
    try:
        await until(
            lambda: connections.shed_count >= shed and made(), f"{shed} of {n} strangers shed"
        )
    except AssertionError:
        for sock in strangers:
            sock.close()
        raise
    return strangers


async def migrate_past(running: Any, strangers: list[socket.socket], tmp_path: Path) -> None:
    """The real channels get in although the strangers are still connected."""
    try:
        streams, data = good_streams(2)
        await asyncio.to_thread(qs.send_streams, running.address, streams)
        await running.result(timeout=10)
    finally:
        for sock in strangers:
            sock.close()
    assert (tmp_path / "dev0.bin").read_bytes() == data


async def test_the_oldest_handshaking_connection_is_shed_beyond_the_cap(tmp_path: Path) -> None:
    running = await start(settings(tmp_path, A, channels=2, max_pending_connections=4))
    connections = running.session.core.connections
    strangers = await strangers_shed(running, 20, 16)
    assert connections.refused_count == connections.shed_count == 16
    assert all(e.reason is Reason.HANDSHAKE_SHED for _, e in connections.refused)
    # The oldest went first: the last four strangers are the ones still waiting.
    waiting = {c.peer for c in connections.pending.values()}
    assert waiting == {"{}:{}".format(*s.getsockname()) for s in strangers[-4:]}
    await migrate_past(running, strangers, tmp_path)


async def test_near_the_descriptor_limit_strangers_are_shed_and_accepting_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vfio_multifd.daemon import listener

    monkeypatch.setattr(listener, "descriptor_room", lambda reserve: 5)
    running = await start(settings(tmp_path, A, channels=2))
    strangers = await strangers_shed(running, 30, 25)
    assert running.session.listener.open <= 5
    await migrate_past(running, strangers, tmp_path)
    assert running.session.core.connections.shed_count >= 25


def test_a_descriptor_limit_too_low_for_the_channels_is_a_usage_error(
    tmp_path: Path, cli_loop: str
) -> None:
    """The real check, which the test above replaces by a constant: under
    RLIMIT_NOFILE 64 the daemon cannot hold 100 channels, and says so before any."""
    args = ["receive", "--listen", "tcp:127.0.0.1:0", "--channels", "100", "--accept-timeout", "3"]
    args += ["--device", f"idstr={IDSTR},data={tmp_path / 'a.bin'}", "--log-format", "json"]
    result = subprocess.run(
        [*TOOL, *with_event_loop(args)],
        capture_output=True,
        text=True,
        timeout=20,
        stdin=subprocess.DEVNULL,
        preexec_fn=limit_descriptors(64),
    )
    assert result.returncode == 2, result.stderr
    assert TRACEBACK not in result.stderr
    assert re.fullmatch(
        r"vfio-multifd: error: the descriptor limit \(RLIMIT_NOFILE 64\) leaves room for \d+ "
        r"connections; 100 channels need 101 \(raise it: ulimit -n, or LimitNOFILE= in a "
        r"systemd unit\)",
        result.stderr.splitlines()[-1],
    ), result.stderr
    assert os.listdir(tmp_path) == []


async def test_accept_out_of_descriptors_backs_off_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMFILE from accept(): no busy loop, no loop error, and the migration still completes."""
    import errno

    real_accept = socket.socket.accept
    failing_until = time.monotonic() + 0.5
    failures = 0

    def accept(self: socket.socket) -> tuple[socket.socket, Any]:
        nonlocal failures
        if time.monotonic() < failing_until:
            failures += 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_accept(self)

    monkeypatch.setattr(socket.socket, "accept", accept)
    config = settings(tmp_path, A, channels=2)
    running = await start(config)
    streams, data = good_streams(2)
    await asyncio.to_thread(qs.send_streams, running.address, streams)
    await running.result(timeout=10)
    assert (tmp_path / "dev0.bin").read_bytes() == data
    assert 1 <= failures <= 12, f"{failures} accept() calls in 0.5 s of EMFILE"


# -- items 5-7: the status socket -----------------------------------------------------------


async def _qmp_line(reader: asyncio.StreamReader) -> dict[str, Any]:
    line = await asyncio.wait_for(reader.readline(), 5)
    assert line.endswith(b"\r\n"), line
    reply: dict[str, Any] = json.loads(line)
    return reply


@contextlib.asynccontextmanager
async def serving_status(tmp_path: Path, path: Path) -> AsyncIterator[StatusServer]:
    """A session waiting for its channels, and its status socket at ``path``."""
    running = await start(settings(tmp_path, A, channels=1))
    server = StatusServer(running.session, path)
    try:
        await server.start()
        yield server
    finally:
        await server.close()
        running.session.cancel()
        with pytest.raises(Cancelled):
            await running.result()


def _has_unread(sock: socket.socket) -> bool:
    """Has the (non-blocking) ``sock`` received bytes nobody read yet?"""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False


def pipeline_unread(path: Path, seconds: float) -> socket.socket:
    """A status client that sends 20,000 query-migrate requests and never reads an
    answer; returned open once the daemon is stuck on it (answers wait unread in this
    socket and the daemon has stopped taking requests for a while), dropped, or after
    ``seconds``."""
    greedy = socket.socket(socket.AF_UNIX)
    greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    greedy.connect(str(path))
    greedy.setblocking(False)
    requests = b'{"execute": "query-migrate"}\n' * 20000
    deadline = time.monotonic() + seconds
    blocked_since = None
    while requests and time.monotonic() < deadline:
        try:
            requests = requests[greedy.send(requests) :]
            blocked_since = None
        except BlockingIOError:
            now = time.monotonic()
            blocked_since = blocked_since or now
            if now - blocked_since > 0.25 and _has_unread(greedy):
                break
            time.sleep(0.01)
        except OSError:
            break  # dropped already
    return greedy


async def test_the_status_socket_is_never_reachable_with_wider_permissions(
    tmp_path: Path, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 5: under umask 000, nothing is at the path until it is 0600."""
    path = short_dir / "status"
    seen: list[int] = []
    real_chmod = os.chmod

    def chmod(target: Any, mode: int, *args: Any, **kwargs: Any) -> None:
        if os.path.lexists(path):
            seen.append(stat.S_IMODE(os.lstat(path).st_mode))
        real_chmod(target, mode, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", chmod)
    old_umask = os.umask(0)
    try:
        async with serving_status(tmp_path, path):
            os.umask(old_umask)
            assert seen == [], f"the socket was at its path with mode {seen} before it was private"
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert os.listdir(short_dir) == ["status"]  # the private directory is gone
            reader, writer = await asyncio.open_unix_connection(str(path))
            assert "QMP" in await _qmp_line(reader)
            writer.close()
    finally:
        os.umask(old_umask)
    assert not path.exists()


async def test_a_status_client_that_does_not_read_is_dropped(
    tmp_path: Path, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 6: 20,000 pipelined requests never read: the client goes, others are served."""
    from vfio_multifd.ops import status_server

    monkeypatch.setattr(status_server, "CLIENT_WRITE_TIMEOUT", 0.3)
    path = short_dir / "status"
    async with serving_status(tmp_path, path) as server:
        greedy = await asyncio.to_thread(pipeline_unread, path, 5)
        for _ in range(300):
            if not server._clients:
                break
            await asyncio.sleep(0.01)
        assert not server._clients, "the client that does not read is still served"
        reader, writer = await asyncio.open_unix_connection(str(path))
        await _qmp_line(reader)
        writer.write(b'{"execute": "query-migrate"}\n')
        assert (await _qmp_line(reader))["return"]["status"] == "setup"
        writer.close()
        greedy.close()


def test_a_status_client_that_does_not_read_does_not_delay_exit(
    tmp_path: Path, short_dir: Path, daemons: list[Daemon]
) -> None:
    """Item 6 at the CLI: SIGTERM exits at once although a client never reads."""
    path = short_dir / "status"
    daemon = Daemon(
        tmp_path,
        "--status-socket",
        str(path),
        "--device",
        f"idstr={IDSTR},data={tmp_path / 'a.bin'}",
    )
    daemons.append(daemon)
    greedy = pipeline_unread(path, 2)
    try:
        started = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        code, _, err = daemon.finish(timeout=10)
        assert code == 143, err
        assert time.monotonic() - started < 2
    finally:
        greedy.close()
    assert not path.exists()


async def test_whitespace_costs_nothing_and_deep_nesting_is_a_qmp_error(
    tmp_path: Path, short_dir: Path
) -> None:
    """Item 7: spaces are never buffered; "[" * 30000 is answered, not a RecursionError."""
    path = short_dir / "status"
    async with serving_status(tmp_path, path):
        reader, writer = await asyncio.open_unix_connection(str(path))
        await _qmp_line(reader)
        cpu = time.process_time()
        spaces = b" " * (1 << 20)
        for _ in range(8):
            writer.write(spaces)
            await writer.drain()
        writer.write(b'{"execute": "query-migrate", "id": 1}\n')
        reply = await _qmp_line(reader)
        assert reply["id"] == 1 and reply["return"]["status"] == "setup"
        assert time.process_time() - cpu < 1.0, "8 MiB of spaces took a second of CPU"
        writer.close()

        reader, writer = await asyncio.open_unix_connection(str(path))
        await _qmp_line(reader)
        writer.write(b"[" * 30000 + b"\n")
        reply = await _qmp_line(reader)
        assert reply["error"]["class"] == "GenericError" and "deeper" in reply["error"]["desc"]
        assert await asyncio.wait_for(reader.read(), 5) == b""  # and hung up
        writer.close()

        reader, writer = await asyncio.open_unix_connection(str(path))
        await _qmp_line(reader)
        writer.write(b'{"execute": "query-migrate", "arguments": {"x": "' + b"a" * (70 << 10))
        reply = await _qmp_line(reader)
        assert "longer than" in reply["error"]["desc"]
        writer.close()


# -- item 4: one file, two roles; only our own socket is unlinked ---------------------------


@pytest.mark.parametrize(
    "case", ["listen-is-data", "status-is-data", "status-is-config", "hard-link"]
)
def test_two_roles_for_one_file_are_a_usage_error(
    tmp_path: Path, short_dir: Path, case: str
) -> None:
    data = short_dir / "mig"
    options = ["--listen", "tcp:127.0.0.1:0", "--device", f"idstr=a,data={data}"]
    if case == "listen-is-data":
        options[1] = f"unix:{data}"
    elif case == "status-is-data":
        options += ["--status-socket", str(data)]
    elif case == "status-is-config":
        options += ["--status-socket", f"{data}.config"]
    else:
        other = short_dir / "other"
        other.write_bytes(b"old")
        os.link(other, short_dir / "other.config")
        options[3] = f"idstr=a,data={other}"
    assert "same file" in usage_error(["receive", *options, "--accept-timeout", "1"])
    assert not data.exists() or case == "hard-link"


def test_only_our_own_sockets_are_unlinked_at_exit(
    tmp_path: Path, short_dir: Path, daemons: list[Daemon]
) -> None:
    listen = short_dir / "mig"
    status = short_dir / "status"
    daemon = Daemon(
        tmp_path,
        "--listen",
        f"unix:{listen}",
        "--status-socket",
        str(status),
        "--device",
        f"idstr={IDSTR},data={tmp_path / 'a.bin'}",
    )
    daemons.append(daemon)
    theirs = []
    for path in (listen, status):  # another daemon took the paths over
        path.unlink()
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.listen()
        theirs.append(sock)
    try:
        daemon.proc.send_signal(signal.SIGTERM)
        code, _, err = daemon.finish(timeout=10)
        assert code == 143, err
        assert listen.exists() and status.exists(), "another daemon's socket was removed"
    finally:
        for sock in theirs:
            sock.close()


# -- item 9: the commit is all-or-nothing, also when cancelled ------------------------------

B = DeviceKey(IDSTR_B, 0)


def two_device_streams() -> tuple[list[bytes], bytes, bytes]:
    data_a, data_b = random_bytes(9000, 5), random_bytes(7000, 6)
    streams = qs.build_streams(
        [(IDSTR, 0, data_a, b"ca"), (IDSTR_B, 0, data_b, b"cb")], 1, chunk_size=4096
    )
    return streams, data_a, data_b


def old_files(config: Any) -> list[Path]:
    paths = [p for d in config.devices for p in (d.data_path, d.config_path)]
    for n, path in enumerate(paths):
        path.write_bytes(f"old {n}".encode())
    return paths


def before_commit_of_b(
    monkeypatch: pytest.MonkeyPatch, config: Any, hook: Callable[[Output], None]
) -> None:
    """Run ``hook`` on the commit thread just before device b's data file is renamed."""
    real_commit = Output.commit

    def commit(self: Output) -> None:
        if self.path == config.devices[1].data_path:
            hook(self)
        real_commit(self)

    monkeypatch.setattr(Output, "commit", commit)


async def test_a_rename_that_fails_part_way_puts_every_old_file_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    config = settings(tmp_path, A, B, channels=1)
    paths = old_files(config)

    def busy(self: Output) -> None:  # device b's data: a bind mount, say
        raise self._error("cannot rename into place", OSError(errno.EBUSY, "busy"))

    before_commit_of_b(monkeypatch, config, busy)
    running = await start(config)
    streams, _, _ = two_device_streams()
    await asyncio.to_thread(qs.send_streams, running.address, streams)
    with pytest.raises(DeviceIOError) as caught:
        await running.result()
    assert "EBUSY" in str(caught.value) and "as it was" in str(caught.value)
    assert [p.read_bytes() for p in paths] == [f"old {n}".encode() for n in range(4)]
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths)  # no .part, no .old


async def test_a_cancel_while_committing_waits_for_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = settings(tmp_path, A, B, channels=1)
    paths = old_files(config)
    in_commit = threading.Event()
    release = threading.Event()

    def hold(self: Output) -> None:  # device a is in place already
        in_commit.set()
        release.wait(10)

    before_commit_of_b(monkeypatch, config, hold)
    running = await start(config)
    streams, data_a, data_b = two_device_streams()
    await asyncio.to_thread(qs.send_streams, running.address, streams)
    assert await asyncio.to_thread(in_commit.wait, 10)
    running.task.cancel()
    await asyncio.sleep(0.3)  # the abort would run now, if nothing held it back
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await running.task
    assert paths[0].read_bytes() == data_a and paths[2].read_bytes() == data_b
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths)
    assert running.session.status.value == "completed"


# -- item 11: a FIFO output with no reader honours --accept-timeout ---------------------------


def test_a_fifo_without_reader_honours_the_accept_timeout(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    started = time.monotonic()
    result = run(
        [
            "receive",
            "--listen",
            "tcp:127.0.0.1:0",
            "--accept-timeout",
            "1",
            "--log-format",
            "json",
            "--device",
            f"idstr=a,data={fifo},config={tmp_path / 'a.config'}",
        ],
        timeout=15,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert 1 <= elapsed < 5
    last = result.stderr.splitlines()[-1]
    assert f"no reader opened {fifo} within 1 s (--accept-timeout)" in last
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert any(e["event"] == "fifo_waiting_for_reader" for e in events)
    assert sorted(os.listdir(tmp_path)) == ["pipe"]


# -- item 10: what "within a second" covers ----------------------------------------------------


async def test_a_cancel_during_slow_fsyncs_cleans_up_within_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three devices' writers stuck in fsync: the abort waits once, not once per device."""
    from vfio_multifd.daemon import output

    keys = [DeviceKey(f"dev{n}", 0) for n in range(3)]
    config = settings(tmp_path, *keys, channels=1)
    real_finish = output.Output.finish
    release = threading.Event()
    stuck = threading.Semaphore(0)

    def finish(self: output.Output) -> None:
        if self.what == "data file":
            stuck.release()
            release.wait(10)  # as an fsync of gigabytes would
        real_finish(self)

    monkeypatch.setattr(output.Output, "finish", finish)
    running = await start(config)
    streams = qs.build_streams(
        [(key.idstr, 0, random_bytes(5000, n), b"c") for n, key in enumerate(keys)], 1
    )
    await asyncio.to_thread(qs.send_streams, running.address, streams)
    for _ in range(3):
        assert await asyncio.to_thread(stuck.acquire, True, 10)
    cancelled = time.monotonic()
    running.session.cancel("cancelled by test")
    with pytest.raises(Cancelled):
        await running.result()
    elapsed = time.monotonic() - cancelled
    try:
        assert elapsed < 1.0, f"the abort took {elapsed:.2f} s"
        assert not [name for name in os.listdir(tmp_path) if name.endswith(".part")]
    finally:
        release.set()
        await asyncio.sleep(0.2)  # let the writer threads end before the loop closes
