"""``receive --record DIR`` and ``vfio-multifd replay DIR`` (issue 14, part 3).

A recording holds each channel's bytes exactly as received (checked against
streams built by ``qemu_source``, the independent encoder), and a replay into a
fresh daemon gives the same files, or the same error. The recording stops,
the migration does not, when its disk fails or falls behind; it is written for
failed and cancelled migrations too. Command-line tests run under both
``--event-loop``s (the ``daemons`` fixture), in-process ones under both loops.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import qemu_source as qs
import structlog
import xxhash
from cli_helpers import (
    TRACEBACK,
    Daemon,
    digests,
    partial_stream,
    receive_usage_error,
    run,
    send_to,
    wait_for,
)
from helpers import (
    IDSTR,
    IDSTR_B,
    FakeTransport,
    assert_outputs,
    closed_address,
    connect,
    random_bytes,
    settings,
    start,
)

from vfio_multifd import Address, DeviceKey, ProtocolError, Reason
from vfio_multifd.cli import main
from vfio_multifd.config import RecordSettings, TlsSettings
from vfio_multifd.core.decoder import ChannelDecoder
from vfio_multifd.core.wire import ChannelHandshake, DevicePacket, PacketHeader
from vfio_multifd.daemon.channel import ChannelProtocol
from vfio_multifd.errors import ProtocolError as DecodeError
from vfio_multifd.ops import recorder as recorder_module
from vfio_multifd.ops.manifest import (
    ChannelEnd,
    Manifest,
    RecordedChannel,
    channel_file,
)
from vfio_multifd.ops.record_channel import RecordingChannel
from vfio_multifd.ops.record_ring import ByteRing
from vfio_multifd.ops.recorder import Recorder
from vfio_multifd.results import SessionStatus
from vfio_multifd.source.replay import Recording, Replay, connection_order, timing

A = DeviceKey(IDSTR, 0)
B = DeviceKey(IDSTR_B, 0)
OTHER_UUID = "12345678-1234-5678-1234-567812345678"


def xxh3(data: bytes) -> str:
    """The digest a manifest gives ``data`` (the daemon's default --digest), computed here."""
    return f"xxh3-128:{xxhash.xxh3_128(data).hexdigest()}"


def manifest_of(directory: Path) -> dict[str, Any]:
    """The manifest as JSON (the contract), after checking it parses as a Manifest."""
    text = (directory / "manifest.json").read_text()
    Manifest.from_json(text)
    raw: dict[str, Any] = json.loads(text)
    return raw


def two_devices() -> tuple[list[tuple[str, int, bytes, bytes]], list[tuple[bytes, bytes]]]:
    """Two devices for qemu_source.build_streams, and what their files must hold."""
    data_a, data_b = random_bytes(5 * 65536 + 77, 31), random_bytes(3 * 65536, 32)
    devices = [(IDSTR, 0, data_a, b"config of A"), (IDSTR_B, 0, data_b, b"config of B")]
    expected = [(data_a, qs.config_blob(b"config of A")), (data_b, qs.config_blob(b"config of B"))]
    return devices, expected


def device_options(directory: Path) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    return [
        "--device",
        f"idstr={IDSTR},data={directory / 'a.bin'}",
        "--device",
        f"idstr={IDSTR_B},data={directory / 'b.bin'}",
    ]


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait (on the loop: the daemon runs there) until ``predicate()``; fail if it never is."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.01)


def replay_cli(directory: Path, address: str, *options: str) -> Any:
    return run(["replay", str(directory), "--connect", address, "--log-format", "json", *options])


# -- 1. a completed migration ------------------------------------------------------------


def test_a_recorded_migration_holds_each_channel_as_sent_and_replays_into_the_same_files(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    devices, expected = two_devices()
    streams = qs.build_streams(devices, channels=3, order="random", seed=4, chunk_size=65536)
    record = tmp_path / "rec"
    options = device_options(tmp_path / "first")
    first = Daemon(tmp_path / "first", "--channels", "3", "--record", str(record), *options)
    daemons.append(first)
    qs.send_streams(first.address, streams)
    code, summary, stderr = first.finish()
    assert code == 0, stderr

    # Each file is its channel's stream, byte for byte, handshake first.
    assert sorted(os.listdir(record)) == [
        "channel-0.bin", "channel-1.bin", "channel-2.bin", "manifest.json"
    ]  # fmt: skip
    for n, stream in enumerate(streams):
        assert (record / channel_file(n)).read_bytes() == stream, f"channel {n}"
    assert (os.stat(record).st_mode & 0o777) == 0o700
    assert (os.stat(record / "channel-0.bin").st_mode & 0o777) == 0o600
    manifest = manifest_of(record)
    assert manifest["format_version"] == 1
    assert manifest["uuid"] == "00000000-0000-0000-0000-000000000000"
    assert manifest["channels"] == 3 and manifest["tls"] is False
    # Each device with the digest the daemon reported (and that of the data sent).
    reported = digests(summary)
    assert reported == {IDSTR: xxh3(expected[0][0]), IDSTR_B: xxh3(expected[1][0])}
    assert manifest["devices"] == [
        {"idstr": IDSTR, "instance": 0, "digest": reported[IDSTR]},
        {"idstr": IDSTR_B, "instance": 0, "digest": reported[IDSTR_B]},
    ]
    assert manifest["outcome"] == "completed" and manifest["error"] is None
    assert manifest["complete"] is True and manifest["stopped"] is None
    assert manifest["refused"] == [] and manifest["refused_not_kept"] == 0
    assert manifest["listen"] == first.address
    channels = sorted(manifest["recorded_channels"], key=lambda c: c["id"])
    assert [c["id"] for c in channels] == [0, 1, 2]
    for channel, stream in zip(channels, streams, strict=True):
        assert channel["file"] == channel_file(channel["id"])
        assert channel["bytes"] == channel["received"] == len(stream)
        assert channel["digest"] == xxh3(stream)
        assert channel["peer"].startswith("127.0.0.1:")
        assert 0 <= channel["first_byte_s"] <= channel["last_byte_s"]
        assert channel["end"] in ("eof", "open")  # the daemon may complete before a FIN

    # Replayed into a fresh daemon (not recording): the same files.
    options = device_options(tmp_path / "second")
    second = Daemon(tmp_path / "second", "--channels", "3", *options)
    daemons.append(second)
    replayed = replay_cli(record, second.address)
    assert replayed.returncode == 0, replayed.stderr
    code, _, stderr = second.finish()
    assert code == 0, stderr
    for name, (data, config) in zip(("a.bin", "b.bin"), expected, strict=True):
        assert (tmp_path / "second" / name).read_bytes() == data
        assert (tmp_path / "second" / f"{name}.config").read_bytes() == config
        assert (tmp_path / "first" / name).read_bytes() == data
    lines = replayed.stdout.splitlines()
    assert lines[0].startswith(f"replaying {record}: recorded ") and "outcome completed" in lines[0]
    assert lines[1] == (
        "the daemon needs: --channels 3 --uuid 00000000-0000-0000-0000-000000000000 "
        f"--device idstr={IDSTR},instance=0,data=... --device idstr={IDSTR_B},instance=0,data=..."
    )
    order = [c["id"] for c in sorted(channels, key=lambda c: (c["first_byte_s"], c["id"]))]
    assert lines[2] == f"connection order (recorded): channel ids {', '.join(map(str, order))}"
    for n, line in zip(order, lines[3:6], strict=True):
        assert line.startswith(f"channel {n}: sent {len(streams[n])} of {len(streams[n])} bytes, ")
    assert lines[6].startswith(f"replayed {sum(map(len, streams))} of {sum(map(len, streams))} ")
    assert lines[6].endswith("; the daemon closed every channel cleanly")


# -- 2. a failed migration -----------------------------------------------------------------


def test_a_recorded_failure_replays_into_the_same_error(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    record = tmp_path / "rec"
    (tmp_path / "first").mkdir()
    out = tmp_path / "first" / "a.bin"
    first = Daemon(
        tmp_path / "first",
        "--channels", "2", "--uuid", OTHER_UUID, "--record", str(record),
        "--device", f"idstr={IDSTR},data={out}",
    )  # fmt: skip
    daemons.append(first)
    sent = send_to(
        first.address, 2, f"idstr={IDSTR},size=3M,seed=9", "--uuid", OTHER_UUID,
        "--inject", "duplicate",
    )  # fmt: skip
    assert sent.returncode == 1, sent.stderr
    code, _, stderr = first.finish()
    error_line = stderr.splitlines()[-1]
    assert code == 1
    assert error_line == f"vfio-multifd: error: channel 0: device {IDSTR}: state buffer 0 already filled"
    manifest = manifest_of(record)
    assert manifest["outcome"] == "failed" and manifest["uuid"] == OTHER_UUID
    assert manifest["error"] == {
        "reason": "vfio-already-filled",
        "message": f"channel 0: device {IDSTR}: state buffer 0 already filled",
        "channel": 0,
        "device": IDSTR,
        "idx": 0,
    }
    assert manifest["complete"] is True
    assert manifest["devices"] == [{"idstr": IDSTR, "instance": 0, "digest": None}]
    # Channel 1's handshake may come after the daemon failed: then it was never accepted.
    assert {c["id"] for c in manifest["recorded_channels"]} in ({0}, {0, 1})

    (tmp_path / "second").mkdir()
    second_out = tmp_path / "second" / "a.bin"
    second = Daemon(
        tmp_path / "second",
        "--channels", "2", "--uuid", OTHER_UUID, "--device", f"idstr={IDSTR},data={second_out}",
    )  # fmt: skip
    daemons.append(second)
    replayed = replay_cli(record, second.address)
    assert replayed.returncode == 1, replayed.stderr
    assert TRACEBACK not in replayed.stderr
    assert "the daemon reset the connection" in replayed.stderr.splitlines()[-1]
    assert f"outcome failed: channel 0: device {IDSTR}: state buffer 0 already filled" in (
        replayed.stdout.splitlines()[0]
    )
    code, _, stderr = second.finish()
    assert (code, stderr.splitlines()[-1]) == (1, error_line)
    assert not second_out.exists() and not out.exists()


# -- 3. refused connections ------------------------------------------------------------------


def refused_connection(address: str, payload: bytes) -> None:
    """Send ``payload`` and wait until the daemon hangs up (it refuses it)."""
    with connect(address) as sock:
        sock.sendall(payload)
        try:
            while sock.recv(4096):
                pass
        except ConnectionResetError:
            pass


def test_refused_connections_are_kept_with_their_reason_up_to_the_cap(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    record = tmp_path / "rec"
    (tmp_path / "d").mkdir()
    daemon = Daemon(
        tmp_path / "d", "--channels", "1", "--record", str(record),
        "--device", f"idstr={IDSTR},data={tmp_path / 'd' / 'a.bin'}",
    )  # fmt: skip
    daemons.append(daemon)
    strangers = [qs.handshake(0, bytes([n + 1]) * 16) for n in range(18)]  # other VMs' uuids
    for payload in strangers:
        refused_connection(daemon.address, payload)
    sent = send_to(daemon.address, 1, f"idstr={IDSTR},size=1M")
    assert sent.returncode == 0, sent.stderr
    assert daemon.finish()[0] == 0

    manifest = manifest_of(record)
    kept = manifest["refused"]
    assert [r["file"] for r in kept] == [f"refused-{n}.bin" for n in range(16)]
    assert manifest["refused_not_kept"] == 2
    for n, entry in enumerate(kept):
        assert entry["reason"] == "handshake-uuid"
        assert "uuid" in entry["message"]
        assert entry["bytes"] == 64 and entry["peer"].startswith("127.0.0.1:")
        assert (record / entry["file"]).read_bytes() == strangers[n]
    assert sorted(os.listdir(record)) == sorted(
        ["channel-0.bin", "manifest.json", *(f"refused-{n}.bin" for n in range(16))]
    )
    assert [c["id"] for c in manifest["recorded_channels"]] == [0]


# -- 4. the recording fails, the migration does not -------------------------------------------


@pytest.mark.parametrize("trouble", ["disk-full", "disk-behind"])
async def test_a_recording_that_cannot_keep_up_stops_and_the_migration_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trouble: str
) -> None:
    devices, expected = two_devices()
    streams = qs.build_streams(devices, channels=2, chunk_size=65536)
    record = tmp_path / "rec"
    written = [0]
    released = threading.Event()
    real_append = recorder_module.append

    def append(fd: int, data: bytes) -> None:
        if trouble == "disk-full" and written[0] + len(data) > 100_000:
            # As a real full disk does: part of the write lands, then ENOSPC.
            real_append(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if trouble == "disk-behind":
            released.wait(30)  # the disk stalls until the recording gave up
        real_append(fd, data)
        written[0] += len(data)

    # The writer thread's channel writes (the manifest is written by record_files itself).
    monkeypatch.setattr(recorder_module, "append", append)
    (tmp_path / "out").mkdir()
    bound = 128 << 10 if trouble == "disk-behind" else 64 << 20
    config = settings(
        tmp_path / "out", A, B, record=RecordSettings(record, max_queued_bytes=bound)
    )
    with structlog.testing.capture_logs() as logs:
        running = await start(config)
        sending = asyncio.create_task(asyncio.to_thread(qs.send_streams, running.address, streams))
        if trouble == "disk-behind":
            try:
                await eventually(
                    lambda: any(e["event"] == "record_stopped" for e in logs),
                    "the recording to stop",
                )
            finally:
                released.set()
        await sending
        result = await running.result()
    assert [d.bytes for d in result.devices] == [len(expected[0][0]), len(expected[1][0])]
    assert_outputs(config, expected)
    [stopped] = [e for e in logs if e["event"] == "record_stopped"]
    assert stopped["log_level"] == "warning"
    why = {
        "disk-full": "No space left on device (ENOSPC, errno 28)",
        "disk-behind": "the disk fell behind: more than 131072 received bytes waited",
    }[trouble]
    assert why in stopped["why"]
    manifest = manifest_of(record)
    assert manifest["complete"] is False and why in manifest["stopped"]
    assert manifest["outcome"] == "completed"
    for channel in manifest["recorded_channels"]:
        stream = streams[channel["id"]]
        held = (record / channel["file"]).read_bytes()
        assert channel["bytes"] == len(held) < len(stream) == channel["received"]
        assert stream.startswith(held), "what was written is the stream's beginning"


# -- 5. a cancelled migration ----------------------------------------------------------------


def test_a_cancelled_migration_is_recorded_too(tmp_path: Path, daemons: list[Daemon]) -> None:
    record = tmp_path / "rec"
    (tmp_path / "d").mkdir()
    daemon = Daemon(
        tmp_path / "d", "--channels", "2", "--record", str(record),
        "--device", f"idstr={IDSTR},data={tmp_path / 'd' / 'a.bin'}",
    )  # fmt: skip
    daemons.append(daemon)
    socks = partial_stream(daemon.address, channels=2, chunks=3, chunk_size=65536)
    data = random_bytes(65536, 5)  # what partial_stream sends
    sent = [
        qs.handshake(0) + b"".join(qs.device_packet(IDSTR, 0, idx, data) for idx in range(3)),
        qs.handshake(1),
    ]
    try:

        def all_recorded() -> bool:
            files = [record / channel_file(n) for n in range(2)]
            return all(f.exists() and f.stat().st_size == len(s) for f, s in zip(files, sent, strict=True))

        wait_for(all_recorded, what="the bytes sent to reach the recording")
        daemon.proc.send_signal(signal.SIGTERM)
        code, _, stderr = daemon.finish()
    finally:
        for sock in socks:
            sock.close()
    assert code == 143, stderr
    manifest = manifest_of(record)
    assert manifest["outcome"] == "cancelled"
    assert manifest["error"]["reason"] == "cancelled"
    assert manifest["error"]["message"] == "cancelled by SIGTERM"
    for n, stream in enumerate(sent):
        assert (record / channel_file(n)).read_bytes() == stream
    assert [c["end"] for c in sorted(manifest["recorded_channels"], key=lambda c: c["id"])] == [
        "open",
        "open",
    ]


# -- how a channel ended ------------------------------------------------------------------


async def test_a_source_that_broke_off_is_replayed_as_one(tmp_path: Path) -> None:
    """Channel 1 is reset inside a packet: the recording says ``lost``, and the replay
    resets it once the daemon has its bytes, so the same error names the same idx."""
    packet = qs.device_packet(IDSTR, 0, 1, random_bytes(8192, 3))
    sent = [qs.handshake(0) + qs.device_packet(IDSTR, 0, 0, b"x" * 4096), qs.handshake(1) + packet[:600]]
    record = tmp_path / "rec"
    (tmp_path / "first").mkdir()
    running = await start(settings(tmp_path / "first", A, record=RecordSettings(record)))
    socks = [connect(running.address) for _ in sent]
    for sock, stream in zip(socks, sent, strict=True):
        sock.sendall(stream)
    await eventually(
        lambda: running.session.snapshot().received_bytes == sum(map(len, sent)), "the daemon to read all"
    )
    socks[1].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    socks[1].close()  # a reset, inside idx 1
    with pytest.raises(ProtocolError) as original:
        await running.result()
    socks[0].close()
    manifest = manifest_of(record)
    ends = {c["id"]: c["end"] for c in manifest["recorded_channels"]}
    assert ends == {0: "open", 1: "lost"}
    assert original.value.reason is Reason.PACKET_TRUNCATED and original.value.idx == 1
    assert manifest["error"]["message"] == str(original.value)

    (tmp_path / "second").mkdir()
    running = await start(settings(tmp_path / "second", A))
    replay = Replay(Recording.load(record))
    error = await asyncio.to_thread(replay.run, Address.parse(running.address), connect_timeout=5)
    with pytest.raises(ProtocolError) as replayed:
        await running.result()
    assert str(replayed.value) == str(original.value)
    assert error is not None and error.channel == 0  # the daemon reset the one left open


class Owner:
    """A channel's owner that accepts every channel and grants every payload a buffer,
    telling the recorder what the session tells it."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def received(self, channel: ChannelProtocol, nbytes: int) -> None:
        pass

    def handshake(self, channel: ChannelProtocol, handshake: ChannelHandshake) -> None:
        self.recorder.accepted(channel, handshake.channel_id)

    def header(self, channel: ChannelProtocol, header: PacketHeader) -> bytearray:
        return bytearray(header.size)

    def packet(self, channel: ChannelProtocol, packet: DevicePacket) -> None:
        pass

    def decode_error(self, channel: ChannelProtocol, error: DecodeError) -> None:
        raise AssertionError(f"a good stream failed to decode: {error}")

    def eof(self, channel: ChannelProtocol) -> None:
        pass

    def lost(
        self, channel: ChannelProtocol, exc: BaseException | None, truncated: DecodeError | None
    ) -> None:
        self.recorder.lost(channel, exc)


async def test_a_channel_end_is_noted_only_until_the_outcome_is_decided(tmp_path: Path) -> None:
    """A source resets its other channels once the daemon failed: that did not cause the
    failure, and a replay that reset them first could cause another."""
    recorder = Recorder(settings(tmp_path, A, record=RecordSettings(tmp_path / "rec")))
    recorder.start()

    owner = Owner(recorder)
    for channel_id in (0, 1):
        channel = recorder.channel(owner, channel_id, peer="source", max_packet_size=1 << 20)
        transport = FakeTransport(channel)
        channel.connection_made(transport)  # type: ignore[arg-type]
        assert transport.feed(qs.handshake(channel_id)) == 64
        if channel_id == 1:
            recorder.status_changed(SessionStatus.FAILED)  # as Session.fail does at once
        channel.connection_lost(ConnectionResetError("reset by the source"))
    await recorder.finish(SessionStatus.FAILED, None, None)
    ends = {c["id"]: c["end"] for c in manifest_of(tmp_path / "rec")["recorded_channels"]}
    assert ends == {0: ChannelEnd.LOST.value, 1: ChannelEnd.OPEN.value}


def feed_decoder(decoder: ChannelDecoder, data: bytes, step: int) -> None:
    """Feed ``data`` to a decoder as a socket reader does, ``step`` bytes a read at most,
    granting each payload a buffer (as admission would)."""
    view = memoryview(data)
    while view:
        while (event := decoder.next_event()) is not None:
            if isinstance(event, PacketHeader):
                decoder.provide_buffer(bytearray(event.size))
        target = decoder.get_buffer()
        n = min(len(target), len(view), step)
        target[:n] = view[:n]
        view = view[n:]
        decoder.buffer_updated(n)


async def test_whoever_feeds_a_channels_decoder_is_recorded_in_order(tmp_path: Path) -> None:
    """The hook is the decoder: a thread that reads a channel's socket and feeds its
    decoder (not the protocol) is recorded too, several at once, each file in order."""
    record = tmp_path / "rec"
    recorder = Recorder(
        settings(tmp_path, A, channels=4, record=RecordSettings(record, max_queued_bytes=1 << 20))
    )
    recorder.start()

    channels = []
    for n in range(4):
        channel = recorder.channel(Owner(recorder), n, peer="source", max_packet_size=1 << 20)
        transport = FakeTransport(channel)
        channel.connection_made(transport)  # type: ignore[arg-type]
        transport.feed(qs.handshake(n))  # accepted on the loop, as a handshake always is
        channels.append(channel)
    packets = [
        [qs.device_packet(IDSTR, 0, 4 * k + n, random_bytes(50_000 + n, k)) for k in range(20)]
        for n in range(4)
    ]
    bodies = [b"".join(p) for p in packets]
    await asyncio.gather(
        *(
            asyncio.to_thread(feed_decoder, channel.decoder, body, 7_000 + 1_000 * n)
            for n, (channel, body) in enumerate(zip(channels, bodies, strict=True))
        )
    )
    await recorder.finish(SessionStatus.FAILED, None, None)
    manifest = manifest_of(record)
    for n, body in enumerate(bodies):
        stream = qs.handshake(n) + body
        held = (record / channel_file(n)).read_bytes()
        assert stream.startswith(held), f"channel {n}: not the stream's beginning"
        if manifest["complete"]:
            assert held == stream


# -- TLS: the plaintext is recorded ---------------------------------------------------------


async def test_tls_channels_are_recorded_as_plaintext_and_replay_to_a_plaintext_daemon(
    tmp_path: Path, short_dir: Path
) -> None:
    from test_tls import SUBJECT, send_tls

    from credentials import Authority

    authority = Authority()
    server = authority.server_dir(short_dir / "server")
    client = authority.client_dir(short_dir / "client")
    source = tmp_path / "source.bin"
    source.write_bytes(random_bytes(200_003, 8))
    record = tmp_path / "rec"
    (tmp_path / "tls").mkdir()
    config = settings(
        tmp_path / "tls", A, channels=2,
        tls=TlsSettings(server, authz=(SUBJECT,)), record=RecordSettings(record),
    )  # fmt: skip
    running = await start(config)
    await asyncio.to_thread(send_tls, running.address, client, source)
    await running.result()
    manifest = manifest_of(record)
    assert manifest["tls"] is True and manifest["complete"] is True
    for n in range(2):
        assert (record / channel_file(n)).read_bytes()[:64] == qs.handshake(n)

    (tmp_path / "plain").mkdir()
    plain = settings(tmp_path / "plain", A, channels=2)
    running = await start(plain)
    replay = Replay(Recording.load(record))
    error = await asyncio.to_thread(replay.run, Address.parse(running.address), connect_timeout=5)
    await running.result()
    assert error is None
    assert plain.devices[0].data_path.read_bytes() == source.read_bytes()


# -- without --record nothing changes ---------------------------------------------------------


@pytest.mark.parametrize("record", [False, True])
async def test_only_a_recording_session_makes_recording_channels(
    tmp_path: Path, record: bool
) -> None:
    """The hook costs a daemon without --record nothing: its channels are plain."""
    extra = {"record": RecordSettings(tmp_path / "rec")} if record else {}
    running = await start(settings(tmp_path, A, channels=1, **extra))
    with connect(running.address) as sock:
        sock.sendall(qs.handshake(0))
        await eventually(lambda: bool(running.session.channels), "the channel")
        [channel] = running.session.channels.values()
        assert type(channel) is (RecordingChannel if record else ChannelProtocol)
        running.session.cancel()
        with pytest.raises(Exception, match="cancelled"):
            await running.result()


def test_the_ring_reuses_its_beginning_and_refuses_what_does_not_fit() -> None:
    ring = ByteRing(100)
    assert ring.reserve(60) == (0, 0) and ring.reserve(30) == (60, 0)
    assert ring.reserve(20) is None  # 10 left at the end, and the beginning is in use
    ring.free(60)
    assert ring.reserve(20) == (0, 10)  # wraps: the last 10 bytes are skipped
    assert ring.queued == 60 and ring.reserve(41) is None
    ring.free(30)
    ring.free(30)
    assert ring.queued == 0
    assert ring.reserve(50) == (0, 0)  # empty: back to the beginning, not at 20
    assert ring.reserve(101) is None


# -- 6. usage ------------------------------------------------------------------------------


def test_record_directory_mistakes_are_usage_errors(tmp_path: Path) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "old.bin").write_bytes(b"another recording")
    line = receive_usage_error(tmp_path, "--record", str(used))
    assert line == (
        f"vfio-multifd: error: --record {used} is not empty: give a new or empty directory "
        "(a recording is never mixed with another)"
    )
    assert os.listdir(used) == ["old.bin"]
    a_file = tmp_path / "file"
    a_file.write_bytes(b"")
    assert "exists and is not a directory" in receive_usage_error(tmp_path, "--record", str(a_file))
    # Two roles for one directory, and an output inside the recording.
    line = receive_usage_error(
        tmp_path, "--record", str(tmp_path / "r"), "--spill-dir", str(tmp_path / "r")
    )
    assert line.endswith("are the same file; each needs a path of its own"), line
    line = receive_usage_error(tmp_path, "--record", str(tmp_path))
    assert line.endswith(f"is inside --record {tmp_path}, which holds the recording and nothing else")
    line = receive_usage_error(
        tmp_path, "--record", str(tmp_path / "r"), "--status-socket", str(tmp_path / "r" / "s")
    )
    assert line.startswith(f"vfio-multifd: error: --status-socket {tmp_path / 'r' / 's'} is inside")
    assert not (tmp_path / "r").exists()


def fake_recording(directory: Path, channels: int) -> Manifest:
    """A recording written by hand: ``channels`` channels with distinct first-byte times."""
    streams = [qs.handshake(n) + bytes([n]) * n for n in range(channels)]
    firsts = [float((n * 7) % channels) for n in range(channels)]  # not in id order
    return write_recording(directory, streams, [(first, first) for first in firsts], ChannelEnd.EOF)


def write_recording(
    directory: Path, streams: list[bytes], times: list[tuple[float, float]], end: ChannelEnd
) -> Manifest:
    """A recording written by hand: channel ``n`` received ``streams[n]`` from ``times[n][0]``
    to ``times[n][1]`` and ended with ``end``."""
    directory.mkdir()
    recorded = []
    for n, (body, (first, last)) in enumerate(zip(streams, times, strict=True)):
        (directory / channel_file(n)).write_bytes(body)
        recorded.append({
            "id": n, "file": channel_file(n), "peer": "127.0.0.1:1", "bytes": len(body),
            "received": len(body), "first_byte_s": first, "last_byte_s": last, "end": end.value,
            "digest": xxh3(body),
        })  # fmt: skip
    text = json.dumps({
        "format_version": 1, "tool": "vfio-multifd test",
        "started_at": "2026-01-01T00:00:00.000+00:00",
        "uuid": "00000000-0000-0000-0000-000000000000", "channels": len(streams), "tls": False,
        "listen": "tcp:127.0.0.1:1", "devices": [{"idstr": IDSTR, "instance": 0, "digest": None}],
        "outcome": "completed", "error": None, "complete": True, "stopped": None,
        "recorded_channels": recorded, "refused": [], "refused_not_kept": 0,
    })  # fmt: skip
    (directory / "manifest.json").write_text(text)
    return Manifest.from_json(text)


def test_replay_of_what_is_not_a_recording_is_a_usage_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = replay_cli(empty, closed_address())
    assert result.returncode == 2 and TRACEBACK not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"vfio-multifd: error: {empty} is not a recording: it has no manifest.json (receive "
        "--record DIR writes it when the migration ends; a daemon killed with SIGKILL leaves none)"
    )
    assert replay_cli(tmp_path / "missing", closed_address()).returncode == 2
    changed = tmp_path / "changed"
    fake_recording(changed, 2)
    with open(changed / "channel-1.bin", "ab") as file:
        file.write(b"more")
    result = replay_cli(changed, closed_address())
    assert result.returncode == 2
    assert "channel 1: " in result.stderr and "holds 69 bytes, the manifest says 65" in result.stderr
    escaping = tmp_path / "escaping"
    fake_recording(escaping, 1)
    text = (escaping / "manifest.json").read_text().replace('"channel-0.bin"', '"../x.bin"')
    (escaping / "manifest.json").write_text(text)
    result = replay_cli(escaping, closed_address())
    assert result.returncode == 2 and "is not 'channel-0.bin'" in result.stderr


def test_channels_order_recorded_reverse_and_random_with_a_seed(tmp_path: Path) -> None:
    manifest = fake_recording(tmp_path / "rec", 8)
    channels = manifest.recorded_channels
    recorded = [c.id for c in connection_order(channels, "recorded")]
    assert recorded == sorted(range(8), key=lambda n: ((n * 7) % 8, n))
    assert [c.id for c in connection_order(channels, "reverse")] == recorded[::-1]
    seeded = [c.id for c in connection_order(channels, "random", 5)]
    assert seeded == [c.id for c in connection_order(channels, "random", 5)]
    assert sorted(seeded) == list(range(8)) and seeded != recorded
    assert seeded != [c.id for c in connection_order(channels, "random", 6)]
    # The command line connects in that order, and says so first (nothing listens here).
    for _ in range(2):
        result = replay_cli(
            tmp_path / "rec", closed_address(), "--channels-order", "random", "--seed", "5",
            "--connect-timeout", "0.1",
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        assert f"connection order (random): channel ids {', '.join(map(str, seeded))}" in (
            result.stdout.splitlines()
        )
        assert result.stderr.splitlines()[-1].startswith(f"vfio-multifd: error: channel {seeded[0]}: ")


# -- issue 20: a replay checks what it sends, keeps the recorded order, and waits bounded -----


def replay_main(
    capsys: pytest.CaptureFixture[str], directory: Path, address: str, *options: str
) -> tuple[int, list[str]]:
    """``vfio-multifd replay`` in this process: its exit code and its lines on stderr."""
    capsys.readouterr()
    code = main(["replay", str(directory), "--connect", address, "--log-format", "json", *options])
    return code, capsys.readouterr().err.splitlines()


async def test_a_flipped_bit_in_a_channel_file_is_refused_before_anything_is_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    devices, expected = two_devices()
    streams = qs.build_streams(devices, channels=2, chunk_size=65536)
    record = tmp_path / "rec"
    (tmp_path / "out").mkdir()
    running = await start(settings(tmp_path / "out", A, B, record=RecordSettings(record)))
    await asyncio.to_thread(qs.send_streams, running.address, streams)
    result = await running.result()
    manifest = manifest_of(record)
    # The digests the daemon reported, and those of the files (computed here from the streams).
    assert [d["digest"] for d in manifest["devices"]] == [d.digest for d in result.devices]
    assert [d.digest for d in result.devices] == [xxh3(data) for data, _ in expected]
    recorded = {c["id"]: c["digest"] for c in manifest["recorded_channels"]}
    assert recorded == {n: xxh3(stream) for n, stream in enumerate(streams)}

    file = record / "channel-0.bin"
    flipped = bytearray(file.read_bytes())
    assert flipped == streams[0]
    flipped[64 + 288 + 1000] ^= 0x10  # one bit of the first packet's payload
    file.write_bytes(flipped)
    # Nothing listens there: a replay that connected would fail with exit 1, not 2.
    code, lines = replay_main(capsys, record, closed_address())
    assert (code, lines) == (
        2,
        [
            f"vfio-multifd: error: channel 0: {file} is not what was recorded: its digest is "
            f"{xxh3(bytes(flipped))}, the manifest says {xxh3(streams[0])}"
        ],
    )


def edit_manifest(directory: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    raw = json.loads((directory / "manifest.json").read_text())
    edit(raw)
    (directory / "manifest.json").write_text(json.dumps(raw))


def drop_digests(raw: dict[str, Any]) -> None:
    for channel in raw["recorded_channels"]:
        del channel["digest"]


def duplicate_id(raw: dict[str, Any]) -> None:
    raw["recorded_channels"][1] = raw["recorded_channels"][0]  # its file is as it says


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            drop_digests,
            "recorded_channels[0]: digest is missing: this recording's manifest has no digest "
            "of its channel files (it was written before vfio-multifd put them there), and a "
            "replay refuses files it cannot check; record the migration again",
        ),
        (
            lambda raw: raw["recorded_channels"][0].update(digest="xxh3-128:abc"),
            "recorded_channels[0]: digest must be xxh3-128:<32 hex digits> or sha256:<64 hex "
            "digits>, not 'xxh3-128:abc'",
        ),
        (duplicate_id, "recorded_channels[1]: channel id 0 is recorded twice"),
        (
            lambda raw: raw["recorded_channels"][1].update(id=2, file="channel-2.bin"),
            "recorded_channels[1]: channel id 2 is not below channels 2",
        ),
        (
            lambda raw: raw["recorded_channels"][1].update(last_byte_s=-1),
            "recorded_channels[1]: last_byte_s must be a number of 0 or more, not -1",
        ),
        (
            lambda raw: raw["recorded_channels"][1].update(first_byte_s=1e999),
            "recorded_channels[1]: first_byte_s must be a number of 0 or more, not inf",
        ),
    ],
    ids=[
        "no-digest", "bad-digest", "duplicate-id", "id-too-high", "negative-time", "infinite-time"
    ],
)
def test_a_bad_manifest_is_refused_in_one_line_before_anything_is_sent(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    edit: Callable[[dict[str, Any]], object],
    expected: str,
) -> None:
    """A manifest without digests is refused, not replayed with a warning: its files cannot
    be checked, and a damaged one would give other outputs with exit 0."""
    fake_recording(tmp_path / "rec", 2)
    edit_manifest(tmp_path / "rec", edit)
    code, lines = replay_main(capsys, tmp_path / "rec", closed_address())
    assert (code, lines) == (
        2, [f"vfio-multifd: error: {tmp_path / 'rec' / 'manifest.json'}: the manifest: {expected}"]
    )  # fmt: skip


def test_a_manifest_nested_too_deeply_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_recording(tmp_path / "rec", 1)
    path = tmp_path / "rec" / "manifest.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    code, lines = replay_main(capsys, tmp_path / "rec", closed_address())
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"vfio-multifd: error: {path}: not JSON: maximum recursion depth")


def recorded(channel_id: int, first: float | None, last: float | None) -> RecordedChannel:
    return RecordedChannel(
        channel_id, channel_file(channel_id), "127.0.0.1:1", 1, 1, first, last, ChannelEnd.EOF,
        xxh3(b"x"),
    )  # fmt: skip


def test_replay_timing_keeps_the_recorded_order_and_gaps_up_to_a_bound() -> None:
    channels = [recorded(0, 0.5, 0.52), recorded(1, 0.5, 3.0), recorded(2, 0.51, 0.51)]
    # Moments 0.5, 0.51, 0.52, 3.0: gaps 0.01, 0.01 and 2.48, kept up to 0.1.
    flat = [moment for pair in timing(channels, max_gap=0.1) for moment in pair]
    assert flat == pytest.approx([0, 0.02, 0, 0.12, 0.01, 0.01])
    assert timing([recorded(0, None, None)]) == [(0.0, 0.0)]


class Peer:
    """A listener on 127.0.0.1 standing in for the daemon: it reads every connection it
    accepts, noting when each read came; ``answer``: it closes them all cleanly once it
    has ``total`` bytes (as a daemon that completed), else it never answers."""

    def __init__(self, connections: int, total: int, *, answer: bool) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.address = f"tcp:127.0.0.1:{self.listener.getsockname()[1]}"
        self.total, self.answer = total, answer
        self.received = [bytearray() for _ in range(connections)]
        self.reads: list[list[tuple[float, int]]] = [[] for _ in range(connections)]
        self.ended = [""] * connections  # eof, reset, or timeout
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._serve, args=(connections,), daemon=True)]
        self.threads[0].start()

    def _serve(self, connections: int) -> None:
        for n in range(connections):
            try:
                conn, _ = self.listener.accept()
            except OSError:  # nothing came: the test's assertions say what is missing
                return
            conn.settimeout(10)
            self.conns.append(conn)
            reader = threading.Thread(target=self._read, args=(n, conn), daemon=True)
            self.threads.append(reader)
            reader.start()

    def _read(self, n: int, conn: socket.socket) -> None:
        try:
            while data := conn.recv(1 << 16):
                with self.lock:
                    self.received[n] += data
                    self.reads[n].append((time.monotonic(), len(self.received[n])))
                    if self.answer and sum(map(len, self.received)) == self.total:
                        for each in self.conns:
                            each.shutdown(socket.SHUT_WR)
            self.ended[n] = "eof"
        except ConnectionResetError:
            self.ended[n] = "reset"
        except TimeoutError:
            self.ended[n] = "timeout"

    def by_channel(self) -> dict[int, int]:
        """Each channel id (byte 24 of its handshake) -> its connection's index."""
        return {bytes(data)[24]: n for n, data in enumerate(self.received)}

    def close(self) -> None:
        for thread in self.threads:
            thread.join(timeout=15)
        for conn in self.conns:
            conn.close()
        self.listener.close()


#: When channel 1's colliding header was recorded: 90 ms after channel 0's idx 0 (the
#: most a replay keeps is MAX_GAP, 0.1 s), so that even a loaded machine's daemon reads
#: the two in that order (at 40 ms apart one run in many read them the other way round).
COLLIDING_HEADER_AT = 0.11


def colliding_recording(directory: Path) -> list[bytes]:
    """A recorded duplicate-idx failure: channel 0 sent idx 0; channel 1 connected first but
    announced idx 0 again only after that (the daemon read no more of it, and failed)."""
    first = qs.device_packet(IDSTR, 0, 0, random_bytes(65536, 7))
    streams = [qs.handshake(0) + first, qs.handshake(1) + first[:288]]
    # Channel 1's first byte first, its header last.
    times = [(0.01, 0.02), (0.0, COLLIDING_HEADER_AT)]
    write_recording(directory, streams, times, ChannelEnd.OPEN)
    return streams


def test_a_replay_keeps_the_recorded_order_of_first_and_last_bytes(tmp_path: Path) -> None:
    """All at once, channel 1 (connected first) would send its header at once, before
    channel 0's idx 0: then legal, its payload never comes, and the migration hangs."""
    streams = colliding_recording(tmp_path / "rec")
    peer = Peer(2, sum(map(len, streams)), answer=True)
    try:
        replay = Replay(Recording.load(tmp_path / "rec"))
        assert [c.id for c in replay.channels] == [1, 0]
        assert replay.run(Address.parse(peer.address), connect_timeout=5) is None
    finally:
        peer.close()
    index = peer.by_channel()
    for channel_id, stream in enumerate(streams):
        assert peer.received[index[channel_id]] == stream
    zero, one = peer.reads[index[0]], peer.reads[index[1]]
    header_zero = next(when for when, size in zero if size >= 64 + 288)
    first_one, last_one = one[0][0], one[-1][0]
    assert [size for _, size in one[-2:]] == [len(streams[1]) - 1, len(streams[1])], (
        "channel 1's last byte did not come apart from the rest"
    )
    assert header_zero < last_one, "channel 0's idx 0 came after channel 1's header"
    assert last_one - first_one >= COLLIDING_HEADER_AT - 0.01, (
        "channel 1's header came before its moment"
    )


def test_replay_waits_for_the_verdict_no_longer_than_verdict_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    streams = colliding_recording(tmp_path / "rec")
    peer = Peer(2, sum(map(len, streams)), answer=False)  # reads all, answers nothing
    try:
        started = time.monotonic()
        code, lines = replay_main(
            capsys, tmp_path / "rec", peer.address, "--verdict-timeout", "0.3"
        )
        took = time.monotonic() - started
    finally:
        peer.close()
    assert (code, lines[-1]) == (
        3,
        f"vfio-multifd: error: {peer.address}: the daemon gave no verdict within 0.3 s "
        "(--verdict-timeout) after the last byte was sent: the replay reset its channels "
        "(the daemon's log says what it was waiting for)",
    )
    assert 0.3 + COLLIDING_HEADER_AT <= took < 5, took
    assert sorted(bytes(data) for data in peer.received) == sorted(streams)
    assert peer.ended == ["reset", "reset"]


async def test_a_recorded_failure_replays_into_the_same_error_each_time(tmp_path: Path) -> None:
    colliding_recording(tmp_path / "rec")
    recording = Recording.load(tmp_path / "rec")
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        out.mkdir()
        running = await start(settings(out, A, progress_timeout=5.0))
        replay = Replay(recording)
        address = Address.parse(running.address)
        error = await asyncio.to_thread(replay.run, address, connect_timeout=5)
        with pytest.raises(ProtocolError) as failed:
            await running.result()
        assert str(failed.value) == f"channel 1: device {IDSTR}: state buffer 0 already filled"
        assert error is not None and error.reason is Reason.CHANNEL_RESET
