"""Promises of README.md and docs/ that no other test would notice breaking: a test (at least) each.

Most run the command line as a user does (``cli_helpers``: real processes,
under each ``--event-loop``); the fsync and ``--inject`` cases run a session
in-process, where a spy can see each call or the session's own error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import qemu_source as qs
from cli_helpers import TRACEBACK, Daemon, partial_stream, run, usage_error, wait_for
from helpers import (
    IDSTR,
    IDSTR_B,
    assert_outputs,
    connect,
    final_files,
    json_stream,
    random_bytes,
    send_json,
    settings,
    start,
)

from vfio_multifd import (
    Address,
    DeviceKey,
    HandshakeError,
    MultifdError,
    Reason,
)
from vfio_multifd.errors import SendError
from vfio_multifd.ops.status_client import query
from vfio_multifd.source.faults import FAULTS
from vfio_multifd.source.plan import SourceDevice
from vfio_multifd.source.sender import send

A = DeviceKey(IDSTR, 0)
B = DeviceKey(IDSTR_B, 0)
MiB = 1 << 20


def events_named(daemon: Daemon, name: str) -> list[dict[str, object]]:
    return [event for event in daemon.events() if event["event"] == name]


def last_line(text: str) -> str:
    return text.splitlines()[-1]


# -- exit 2: an unusable path, with nothing else wrong on the command line -----------


def receive_exits_2(*options: str) -> str:
    """``receive`` with exactly ``options`` (all valid but one path): exit 2, one line."""
    return usage_error(["receive", "--listen", "tcp:127.0.0.1:0", "--log-format", "json", *options])


@pytest.mark.parametrize(
    ("device", "message"),
    [
        (
            "idstr=a,data={tmp}/missing/a.bin",
            "device a: cannot open data file {tmp}/missing/a.bin: "
            "No such file or directory (ENOENT, errno 2)",
        ),
        (
            "idstr=a,data={tmp}/a-directory",
            "device a: cannot open data file {tmp}/a-directory: not a regular file (EISDIR, errno 21)",
        ),
        (
            "idstr=a,data={tmp}/a.bin,config={tmp}/missing/a.cfg",
            "device a: cannot open config file {tmp}/missing/a.cfg: "
            "No such file or directory (ENOENT, errno 2)",
        ),
    ],
    ids=["data in a missing directory", "data is a directory", "config in a missing directory"],
)
def test_an_unusable_output_path_exits_2(
    tmp_path: Path, cli_loop: str, device: str, message: str
) -> None:
    (tmp_path / "a-directory").mkdir()
    line = receive_exits_2("--device", device.format(tmp=tmp_path))
    assert line == "vfio-multifd: error: " + message.format(tmp=tmp_path)
    assert os.listdir(tmp_path) == ["a-directory"], "no temporary file is left behind"


@pytest.mark.parametrize("spill_dir", ["missing", "a-file"])
def test_an_unusable_spill_dir_exits_2(tmp_path: Path, cli_loop: str, spill_dir: str) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    line = receive_exits_2(
        "--device", f"idstr=a,data={tmp_path / 'a.bin'}", "--spill-dir", str(tmp_path / spill_dir)
    )
    assert line == (
        f"vfio-multifd: error: cannot spill to {tmp_path / spill_dir}: "
        "not a writable directory (--spill-dir)"
    )
    assert sorted(os.listdir(tmp_path)) == ["a-file"], "the outputs opened first are removed"


@pytest.mark.parametrize("kind", ["regular file", "directory", "fifo"])
def test_a_non_socket_file_at_the_unix_listen_path_exits_2(
    tmp_path: Path, cli_loop: str, kind: str
) -> None:
    path = tmp_path / "mig.sock"
    if kind == "regular file":
        path.write_text("keep me")
    elif kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    line = receive_exits_2(
        "--device", f"idstr=a,data={tmp_path / 'a.bin'}", "--listen", f"unix:{path}"
    )
    assert line == (
        f"vfio-multifd: error: cannot listen on unix:{path}: the path exists and is not a socket"
    )
    if kind == "regular file":
        assert path.read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["mig.sock"]


# -- fsync: data and config before any rename, the directory after -------------------


class FsyncSpy:
    """Records ``os.fsync`` (by the path of the descriptor) and ``os.replace`` in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str, str]] = []  # (what, path, final path for replace)
        real_fsync, real_replace = os.fsync, os.replace
        lock = threading.Lock()

        def fsync(fd: int) -> None:
            with lock:
                self.calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))
            real_fsync(fd)

        def replace(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
            with lock:
                self.calls.append(("replace", os.fspath(source), os.fspath(target)))
            real_replace(source, target)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
async def test_outputs_are_fsynced_before_any_rename_and_directories_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/receiving.md: "the files are fsynced, every final path is checked, and all are renamed
    into place" (and the rename made durable). Two devices in two directories."""
    spy = FsyncSpy(monkeypatch)
    config = settings(tmp_path, A, B, channels=2, fsync=True)
    dirs = [tmp_path / "one", tmp_path / "two"]
    for directory in dirs:
        directory.mkdir()
    from vfio_multifd import DeviceSpec

    config = type(config)(
        **{
            **{f: getattr(config, f) for f in config.__dataclass_fields__},
            "devices": tuple(
                DeviceSpec(key, directory / "data.bin", directory / "data.cfg")
                for key, directory in zip((A, B), dirs, strict=True)
            ),
        }
    )
    data = [random_bytes(70000, 1), random_bytes(30000, 2)]
    running = await start(config)
    await asyncio.to_thread(
        qs.send_streams,
        running.address,
        qs.build_streams(
            [(IDSTR, 0, data[0], b"c1"), (IDSTR_B, 0, data[1], b"c2")], 2, chunk_size=16384
        ),
    )
    await running.result()
    assert_outputs(config, [(data[0], qs.config_blob(b"c1")), (data[1], qs.config_blob(b"c2"))])

    replaces = {target: n for n, (what, _, target) in enumerate(spy.calls) if what == "replace"}
    finals = [str(p) for spec in config.devices for p in (spec.data_path, spec.config_path)]
    assert sorted(replaces) == sorted(finals), spy.calls
    first_rename = min(replaces.values())
    for final in finals:
        # The temporary file renamed to ``final`` was fsynced, before any rename.
        source = next(src for what, src, target in spy.calls if target == final)
        synced = [
            n for n, (what, path, _) in enumerate(spy.calls) if (what, path) == ("fsync", source)
        ]
        assert synced and max(synced) < first_rename, (final, spy.calls)
    last_rename = max(replaces.values())
    for directory in dirs:
        synced = [n for n, call in enumerate(spy.calls) if call[:2] == ("fsync", str(directory))]
        assert synced and min(synced) > last_rename, (directory, spy.calls)


async def test_no_fsync_means_no_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = FsyncSpy(monkeypatch)
    config = settings(tmp_path, A, channels=1, fsync=False)
    data = random_bytes(10000, 3)
    running = await start(config)
    await asyncio.to_thread(
        qs.send_streams, running.address, qs.build_streams([(IDSTR, 0, data, b"n")], 1)
    )
    await running.result()
    assert_outputs(config, [(data, qs.config_blob(b"n"))])
    assert [call for call in spy.calls if call[0] == "fsync"] == []
    assert len([call for call in spy.calls if call[0] == "replace"]) == 2


def test_fsync_is_on_by_default_and_off_with_no_fsync(tmp_path: Path) -> None:
    from vfio_multifd.cli import build_parser, receive_settings

    base = ["receive", "--device", f"idstr=a,data={tmp_path / 'a.bin'}"]
    assert receive_settings(build_parser().parse_args(base)).fsync is True
    assert receive_settings(build_parser().parse_args([*base, "--no-fsync"])).fsync is False


# -- FIFOs: written directly; a stalled reader is abandoned and the process exits ------


class FifoReader:
    """Opens a FIFO for reading on a thread; reads it to EOF unless ``stall``."""

    def __init__(self, path: Path, *, stall: bool = False) -> None:
        self.path = path
        self.data = b""
        self.opened = threading.Event()
        self.release = threading.Event()
        self._stall = stall
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with open(self.path, "rb", buffering=0) as fifo:
            self.opened.set()
            if self._stall:
                self.release.wait(60)
                return
            chunks = []
            while chunk := fifo.read(1 << 16):
                chunks.append(chunk)
            self.data = b"".join(chunks)

    def join(self) -> bytes:
        self.release.set()
        self._thread.join(30)
        assert not self._thread.is_alive()
        return self.data


def test_fifo_outputs_end_to_end(tmp_path: Path, daemons: list[Daemon]) -> None:
    data_fifo, config_fifo = tmp_path / "data.fifo", tmp_path / "config.fifo"
    os.mkfifo(data_fifo)
    os.mkfifo(config_fifo)
    readers = [FifoReader(data_fifo), FifoReader(config_fifo)]
    daemon = Daemon(
        tmp_path,
        "--channels",
        "2",
        "--device",
        f"idstr={IDSTR},data={data_fifo},config={config_fifo}",
    )
    daemons.append(daemon)
    data = random_bytes(3 * MiB + 5, 4)
    qs.send_streams(
        daemon.address, qs.build_streams([(IDSTR, 0, data, b"fifo")], 2, "random", 2, 65536)
    )
    code, summary, stderr = daemon.finish()
    assert code == 0, stderr
    assert readers[0].join() == data
    assert readers[1].join() == qs.config_blob(b"fifo")
    assert f"-> {data_fifo}" in summary
    assert sorted(os.listdir(tmp_path)) == ["config.fifo", "daemon.stderr", "data.fifo"]


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["SIGTERM", "progress-timeout"])
def test_a_stalled_fifo_reader_is_abandoned_and_the_process_exits(
    tmp_path: Path, short_dir: Path, daemons: list[Daemon], ending: str
) -> None:
    """The reader opens the FIFO and never reads: the writer blocks for good once the
    pipe is full. The migration fails (a signal, or no progress); the daemon abandons
    the write, removes its temporary files and the process exits all the same."""
    data_fifo = tmp_path / "data.fifo"
    os.mkfifo(data_fifo)
    reader = FifoReader(data_fifo, stall=True)
    status = short_dir / "status.sock"
    daemon = Daemon(
        tmp_path,
        "--channels",
        "1",
        "--status-socket",
        str(status),
        "--progress-timeout",
        "1" if ending == "progress-timeout" else "0",
        "--device",
        f"idstr={IDSTR},data={data_fifo},config={tmp_path / 'a.cfg'}",
    )
    daemons.append(daemon)
    data = random_bytes(2 * MiB, 5)
    stream = qs.build_streams([(IDSTR, 0, data, b"x")], 1, chunk_size=256 * 1024)[0]
    try:
        with connect(daemon.address) as sock:
            sock.sendall(stream)  # all of it fits under the default bound
            # Everything arrived and nothing could be written: the writer is stuck.
            wait_for(
                lambda: query(str(status))["return"]["transferred"] == len(stream),
                what="the whole stream to arrive",
            )
            assert query(str(status))["return"]["devices"][0]["bytes-written"] == 0
            if ending == "SIGTERM":
                daemon.proc.send_signal(signal.SIGTERM)
            code, summary, stderr = daemon.finish(timeout=20)  # the socket is still open
    finally:
        reader.join()
    assert (code, summary) == ((143, "") if ending == "SIGTERM" else (1, "")), stderr
    assert last_line(stderr) == (
        "vfio-multifd: cancelled by SIGTERM"
        if ending == "SIGTERM"
        else f"vfio-multifd: error: no progress for 1 s ({len(stream)} bytes received; "
        f"waiting for device {IDSTR} to write what it received)"
    )
    assert [e["device"] for e in events_named(daemon, "writer_abandoned")] == [IDSTR]
    assert TRACEBACK not in stderr
    assert sorted(os.listdir(tmp_path)) == ["daemon.stderr", "data.fifo"]


# -- options that must take effect: --max-packet-size, --on-queue-full, --max-queued-bytes --


@pytest.mark.parametrize("size", [5000, 5001])
def test_max_packet_size_on_the_command_line(
    tmp_path: Path, daemons: list[Daemon], size: int
) -> None:
    """5001 bytes pass the default (4M) but not --max-packet-size 5000; 5000 passes."""
    daemon = Daemon(
        tmp_path,
        "--channels",
        "1",
        "--max-packet-size",
        "5000",
        "--device",
        f"idstr={IDSTR},data={tmp_path / 'a.bin'}",
    )
    daemons.append(daemon)
    chunk = random_bytes(size - 12, 6)
    stream = qs.handshake(0) + qs.device_packet(IDSTR, 0, 0, chunk)
    stream += qs.device_packet(IDSTR, 0, 1, qs.config_blob(b"m"), config=True)
    with contextlib.suppress(OSError):
        qs.send_streams(daemon.address, [stream])
    code, _, stderr = daemon.finish()
    if size == 5000:
        assert code == 0, stderr
        assert (tmp_path / "a.bin").read_bytes() == chunk
    else:
        assert code == 1, stderr
        assert last_line(stderr) == (
            f"vfio-multifd: error: channel 0: device {IDSTR}: next_packet_size 5001 is over "
            "--max-packet-size 5000 (QEMU's largest is 1048588: a 1 MiB chunk and its VFIO "
            "header; for a source that sends larger ones, raise --max-packet-size)"
        )
        assert not (tmp_path / "a.bin").exists()


CHUNK = 16384
#: A bound that holds a few 16 KiB chunks: reverse order must spill, or fail.
SMALL_BOUND = ["--max-packet-size", str(CHUNK + 12), "--max-queued-bytes", "96K"]


def reverse_stream(data: bytes, channels: int = 2) -> list[bytes]:
    return qs.build_streams([(IDSTR, 0, data, b"q")], channels, "reverse", chunk_size=CHUNK)


def summary_figures(summary: str) -> dict[str, int]:
    match = re.search(r"peak queued (\d+) bytes, spilled (\d+) bytes", summary)
    assert match, summary
    return {"peak": int(match.group(1)), "spilled": int(match.group(2))}


@pytest.mark.parametrize("policy", ["spill", "fail"])
def test_on_queue_full_on_the_command_line(
    tmp_path: Path, daemons: list[Daemon], policy: str
) -> None:
    daemon = Daemon(
        tmp_path,
        *SMALL_BOUND,
        "--on-queue-full",
        policy,
        "--device",
        f"idstr={IDSTR},data={tmp_path / 'a.bin'}",
    )
    daemons.append(daemon)
    data = random_bytes(64 * CHUNK, 7)
    with contextlib.suppress(OSError):
        qs.send_streams(daemon.address, reverse_stream(data))
    code, summary, stderr = daemon.finish()
    if policy == "spill":
        assert code == 0, stderr
        assert (tmp_path / "a.bin").read_bytes() == data
        figures = summary_figures(summary)
        assert figures["spilled"] > 0 and figures["peak"] <= 96 * 1024
    else:
        assert code == 1, stderr
        line = last_line(stderr)
        assert re.fullmatch(
            rf"vfio-multifd: error: channel [01]: device {re.escape(IDSTR)}: queueing state "
            rf"buffer \d+ \(16384 bytes\) would hold \d+ bytes, over the bound of \d+ "
            r"\(--max-queued-bytes\)",
            line,
        ), line
        assert events_named(daemon, "migration_failed")[0]["reason"] == "queue-full"
        assert not (tmp_path / "a.bin").exists()


def test_max_queued_bytes_zero_is_no_bound(tmp_path: Path, daemons: list[Daemon]) -> None:
    """With a bound, 40 MiB packets need 80 MiB of it (startup refuses the default 64M);
    with 0 nothing is checked, nothing spills, and every early chunk is held."""
    refused = usage_error(
        ["receive", "--max-packet-size", "40M", "--device", f"idstr={IDSTR},data={tmp_path / 'a.bin'}"]
    )
    assert "the smallest bound that works is" in refused
    daemon = Daemon(
        tmp_path,
        "--channels",
        "1",
        "--max-packet-size",
        "40M",
        "--max-queued-bytes",
        "0",
        "--device",
        f"idstr={IDSTR},data={tmp_path / 'a.bin'}",
    )
    daemons.append(daemon)
    data = random_bytes(64 * CHUNK, 8)
    qs.send_streams(daemon.address, reverse_stream(data, channels=1))
    code, summary, stderr = daemon.finish()
    assert code == 0, stderr
    assert (tmp_path / "a.bin").read_bytes() == data
    figures = summary_figures(summary)
    assert figures["spilled"] == 0
    assert figures["peak"] >= len(data), "chunk 0 came last: every chunk was held at once"


# -- what the daemon prints and tells systemd ---------------------------------------


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_enospc_is_the_readme_line(tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = Daemon(
        tmp_path, "--device", f"idstr={IDSTR},data=/dev/full,config={tmp_path / 'a.cfg'}"
    )
    daemons.append(daemon)
    with contextlib.suppress(OSError):
        qs.send_streams(
            daemon.address, qs.build_streams([(IDSTR, 0, random_bytes(99999, 9), b"f")], 2)
        )
    code, _, stderr = daemon.finish()
    assert code == 1, stderr
    assert last_line(stderr) == (
        f"vfio-multifd: error: device {IDSTR}: cannot write data file /dev/full: "
        "No space left on device (ENOSPC, errno 28)"
    )
    assert events_named(daemon, "migration_failed")[0]["reason"] == "device-write"
    assert sorted(os.listdir(tmp_path)) == ["daemon.stderr"]


@pytest.fixture
def notify_socket(short_dir: Path) -> Iterator[socket.socket]:
    """A stand-in for systemd's notify socket (a datagram socket that reads)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(short_dir / "notify"))
        listener.settimeout(0.1)
        yield listener


def test_status_lines_under_systemd(
    tmp_path: Path, notify_socket: socket.socket, daemons: list[Daemon]
) -> None:
    daemon = Daemon(
        tmp_path,
        "--progress-interval",
        "0.05",
        "--device",
        f"idstr={IDSTR},data={tmp_path / 'a.bin'}",
        env={**os.environ, "NOTIFY_SOCKET": notify_socket.getsockname()},
    )
    daemons.append(daemon)
    messages: list[str] = []

    def receive_until(done: object) -> None:
        assert callable(done)
        deadline = time.monotonic() + 20
        while not done():
            assert time.monotonic() < deadline, messages
            with contextlib.suppress(TimeoutError):
                messages.append(notify_socket.recv(4096).decode())

    receive_until(lambda: messages)
    assert messages[0] == f"READY=1\nSTATUS=waiting for 2 channel(s) on {daemon.address}"
    socks = partial_stream(daemon.address, channels=2, chunks=3, chunk_size=MiB)
    received = 2 * 64 + 3 * (288 + MiB)  # 3.1 MB: "3 MB received"
    try:
        # Once everything has arrived and nothing more comes, the rate reads 0.0.
        receive_until(lambda: messages[-1] == "STATUS=active: 3 MB received, 0.0 MB/s")
        daemon.proc.send_signal(signal.SIGTERM)
        code, _, _ = daemon.finish()
    finally:
        for sock in socks:
            sock.close()
    assert code == 143
    # The "3 MB" waited for is the daemon's own count: every byte sent, in MB.
    progress = [e for e in daemon.events() if e["event"] == "migration_progress"]
    assert progress and progress[-1]["bytes"] == received, progress[-1:]
    assert messages[-1] == f"STATUS=active: {received / 1e6:.0f} MB received, 0.0 MB/s"
    status = messages[1:]
    for message in status:
        assert re.fullmatch(r"STATUS=active: \d+ MB received, \d+\.\d MB/s", message), message
    megabytes = [int(message.split()[1]) for message in status]
    assert megabytes == sorted(megabytes), "what was received only grows"


# -- digests and uuids end to end -------------------------------------------------------


def send_to(daemon: Daemon, *options: str) -> subprocess.CompletedProcess[str]:
    """``vfio-multifd send`` to ``daemon`` in 64 KiB chunks, which must succeed."""
    sent = run(["send", "--connect", daemon.address, "--chunk-size", "64K", *options])
    assert sent.returncode == 0, sent.stderr
    return sent


def test_digest_sha256_end_to_end(tmp_path: Path, daemons: list[Daemon]) -> None:
    data = random_bytes(5 * 65536 + 3, 10)
    source = tmp_path / "src.bin"
    source.write_bytes(data)
    daemon = Daemon(
        tmp_path, "--digest", "sha256", "--device", f"idstr={IDSTR},data={tmp_path / 'a.bin'}"
    )
    daemons.append(daemon)
    sent = send_to(
        daemon,
        "--digest",
        "sha256",
        "--order",
        "reverse",
        "--device",
        f"idstr={IDSTR},source={source}",
    )
    code, summary, stderr = daemon.finish()
    assert code == 0, stderr
    assert (tmp_path / "a.bin").read_bytes() == data
    expected = "sha256:" + hashlib.sha256(data).hexdigest()
    assert f"{expected} -> {tmp_path / 'a.bin'}" in summary
    assert f"device {IDSTR}: {len(data)} bytes in 6 chunks, {expected}" in sent.stdout.splitlines()


def test_a_non_zero_uuid_end_to_end(tmp_path: Path, daemons: list[Daemon]) -> None:
    uuid = "8c0b2f2e-5d4a-4b8e-9a77-0123456789ab"
    daemon = Daemon(
        tmp_path, "--uuid", uuid, "--device", f"idstr={IDSTR},data={tmp_path / 'a.bin'}"
    )
    daemons.append(daemon)
    # A channel of another VM (the all-zero uuid) is refused; the migration goes on.
    with connect(daemon.address) as stray:
        stray.sendall(qs.handshake(0))
        stray.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            assert stray.recv(10) == b""
    wait_for(lambda: events_named(daemon, "channel_refused"), what="the refusal")
    [refusal] = events_named(daemon, "channel_refused")
    assert refusal["reason"] == "handshake-uuid"
    assert str(refusal["error"]).endswith(f"differs from the expected {uuid.replace('-', '')}")
    send_to(daemon, "--uuid", uuid, "--device", f"idstr={IDSTR},size=300K,seed=3")
    code, _, stderr = daemon.finish()
    assert code == 0, stderr
    from vfio_multifd.source.plan import DeviceState

    state = DeviceState(SourceDevice(A, size=300 * 1024, seed=3), 65536)
    expected = b"".join(bytes(state.chunk(idx)) for idx in range(state.chunks))
    assert (tmp_path / "a.bin").read_bytes() == expected
    assert [e["channel"] for e in events_named(daemon, "channel_accepted")] in ([0, 1], [1, 0])


# -- every fault ``vfio-multifd send --inject`` puts in, and the error it shows -------

#: Fault -> the reason it shows: a refused connection (handshake faults; the
#: migration goes on), or the error the migration fails with.
FAULT_REASONS = {
    "handshake-magic": Reason.HANDSHAKE_MAGIC,
    "handshake-version": Reason.HANDSHAKE_VERSION,
    "handshake-uuid": Reason.HANDSHAKE_UUID,
    "handshake-id": Reason.HANDSHAKE_CHANNEL_ID,
    "main-channel": Reason.HANDSHAKE_MAIN_CHANNEL,
    "bad-magic": Reason.PACKET_MAGIC,
    "bad-version": Reason.PACKET_VERSION,
    "ram": Reason.PACKET_RAM,
    "sync": Reason.PACKET_SYNC,
    "idstr-unterminated": Reason.PACKET_IDSTR,
    "zero-size": Reason.PACKET_SIZE,
    "oversize": Reason.PACKET_SIZE,
    "short-vfio": Reason.VFIO_SHORT,
    "vfio-version": Reason.VFIO_VERSION,
    "invalid-idx": Reason.VFIO_INVALID_IDX,
    "duplicate": Reason.VFIO_ALREADY_FILLED,
    "unknown-device": Reason.UNKNOWN_DEVICE,
    "after-config": Reason.VFIO_AFTER_CONFIG,
    "second-config": Reason.VFIO_SECOND_CONFIG,
    "bad-config": Reason.VFIO_CONFIG_BLOB,
    "missing": Reason.INCOMPLETE,
    "truncate": Reason.PACKET_TRUNCATED,
}


def test_every_fault_has_its_reason() -> None:
    assert set(FAULT_REASONS) == set(FAULTS)


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_each_inject_fault_shows_its_error(tmp_path: Path, fault: str) -> None:
    config = settings(tmp_path, A, B, channels=2)
    running = await start(config)
    devices = [SourceDevice(A, size=256 * 1024, seed=1), SourceDevice(B, size=100_000, seed=2)]

    def sender() -> None:
        # The daemon resets the channels of a failed migration: the sender says so.
        with contextlib.suppress(OSError, SendError):
            send(
                Address.parse(running.address),
                devices,
                channels=2,
                chunk_size=65536,
                inject=fault,
                connect_timeout=10,
            )

    sending = asyncio.create_task(asyncio.to_thread(sender))
    reason = FAULT_REASONS[fault]
    try:
        if fault.startswith("handshake") or fault == "main-channel":
            # Refused: only that connection; the migration keeps waiting for channel 0.
            connections = running.session.core.connections
            for _ in range(1000):
                if connections.refused:
                    break
                await asyncio.sleep(0.01)
            [(_, refusal)] = connections.refused
            assert isinstance(refusal, HandshakeError) and refusal.reason is reason, refusal
            # The source, reset on its refused channel, resets its others (issue 16): the
            # migration may have failed already; if not, it is waiting, and is cancelled.
            running.session.cancel("the test has seen the refusal")
            with pytest.raises(MultifdError):
                await running.result()
        else:
            with pytest.raises(MultifdError) as caught:
                await running.result()
            error = caught.value
            assert error.reason is reason, str(error)
            if reason is Reason.INCOMPLETE:  # docs/receiving.md: "vfio-multifd: error: " + this
                assert str(error) == (
                    f"all 2 channels closed with 1 device(s) incomplete: device {IDSTR}: "
                    "missing 1 of 4 chunks (idx 0: about 65536 bytes at 65536 bytes a chunk)"
                )
            elif fault in ("after-config", "second-config"):
                # Either packet may come second: the channel that brought it is named.
                assert error.channel in (0, 1), str(error)
            elif reason is not Reason.VFIO_CONFIG_BLOB:  # found by the loader, not a channel
                assert error.channel == 0, str(error)
    finally:
        await asyncio.wait_for(sending, 30)
    assert final_files(tmp_path) == []


def test_the_fault_after_config_is_seen_before_the_device_can_complete() -> None:
    """It used to be sent last on channel 0: a device whose other packets were all in
    could complete first, and the migration succeed (exit 0) with the fault unseen."""
    from vfio_multifd.source.faults import plan_fault as _plan_fault
    from vfio_multifd.source.plan import DeviceState, plan

    states = [DeviceState(SourceDevice(A, size=65536), 65536)]
    try:
        per_channel = plan(states, 2, "round-robin", 0)
        for fault in ("after-config", "second-config"):
            channel0 = _plan_fault(fault, states, per_channel)[0]
            assert channel0[0] == (0, states[0].chunks + 1)
            assert len(channel0) > 1, "a packet the device needs follows it"
    finally:
        states[0].close()


# -- smaller promises: where spills go; `vfio-multifd status` against QEMU's own QMP --------


def test_spills_go_beside_the_first_data_file_unless_spill_dir(tmp_path: Path) -> None:
    from vfio_multifd import DeviceSpec, ReceiveSettings
    from vfio_multifd.daemon.spill import spill_directory

    first, second = tmp_path / "one", tmp_path / "two"
    devices = (
        DeviceSpec(A, first / "a.bin", first / "a.cfg"),
        DeviceSpec(B, second / "b.bin", second / "b.cfg"),
    )
    assert spill_directory(ReceiveSettings(devices=devices)) == first
    chosen = ReceiveSettings(devices=devices, spill_dir=second)
    assert spill_directory(chosen) == second
    # /dev/null's directory is no place for a file: the temporary directory instead.
    null = (DeviceSpec(A, Path("/dev/null"), Path("/dev/null")),)
    assert spill_directory(ReceiveSettings(devices=null)) == Path(tempfile.gettempdir())


def test_status_command_against_a_qemu_style_qmp_socket(short_dir: Path) -> None:
    """QEMU's monitor wants qmp_capabilities first, may interleave events, and puts
    the transferred bytes under "ram"."""
    path = short_dir / "qmp.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(20)
    asked: list[str] = []

    def qemu() -> None:
        connection, _ = listener.accept()
        connection.settimeout(20)
        with connection:
            version = {"qemu": {"major": 10, "minor": 1, "micro": 0}, "package": ""}
            send_json(connection, {"QMP": {"version": version, "capabilities": []}})
            ready = False
            # Like QEMU's parser: JSON objects in a stream, no newline needed between them.
            for request in json_stream(connection):
                command = request["execute"]
                asked.append(command)
                reply: dict[str, object]
                if command == "qmp_capabilities":
                    ready = True
                    reply = {"return": {}}
                elif not ready:
                    reply = {"error": {"class": "CommandNotFound", "desc": "first"}}
                else:
                    send_json(connection, {"event": "MIGRATION", "data": {"status": "active"}})
                    info = {
                        "status": "active",
                        "total-time": 1234,
                        "ram": {"transferred": 5000, "mbps": 12.5},
                    }
                    reply = {"return": info}
                if "id" in request:  # as QEMU does: a client matches replies by id
                    reply["id"] = request["id"]
                send_json(connection, reply)

    server = threading.Thread(target=qemu, daemon=True)
    server.start()
    try:
        result = run(["status", "--socket", str(path)], timeout=20)
    finally:
        server.join(20)
        listener.close()
    assert result.returncode == 0, result.stderr
    assert asked == ["qmp_capabilities", "query-migrate"]
    assert result.stdout.splitlines()[0] == (
        "status: active   total-time: 1234 ms   transferred: 5000 bytes   mbps: 12.5 (megabits/s)"
    )
