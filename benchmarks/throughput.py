"""Receive throughput: the daemon against the plain copy, same streams, same sink, same run.

    python benchmarks/throughput.py [--quick] [--size 1G] [--null-size 2G] [--reps 3]
        [--headline-reps 5] [--channels 1,2,4,8] [--devices 1,4] [--sinks null,file]
        [--no-fsync] [--json PATH] [--tmpdir DIR] [--no-headline] [--no-tls | --tls-only]

First the headline (the throughput issue's targets, ``--no-headline`` leaves it
out): 4 channels, 1 device, ``--headline-reps`` a/b pairs each of /dev/null at
``--null-size`` with the daemon's defaults, with ``--digest none`` and with
``--reader-threads`` 0, 1 and 2, and of a fresh file at ``--size``; each
receiver under ``perf stat`` where it works, for the per-GB counts of
``counters.py``, printed beside the plain copy's. Then the matrix below.

For every sink, device count and channel count it runs, alternately and
``--reps`` times over, (a) the baseline, ``plain_copy.py`` (one thread per
connection, ``recv_into`` a reused 1 MiB buffer, ``os.write`` to one sink;
a file sink is fsynced at the end), and (b) the daemon, ``python -m
vfio_multifd receive`` with its default settings (digests on, fsync on unless
``--no-fsync``). Both get the same pre-built QEMU-format streams from the
same replay sender, once the receiver is listening and idle (its start-up
done, as a destination is before a real stop-copy). Sinks: ``null`` is
/dev/null; ``file`` is fresh files in ``--tmpdir`` (the daemon's one per
device, the baseline's one in all).

Per run: MB/s = data bytes / the receiver's own seconds, first byte received
to last byte written (the daemon's ``migration_completed``, the plain copy's
report); CPU = user + system of the receiving process, start to exit
(``wait4``), per 1e9 data bytes; peak RSS = ``VmHWM``; lag = the replay's last
``sendmsg`` -> the daemon's last ``load_thread_end``. A daemon run whose
digests differ from the workload's failed and is not counted. The report gives
medians and ranges, and the ratio daemon/baseline of each a/b pair; nothing
here asserts a time.

Then the TLS row (``--no-tls`` leaves it out, ``--tls-only`` runs nothing
else): the daemon with ``--tls-creds`` against the daemon without, 4
channels to /dev/null, the same pre-built streams, alternated ``--reps``
times. Credentials are throwaway (``credentials.py``, trustme); the replay
does a TLS handshake per channel and ``sendall``-s the same buffers on the
TLS socket. Reported: each one's MB/s and CPU s/GB (the daemon's, and the
benchmark process's, which is mostly the replay: it pays for encryption), and
the ratios TLS/plaintext of each pair.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import plain_copy
from counters import LEGEND as COUNTS_LEGEND
from counters import Counts, format_per_gb, sender_cpu
from credentials import loopback_credentials
from daemon import DaemonRun, Listening, Sender, replay_to, run_daemon, run_receiver
from replay import Replay, replay
from report import median_range, progress, quiet_sender
from vfio_multifd.config import Address, parse_size
from vfio_multifd.tls import TlsClient, load_client
from workload import Workload, build_workload

# Targets of the throughput issue (4 channels, 1 device, the daemon's defaults):
# reported as met or not, never asserted.
TARGET_NULL_RATIO = 0.8  # daemon / baseline MB/s to /dev/null
TARGET_CPU_RATIO = 1.5  # daemon / baseline CPU s/GB to /dev/null
TARGET_FILE_RATIO = 1.2  # daemon / baseline MB/s to a new file, fsync at the end
TARGET_LAG_MS = 50.0  # median completion lag, /dev/null
HEADLINE_CHANNELS = 4
#: Daemon variants of the headline's /dev/null row: its defaults, without a digest
#: (the upper bound of what the digest costs), then reader threads.
HEADLINE_VARIANTS: tuple[tuple[str, ...], ...] = (
    (),
    ("--digest", "none"),
    ("--reader-threads", "0"),
    ("--reader-threads", "1"),
    ("--reader-threads", "2"),
)
FLAT_TOLERANCE = 0.10  # "flat": the slowest within 10 % of the fastest


@dataclass
class Run:
    kind: str  # "baseline" or "daemon"
    ok: bool
    error: str = ""
    mb_per_s: float = 0.0
    cpu_per_gb: float = 0.0
    peak_rss: int = 0
    lag: float = 0.0  # the daemon's (the baseline has no per-device completion)
    daemon: DaemonRun | None = None
    counts: Counts = field(default_factory=Counts)  # the receiver's and the sender's


@dataclass
class ConfigResult:
    sink: str
    devices: int
    channels: int
    size: int
    options: tuple[str, ...] = ()  # the daemon's extra options (its defaults: none)
    baseline: list[Run] = field(default_factory=list)
    daemon: list[Run] = field(default_factory=list)

    @property
    def label(self) -> str:
        return " ".join(self.options) or "defaults"

    def values(self, kind: str, attr: str) -> list[float]:
        runs = self.baseline if kind == "baseline" else self.daemon
        return [float(getattr(run, attr)) for run in runs if run.ok]

    def median(self, kind: str, attr: str) -> float | None:
        values = self.values(kind, attr)
        return statistics.median(values) if values else None

    def pair_ratios(self, attr: str) -> list[float]:
        """Daemon / baseline of ``attr`` in each a/b pair in which both succeeded."""
        pairs = zip(self.baseline, self.daemon, strict=False)
        return [
            getattr(d, attr) / getattr(b, attr)
            for b, d in pairs
            if b.ok and d.ok and getattr(b, attr) > 0
        ]

    def ratios(self) -> list[float]:
        """Daemon MB/s / baseline MB/s of each pair."""
        return self.pair_ratios("mb_per_s")

    def ratio(self) -> float | None:
        ratios = self.ratios()
        return statistics.median(ratios) if ratios else None

    def cpu_ratios(self) -> list[float]:
        """Daemon CPU s/GB / baseline CPU s/GB of each pair."""
        return self.pair_ratios("cpu_per_gb")

    def cpu_ratio(self) -> float | None:
        ratios = self.cpu_ratios()
        return statistics.median(ratios) if ratios else None

    def ok_runs(self, kind: str) -> int:
        return sum(1 for run in (self.baseline if kind == "baseline" else self.daemon) if run.ok)


def split(size: int, devices: int) -> list[int]:
    base, extra = divmod(size, devices)
    return [base + (1 if d < extra else 0) for d in range(devices)]


def run_baseline(workload: Workload, sink: str, fsync: bool, *, count_syscalls: bool = False) -> Run:
    spent: list[float] = []
    finished = run_receiver(
        plain_copy.command(workload.channels, sink, fsync=fsync),
        workload,
        send=sender_cpu(replay_to, spent.append),
        count_syscalls=count_syscalls,
        settle=True,
    )
    finished.counts.sender = spent[0] if spent else None
    done = finished.named(plain_copy.DONE)
    if finished.error or not done:
        return Run("baseline", ok=False, error=finished.error or "no report")
    report = done[-1]
    if report["bytes"] != sum(workload.channel_bytes):
        received = f"received {report['bytes']} of {sum(workload.channel_bytes)} bytes"
        return Run("baseline", ok=False, error=received)
    return Run(
        "baseline",
        ok=True,
        mb_per_s=workload.size / 1e6 / float(report["seconds"]),
        cpu_per_gb=finished.cpu / (workload.size / 1e9),
        peak_rss=finished.peak_rss,
        counts=finished.counts,
    )


def run_the_daemon(
    workload: Workload,
    out_dir: Path | None,
    fsync: bool,
    *options: str,
    send: Sender = replay_to,
    kind: str = "daemon",
    count_syscalls: bool = False,
    prefix: Sequence[str] = (),
) -> Run:
    spent: list[float] = []
    result = run_daemon(
        workload,
        out_dir,
        *([] if fsync else ["--no-fsync"]),
        *options,
        send=sender_cpu(send, spent.append),
        count_syscalls=count_syscalls,
        prefix=prefix,
        settle=True,
    )
    result.counts.sender = spent[0] if spent else None
    return Run(
        kind,
        ok=result.ok,
        error=result.error,
        mb_per_s=result.mb_per_s,
        cpu_per_gb=result.cpu / (workload.size / 1e9),
        peak_rss=result.peak_rss,
        lag=result.lag,
        daemon=result,
        counts=result.counts,
    )


def _clean(directory: Path) -> None:
    for entry in directory.iterdir():
        entry.unlink()


def run_config(
    workload: Workload,
    sink: str,
    *,
    reps: int,
    out_dir: Path,
    fsync: bool = True,
    options: tuple[str, ...] = (),
    count_syscalls: bool = False,
) -> ConfigResult:
    """``reps`` a/b pairs of one workload into one sink, the order alternating
    (``count_syscalls``: each receiver under ``perf stat``, see counters.py)."""
    config = ConfigResult(sink, len(workload.devices), workload.channels, workload.size, options)
    for rep in range(reps):
        # Alternate which goes first, so drift (page cache, other load) hits both alike.
        for kind in ("baseline", "daemon") if rep % 2 == 0 else ("daemon", "baseline"):
            if kind == "daemon":
                run = run_the_daemon(
                    workload,
                    out_dir if sink == "file" else None,
                    fsync,
                    *options,
                    count_syscalls=count_syscalls,
                )
                config.daemon.append(run)
            else:
                target = str(out_dir / "plain.bin") if sink == "file" else os.devnull
                run = run_baseline(workload, target, fsync, count_syscalls=count_syscalls)
                config.baseline.append(run)
            _clean(out_dir)
            if sink == "file":
                os.sync()  # this run's dirty pages are not the next one's to write
            status = (
                f"{run.mb_per_s:8.1f} MB/s  cpu {run.cpu_per_gb:.3f} s/GB  "
                f"rss {run.peak_rss / 2**20:6.1f} MiB"
            )
            if kind == "daemon":
                status += f"  lag {run.lag * 1e3:6.1f} ms"
            if not run.ok:
                status = f"FAILED ({run.error})"
            progress(
                f"{sink:4} dev={config.devices} ch={config.channels} {config.label} "
                f"rep {rep + 1}/{reps} {kind:8} {status}"
            )
    return config


def run_headline(
    *, null_size: int, file_size: int, reps: int, work_dir: Path, fsync: bool = True
) -> list[ConfigResult]:
    """The issue's targets: 4 channels, 1 device; /dev/null with each variant, then a file."""
    results: list[ConfigResult] = []
    null_workload = build_workload([null_size], channels=HEADLINE_CHANNELS)
    for options in HEADLINE_VARIANTS:
        out_dir = work_dir / f"headline-null-{len(results)}"
        out_dir.mkdir()
        results.append(
            run_config(
                null_workload,
                "null",
                reps=reps,
                out_dir=out_dir,
                options=options,
                count_syscalls=True,
            )
        )
        out_dir.rmdir()
    del null_workload
    out_dir = work_dir / "headline-file"
    out_dir.mkdir()
    file_workload = build_workload([file_size], channels=HEADLINE_CHANNELS)
    results.append(
        run_config(
            file_workload, "file", reps=reps, out_dir=out_dir, fsync=fsync, count_syscalls=True
        )
    )
    out_dir.rmdir()
    return results


def run_benchmark(
    *,
    channels: Sequence[int],
    devices: Sequence[int],
    sinks: Sequence[str],
    size: int,
    reps: int,
    work_dir: Path,
    fsync: bool = True,
) -> list[ConfigResult]:
    results = []
    for sink in sinks:
        for n_devices in devices:
            for n_channels in channels:
                workload = build_workload(split(size, n_devices), channels=n_channels)
                out_dir = work_dir / f"{sink}-{n_devices}dev-{n_channels}ch"
                out_dir.mkdir()
                results.append(run_config(workload, sink, reps=reps, out_dir=out_dir, fsync=fsync))
                out_dir.rmdir()
    return results


# --- TLS against plaintext ------------------------------------------------------------------

TLS_CHANNELS = 4


@dataclass
class TlsComparison:
    """The daemon with and without ``--tls-creds``: same streams, /dev/null, a/b pairs."""

    channels: int
    size: int
    plain: list[Run] = field(default_factory=list)
    tls: list[Run] = field(default_factory=list)
    #: CPU s/GB of this process (the replay's threads) per run, by kind.
    sender_cpu: dict[str, list[float]] = field(default_factory=lambda: {"plain": [], "tls": []})

    def runs(self, kind: str) -> list[Run]:
        return self.plain if kind == "plain" else self.tls

    def values(self, kind: str, attr: str) -> list[float]:
        return [float(getattr(run, attr)) for run in self.runs(kind) if run.ok]

    def ratios(self, attr: str) -> list[float]:
        """TLS / plaintext of ``attr`` in each pair where both succeeded."""
        pairs = zip(self.plain, self.tls, strict=False)
        return [
            getattr(t, attr) / getattr(p, attr)
            for p, t in pairs
            if p.ok and t.ok and getattr(p, attr) > 0
        ]


def _tls_replay(client: TlsClient) -> Sender:
    def run(receiver: Listening, workload: Workload, timeout: float) -> Replay:
        return replay(receiver.address, workload, timeout, client)

    return run


def run_tls_comparison(
    size: int, *, reps: int, work_dir: Path, channels: int = TLS_CHANNELS
) -> TlsComparison:
    """``reps`` pairs (plaintext, TLS) of one workload to /dev/null, the order alternating."""
    workload = build_workload([size], channels=channels)
    server, client_dir = loopback_credentials(work_dir / "tls-credentials")
    client = load_client(client_dir, Address("tcp", "127.0.0.1", 0))  # the daemon listens there
    comparison = TlsComparison(channels, size)
    gigabytes = workload.size / 1e9
    for rep in range(reps):
        for kind in ("plain", "tls") if rep % 2 == 0 else ("tls", "plain"):
            if kind == "tls":
                send = _tls_replay(client)
                run = run_the_daemon(
                    workload, None, True, "--tls-creds", str(server), send=send, kind=kind
                )
            else:
                run = run_the_daemon(workload, None, True, kind=kind)
            comparison.runs(kind).append(run)
            if run.ok and run.counts.sender is not None:
                comparison.sender_cpu[kind].append(run.counts.sender / gigabytes)
            status = (
                f"{run.mb_per_s:8.1f} MB/s  cpu {run.cpu_per_gb:.3f} s/GB"
                if run.ok
                else f"FAILED ({run.error})"
            )
            progress(f"tls  dev=1 ch={channels} rep {rep + 1}/{reps} {kind:8} {status}")
    return comparison


def format_tls(comparison: TlsComparison) -> list[str]:
    """The TLS row: plaintext, TLS and their ratio, medians [ranges]."""
    rows = [
        (
            kind,
            median_range(comparison.values(kind, "mb_per_s"), ".0f"),
            median_range(comparison.values(kind, "cpu_per_gb"), ".2f"),
            median_range(comparison.sender_cpu[kind], ".2f"),
            f"{sum(run.ok for run in comparison.runs(kind))}/{len(comparison.runs(kind))}",
        )
        for kind in ("plain", "tls")
    ]
    rows.append(
        (
            "tls/plain",
            median_range(comparison.ratios("mb_per_s"), ".2f"),
            median_range(comparison.ratios("cpu_per_gb"), ".2f"),
            "",
            "",
        )
    )
    header = ("", "daemon MB/s", "daemon CPU s/GB", "sender CPU s/GB", "ok")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    title = (
        f"TLS against plaintext: {comparison.channels} channels, 1 device, /dev/null, "
        f"{comparison.size >> 20} MiB per run, same streams; median [range] of "
        f"{len(comparison.plain)} pair(s)"
    )
    return [title, *lines]


# --- the report --------------------------------------------------------------------------


def format_table(results: Sequence[ConfigResult]) -> str:
    rows = [
        (
            r.sink,
            str(r.devices),
            str(r.channels),
            r.label,
            median_range(r.values("baseline", "mb_per_s"), ".0f"),
            median_range(r.values("daemon", "mb_per_s"), ".0f"),
            median_range(r.ratios(), ".2f"),
            median_range(r.values("daemon", "cpu_per_gb"), ".2f"),
            median_range(r.values("baseline", "cpu_per_gb"), ".2f"),
            median_range(r.cpu_ratios(), ".2f"),
            median_range(r.values("daemon", "peak_rss"), ".0f", 2**-20),
            median_range(r.values("daemon", "lag"), ".1f", 1e3),
            f"{r.ok_runs('daemon')}/{len(r.daemon)}",
        )
        for r in results
    ]
    header = (
        "sink", "dev", "ch", "daemon options", "base MB/s", "daemon MB/s", "ratio",
        "CPU s/GB", "base CPU", "CPU ratio", "RSS MiB", "lag ms", "daemon ok",
    )  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_counts(results: Sequence[ConfigResult]) -> list[str]:
    """Per GB, for each configuration: the baseline's counts, the daemon's, their ratios."""
    lines: list[str] = []
    for r in results:
        lines.append(f"{r.sink}, {r.devices} device(s), {r.channels} channels, {r.label}:")
        runs = [
            (kind, [run.counts for run in getattr(r, kind) if run.ok], r.size)
            for kind in ("baseline", "daemon")
        ]
        lines += ["  " + line for line in format_per_gb(runs)]
    lines += textwrap.wrap(COUNTS_LEGEND, 100)
    return lines


def assess_targets(results: Sequence[ConfigResult]) -> list[str]:
    """The issue's targets, each met or not on this run's medians (a report, not a test).

    They concern 4 channels, 1 device and the daemon's defaults; the other rows
    (reader thread variants, the matrix) are reported, not judged.
    """

    def verdict(ok: bool | None) -> str:
        return "n/a    " if ok is None else ("met    " if ok else "NOT MET")

    def headline(sink: str) -> ConfigResult | None:
        return next(
            (
                r
                for r in results
                if (r.sink, r.devices, r.channels, r.options) == (sink, 1, HEADLINE_CHANNELS, ())
            ),
            None,
        )

    null, file = headline("null"), headline("file")
    lag = None if null is None else null.median("daemon", "lag")
    checks: list[tuple[str, ConfigResult | None, float | None, float, bool]] = [
        ("MB/s ratio, /dev/null", null, null.ratio() if null else None, TARGET_NULL_RATIO, True),
        ("CPU s/GB ratio, /dev/null", null, null.cpu_ratio() if null else None, TARGET_CPU_RATIO, False),
        ("MB/s ratio, new file", file, file.ratio() if file else None, TARGET_FILE_RATIO, True),
        ("completion lag ms, /dev/null", null, None if lag is None else lag * 1e3, TARGET_LAG_MS, False),
    ]  # fmt: skip
    lines = []
    for text, config, value, limit, at_least in checks:
        bound = f"{'>=' if at_least else '<='} {limit:g}"
        if config is None or value is None:
            lines.append(f"{verdict(None)} {text} {bound}: no run (4 channels, 1 device, defaults)")
            continue
        ok = value >= limit if at_least else value <= limit
        size = f"{config.size / 2**30:g} GiB"
        lines.append(f"{verdict(ok)} {text} {bound}: {value:.2f} (median, {size}, 4 ch, 1 dev)")
    failed = sum(len(r.daemon) - r.ok_runs("daemon") for r in results)
    lines.append(
        f"{verdict(failed == 0)} every daemon run completed with the workload's digests "
        f"({failed} failed, not counted)"
    )
    return lines


# --- the command line ------------------------------------------------------------------------


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
        prog="benchmarks/throughput.py",
        description="Receive throughput of the daemon against a plain blocking Python copy.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 and 4 channels, 1 device, 256M, 1 repetition"
    )
    parser.add_argument(
        "--size", default=None, help="data bytes per run: matrix, file headline (default 1G)"
    )
    parser.add_argument(
        "--null-size", default=None, help="data bytes per /dev/null headline run (default 2G)"
    )
    parser.add_argument("--reps", type=int, default=None, help="matrix repetitions (default 3)")
    parser.add_argument(
        "--headline-reps", type=int, default=None, help="headline repetitions (default 5)"
    )
    parser.add_argument("--no-headline", action="store_true", help="leave out the headline")
    parser.add_argument("--channels", type=_int_list, default=None, help="default 1,2,4,8")
    parser.add_argument("--devices", type=_int_list, default=None, help="default 1,4")
    parser.add_argument("--sinks", type=_sink_list, default=None, help="null,file (default both)")
    parser.add_argument(
        "--no-fsync", action="store_true", help="file sink: neither receiver fsyncs"
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also dump raw results")
    parser.add_argument("--tmpdir", default=None, help="where file sinks go (default $TMPDIR)")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--no-tls", action="store_true", help="leave out the TLS row")
    tls.add_argument(
        "--tls-only", action="store_true", help="only the TLS row (4 channels, /dev/null)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quick = args.quick
    size = parse_size(args.size or ("256M" if quick else "1G"))
    null_size = parse_size(args.null_size or ("256M" if quick else "2G"))
    reps = args.reps or (1 if quick else 3)
    headline_reps = args.headline_reps or (1 if quick else 5)
    headline = not (args.no_headline or args.tls_only)
    channels = args.channels or ([1, 4] if quick else [1, 2, 4, 8])
    devices = args.devices or ([1] if quick else [1, 4])
    sinks = [] if args.tls_only else args.sinks or ["null", "file"]
    base_dir = Path(args.tmpdir or tempfile.gettempdir())
    free = shutil.disk_usage(base_dir).free
    if ("file" in sinks or headline) and free < 3 * size:
        progress(
            f"throughput: {free >> 20} MiB free in {base_dir}, the file sink needs {3 * size >> 20}"
        )
        return 2
    started = time.monotonic()
    progress(
        (
            f"throughput: headline 4 ch, 1 dev, /dev/null {null_size >> 20} MiB and a file "
            f"{size >> 20} MiB, {headline_reps} repetition(s); "
            if headline
            else "throughput: "
        )
        + f"matrix: sinks {sinks}, devices {devices}, channels {channels}, "
        f"{size >> 20} MiB per run, {reps} repetition(s)"
        + ("" if args.no_tls else f"; TLS row: {TLS_CHANNELS} channels, /dev/null")
    )
    work_dir = Path(tempfile.mkdtemp(prefix="vfio-multifd-bench-", dir=base_dir))
    try:
        tops = (
            run_headline(
                null_size=null_size,
                file_size=size,
                reps=headline_reps,
                work_dir=work_dir,
                fsync=not args.no_fsync,
            )
            if headline
            else []
        )
        results = run_benchmark(
            channels=channels,
            devices=devices,
            sinks=sinks,
            size=size,
            reps=reps,
            work_dir=work_dir,
            fsync=not args.no_fsync,
        )
        tls = None if args.no_tls else run_tls_comparison(size, reps=reps, work_dir=work_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    elapsed = time.monotonic() - started
    if tops:
        print("Headline: the throughput issue's targets (4 channels, 1 device)")
        print_results(tops, reps=headline_reps, sinks=["null", "file"], fsync=not args.no_fsync)
        print()
    if results:
        print("Matrix")
        print_results(results, reps=reps, sinks=sinks, fsync=not args.no_fsync, judge=False)
    if tls is not None:
        print_tls(tls)
    print(f"took {elapsed:.0f} s")
    if args.json:
        raw = {
            "size": size,
            "reps": reps,
            "fsync": not args.no_fsync,
            "seconds": elapsed,
            "headline": [asdict(r) for r in tops],
            "results": [asdict(r) for r in results],
            "tls": None if tls is None else asdict(tls),
        }
        Path(args.json).write_text(json.dumps(raw, indent=1))
    runs = [run for r in (*tops, *results) for run in (*r.baseline, *r.daemon)]
    runs += [] if tls is None else [*tls.plain, *tls.tls]
    return 1 if any(not run.ok for run in runs) else 0


def print_results(
    results: Sequence[ConfigResult],
    *,
    reps: int,
    sinks: Sequence[str],
    fsync: bool,
    judge: bool = True,
) -> None:
    print(format_table(results))
    print()
    sizes = ", ".join(sorted({f"{r.sink} {r.size >> 20} MiB" for r in results}))
    legend = (
        f"1 MiB chunks, {sizes} per run, {reps} repetition(s): median [range]. "
        "MB/s = 1e6 data bytes per second of the receiver's own clock (first byte received "
        "-> last written); ratio = daemon/baseline of each a/b pair; CPU s/GB = user+sys "
        "of the receiving process from start to exit per 1e9 data bytes (base CPU: the "
        "baseline's); CPU ratio = daemon/baseline CPU s/GB of each pair; daemon options = what "
        "the daemon ran with besides its defaults; RSS = the daemon's peak (VmHWM); lag = the last sendmsg returned -> "
        "the last device complete (two processes' wall clocks: it can read a little below 0); "
        "daemon ok = daemon runs that completed with the workload's digests (only those count)."
    )
    if "file" in sinks:
        legend += (
            " File sink: fresh files, the daemon's one per device (temporary, renamed), the "
            "baseline's one for all channels; "
            + ("both fsync before they report done." if fsync else "neither fsyncs.")
        )
    print(textwrap.fill(legend, 100))
    if judge:
        for line in assess_targets(results):
            print(line)
        print()
        for line in format_counts(results):
            print(line)


def print_tls(comparison: TlsComparison) -> None:
    print()
    for line in format_tls(comparison):
        print(line)
    legend = (
        "daemon MB/s and CPU s/GB as above (its own clock; user+sys start to exit per 1e9 data "
        "bytes); sender CPU s/GB = user+sys of this process while the replay runs (its send "
        "threads: TLS encryption is theirs) per 1e9 data bytes; tls/plain = the ratio in each "
        "a/b pair. Both share the machine's cores: a sender that encrypts leaves less CPU to "
        "the daemon."
    )
    print(textwrap.fill(legend, 100))


if __name__ == "__main__":
    quiet_sender()
    raise SystemExit(main())
