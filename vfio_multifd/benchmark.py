"""Receive throughput: the daemon against plain blocking Python, same streams, same sink.

``python -m vfio_multifd.benchmark`` (``make bench``). For every combination
of channel count, device count and sink it runs, alternately and several
times over:

(a) **baseline**: a process of plain blocking Python, one thread per channel
    doing ``recv_into`` into a reused 1 MiB buffer and ``os.write`` to the sink;
(b) **daemon**: ``vfio-multifd receive`` as a subprocess (digests on).

Both are fed the same pre-built QEMU-format streams by a replay sender in this
process that does nothing but ``sendmsg`` of pre-encoded headers and payload
views (one thread and one blocking socket per channel), so the sender costs
the same in (a) and (b). Payloads are views into one random 2 MiB block at
varying offsets: cheap to send, yet every chunk differs, so the daemon's
digest checks the order it wrote them in.

Measured per run: MB/s (data bytes / first byte sent -> receiver done),
the receiver's CPU (user + sys of the whole process, from ``wait4``) per GB,
its peak RSS (``ru_maxrss``) and the completion lag (the replay sender's last
``sendmsg`` returned -> the daemon's last ``load_thread_end`` log line, both
wall-clock). Start-up CPU is measured separately (start, wait until listening,
SIGTERM) and subtracted. The result is a report; nothing here asserts a time.

The baseline receiver (``--baseline-receiver``) runs this very file as a
script, so it imports the standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, NamedTuple

CHUNK = 1 << 20
#: Packets per ``sendmsg`` call of the replay sender (2 buffers each).
SEND_BATCH_PACKETS = 16
#: How long one run may take before its receiver is killed.
RUN_TIMEOUT = 300.0
IDLE_REPS = 3

Buffer = bytes | memoryview

# --- targets (from the issue) ------------------------------------------------------------

TARGET_RATIO = 1.0  # daemon / baseline at 4 channels
TARGET_CPU_PER_GB = 0.5  # daemon receive CPU seconds per GB
TARGET_LAG_MS = 50.0  # median completion lag
FLAT_TOLERANCE = 0.10  # "flat": the slowest is within 10 % of the fastest


def idstr_of(n: int) -> str:
    return f"0000:00:{n + 2:02x}.0/vfio"


# --- the workload: pre-built streams -------------------------------------------------------


@dataclass
class Workload:
    """Every channel's complete stream, pre-encoded, as batches of buffers for ``sendmsg``."""

    channels: int
    devices: int
    size: int  # data bytes over all devices
    device_sizes: list[int]
    chunk: int
    block: bytes  # 2 * chunk random bytes; every payload is a view into it
    streams: list[list[list[Buffer]]]  # channel -> batches -> buffers
    channel_bytes: list[int]
    config_blobs: list[bytes]

    def chunk_view(self, device: int, idx: int) -> memoryview:
        """The data of device ``device``'s chunk ``idx`` (not the config packet)."""
        offset = ((idx * 40503 + device * 7919 + 1) * 64) % self.chunk
        size = min(self.chunk, self.device_sizes[device] - idx * self.chunk)
        return memoryview(self.block)[offset : offset + size]

    def chunks_of(self, device: int) -> int:
        return -(-self.device_sizes[device] // self.chunk)

    def expected_digests(self) -> list[str]:
        import xxhash

        digests = []
        for d in range(self.devices):
            hasher = xxhash.xxh3_128()
            for idx in range(self.chunks_of(d)):
                hasher.update(self.chunk_view(d, idx))
            digests.append(f"xxh3-128:{hasher.hexdigest()}")
        return digests

    def stream_bytes(self, channel: int) -> bytes:
        """One channel's stream as one bytes object (for tests; the sender never joins)."""
        return b"".join(bytes(b) for batch in self.streams[channel] for b in batch)


def build_workload(
    *, channels: int, devices: int, size: int, chunk: int = CHUNK, seed: int = 1
) -> Workload:
    """Handshakes, then each device's packets (idx 0..n, the last one the config state),
    devices interleaved one packet each, dealt to the channels round-robin: the order
    of ``vfio_multifd.sender`` and of QEMU's source."""
    from .wire import ChannelHandshake, DeviceKey, encode_config_blob, encode_packet_prefix

    if channels < 1 or devices < 1 or size < devices:
        raise ValueError("need at least one channel, one device and one byte per device")
    rng = random.Random(seed)
    block = rng.randbytes(2 * chunk)
    base, extra = divmod(size, devices)
    device_sizes = [base + (1 if d < extra else 0) for d in range(devices)]
    config_blobs = [encode_config_blob(rng.randbytes(256)) for _ in range(devices)]
    workload = Workload(
        channels=channels,
        devices=devices,
        size=size,
        device_sizes=device_sizes,
        chunk=chunk,
        block=block,
        streams=[],
        channel_bytes=[],
        config_blobs=config_blobs,
    )
    keys = [DeviceKey(idstr_of(d)) for d in range(devices)]
    # (device, idx) in send order
    longest = max(workload.chunks_of(d) + 1 for d in range(devices))
    order = [
        (d, idx) for idx in range(longest) for d in range(devices) if idx <= workload.chunks_of(d)
    ]
    per_channel: list[list[Buffer]] = [[ChannelHandshake(c).encode()] for c in range(channels)]
    for n, (d, idx) in enumerate(order):
        config = idx == workload.chunks_of(d)
        data: Buffer = config_blobs[d] if config else workload.chunk_view(d, idx)
        buffers = per_channel[n % channels]
        buffers.append(encode_packet_prefix(keys[d], idx, len(data), config))
        buffers.append(data)
    step = 2 * SEND_BATCH_PACKETS
    for buffers in per_channel:
        workload.streams.append([buffers[i : i + step] for i in range(0, len(buffers), step)])
        workload.channel_bytes.append(sum(len(b) for b in buffers))
    return workload


# --- the replay sender -------------------------------------------------------------------


def sendmsg_all(sock: socket.socket, buffers: Sequence[Buffer]) -> None:
    """``sendmsg`` until every byte of ``buffers`` is out (one call, nearly always)."""
    total = sum(len(b) for b in buffers)
    sent = sock.sendmsg(buffers)
    if sent == total:
        return
    views = [memoryview(b) for b in buffers]
    while True:
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if not views:
            return
        if sent:
            views[0] = views[0][sent:]
        sent = sock.sendmsg(views)


@dataclass
class ReplayTimes:
    started: float  # wall clock: every channel connected, sending begins
    sent: float  # the last channel's last sendmsg returned
    closed: float  # every peer closed its side
    errors: list[str] = field(default_factory=list)


def replay(port: int, workload: Workload, *, timeout: float = RUN_TIMEOUT) -> ReplayTimes:
    """Send every channel's stream on its own thread, then wait for the receiver to close."""
    socks = []
    try:
        for _ in range(workload.channels):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.settimeout(None)  # truly blocking: sendmsg sends everything in one call
            socks.append(sock)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    barrier = threading.Barrier(workload.channels + 1)
    sent = [0.0] * workload.channels
    closed = [0.0] * workload.channels
    errors: list[str] = []

    def worker(c: int) -> None:
        sock = socks[c]
        try:
            barrier.wait()
            for batch in workload.streams[c]:
                sendmsg_all(sock, batch)
            sent[c] = time.time()
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(timeout)
            while sock.recv(4096):
                pass
        except OSError as error:
            errors.append(f"channel {c}: {error}")
        finally:
            closed[c] = time.time()
            sock.close()

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(len(socks))]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.time()
    for thread in threads:
        thread.join()
    return ReplayTimes(started, max(sent), max(closed), errors)


# --- running a receiver process ------------------------------------------------------------


@dataclass
class Usage:
    cpu: float  # user + sys seconds, all threads
    maxrss: int  # bytes
    exit_code: int


def _wait4(proc: subprocess.Popen[bytes]) -> Usage:
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Usage(rusage.ru_utime + rusage.ru_stime, rusage.ru_maxrss * 1024, proc.returncode)


class _Watchdog:
    """Kills a process that outlives its deadline, unless disarmed first."""

    def __init__(self, proc: subprocess.Popen[bytes], seconds: float) -> None:
        self._proc = proc
        self._lock = threading.Lock()
        self._armed = True
        self.fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if self._armed:
                self.fired = True
                with contextlib.suppress(OSError):
                    os.kill(self._proc.pid, signal.SIGKILL)

    def disarm(self) -> None:
        with self._lock:
            self._armed = False
        self._timer.cancel()


class _LineReader(threading.Thread):
    """Collects a pipe's lines with their arrival times; ``match`` may signal an event."""

    def __init__(self, pipe: IO[bytes], match: Callable[[str], bool] | None = None) -> None:
        super().__init__(daemon=True)
        self.pipe = pipe
        self.lines: list[tuple[float, str]] = []
        self.match = match
        self.matched = threading.Event()
        self.start()

    def run(self) -> None:
        for raw in iter(self.pipe.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append((time.time(), line))
            if self.match is not None and not self.matched.is_set() and self.match(line):
                self.matched.set()
        self.matched.set()  # EOF: whoever waits must look at the lines
        self.pipe.close()


def _json_lines(reader: _LineReader) -> list[dict[str, Any]]:
    events = []
    for _, line in reader.lines:
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                events.append(event)
    return events


def _timestamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


class _Driven(NamedTuple):
    """What one receiver run left behind, for its caller to judge."""

    stdout: _LineReader
    stderr: _LineReader
    usage: Usage
    times: ReplayTimes | None  # None: the replay never ran to its end
    error: str  # the start-up or replay failure, else the channels' errors
    fired: bool  # the watchdog killed the receiver


def _drive(
    cmd: list[str],
    workload: Workload,
    name: str,
    *,
    ready: Callable[[_LineReader, _LineReader], bool],
    port: Callable[[_LineReader, _LineReader], int],
    stdout_match: Callable[[str], bool] | None = None,
    stderr_match: Callable[[str], bool] | None = None,
) -> _Driven:
    """Start the receiver ``cmd``, wait until ``ready(stdout, stderr)`` says it listens,
    replay ``workload`` to ``port(stdout, stderr)`` and reap it (``wait4``).

    A receiver that does not start, or a replay that fails with ``OSError`` or
    ``RuntimeError``, gets SIGTERM; one that outlives ``RUN_TIMEOUT`` gets SIGKILL."""
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    stdout = _LineReader(proc.stdout, stdout_match)
    stderr = _LineReader(proc.stderr, stderr_match)
    watchdog = _Watchdog(proc, RUN_TIMEOUT)
    times: ReplayTimes | None = None
    error = ""
    try:
        if not ready(stdout, stderr):
            raise RuntimeError(f"the {name} did not start listening within 30 s")
        times = replay(port(stdout, stderr), workload)
    except (OSError, RuntimeError) as exc:
        error = str(exc)
        with contextlib.suppress(OSError):
            os.kill(proc.pid, signal.SIGTERM)
    usage = _wait4(proc)
    watchdog.disarm()
    stdout.join(10)
    stderr.join(10)
    if times is not None and times.errors:
        error = "; ".join(times.errors)
    return _Driven(stdout, stderr, usage, times, error, watchdog.fired)


def daemon_command(workload: Workload, sink: str, out_dir: Path) -> list[str]:
    script = Path(sys.executable).with_name("vfio-multifd")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "vfio_multifd"]
    cmd += [
        "receive",
        "--listen",
        "tcp:127.0.0.1:0",
        "--channels",
        str(workload.channels),
        "--log-format",
        "json",
        "--no-fsync",
        "--digest",
        "xxh3-128",
    ]
    for d in range(workload.devices):
        if sink == "null":
            data, config = "/dev/null", "/dev/null"
        else:
            data, config = str(out_dir / f"dev{d}.bin"), str(out_dir / f"dev{d}.bin.config")
        cmd += ["--device", f"idstr={idstr_of(d)},data={data},config={config}"]
    return cmd


def _is_listening(line: str) -> bool:
    return '"listening"' in line


def _daemon_port(stderr: _LineReader) -> int:
    for event in _json_lines(stderr):
        if event.get("event") == "listening":
            return int(str(event["address"]).rsplit(":", 1)[1])
    raise RuntimeError("the daemon did not log its address")


@dataclass
class RunResult:
    kind: str  # "baseline" or "daemon"
    ok: bool
    mb_per_s: float = 0.0
    seconds: float = 0.0  # first byte sent -> receiver done
    cpu: float = 0.0  # raw user+sys of the receiver process
    cpu_net: float = 0.0  # minus the idle start-up cost
    cpu_per_gb: float = 0.0  # cpu_net per 1e9 data bytes
    maxrss: int = 0
    lag: float = 0.0  # seconds, last byte sent -> receiver done
    error: str = ""
    digests: list[str] = field(default_factory=list)
    digest_ok: bool | None = None
    daemon_mb_per_s: float | None = None  # what the daemon itself reports
    peak_queued_bytes: int | None = None


_DEVICE_LINE = re.compile(
    r"^device (?P<key>.+?): (?P<bytes>\d+) bytes in \d+ chunks, .*?"
    r"(?P<digest>(?:xxh3-128|sha256):[0-9a-f]+) -> "
)


def run_daemon(
    workload: Workload, sink: str, out_dir: Path, idle_cpu: float, expected: list[str]
) -> RunResult:
    stdout, stderr, usage, times, error, fired = _drive(
        daemon_command(workload, sink, out_dir),
        workload,
        "daemon",
        ready=lambda _out, err: err.matched.wait(30),
        port=lambda _out, err: _daemon_port(err),
        stderr_match=_is_listening,
    )
    result = RunResult("daemon", ok=False, cpu=usage.cpu, maxrss=usage.maxrss)
    events = _json_lines(stderr)
    if usage.exit_code != 0 or fired or error or times is None:
        tail = " | ".join(line for _, line in stderr.lines[-3:])
        result.error = error or f"daemon exited with {usage.exit_code}: {tail}"
        return result
    ends = [_timestamp(e) for e in events if e.get("event") == "load_thread_end"]
    if len(ends) != workload.devices:
        result.error = f"{len(ends)} load_thread_end lines for {workload.devices} devices"
        return result
    done = max(ends)
    result.seconds = done - times.started
    result.mb_per_s = workload.size / 1e6 / result.seconds
    result.lag = done - times.sent
    result.cpu_net = max(usage.cpu - idle_cpu, 0.0)
    result.cpu_per_gb = result.cpu_net / (workload.size / 1e9)
    for event in events:
        if event.get("event") == "migration_completed":
            result.daemon_mb_per_s = float(event.get("mb_per_s", 0.0))
            result.peak_queued_bytes = int(event.get("peak_queued_bytes", 0))
    sizes = []
    for _, line in stdout.lines:
        match = _DEVICE_LINE.match(line)
        if match:
            result.digests.append(match["digest"])
            sizes.append(int(match["bytes"]))
    result.digest_ok = result.digests == expected and sizes == workload.device_sizes
    result.ok = True
    if not result.digest_ok:
        result.error = f"digest or size mismatch: got {result.digests} {sizes}, expected {expected}"
    return result


def run_idle_daemon(workload: Workload, sink: str, out_dir: Path) -> Usage:
    """Start-up and shutdown only: start, wait until listening, SIGTERM."""
    return _run_idle(daemon_command(workload, sink, out_dir), "stderr", _is_listening)


def _run_idle(cmd: list[str], stream: str, listening: Callable[[str], bool]) -> Usage:
    """Start a receiver, wait until it listens (a line on ``stream``), SIGTERM it."""
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if stream == "stdout" else subprocess.DEVNULL,
        stderr=subprocess.PIPE if stream == "stderr" else subprocess.DEVNULL,
    )
    pipe = proc.stdout if stream == "stdout" else proc.stderr
    assert pipe is not None
    reader = _LineReader(pipe, listening)
    watchdog = _Watchdog(proc, 60)
    reader.matched.wait(30)
    with contextlib.suppress(OSError):
        os.kill(proc.pid, signal.SIGTERM)
    usage = _wait4(proc)
    watchdog.disarm()
    reader.join(10)
    return usage


def _baseline_command(workload: Workload, sink: str, out_dir: Path) -> list[str]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--baseline-receiver",
        "--channels",
        str(workload.channels),
        "--chunk",
        str(workload.chunk),
    ]
    if sink == "file":
        cmd += ["--sink-dir", str(out_dir)]
    return cmd


def preallocate_baseline_files(workload: Workload, out_dir: Path) -> None:
    for c, size in enumerate(workload.channel_bytes):
        fd = os.open(out_dir / f"ch{c}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)


def run_baseline(
    workload: Workload, sink: str, out_dir: Path, idle_cpu: float, *, prealloc: bool = True
) -> RunResult:
    if sink == "file" and prealloc:
        preallocate_baseline_files(workload, out_dir)
    stdout, stderr, usage, times, error, _ = _drive(
        _baseline_command(workload, sink, out_dir),
        workload,
        "baseline receiver",
        ready=lambda out, _err: out.matched.wait(30) and bool(out.lines),
        port=lambda out, _err: int(out.lines[0][1].split()[1]),
        stdout_match=lambda line: line.startswith("port "),
    )
    result = RunResult("baseline", ok=False, cpu=usage.cpu, maxrss=usage.maxrss)
    report = None
    for _, line in stdout.lines:
        if line.startswith("{"):
            report = json.loads(line)
    if usage.exit_code != 0 or error or times is None or report is None:
        tail = " | ".join(line for _, line in stderr.lines[-3:])
        result.error = error or f"baseline exited with {usage.exit_code}: {tail}"
        return result
    total = sum(workload.channel_bytes)
    if report["bytes"] != total:
        result.error = f"baseline received {report['bytes']} of {total} bytes"
        return result
    done = float(report["end"])
    result.seconds = done - times.started
    result.mb_per_s = workload.size / 1e6 / result.seconds
    result.lag = done - times.sent
    result.cpu_net = max(usage.cpu - idle_cpu, 0.0)
    result.cpu_per_gb = result.cpu_net / (workload.size / 1e9)
    result.ok = True
    return result


def run_idle_baseline(workload: Workload, sink: str, out_dir: Path) -> Usage:
    return _run_idle(
        _baseline_command(workload, "null", out_dir),
        "stdout",
        lambda line: line.startswith("port "),
    )


# --- the baseline receiver (a subprocess: this file run as a script) ----------------------


def baseline_receiver(channels: int, chunk: int, sink_dir: str | None) -> int:
    """Plain blocking Python: accept ``channels`` connections, one thread each,
    ``recv_into`` a reused buffer and ``os.write`` it to the sink."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(max(channels, 8))
    print(f"port {server.getsockname()[1]}", flush=True)
    received = [0] * channels
    failures: list[str] = []

    def receive(n: int, conn: socket.socket) -> None:
        path = "/dev/null" if sink_dir is None else os.path.join(sink_dir, f"ch{n}.bin")
        # Preallocated by the parent (or, with --no-prealloc, created here like the daemon's).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        buf = bytearray(chunk)
        view = memoryview(buf)
        total = 0
        try:
            while True:
                got = conn.recv_into(buf)
                if not got:
                    break
                done = 0
                while done < got:
                    done += os.write(fd, view[done:got])
                total += got
        except OSError as error:
            failures.append(f"channel {n}: {error}")
        finally:
            os.close(fd)
            conn.close()
            received[n] = total

    threads = []
    for n in range(channels):
        conn, _ = server.accept()
        thread = threading.Thread(target=receive, args=(n, conn))
        thread.start()
        threads.append(thread)
    server.close()
    for thread in threads:
        thread.join()
    end = time.time()
    print(json.dumps({"end": end, "bytes": sum(received), "errors": failures}), flush=True)
    return 1 if failures else 0


# --- the benchmark -----------------------------------------------------------------------


@dataclass
class ConfigResult:
    sink: str
    devices: int
    channels: int
    size: int
    baseline: list[RunResult] = field(default_factory=list)
    daemon: list[RunResult] = field(default_factory=list)
    idle_daemon_cpu: float = 0.0
    idle_baseline_cpu: float = 0.0

    def _ok(self, kind: str) -> list[RunResult]:
        return [r for r in (self.baseline if kind == "baseline" else self.daemon) if r.ok]

    def median(self, kind: str, attr: str) -> float | None:
        values = [float(getattr(r, attr)) for r in self._ok(kind)]
        return statistics.median(values) if values else None

    def ratio(self) -> float | None:
        """Median over the repetitions of daemon MB/s / baseline MB/s of the same pair."""
        pairs = [
            d.mb_per_s / b.mb_per_s
            for b, d in zip(self.baseline, self.daemon, strict=False)
            if b.ok and d.ok and b.mb_per_s > 0
        ]
        return statistics.median(pairs) if pairs else None

    def digests_ok(self) -> bool:
        return all(r.digest_ok for r in self.daemon if r.ok)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _clean(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def run_benchmark(
    *,
    channels: Sequence[int],
    devices: Sequence[int],
    sinks: Sequence[str],
    size: int,
    reps: int,
    work_dir: Path,
    prealloc: bool = True,
    chunk: int = CHUNK,
) -> list[ConfigResult]:
    results: list[ConfigResult] = []
    configs = [(s, d, c) for s in sinks for d in devices for c in channels]
    idle: dict[tuple[str, int, str], float] = {}
    total_runs = len(configs) * reps * 2
    run_no = 0
    for sink, n_devices, n_channels in configs:
        workload = build_workload(channels=n_channels, devices=n_devices, size=size, chunk=chunk)
        expected = workload.expected_digests()
        out_dir = work_dir / f"{sink}-{n_devices}dev-{n_channels}ch"
        out_dir.mkdir(exist_ok=True)
        config = ConfigResult(sink, n_devices, n_channels, size)
        for kind in ("daemon", "baseline"):
            key = (sink, n_devices, kind)
            if key not in idle:
                samples = [
                    (run_idle_daemon if kind == "daemon" else run_idle_baseline)(
                        workload, sink, out_dir
                    ).cpu
                    for _ in range(max(1, min(IDLE_REPS, reps)))
                ]
                idle[key] = statistics.median(samples)
                _clean(out_dir)
                _progress(
                    f"idle {kind} ({sink}, {n_devices} device(s)): "
                    f"{idle[key]:.3f} CPU s (start-up + shutdown, subtracted)"
                )
        config.idle_daemon_cpu = idle[(sink, n_devices, "daemon")]
        config.idle_baseline_cpu = idle[(sink, n_devices, "baseline")]
        for rep in range(reps):
            # Alternate which goes first, so drift (page cache, thermal) hits both alike.
            order = ("baseline", "daemon") if rep % 2 == 0 else ("daemon", "baseline")
            for kind in order:
                run_no += 1
                if kind == "daemon":
                    result = run_daemon(workload, sink, out_dir, config.idle_daemon_cpu, expected)
                    config.daemon.append(result)
                else:
                    result = run_baseline(
                        workload, sink, out_dir, config.idle_baseline_cpu, prealloc=prealloc
                    )
                    config.baseline.append(result)
                _clean(out_dir)
                if sink == "file":
                    os.sync()
                status = (
                    f"{result.mb_per_s:8.1f} MB/s  cpu {result.cpu_per_gb:.3f} s/GB  "
                    f"rss {result.maxrss / 2**20:6.1f} MiB  lag {result.lag * 1e3:6.1f} ms"
                    if result.ok
                    else "FAILED"
                )
                if result.error:
                    status += f"  ({result.error})"
                _progress(
                    f"[{run_no}/{total_runs}] {sink:4} dev={n_devices} ch={n_channels} "
                    f"rep {rep + 1}/{reps} {kind:8} {status}"
                )
        shutil.rmtree(out_dir, ignore_errors=True)
        results.append(config)
    return results


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: Sequence[ConfigResult]) -> str:
    header = (
        f"{'sink':4} {'dev':>3} {'ch':>3} {'base MB/s':>10} {'daemon MB/s':>11} {'ratio':>6} "
        f"{'CPU s/GB':>8} {'base CPU':>8} {'RSS MiB':>8} {'lag ms':>7} digest"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        rss = r.median("daemon", "maxrss")
        lag = r.median("daemon", "lag")
        lines.append(
            f"{r.sink:4} {r.devices:>3} {r.channels:>3} "
            f"{_fmt(r.median('baseline', 'mb_per_s'), '.1f'):>10} "
            f"{_fmt(r.median('daemon', 'mb_per_s'), '.1f'):>11} "
            f"{_fmt(r.ratio(), '.2f'):>6} "
            f"{_fmt(r.median('daemon', 'cpu_per_gb'), '.3f'):>8} "
            f"{_fmt(r.median('baseline', 'cpu_per_gb'), '.3f'):>8} "
            f"{_fmt(None if rss is None else rss / 2**20, '.1f'):>8} "
            f"{_fmt(None if lag is None else lag * 1e3, '.1f'):>7} "
            f"{'ok' if r.daemon and r.digests_ok() else 'BAD'}"
        )
    return "\n".join(lines)


def _spread(values: list[float]) -> float | None:
    """How far below the fastest the slowest is, as a fraction (0 = perfectly flat)."""
    if len(values) < 2 or max(values) <= 0:
        return None
    return 1 - min(values) / max(values)


def assess_targets(results: Sequence[ConfigResult]) -> list[str]:
    lines = []

    def verdict(ok: bool | None) -> str:
        return "n/a    " if ok is None else ("met    " if ok else "NOT MET")

    at4 = [(r, r.ratio()) for r in results if r.channels == 4]
    ratios = [(r, x) for r, x in at4 if x is not None]
    if ratios:
        worst_r, worst = min(ratios, key=lambda item: item[1])
        detail = ", ".join(f"{r.sink}/{r.devices}dev {x:.2f}" for r, x in ratios)
        lines.append(
            f"{verdict(worst >= TARGET_RATIO)} ratio >= {TARGET_RATIO:g} at 4 channels: "
            f"worst {worst:.2f} ({worst_r.sink}, {worst_r.devices} dev); {detail}"
        )
    else:
        lines.append(f"{verdict(None)} ratio >= {TARGET_RATIO:g} at 4 channels: no 4-channel run")

    cpus = [(r, r.median("daemon", "cpu_per_gb")) for r in results]
    cpu_known = [(r, x) for r, x in cpus if x is not None]
    if cpu_known:
        r, worst = max(cpu_known, key=lambda item: item[1])
        best = min(x for _, x in cpu_known)
        lines.append(
            f"{verdict(worst <= TARGET_CPU_PER_GB)} CPU <= {TARGET_CPU_PER_GB:g} s/GB: "
            f"worst {worst:.3f} ({r.sink}, {r.devices} dev, {r.channels} ch), "
            f"best {best:.3f}"
        )

    lags = [(r, r.median("daemon", "lag")) for r in results]
    lag_known = [(r, x) for r, x in lags if x is not None]
    if lag_known:
        r, worst = max(lag_known, key=lambda item: item[1])
        lines.append(
            f"{verdict(worst * 1e3 <= TARGET_LAG_MS)} completion lag <= "
            f"{TARGET_LAG_MS:g} ms median: worst {worst * 1e3:.1f} ms "
            f"({r.sink}, {r.devices} dev, {r.channels} ch)"
        )

    for dimension, other in (("channels", "devices"), ("devices", "channels")):
        groups: dict[tuple[str, int], list[tuple[int, float]]] = {}
        for r in results:
            value = r.median("daemon", "mb_per_s")
            if value is not None:
                key = (r.sink, getattr(r, other))
                groups.setdefault(key, []).append((getattr(r, dimension), value))
        spreads = []
        for (sink, fixed), points in sorted(groups.items()):
            spread = _spread([v for _, v in points])
            if spread is not None:
                figures = " ".join(f"{n}:{v:.0f}" for n, v in sorted(points))
                spreads.append(
                    (spread, f"{sink}/{fixed} {other}: {figures} MB/s (-{spread * 100:.0f}%)")
                )
        name = "1 to 8 channels" if dimension == "channels" else "1 to 4 devices"
        if not spreads:
            lines.append(f"{verdict(None)} throughput flat from {name}: only one {dimension} value")
            continue
        worst_spread = max(s for s, _ in spreads)
        lines.append(
            f"{verdict(worst_spread <= FLAT_TOLERANCE)} throughput flat from {name} "
            f"(slowest within {FLAT_TOLERANCE * 100:.0f}% of fastest): worst "
            f"-{worst_spread * 100:.0f}%; " + "; ".join(text for _, text in spreads)
        )
    digests = all(r.digests_ok() for r in results)
    lines.append(f"{verdict(digests)} daemon digests equal the digests of the data sent")
    return lines


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _sink_list(text: str) -> list[str]:
    sinks = [part.strip() for part in text.split(",") if part.strip()]
    for sink in sinks:
        if sink not in ("null", "file"):
            raise argparse.ArgumentTypeError(f"unknown sink {sink!r} (null, file)")
    return sinks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vfio_multifd.benchmark",
        description="Receive throughput of the daemon against a plain blocking Python receiver.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 and 4 channels, 1 device, 256M, 1 repetition",
    )
    parser.add_argument("--size", default=None, help="data bytes per run (default 1G)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3)")
    parser.add_argument("--channels", type=_int_list, default=None, help="default 1,2,4,8")
    parser.add_argument("--devices", type=_int_list, default=None, help="default 1,4")
    parser.add_argument("--sinks", type=_sink_list, default=None, help="null,file (default both)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also dump raw results")
    parser.add_argument("--tmpdir", default=None, help="where file sinks go (default $TMPDIR)")
    parser.add_argument(
        "--no-prealloc",
        action="store_true",
        help="file sink: the baseline writes fresh files, as the daemon does, "
        "instead of files preallocated with posix_fallocate",
    )
    # the baseline receiver subprocess
    parser.add_argument("--baseline-receiver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=CHUNK, help=argparse.SUPPRESS)
    parser.add_argument("--sink-dir", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.baseline_receiver:
        return baseline_receiver(args.channels[0], args.chunk, args.sink_dir)
    from .config import parse_size

    quick = args.quick
    size = parse_size(args.size or ("256M" if quick else "1G"))
    reps = args.reps or (1 if quick else 3)
    channels = args.channels or ([1, 4] if quick else [1, 2, 4, 8])
    devices = args.devices or ([1] if quick else [1, 4])
    sinks = args.sinks or ["null", "file"]
    base_dir = Path(args.tmpdir or tempfile.gettempdir())
    free = shutil.disk_usage(base_dir).free
    if "file" in sinks and free < 3 * size:
        print(
            f"benchmark: only {free >> 20} MiB free in {base_dir}; need {3 * size >> 20} MiB "
            "for the file sink",
            file=sys.stderr,
        )
        return 2
    started = time.monotonic()
    _progress(
        f"benchmark: sinks {sinks}, devices {devices}, channels {channels}, "
        f"{size >> 20} MiB per run, {reps} repetition(s), chunk {CHUNK >> 10} KiB"
    )
    work_dir = Path(tempfile.mkdtemp(prefix="vfio-multifd-bench-", dir=base_dir))
    try:
        results = run_benchmark(
            channels=channels,
            devices=devices,
            sinks=sinks,
            size=size,
            reps=reps,
            work_dir=work_dir,
            prealloc=not args.no_prealloc,
        )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    elapsed = time.monotonic() - started
    idle_note = ", ".join(
        sorted(
            {
                f"{r.devices} dev {r.sink}: daemon {r.idle_daemon_cpu:.2f} s / baseline "
                f"{r.idle_baseline_cpu:.2f} s"
                for r in results
            }
        )
    )
    print(format_table(results))
    print()
    print(
        f"{size >> 20} MiB per run, {reps} repetition(s), medians; MB/s = 1e6 data bytes/s "
        "from the first byte sent to the receiver done; ratio = median of daemon/baseline "
        "per a/b pair; CPU s/GB = user+sys of the receiving process per 1e9 data bytes, "
        f"minus its idle start-up+shutdown CPU ({idle_note}); RSS = daemon ru_maxrss; "
        "lag = last byte sent -> last device complete."
    )
    if "file" in sinks:
        print(
            "file sink: the daemon writes a fresh temporary file per device and renames it; "
            + (
                "the baseline writes fresh files too (--no-prealloc)."
                if args.no_prealloc
                else "the baseline writes files preallocated with posix_fallocate (one per "
                "channel), which spares it the filesystem's block allocation."
            )
        )
    for line in assess_targets(results):
        print(line)
    print(f"took {elapsed:.0f} s")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "size": size,
                    "reps": reps,
                    "prealloc": not args.no_prealloc,
                    "seconds": elapsed,
                    "results": [asdict(r) for r in results],
                },
                out,
                indent=1,
            )
    failed = any(not run.ok for r in results for run in (*r.baseline, *r.daemon))
    return 1 if failed else 0


if __name__ == "__main__":
    # Also run as a plain script (the baseline receiver): then only the standard library.
    raise SystemExit(main())
