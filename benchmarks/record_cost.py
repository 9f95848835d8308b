"""What ``receive --record DIR`` costs: the daemon with and without it, same streams, same run.

    python benchmarks/record_cost.py [--size 1G] [--reps 3] [--channels 4]
        [--sinks null,file] [--tmpdir DIR]

One device over ``--channels`` channels, a/b alternated ``--reps`` times for
each sink: (a) ``receive`` as usual, (b) ``receive --record DIR`` with DIR a
fresh directory in ``--tmpdir`` (default $TMPDIR), so the recording goes to
the same disk as a ``file`` sink's output. Sinks: ``null`` writes the device
to /dev/null (the recording is the only disk traffic: its own cost), ``file``
to a fresh file in ``--tmpdir`` (outputs and recording share the disk, as
they would in use; the daemon fsyncs its output, not the recording).

Per run: MB/s is the daemon's own (``migration_completed``: first byte
received to last device complete); CPU is the receiving process's user +
system, start to exit, per 1e9 data bytes; *exit lag* is the replay's last
``sendmsg`` to the daemon's exit, which with ``--record`` includes the wait
for the recording to reach the disk and its manifest. A recorded run also
checks its manifest: complete, and every channel file as long as the stream
sent on it. Every run starts after an ``os.sync()``, so that none pays for the
dirty pages of the one before. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from daemon import DaemonRun, run_daemon
from report import median_range, progress
from vfio_multifd import logconfig
from vfio_multifd.config import parse_size
from workload import Workload, build_workload


@dataclass
class Pairs:
    """The runs of one sink, plain and recorded."""

    sink: str
    plain: list[DaemonRun] = field(default_factory=list)
    recorded: list[DaemonRun] = field(default_factory=list)
    recording_errors: list[str] = field(default_factory=list)
    recorded_share: list[float] = field(default_factory=list)  # of the bytes sent, per run


def check_recording(directory: Path, workload: Workload) -> tuple[str, float]:
    """Why the recording in ``directory`` is not the whole of what was sent ("" if it is),
    and the share of the bytes sent that its channel files hold."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError) as error:
        return f"no manifest: {error}", 0.0
    sizes = {c["id"]: (directory / c["file"]).stat().st_size for c in manifest["recorded_channels"]}
    share = sum(sizes.values()) / sum(workload.channel_bytes)
    if not manifest["complete"]:
        return f"incomplete: {manifest['stopped']}", share
    expected = dict(enumerate(workload.channel_bytes))
    return ("" if sizes == expected else f"channel files {sizes}, streams {expected}"), share


def run_pairs(workload: Workload, sink: str, reps: int, work: Path) -> Pairs:
    pairs = Pairs(sink)
    for rep in range(reps):
        for kind in ("plain", "recorded") if rep % 2 == 0 else ("recorded", "plain"):
            out = work / "out"
            record = work / "record"
            out.mkdir()
            os.sync()  # each run starts with no dirty pages left by the one before
            try:
                target = out if sink == "file" else None
                if kind == "plain":
                    pairs.plain.append(run_daemon(workload, target))
                else:
                    run = run_daemon(workload, target, "--record", str(record))
                    why, share = check_recording(record, workload)
                    if why:
                        pairs.recording_errors.append(why)
                    pairs.recorded_share.append(share)
                    pairs.recorded.append(run)
            finally:
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(record, ignore_errors=True)
            last = (pairs.plain if kind == "plain" else pairs.recorded)[-1]
            progress(
                f"record cost: {sink:4} {kind:8} rep {rep + 1}/{reps}: "
                + (f"{last.mb_per_s:.0f} MB/s" if last.ok else f"failed: {last.error}")
            )
    return pairs


def report(all_pairs: Sequence[Pairs], size: int) -> list[str]:
    def values(runs: list[DaemonRun], what: str) -> list[float]:
        ok = [run for run in runs if run.ok]
        if what == "mbps":
            return [run.mb_per_s for run in ok]
        if what == "cpu":
            return [run.cpu / (size / 1e9) for run in ok]
        return [run.exit_lag * 1000 for run in ok]

    lines = [
        f"{'sink':5}{'':10}{'MB/s':>22}{'CPU s/GB':>20}{'exit lag ms':>22}{'ok':>6}",
        "-" * 85,
    ]
    for pairs in all_pairs:
        for name, runs in (("plain", pairs.plain), ("--record", pairs.recorded)):
            ok = sum(run.ok for run in runs)
            lines.append(
                f"{pairs.sink:5}{name:10}{median_range(values(runs, 'mbps'), '.0f'):>22}"
                f"{median_range(values(runs, 'cpu'), '.2f'):>20}"
                f"{median_range(values(runs, 'lag'), '.0f'):>22}{f'{ok}/{len(runs)}':>6}"
            )
        plain, recorded = values(pairs.plain, "mbps"), values(pairs.recorded, "mbps")
        if plain and recorded:
            ratio = statistics.median(recorded) / statistics.median(plain)
            extra = statistics.median(values(pairs.recorded, "cpu")) - statistics.median(
                values(pairs.plain, "cpu")
            )
            complete = len(pairs.recorded) - len(pairs.recording_errors)
            shares = ", ".join(f"{share:.0%}" for share in pairs.recorded_share)
            lines.append(
                f"{pairs.sink:5}recorded/plain MB/s (medians) {ratio:.2f}; CPU {extra:+.2f} s/GB; "
                f"recordings complete and exact in size: {complete}/{len(pairs.recorded)} "
                f"(holding {shares} of the bytes sent)"
            )
        for why in sorted(set(pairs.recording_errors)):
            count = pairs.recording_errors.count(why)
            lines.append(f"{pairs.sink:5}recording {count} time(s): {why}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--sinks", default="null,file", help="null,file (default both)")
    parser.add_argument("--tmpdir", default=None, help="where outputs and recordings go")
    args = parser.parse_args(argv)
    logconfig.configure(log_format="console", level="warning")  # the replay's info lines: noise
    size = parse_size(args.size)
    sinks = [sink for sink in args.sinks.split(",") if sink]
    workload = build_workload([size], channels=args.channels)
    progress(
        f"record cost: {size >> 20} MiB, 1 device, {args.channels} channels, sinks "
        f"{', '.join(sinks)}, {args.reps} a/b pairs each, recording in {args.tmpdir or '$TMPDIR'}"
    )
    work = Path(tempfile.mkdtemp(prefix="vfio-record-bench-", dir=args.tmpdir))
    try:
        results = [run_pairs(workload, sink, args.reps, work) for sink in sinks]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"--record against without: 1 device, {args.channels} channels, {size >> 20} MiB per run, "
        f"same streams; median [range] of {args.reps} pair(s)"
    )
    for line in report(results, size):
        print(line)
    failed = any(
        not run.ok for pairs in results for run in (*pairs.plain, *pairs.recorded)
    ) or any(pairs.recording_errors for pairs in results)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
