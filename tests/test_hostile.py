"""Hostile peers, stray signals and operator mistakes (issue 15).

Each test here failed on the code before the fix it guards. In-process tests
run under both event loops; the CLI tests run the daemon as a subprocess.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import qemu_source as qs
import structlog
from cli_helpers import TRACEBACK, Daemon, run
from helpers import IDSTR, random_bytes, settings, start

from vfio_multifd import DeviceKey, HandshakeError, ProtocolError, Reason, SessionError, logconfig
from vfio_multifd.channel import ChannelProtocol, ChannelState
from vfio_multifd.wire import ChannelHandshake, DevicePacket, PacketHeader

A = DeviceKey(IDSTR, 0)


# -- item 13: a channel that failed, a handshake that completes too late -------------------


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 1) if name == "peername" else default

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class FakeOwner:
    def __init__(self) -> None:
        self.errors: list[Exception] = []

    def accept(self, channel: ChannelProtocol, handshake: ChannelHandshake) -> None:
        pass

    def refused(self, channel: ChannelProtocol, error: HandshakeError) -> None:
        self.errors.append(error)

    def fail(self, error: Exception) -> None:
        self.errors.append(error)

    def allocate_now(self, header: PacketHeader) -> bytearray:
        return bytearray(header.size)

    async def allocate(self, header: PacketHeader, channel: int | None) -> bytearray:
        return bytearray(header.size)

    async def deliver(self, packet: DevicePacket, channel: int | None) -> None:
        pass

    def closed(self, channel: ChannelProtocol) -> None:
        pass


def feed(protocol: ChannelProtocol, data: bytes) -> None:
    """As the event loop does: into get_buffer, then buffer_updated."""
    while data:
        target = protocol.get_buffer(-1)
        n = min(len(target), len(data))
        target[:n] = data[:n]
        data = data[n:]
        protocol.buffer_updated(n)


async def test_a_failed_channels_reader_delivers_nothing_it_still_holds() -> None:
    owner = FakeOwner()
    protocol = ChannelProtocol(owner, max_packet_size=1 << 20, handshake_timeout=10)  # type: ignore[arg-type]
    transport = FakeTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    feed(protocol, qs.handshake(0) + qs.device_packet(IDSTR, 0, 0, b"ab"))
    feed(protocol, qs.device_packet(IDSTR, 0, 1, b"cd"))
    assert len(protocol.pending) == 2 and protocol.state is ChannelState.ACTIVE
    protocol.fail(ProtocolError(Reason.PACKET_MAGIC, "bad"))
    assert transport.aborted and protocol.state is ChannelState.FAILED
    assert await asyncio.wait_for(protocol.next_item(), 1) is None


async def test_a_handshake_completing_once_the_migration_failed_is_refused(
    tmp_path: Path,
) -> None:
    running = await start(settings(tmp_path, A, channels=2))
    session = running.session
    session.fail(SessionError(Reason.PROGRESS_TIMEOUT, "stopped"))
    # Same loop iteration: the task group has not even started to shut down.
    protocol = ChannelProtocol(session, max_packet_size=1 << 20, handshake_timeout=10)
    with pytest.raises(HandshakeError) as refused:
        session.accept(protocol, ChannelHandshake(0))
    assert refused.value.reason is Reason.HANDSHAKE_CLOSED
    assert session.registry.channels == {}
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
        (["--device", "idstr=a,data=/tmp/x", "--max-spill-bytes", "\u0663", "--accept-timeout", "0.5"], "not a size"),
    ],
)
def test_bad_values_are_usage_errors(options: list[str], text: str) -> None:
    result = run(["receive", *options, "--log-format", "json"], timeout=20)
    assert result.returncode == 2, result.stderr
    assert TRACEBACK not in result.stderr
    assert text in result.stderr.splitlines()[-1]


def test_a_data_path_that_is_not_utf8_is_received_and_summarized(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    path = tmp_path / "dev\udcff.bin"  # the byte 0xff, as os.fsdecode gives it
    daemon = Daemon(tmp_path, "--channels", "1", "--device", f"idstr={IDSTR},data={path}")
    daemons.append(daemon)
    sent = run(
        [
            "send",
            "--connect",
            daemon.address,
            "--channels",
            "1",
            "--device",
            f"idstr={IDSTR},size=10000,seed=3",
            "--log-format",
            "json",
        ]
    )
    assert sent.returncode == 0, sent.stderr
    code, out, err = daemon.finish()
    assert code == 0, err
    assert TRACEBACK not in err
    assert "dev\\xff.bin" in out
    assert os.path.getsize(os.fsencode(path)) == 10000


def test_a_symlinked_data_path_is_refused_and_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "real.bin"
    target.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    result = run(
        ["receive", "--listen", "tcp:127.0.0.1:0", "--device", f"idstr=a,data={link}"],
        timeout=20,
    )
    assert result.returncode == 2, result.stderr
    assert "symbolic link" in result.stderr and TRACEBACK not in result.stderr
    assert link.is_symlink() and target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["link.bin", "real.bin"]


# -- item 14: trace lines only when asked for ----------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    logconfig._configured = None


async def test_an_unconfigured_library_user_gets_no_line_per_packet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    structlog.reset_defaults()
    config = settings(tmp_path, A, channels=1)
    running = await start(config)
    data = random_bytes(8 * 4096, 2)
    streams = [qs.handshake(0) + b"".join(
        qs.device_packet(IDSTR, 0, idx, chunk) for idx, chunk in enumerate(qs.device_chunks(data, 4096))
    ) + qs.device_packet(IDSTR, 0, 8, qs.config_blob(b"c"), config=True)]
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
