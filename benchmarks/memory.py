"""Memory: the daemon's peak RSS against --max-queued-bytes, and what the bound costs in order.

    python benchmarks/memory.py [--size 1G] [--bound 32M] [--reps 3] [--json PATH]

1. Reverse order (the worst case: the first chunk comes last), one device,
   4 channels, ``--size`` bytes to a file, under ``--bound``.
2. Two devices crossing on two channels (channel 0: the second half of A,
   then the first half of B; channel 1 the mirror), ``--size`` / 4 each, to
   files, under ``--bound``: the case that deadlocks a destination which
   pauses channels.
3. Odd chunk sizes: 600 KiB and 100,003-byte chunks, reverse order, 4
   channels, ``--size`` / 4 each, to files, under 128 MiB.
4. 256 channels with announced-but-empty payloads, under the daemon's default
   bound (64 MiB): each channel sends its handshake and a header announcing a
   4 MiB payload (--max-packet-size 4 MiB + 12), then 3 MiB of it, and
   stalls. Once every channel is accepted and nothing more has gone out for a
   second, the daemon's VmHWM is read and the connections closed: the daemon
   then fails the migration with a truncation error, as it should.
5. 100,000 chunks of 1 KiB (at the default ``--size``; the count scales with
   it) in reverse order, 4 channels, to a file, under 16 MiB: the case whose
   spilling was once quadratic.
6. In order (round-robin), 4 channels, ``--size`` bytes to /dev/null, with no
   bound (``--max-queued-bytes 0``) and under ``--bound``, alternating
   ``--reps`` times: medians, ranges and the ratio bounded / unbounded.

Per run: the daemon's peak RSS (``VmHWM``, sampled from /proc while it runs),
its idle RSS (the same figure when it logs ``listening``, before any traffic)
and so the peak above idle (compared with the bound: what it leaves out); the wall time
from its start to its exit; and, from its ``migration_completed`` event, its
own time (first byte to last device complete), MB/s, peak queued bytes, bytes
spilled and the time its channels were paused. Every completed run's digests
are checked against the workload's (a run whose digests differ failed). The
daemon runs with ``--no-fsync`` and ``--max-packet-size`` of the workload's
chunk + 12 (the stalled case: 4 MiB + 12), its spill directory beside the
files. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import selectors
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from daemon import DaemonRun, Listening, daemon_command, run_daemon, run_receiver, vm_hwm
from replay import Replay
from report import median_range, progress
from vfio_multifd.config import DEFAULT_MAX_QUEUED_BYTES, parse_size
from vfio_multifd.core.wire import VFIO_HEADER
from vfio_multifd.source.plan import Packet
from workload import CHUNK, Buffer, Workload, build_workload, device_states, encode

MIB = 1 << 20
GIB = 1 << 30
#: The RSS goal of the memory issue: the bound plus this much for the interpreter.
RSS_ALLOWANCE = 100 * MIB

ODD_CHUNKS = (600 << 10, 100_003)
ODD_BOUND = 128 * MIB
#: 100,000 chunks of 1 KiB at ``--size`` 1G; the count scales with ``--size``.
SMALL_CHUNK = 1 << 10
SMALL_CHUNKS_PER_GIB = 100_000
SMALL_BOUND = 16 * MIB
STALL_CHANNELS = 256
STALL_PAYLOAD = 4 * MIB  # what each header announces (the daemon is given room for it)
STALL_SENT = 3 * MIB  # of which each channel sends this much
STALL_SETTLE = 1.0  # seconds with every channel accepted and nothing more going out
STALL_TIMEOUT = 60.0


def crossing(size: int, seed: int) -> Workload:
    """Devices A and B of ``size`` bytes; channel 0 sends the second half of A then the
    first half of B, channel 1 the second half of B then the first half of A."""
    devices = device_states([size, size], seed=seed)
    last = devices[0].chunks  # the config packet's idx, the same for both
    half = (last + 1) // 2

    def halves(first: int, second: int) -> list[Packet]:
        return [(first, idx) for idx in range(half, last + 1)] + [
            (second, idx) for idx in range(half)
        ]

    return encode(devices, [halves(0, 1), halves(1, 0)])


def announced(channels: int) -> Workload:
    """One device; channel ``c`` sends its chunk ``c``, a whole ``STALL_PAYLOAD`` (the
    stalled case sends only the start of each stream)."""
    devices = device_states([channels * STALL_PAYLOAD], seed=5, chunk=STALL_PAYLOAD)
    return encode(devices, [[(0, c)] for c in range(channels)])


def _head(stream: list[list[Buffer]], limit: int) -> list[memoryview]:
    """The first ``limit`` bytes of one channel's stream."""
    views: list[memoryview] = []
    for buffer in (b for batch in stream for b in batch):
        if limit <= 0:
            break
        views.append(memoryview(buffer)[:limit])
        limit -= len(views[-1])
    return views


@dataclass
class Stall:
    """A sender that never blocks: each channel's stream up to ``data`` bytes of its
    payload, then nothing. Once the daemon has accepted every channel and nothing more
    has gone out for ``settle`` seconds, it reads the daemon's VmHWM and closes them all."""

    data: int
    settle: float = STALL_SETTLE
    accepted: int = 0  # channels the daemon logged as accepted
    peak_rss: int = 0  # VmHWM at the stall, before the connections closed
    whole_run_rss: int = 0  # VmHWM over the whole run, closing and failing included
    stalled_after: float = 0.0  # seconds from the first connect to the stall
    sent: list[int] = field(default_factory=list)  # bytes per channel

    def __call__(self, receiver: Listening, workload: Workload, timeout: float) -> Replay:
        channels = workload.channels
        prefix = len(workload.streams[0][0][0]) + len(workload.streams[0][0][1])
        pending = [_head(stream, prefix + self.data) for stream in workload.streams]
        self.sent = [0] * channels
        selector = selectors.DefaultSelector()
        socks: list[socket.socket] = []
        started, clock = time.time(), time.monotonic()
        try:
            for channel in range(channels):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.setblocking(False)
                code = sock.connect_ex((receiver.address.host, receiver.address.port))
                if code not in (0, errno.EINPROGRESS):
                    raise OSError(code, f"channel {channel}: connect: {os.strerror(code)}")
                selector.register(sock, selectors.EVENT_WRITE, channel)
            progressed = time.monotonic()
            while True:
                now = time.monotonic()
                self.accepted = len(receiver.named("channel_accepted"))
                if self.accepted == channels and now - progressed >= self.settle:
                    break
                if receiver.named("migration_failed") or now - clock > timeout:
                    raise RuntimeError(
                        f"no stall: {self.accepted} of {channels} channels accepted, "
                        f"{sum(self.sent)} bytes sent, then "
                        + ("the daemon failed" if now - clock <= timeout else "timeout")
                    )
                for key, _ in selector.select(timeout=0.05):
                    channel = key.data
                    views = pending[channel]
                    try:
                        n = socks[channel].send(views[0])
                    except BlockingIOError:
                        continue
                    except ConnectionResetError:
                        refused = receiver.named("channel_refused")
                        raise RuntimeError(
                            f"channel {channel} was reset by the daemon after "
                            f"{self.sent[channel]} bytes ({self.accepted} accepted; "
                            f"refusals: {[e.get('error') for e in refused][:3]})"
                        ) from None
                    self.sent[channel] += n
                    progressed = time.monotonic()
                    views[0] = views[0][n:]
                    if not views[0]:
                        views.pop(0)
                    if not views:
                        selector.unregister(socks[channel])
            self.stalled_after = time.monotonic() - clock
            self.peak_rss = vm_hwm(receiver.pid) or 0
        finally:
            selector.close()
            for sock in socks:
                sock.close()
        return Replay(started, time.time(), self.sent)


@dataclass
class Case:
    name: str
    size: int  # data bytes the workload carries (the stalled case: announced)
    bound: int | None  # --max-queued-bytes (None: no bound)
    run: DaemonRun
    wall: float  # seconds, the daemon's start to its exit
    outcome: str = "digests match"  # what an ok run reports; else the run's error
    stall: Stall | None = None  # the stalled case's own figures

    @property
    def completed(self) -> bool:
        """The daemon reported ``migration_completed`` (its figures are in ``run``)."""
        return self.run.bytes > 0

    @property
    def above_idle(self) -> int:
        return self.run.peak_rss - self.run.idle_rss


@dataclass
class Report:
    bound: int
    cases: list[Case] = field(default_factory=list)
    in_order: dict[str, list[Case]] = field(default_factory=dict)  # "unbounded", "bounded"

    def ok_runs(self, name: str) -> list[DaemonRun]:
        return [case.run for case in self.in_order[name] if case.run.ok]

    def ratios(self) -> list[float]:
        """Bounded MB/s / unbounded MB/s of each pair in which both succeeded."""
        pairs = zip(self.in_order["unbounded"], self.in_order["bounded"], strict=True)
        return [
            b.run.mb_per_s / u.run.mb_per_s
            for u, b in pairs
            if u.run.ok and b.run.ok and u.run.mb_per_s > 0
        ]

    def rows(self) -> list[Case]:
        """The cases, then each in-order variant's run highest above idle."""
        rows = list(self.cases)
        for runs in self.in_order.values():
            ok = [case for case in runs if case.run.ok] or runs
            if ok:
                rows.append(max(ok, key=lambda case: case.above_idle))
        return rows

    def ok(self) -> bool:
        cases = self.cases + [case for cases in self.in_order.values() for case in cases]
        return all(case.run.ok for case in cases)


def _options(workdir: Path, chunk: int, bound: int | None) -> list[str]:
    """``--max-packet-size`` of ``chunk`` and its VFIO header, so small bounds are allowed."""
    limit = "0" if bound is None else str(bound)
    return [
        "--no-fsync",
        "--spill-dir",
        str(workdir),
        "--max-packet-size",
        str(chunk + VFIO_HEADER.size),
        "--max-queued-bytes",
        limit,
    ]


def run_case(
    name: str, workload: Workload, bound: int | None, chunk: int, workdir: Path, *, files: bool
) -> Case:
    """One completed-migration case: the daemon fed ``workload``, digests checked."""
    clock = time.monotonic()
    run = run_daemon(workload, workdir if files else None, *_options(workdir, chunk, bound))
    case = Case(name, workload.size, bound, run, time.monotonic() - clock)
    if not run.ok:
        case.outcome = f"FAILED ({run.error})"
    progress(f"  {name}: {_figures(case)}")
    for entry in workdir.iterdir():
        entry.unlink()
    return case


def run_stall(channels: int, workdir: Path, settle: float = STALL_SETTLE) -> Case:
    """256 channels (``channels``) announce a payload each, send part of it and stall
    (nothing more going out for ``settle`` seconds)."""
    workload = announced(channels)
    bound = DEFAULT_MAX_QUEUED_BYTES
    stall = Stall(STALL_SENT, settle)
    options = ["--no-fsync", "--spill-dir", str(workdir), "--max-queued-bytes", str(bound),
               "--max-packet-size", str(STALL_PAYLOAD + VFIO_HEADER.size)]  # fmt: skip
    clock = time.monotonic()
    finished = run_receiver(
        daemon_command(workload, None, *options), workload, STALL_TIMEOUT, stall
    )
    wall = time.monotonic() - clock
    stall.whole_run_rss = finished.peak_rss
    failed = finished.named("migration_failed")
    reason = str(failed[-1].get("reason")) if failed else ""
    expected = (
        finished.replay is not None
        and stall.accepted == channels
        and finished.exit_code == 1
        and reason == "packet-truncated"
    )
    run = DaemonRun(
        ok=expected,
        error="" if expected else finished.error or f"exit status {finished.exit_code}: {reason}",
        cpu=finished.cpu,
        peak_rss=stall.peak_rss,
        idle_rss=finished.idle_rss,
    )
    name = f"{channels} ch announce {STALL_PAYLOAD / MIB:.0f} MiB, send {STALL_SENT // MIB}, stall"
    case = Case(name, channels * STALL_PAYLOAD, bound, run, wall, stall=stall)
    case.outcome = (
        f"failed as expected ({reason})" if expected else f"FAILED ({run.error or reason})"
    )
    progress(
        f"  {name}: {_figures(case)}; {stall.accepted} accepted, "
        f"{sum(stall.sent) / MIB:.0f} MiB sent, stalled after {stall.stalled_after:.1f} s; "
        f"VmHWM over the whole run {stall.whole_run_rss / MIB:.1f} MiB"
    )
    return case


def run_memory(
    *,
    size: int,
    bound: int,
    reps: int,
    workdir: Path,
    stall_channels: int = STALL_CHANNELS,
    stall_settle: float = STALL_SETTLE,
) -> Report:
    report = Report(bound)
    quarter = max(CHUNK, size // 4 // CHUNK * CHUNK)
    small = max(1, size * SMALL_CHUNKS_PER_GIB // GIB)
    cases: list[tuple[str, Callable[[], Workload], int, int]] = [  # built one at a time
        (
            "reverse, 1 device, 4 ch",
            lambda: build_workload([size], channels=4, order="reverse"),
            bound,
            CHUNK,
        ),
        ("crossing, 2 devices, 2 ch", lambda: crossing(quarter, seed=2), bound, CHUNK),
        *(
            (
                f"odd {chunk:,} B chunks, reverse, 4 ch",
                lambda chunk=chunk: build_workload(
                    [size // 4], channels=4, order="reverse", seed=3, chunk=chunk
                ),
                ODD_BOUND,
                chunk,
            )
            for chunk in ODD_CHUNKS
        ),
        (
            f"{small:,} x 1 KiB chunks, reverse, 4 ch",
            lambda: build_workload(
                [small * SMALL_CHUNK], channels=4, order="reverse", seed=6, chunk=SMALL_CHUNK
            ),
            SMALL_BOUND,
            SMALL_CHUNK,
        ),
    ]
    for name, workload, limit, chunk in cases:
        report.cases.append(run_case(name, workload(), limit, chunk, workdir, files=True))
    report.cases.append(run_stall(stall_channels, workdir, stall_settle))
    in_order = build_workload([size], channels=4, seed=4)
    report.in_order = {"unbounded": [], "bounded": []}
    for _ in range(reps):
        for variant, limit_or_none in (("unbounded", None), ("bounded", bound)):
            name = f"in order, 4 ch, {'no bound' if limit_or_none is None else 'bounded'}"
            case = run_case(name, in_order, limit_or_none, CHUNK, workdir, files=False)
            report.in_order[variant].append(case)
    return report


def _mib(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value / MIB, spec)


def _figures(case: Case) -> str:
    run = case.run
    if not run.ok:
        return case.outcome
    text = (
        f"peak RSS {_mib(run.peak_rss)} MiB (idle {_mib(run.idle_rss)}, above idle "
        f"{_mib(case.above_idle)}), {case.wall:.1f} s"
    )
    if case.completed:
        text += (
            f", {run.mb_per_s:.0f} MB/s, peak queued {_mib(run.peak_queued_bytes)} MiB, "
            f"spilled {_mib(run.spilled_bytes, '.0f')} MiB, paused {run.paused_seconds:.2f} s"
        )
    return text


def format_report(report: Report) -> list[str]:
    reps = len(report.in_order.get("unbounded", []))
    lines = [
        f"Memory benchmark (MiB; bound = --max-queued-bytes; in-order rows: the run highest "
        f"above idle of {reps})",
        f"{'case':38} {'data':>5} {'bound':>5} {'peak RSS':>8} {'idle':>5} {'above':>6} "
        f"{'queued':>6} {'spilled':>7} {'wall s':>6} {'daemon s':>8}  outcome",
    ]
    for case in report.rows():
        run, done = case.run, case.completed
        lines.append(
            f"{case.name:38} {case.size // MIB:>5} {_mib(case.bound, '.0f'):>5} "
            f"{_mib(run.peak_rss):>8} {_mib(run.idle_rss):>5} {_mib(case.above_idle):>6} "
            f"{_mib(run.peak_queued_bytes if done else None):>6} "
            f"{_mib(run.spilled_bytes if done else None, '.0f'):>7} {case.wall:>6.1f} "
            f"{f'{run.seconds:.2f}' if done else '-':>8}  {case.outcome}"
        )
    speeds = {name: [run.mb_per_s for run in report.ok_runs(name)] for name in report.in_order}
    lines.append(
        f"in order, 4 ch, /dev/null, MB/s median [range] of {reps}: "
        f"no bound {median_range(speeds.get('unbounded', []), '.0f')}, "
        f"bounded {median_range(speeds.get('bounded', []), '.0f')}, "
        f"ratio {median_range(report.ratios(), '.2f')}"
    )
    lines.append(
        f"target (issue 10): VmHWM <= bound + {RSS_ALLOWANCE // MIB} MiB; also shown: what "
        "peak RSS above idle exceeds the bound by (memory the bound leaves out: see docs/memory.md)"
    )
    for case in report.rows():
        lines.append(f"  {case.name:38} " + _verdict(case))
    failed = sum(not case.run.ok for cases in report.in_order.values() for case in cases)
    lines.append(f"in-order runs failed (not counted): {failed}")
    return lines


def _verdict(case: Case) -> str:
    if case.bound is None:
        return "n/a (no bound)"
    if not case.run.ok:
        return "n/a (the run failed)"
    above, peak, bound = case.above_idle, case.run.peak_rss, case.bound
    goal = bound + RSS_ALLOWANCE
    return (
        f"VmHWM {peak / MIB:.1f} <= {goal / MIB:.0f}: "
        + ("met" if peak <= goal else f"NOT MET (by {(peak - goal) / MIB:.1f} MiB)")
        + f"; above idle {above / MIB:.1f} = bound {bound / MIB:.0f} "
        + f"{'+' if above >= bound else '-'} {abs(above - bound) / MIB:.1f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/memory.py", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument(
        "--size", default="1G", help="bytes of state in the reverse and in-order runs (1G)"
    )
    parser.add_argument(
        "--bound",
        default="32M",
        help="--max-queued-bytes of the reverse, crossing and in-order runs (32M)",
    )
    parser.add_argument("--reps", type=int, default=3, help="in-order repetitions (3)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    size, bound = parse_size(args.size), parse_size(args.bound)
    clock = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vfio-multifd-bench-mem-") as tmp:
        report = run_memory(size=size, bound=bound, reps=args.reps, workdir=Path(tmp))
    print("\n".join(format_report(report)))
    print(f"took {time.monotonic() - clock:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 0 if report.ok() else 1


if __name__ == "__main__":
    raise SystemExit(main())
