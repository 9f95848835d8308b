"""Memory: the daemon's peak RSS under ``--max-queued-bytes``, and what the bound costs in order.

    python benchmarks/memory.py [--size 1G] [--bound 32M] [--reps 3] [--json PATH]

1. Reverse order (the worst case: the first chunk comes last), one device,
   4 channels, ``--size`` bytes to a file, with the bound.
2. Two devices crossing on two channels (channel 0: the second half of A,
   then the first half of B; channel 1 the mirror), ``--size`` / 4 each, to
   files, with the bound: the case that deadlocks a destination which pauses
   channels.
3. In order (round-robin), 4 channels, ``--size`` bytes to /dev/null, with no
   bound (``--max-queued-bytes 0``) and with the bound, alternating ``--reps``
   times: medians, ranges and the ratio bounded / unbounded.

Per run: the daemon's peak RSS (``VmHWM``) and, from its ``migration_completed``
event, MB/s, peak queued bytes, bytes spilled and the time its channels were
paused; every run's digests are checked against the workload's (a run whose
digests differ failed). The daemon runs with ``--no-fsync``, its spill
directory beside the files. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from daemon import DaemonRun, run_daemon
from report import median_range, progress
from vfio_multifd.config import parse_size
from vfio_multifd.sender import Packet
from workload import CHUNK, Workload, build_workload, device_states, encode

MIB = 1 << 20
#: The RSS target of the memory issue: the bound plus this much for the interpreter.
RSS_ALLOWANCE = 100 * MIB


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


@dataclass
class Case:
    name: str
    size: int
    run: DaemonRun


@dataclass
class Report:
    bound: int
    cases: list[Case] = field(default_factory=list)
    in_order: dict[str, list[DaemonRun]] = field(default_factory=dict)  # "unbounded", "bounded"

    def speeds(self, name: str) -> list[float]:
        return [run.mb_per_s for run in self.in_order[name] if run.ok]

    def rss(self, name: str) -> list[float]:
        return [run.peak_rss / MIB for run in self.in_order[name] if run.ok]

    def ratios(self) -> list[float]:
        """Bounded MB/s / unbounded MB/s of each pair in which both succeeded."""
        pairs = zip(self.in_order["unbounded"], self.in_order["bounded"], strict=True)
        return [b.mb_per_s / u.mb_per_s for u, b in pairs if u.ok and b.ok and u.mb_per_s > 0]

    def ok(self) -> bool:
        runs = [case.run for case in self.cases] + [r for rs in self.in_order.values() for r in rs]
        return all(run.ok for run in runs)


def run_memory(*, size: int, bound: int, reps: int, workdir: Path) -> Report:
    report = Report(bound)
    # The largest packet QEMU sends: a 1 MiB chunk and its 12-byte VFIO header.
    options = ["--no-fsync", "--spill-dir", str(workdir), "--max-packet-size", str(CHUNK + 12)]
    bounded = [*options, "--max-queued-bytes", str(bound)]
    quarter = max(CHUNK, size // 4 // CHUNK * CHUNK)
    for name, nbytes, workload in (
        (
            "reverse, 1 device, 4 channels",
            size,
            build_workload([size], channels=4, order="reverse"),
        ),
        ("crossing, 2 devices, 2 channels", 2 * quarter, crossing(quarter, seed=2)),
    ):
        run = run_daemon(workload, workdir, *bounded)
        report.cases.append(Case(name, nbytes, run))
        progress(f"  {name}: {_figures(run)}")
        for entry in workdir.iterdir():
            entry.unlink()
    workload = build_workload([size], channels=4, seed=4)
    report.in_order = {"unbounded": [], "bounded": []}
    for _ in range(reps):
        for name, limit in (
            ("unbounded", [*options, "--max-queued-bytes", "0"]),
            ("bounded", bounded),
        ):
            run = run_daemon(workload, None, *limit)
            report.in_order[name].append(run)
            progress(f"  in order {name}: {_figures(run)}")
    return report


def _figures(run: DaemonRun) -> str:
    if not run.ok:
        return f"FAILED ({run.error})"
    return (
        f"{run.mb_per_s:.0f} MB/s, peak RSS {run.peak_rss / MIB:.0f} MiB, peak queued "
        f"{run.peak_queued_bytes / MIB:.1f} MiB, spilled {run.spilled_bytes / MIB:.0f} MiB, "
        f"paused {run.paused_seconds:.2f} s"
    )


def format_report(report: Report) -> list[str]:
    lines = [
        f"Memory benchmark: --max-queued-bytes {report.bound // MIB} MiB, 1 MiB chunks",
        f"{'case':34} {'MiB':>6} {'MB/s':>7} {'peak RSS MiB':>13} {'peak queued MiB':>16} "
        f"{'spilled MiB':>12} {'paused s':>9} digests",
    ]
    for case in report.cases:
        run = case.run
        lines.append(
            f"{case.name:34} {case.size // MIB:>6} {run.mb_per_s:>7.0f} "
            f"{run.peak_rss / MIB:>13.0f} {run.peak_queued_bytes / MIB:>16.1f} "
            f"{run.spilled_bytes / MIB:>12.0f} {run.paused_seconds:>9.2f} "
            + ("match" if run.ok else f"FAILED ({run.error})")
        )
    runs = len(report.in_order["unbounded"])
    lines.append(
        f"in order, 4 channels, /dev/null, median [range] of {runs}: "
        f"no bound {median_range(report.speeds('unbounded'), '.0f')} MB/s "
        f"(peak RSS {median_range(report.rss('unbounded'), '.0f')} MiB), "
        f"bounded {median_range(report.speeds('bounded'), '.0f')} MB/s "
        f"(peak RSS {median_range(report.rss('bounded'), '.0f')} MiB), "
        f"ratio {median_range(report.ratios(), '.2f')}"
    )
    target = report.bound + RSS_ALLOWANCE
    worst = max((c.run.peak_rss for c in report.cases if c.run.ok), default=None)
    verdict = "n/a (no case ran)" if worst is None else "met" if worst <= target else "NOT met"
    lines.append(
        f"target: peak RSS under bound + {RSS_ALLOWANCE // MIB} MiB = {target // MIB} MiB: "
        + verdict
        + ("" if worst is None else f" (worst {worst / MIB:.0f} MiB)")
    )
    failed = sum(not run.ok for runs in report.in_order.values() for run in runs)
    lines.append(f"in-order runs failed (not counted): {failed}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/memory.py", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--size", default="1G", help="bytes of state in the reverse run (1G)")
    parser.add_argument("--bound", default="32M", help="--max-queued-bytes (32M)")
    parser.add_argument("--reps", type=int, default=3, help="in-order repetitions (3)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    size, bound = parse_size(args.size), parse_size(args.bound)
    with tempfile.TemporaryDirectory(prefix="vfio-multifd-bench-mem-") as tmp:
        report = run_memory(size=size, bound=bound, reps=args.reps, workdir=Path(tmp))
    print("\n".join(format_report(report)))
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 0 if report.ok() else 1


if __name__ == "__main__":
    raise SystemExit(main())
