"""Memory benchmark: the daemon's peak RSS under --max-queued-bytes, and what the bound costs.

    python -m vfio_multifd.bench_memory [--size 1G] [--bound 32M] [--reps 3]

1. Reverse order (the worst case: the first chunk comes last), one device,
   4 channels, ``--size`` bytes: peak RSS of the daemon with the bound, peak
   queued bytes and bytes spilled from its own accounting, digests compared.
2. Two devices crossing on two channels (channel 0: second half of A, then
   first half of B; channel 1 the mirror), ``--size`` / 4 each: the case that
   deadlocks a destination which pauses channels; same figures.
3. In-order (round-robin) throughput to /dev/null with and without the bound,
   alternating runs, medians and their ratio.

Streams are pre-built in this process and replayed with ``sendall`` from one
thread per channel, so the sender costs little. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import xxhash

from .config import parse_size
from .wire import ChannelHandshake, DeviceKey, encode_config_blob, encode_packet_prefix

CHUNK = 1 << 20
DEV_A = DeviceKey("0000:00:02.0/vfio", 0)
DEV_B = DeviceKey("0000:00:03.0/vfio", 0)


def device_chunks(key: DeviceKey, size: int, seed: int) -> list[bytes]:
    """Distinct chunks without paying for ``size`` random bytes: rotations of one block."""
    block = random.Random(seed).randbytes(CHUNK)
    doubled = block + block
    chunks = []
    for idx in range(size // CHUNK):
        start = (idx * 7919 + seed) % CHUNK
        chunks.append(doubled[start : start + CHUNK])
    return chunks


def packet(key: DeviceKey, idx: int, data: bytes, config: bool = False) -> bytes:
    return encode_packet_prefix(key, idx, len(data), config) + data


def device_packets(key: DeviceKey, chunks: list[bytes]) -> list[bytes]:
    out = [packet(key, idx, data) for idx, data in enumerate(chunks)]
    out.append(
        packet(key, len(chunks), encode_config_blob(b"config of " + key.idstr.encode()), True)
    )
    return out


def digest(chunks: list[bytes]) -> str:
    hasher = xxhash.xxh3_128()
    for data in chunks:
        hasher.update(data)
    return "xxh3-128:" + hasher.hexdigest()


@dataclass
class Run:
    seconds: float
    mb_per_s: float
    peak_rss_mib: float
    peak_queued: int
    spilled: int
    paused: float
    digests: dict[str, str]


def replay(port: int, streams: list[bytes]) -> None:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in streams]

    def send(sock: socket.socket, stream: bytes) -> None:
        view = memoryview(stream)
        for start in range(0, len(view), 8 << 20):
            sock.sendall(view[start : start + (8 << 20)])
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(120)
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass
        sock.close()

    threads = [
        threading.Thread(target=send, args=pair) for pair in zip(socks, streams, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def watch_hwm(pid: int, hwm: list[int]) -> None:
    """Keep the daemon's VmHWM (peak RSS, KiB) until it exits."""
    path = f"/proc/{pid}/status"
    while True:
        try:
            with open(path) as status:
                text = status.read()
        except OSError:
            return
        match = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
        if not match:  # a zombie has no memory lines: it has exited
            return
        hwm[0] = max(hwm[0], int(match.group(1)))
        time.sleep(0.02)


def run_daemon(
    workdir: Path, streams: list[bytes], devices: list[DeviceKey], sink: str, bound: int | None
) -> Run:
    exe = Path(sys.executable).with_name("vfio-multifd")
    command = [
        str(exe),
        "receive",
        "--listen",
        "tcp:127.0.0.1:0",
        "--channels",
        str(len(streams)),
        "--log-format",
        "json",
        "--no-fsync",
        "--spill-dir",
        str(workdir),
    ]
    for n, key in enumerate(devices):
        data = sink if sink == "/dev/null" else str(workdir / f"dev{n}.bin")
        config = sink if sink == "/dev/null" else str(workdir / f"dev{n}.cfg")
        command += [
            "--device",
            f"idstr={key.idstr},instance={key.instance_id},data={data},config={config}",
        ]
    if bound is not None:
        command += ["--max-queued-bytes", str(bound)]
    daemon = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert daemon.stderr is not None and daemon.stdout is not None
    port = None
    while port is None:
        line = daemon.stderr.readline()
        if not line:
            raise SystemExit(f"daemon died: {daemon.wait()}")
        event = json.loads(line)
        if event.get("event") == "listening":
            port = int(event["address"].rsplit(":", 1)[1])
    drain = threading.Thread(target=daemon.stderr.read, daemon=True)
    drain.start()
    # VmHWM, not wait4's ru_maxrss: the latter carries over the RSS this
    # (large) process had when it forked the daemon.
    hwm = [0]
    watcher = threading.Thread(target=watch_hwm, args=(daemon.pid, hwm), daemon=True)
    watcher.start()
    replay(port, streams)
    out = daemon.stdout.read()
    watcher.join()
    daemon.wait()
    if daemon.returncode != 0:
        raise SystemExit(f"daemon failed with exit {daemon.returncode}: {out}")
    summary = re.search(
        r"received (\d+) bytes in ([\d.]+) s \(([\d.]+) MB/s\); peak queued (\d+) bytes, "
        r"spilled (\d+) bytes, paused ([\d.]+) s",
        out,
    )
    assert summary, out
    digests = dict(re.findall(r"^device (\S+): .* (xxh3-128:[0-9a-f]+)", out, re.MULTILINE))
    return Run(
        seconds=float(summary.group(2)),
        mb_per_s=float(summary.group(3)),
        peak_rss_mib=hwm[0] / 1024,
        peak_queued=int(summary.group(4)),
        spilled=int(summary.group(5)),
        paused=float(summary.group(6)),
        digests=digests,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="bytes of state in the reverse run (1G)")
    parser.add_argument("--bound", default="32M", help="--max-queued-bytes (32M)")
    parser.add_argument("--reps", type=int, default=3, help="in-order repetitions (3)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    size, bound = parse_size(args.size), parse_size(args.bound)
    report: dict[str, object] = {"size": size, "bound": bound}
    lines = []
    with tempfile.TemporaryDirectory(prefix="vfio-multifd-bench-mem-") as tmp:
        workdir = Path(tmp)

        # 1. reverse order, one device, 4 channels
        chunks_a = device_chunks(DEV_A, size, 1)
        packets = list(reversed(device_packets(DEV_A, chunks_a)))
        streams = [ChannelHandshake(n).encode() + b"".join(packets[n::4]) for n in range(4)]
        del packets
        run = run_daemon(workdir, streams, [DEV_A], "file", bound)
        ok = run.digests.get(DEV_A.idstr) == digest(chunks_a)
        lines.append(("reverse, 1 device, 4 channels", size, run, ok))
        del streams, chunks_a

        # 2. two devices crossing on two channels
        quarter = max(CHUNK, size // 4 // CHUNK * CHUNK)
        a, b = device_chunks(DEV_A, quarter, 2), device_chunks(DEV_B, quarter, 3)
        pa, pb = device_packets(DEV_A, a), device_packets(DEV_B, b)
        half = len(pa) // 2
        streams = [
            ChannelHandshake(0).encode() + b"".join(pa[half:] + pb[:half]),
            ChannelHandshake(1).encode() + b"".join(pb[half:] + pa[:half]),
        ]
        del pa, pb
        run = run_daemon(workdir, streams, [DEV_A, DEV_B], "file", bound)
        ok = run.digests.get(DEV_A.idstr) == digest(a) and run.digests.get(DEV_B.idstr) == digest(b)
        lines.append(("crossing, 2 devices, 2 channels", 2 * quarter, run, ok))
        del streams, a, b
        for f in workdir.iterdir():
            f.unlink()

        # 3. in order to /dev/null, with and without the bound
        chunks_a = device_chunks(DEV_A, size, 4)
        packets = device_packets(DEV_A, chunks_a)
        streams = [ChannelHandshake(n).encode() + b"".join(packets[n::4]) for n in range(4)]
        del packets
        expected = digest(chunks_a)
        speeds: dict[str, list[float]] = {"unbounded": [], "bounded": []}
        rss: dict[str, list[float]] = {"unbounded": [], "bounded": []}
        for _ in range(args.reps):
            for name, limit in (("unbounded", None), ("bounded", bound)):
                run = run_daemon(workdir, streams, [DEV_A], "/dev/null", limit)
                if run.digests.get(DEV_A.idstr) != expected:
                    raise SystemExit(f"digest mismatch in the {name} in-order run")
                speeds[name].append(run.mb_per_s)
                rss[name].append(run.peak_rss_mib)
                print(
                    f"  in order {name}: {run.mb_per_s:.0f} MB/s, peak RSS {run.peak_rss_mib:.0f} MiB, "
                    f"peak queued {run.peak_queued >> 20} MiB, spilled {run.spilled >> 20} MiB, paused {run.paused:.2f} s",
                    file=sys.stderr,
                )
    mib = 1 << 20
    print(f"Memory benchmark: --max-queued-bytes {bound // mib} MiB, 1 MiB chunks")
    print(
        f"{'case':34} {'MiB':>6} {'MB/s':>7} {'peak RSS MiB':>13} {'peak queued MiB':>16} "
        f"{'spilled MiB':>12} {'paused s':>9} digests"
    )
    for name, nbytes, run, ok in lines:
        print(
            f"{name:34} {nbytes // mib:>6} {run.mb_per_s:>7.0f} {run.peak_rss_mib:>13.0f} "
            f"{run.peak_queued / mib:>16.1f} {run.spilled / mib:>12.0f} {run.paused:>9.2f} "
            f"{'match' if ok else 'DIFFER'}"
        )
        report[name] = {**run.__dict__, "digests_match": ok}
    median = {k: statistics.median(v) for k, v in speeds.items()}
    ratio = median["bounded"] / median["unbounded"]
    print(
        f"in order, 4 channels, /dev/null: unbounded {median['unbounded']:.0f} MB/s "
        f"(peak RSS {statistics.median(rss['unbounded']):.0f} MiB), bounded "
        f"{median['bounded']:.0f} MB/s (peak RSS {statistics.median(rss['bounded']):.0f} MiB), "
        f"ratio {ratio:.2f} (median of {args.reps})"
    )
    worst = max(run.peak_rss_mib for _, _, run, _ in lines)
    target = bound / mib + 100
    print(
        f"target: peak RSS under bound + 100 MiB = {target:.0f} MiB: "
        f"{'met' if worst <= target else 'NOT met'} (worst {worst:.0f} MiB)"
    )
    print(f"target: in-order throughput with the bound not measurably lower: ratio {ratio:.2f}")
    report["in_order"] = {"median_mb_per_s": median, "ratio": ratio, "runs": speeds, "rss": rss}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0 if all(ok for *_, ok in lines) else 1


if __name__ == "__main__":
    raise SystemExit(main())
