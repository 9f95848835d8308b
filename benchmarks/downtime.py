"""Downtime at QEMU's sizes: from the first byte to the state in place, against the plain copy.

    python benchmarks/downtime.py [--size 400M] [--reps 5] [--sinks file,null]
        [--cases 4x,1x] [--json PATH] [--tmpdir DIR]

What a user feels of a migration's device state is downtime: the time from
the first stop-copy byte to the state being in place. Real states are a few
hundred MiB (upstream's test: about 400 MiB for 4 ConnectX-7 VFs), so these
runs are that size, where warm-up costs (fresh pages, the first packets)
weigh more than in a 2 GiB throughput run. Cases, each over 4 channels:

* ``4x``: 4 devices of ``--size`` / 4 each (QEMU's round-robin order);
* ``1x``: 1 device of ``--size``.

Sinks: ``file``, new files in ``--tmpdir`` fsynced before they count as in
place; ``null``, /dev/null. Receivers, alternated ``--reps`` times over the
same pre-built streams: the daemon (``receive`` with its defaults, fsync on,
digests checked) and ``plain_copy.py`` writing as many files as there are
devices (each connection to one of them), fsynced where the daemon fsyncs.
Both have listened for half a second and are idle (no CPU used for 50 ms)
before the first byte is sent, as a destination is before a real stop-copy.

Per run, times from the receiver's first byte: *receive* until the last byte
is received, *last write* until it is written, *fsync* until the files are
synced, *commit* until they are in place (the daemon's renames and directory
sync; the plain copy has none), then *exit* until the process has exited.
The daemon's own times come from its ``migration_completed`` event
(``phases``), the plain copy's from its report. The report gives medians
[ranges] and, per a/b pair, the ratio daemon/plain copy of the time to in
place and of the time to exit; the targets are judged on the medians of
those ratios, and never asserted.
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
from daemon import run_daemon, run_receiver, timestamp
from report import comma_list, format_table, median_range, progress, quiet_sender, run_status
from vfio_multifd.config import parse_size
from workload import Workload, build_workload

CHANNELS = 4
#: ``--cases``: name -> devices the size is split over.
CASES = {"4x": 4, "1x": 1}
#: Targets of the speed issue: daemon / plain copy, first byte to in place, 400 MiB, 4 channels.
TARGETS = {"file": 1.2, "null": 1.3}
PHASES = ("received", "written", "synced", "committed", "exited")
#: The report's name for the time each phase of PHASES takes.
DURATIONS = ("receive", "last write", "fsync", "commit", "exit")


@dataclass
class Timed:
    """One receiver run: when each phase ended, seconds from its first byte."""

    kind: str  # "daemon" or "plain"
    ok: bool
    error: str = ""
    ends: dict[str, float] = field(default_factory=dict)  # PHASES -> seconds
    cpu: float = 0.0

    @property
    def in_place(self) -> float:
        return self.ends["committed"]

    def durations(self) -> dict[str, float]:
        """Each phase's own time: receive, last write, fsync, commit (the daemon's), exit."""
        previous = 0.0
        result = {}
        for name, phase in zip(DURATIONS, PHASES, strict=True):
            if not (phase == "committed" and self.kind == "plain"):  # it writes in place
                result[name] = max(0.0, self.ends[phase] - previous)
            previous = max(previous, self.ends[phase])
        return result


def run_plain(workload: Workload, sink: Path | None) -> Timed:
    files = len(workload.devices)
    target = os.devnull if sink is None else str(sink / "plain.bin")
    command = plain_copy.command(workload.channels, target, files=files if sink else 1)
    finished = run_receiver(command, workload, settle=True)
    done = finished.named(plain_copy.DONE)
    if finished.error or not done:
        return Timed("plain", ok=False, error=finished.error or "no report")
    report = done[-1]
    sent = sum(workload.channel_bytes)
    if report["bytes"] != sent:
        return Timed("plain", ok=False, error=f"received {report['bytes']} of {sent} bytes")
    if sink is not None:
        written = sum(Path(p).stat().st_size for p in plain_copy.sink_paths(target, files))
        if written != sent:
            return Timed("plain", ok=False, error=f"wrote {written} of {sent} bytes")
    first_byte = float(report["end"]) - float(report["seconds"])
    phases = {name: float(report["phases"][name]) for name in ("received", "written", "synced")}
    ends = {**phases, "committed": phases["synced"], "exited": finished.exited - first_byte}
    return Timed("plain", ok=True, ends=ends, cpu=finished.cpu)


def run_the_daemon(workload: Workload, sink: Path | None) -> Timed:
    run = run_daemon(workload, sink, settle=True)
    if not run.ok:
        return Timed("daemon", ok=False, error=run.error)
    completed = [e for e in run.events if e.get("event") == "migration_completed"][-1]
    phases = {name: float(completed["phases"][name]) for name in PHASES[:4]}
    first_byte = timestamp(completed) - phases["committed"]
    return Timed("daemon", ok=True, ends={**phases, "exited": run.exited - first_byte}, cpu=run.cpu)


@dataclass
class Case:
    name: str  # "4x" / "1x"
    devices: int
    sink: str  # "file" / "null"
    size: int
    runs: dict[str, list[Timed]] = field(default_factory=lambda: {"plain": [], "daemon": []})

    @property
    def label(self) -> str:
        each = self.size // self.devices >> 20
        return f"{self.devices} x {each} MiB, {CHANNELS} ch, {self.sink}"

    def ok(self, kind: str) -> list[Timed]:
        return [run for run in self.runs[kind] if run.ok]

    def ratios(self, phase: str) -> list[float]:
        """Daemon / plain copy of the time to ``phase`` in each pair where both succeeded."""
        pairs = zip(self.runs["plain"], self.runs["daemon"], strict=False)
        return [
            d.ends[phase] / p.ends[phase] for p, d in pairs if p.ok and d.ok and p.ends[phase] > 0
        ]


def run_case(case: Case, workload: Workload, *, reps: int, work_dir: Path) -> None:
    """``reps`` a/b pairs, the order alternating, every output removed after each run."""
    for rep in range(reps):
        for kind in ("plain", "daemon") if rep % 2 == 0 else ("daemon", "plain"):
            out = work_dir if case.sink == "file" else None
            if out is not None:
                os.sync()  # the previous run's dirty pages are not this one's to write
            run = run_plain(workload, out) if kind == "plain" else run_the_daemon(workload, out)
            case.runs[kind].append(run)
            for entry in work_dir.iterdir():
                entry.unlink()
            figures = (
                f"in place {run.in_place * 1e3:7.1f} ms, exit {run.ends['exited'] * 1e3:7.1f} ms"
                if run.ok
                else ""
            )
            status = run_status(run.ok, figures, run.error)
            progress(f"downtime {case.label} rep {rep + 1}/{reps} {kind:6} {status}")


def run_downtime(
    *, size: int, reps: int, sinks: Sequence[str], cases: Sequence[str], work_dir: Path
) -> list[Case]:
    results = []
    for name in cases:
        devices = CASES[name]
        base, extra = divmod(size, devices)
        sizes = [base + (1 if d < extra else 0) for d in range(devices)]
        workload = build_workload(sizes, channels=CHANNELS)
        for sink in sinks:
            case = Case(name, devices, sink, size)
            run_case(case, workload, reps=reps, work_dir=work_dir)
            results.append(case)
    return results


# --- the report --------------------------------------------------------------------------


def format_report(results: Sequence[Case]) -> list[str]:
    header = (
        "case",
        "receiver",
        *(f"{d} ms" for d in DURATIONS),
        "in place ms",
        "to exit ms",
        "ok",
    )
    rows: list[tuple[str, ...]] = []
    for case in results:
        for kind in ("plain", "daemon"):
            runs = case.ok(kind)
            rows.append(
                (
                    case.label,
                    "plain copy" if kind == "plain" else "daemon",
                    *(median_range(_values(runs, d), ".1f", 1e3) for d in DURATIONS),
                    median_range([r.in_place for r in runs], ".1f", 1e3),
                    median_range([r.ends["exited"] for r in runs], ".1f", 1e3),
                    f"{len(runs)}/{len(case.runs[kind])}",
                )
            )
        blank = ("",) * len(DURATIONS)
        rows.append(
            (
                case.label,
                "daemon/plain",
                *blank,
                median_range(case.ratios("committed"), ".2f"),
                median_range(case.ratios("exited"), ".2f"),
                "",
            )
        )
    return format_table(header, rows, left=2)


def _values(runs: Sequence[Timed], duration: str) -> list[float]:
    return [run.durations()[duration] for run in runs if duration in run.durations()]


def assess_targets(results: Sequence[Case]) -> list[str]:
    """Each case's median ratio (daemon / plain copy, first byte to in place) against
    the issue's target for its sink (a report, not a test)."""
    lines = []
    for case in results:
        limit = TARGETS[case.sink]
        ratios = case.ratios("committed")
        if not ratios:
            lines.append(f"n/a     {case.label}: first byte to in place <= {limit:g}x: no pair")
            continue
        value = statistics.median(ratios)
        verdict = "met    " if value <= limit else "NOT MET"
        lines.append(
            f"{verdict} {case.label}: first byte to in place <= {limit:g}x the plain copy's: "
            f"{value:.2f} (median of {len(ratios)} pairs)"
        )
    failed = sum(len(c.runs[k]) - len(c.ok(k)) for c in results for k in ("plain", "daemon"))
    lines.append(
        f"{'met    ' if failed == 0 else 'NOT MET'} every run completed with the bytes "
        f"(and the daemon's digests) expected ({failed} failed, not counted)"
    )
    return lines


LEGEND = (
    "Times from the receiver's own first byte, medians [ranges]: receive = until the last "
    "byte was received, last write = then until it was written, fsync = then until the "
    "files were synced, commit = then until they were in place (renamed, directory synced; "
    "the plain copy writes in place), exit = then until the process had exited; in place "
    "= first byte to in place, to exit = first byte to exit. daemon/plain = the ratio in "
    "each a/b pair. The daemon: defaults (digests, fsync), one file per device; the plain "
    "copy: as many files as devices, fsynced too; /dev/null: nothing to sync or rename."
)


# --- the command line ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/downtime.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--size", default="400M", help="data bytes per run (default 400M)")
    parser.add_argument("--reps", type=int, default=5, help="a/b pairs per case (default 5)")
    parser.add_argument(
        "--sinks", type=comma_list(("file", "null")), default=["file", "null"], help="file,null"
    )
    parser.add_argument("--cases", type=comma_list(tuple(CASES)), default=list(CASES), help="4x,1x")
    parser.add_argument("--json", default=None, metavar="PATH", help="also dump raw results")
    parser.add_argument("--tmpdir", default=None, help="where the files go (default $TMPDIR)")
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    base_dir = Path(args.tmpdir or tempfile.gettempdir())
    if "file" in args.sinks and shutil.disk_usage(base_dir).free < 3 * size:
        progress(f"downtime: not enough room in {base_dir} for {3 * size >> 20} MiB")
        return 2
    started = time.monotonic()
    progress(
        f"downtime: cases {args.cases}, sinks {args.sinks}, {size >> 20} MiB over {CHANNELS} "
        f"channels, {args.reps} pair(s) each"
    )
    work_dir = Path(tempfile.mkdtemp(prefix="vfio-multifd-downtime-", dir=base_dir))
    try:
        results = run_downtime(
            size=size, reps=args.reps, sinks=args.sinks, cases=args.cases, work_dir=work_dir
        )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(f"Downtime: first byte to in place, {size >> 20} MiB over {CHANNELS} channels")
    for line in format_report(results):
        print(line)
    print()
    print(textwrap.fill(LEGEND, 100))
    for line in assess_targets(results):
        print(line)
    print(f"took {time.monotonic() - started:.0f} s")
    if args.json:
        raw = {"size": size, "reps": args.reps, "cases": [asdict(case) for case in results]}
        Path(args.json).write_text(json.dumps(raw, indent=1))
    runs = [run for case in results for kind in case.runs.values() for run in kind]
    return 1 if any(not run.ok for run in runs) else 0


if __name__ == "__main__":
    quiet_sender()
    raise SystemExit(main())
