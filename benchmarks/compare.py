"""The daemon against itself: two versions or two option sets, same streams, same run.

    python benchmarks/compare.py [--ref REF] [--size 2G] [--reps 5] [--devices 1]
        [--sink null|file] [--a-options "..."] [--b-options "..."] [--no-baseline]

A change to the data path is kept only if it helps, and on a shared machine
only a comparison within one run says whether it does. This runs, in turn
and ``--reps`` times over (the order rotating), the plain copy (the
baseline, unless ``--no-baseline``), the daemon *A* and the daemon *B*, 4
channels, over the same pre-built streams. *B* is the working tree's code;
*A* is the same code, or with ``--ref`` the package as it is at that git
commit (``git archive`` into a temporary directory, run from there and put
first on ``PYTHONPATH``). ``--a-options`` and ``--b-options`` add receive options to
either (``--b-options "--digest none"`` measures an option on one code).

Reported: MB/s (each receiver's own clock) and the per-GB counts of
``counters.py`` (reads, futex, context switches, faults, CPU with and
without start-up, with the sender's) as medians, then B/A of each pair's MB/s
and CPU.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path

from counters import LEGEND, format_per_gb
from report import median_range, progress, quiet_sender, run_status
from throughput import Run, run_baseline, run_the_daemon
from vfio_multifd.config import parse_size
from workload import build_workload

ROOT = Path(__file__).resolve().parent.parent


def export_package(ref: str, into: Path) -> Path:
    """The ``vfio_multifd`` package as it is at git commit ``ref``, under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "vfio_multifd"], capture_output=True, check=True
    )
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/compare.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--ref", default=None, help="A's code: this git commit (default: B's)")
    parser.add_argument("--size", default="2G")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--sink", choices=("null", "file"), default="null")
    parser.add_argument("--a-options", default="", help="receive options of A")
    parser.add_argument("--b-options", default="", help="receive options of B")
    parser.add_argument("--no-baseline", action="store_true", help="leave out the plain copy")
    parser.add_argument("--tmpdir", default=None)
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    per_device = [size // args.devices] * args.devices
    workload = build_workload(per_device, channels=args.channels)
    work = Path(tempfile.mkdtemp(prefix="vfio-multifd-compare-", dir=args.tmpdir))
    out_dir = work / "out"
    out_dir.mkdir()
    prefix: list[str] = []
    if args.ref is not None:
        source = export_package(args.ref, work / "a")
        # From there: ``python -m`` puts the working directory first on sys.path.
        prefix = ["env", "-C", str(source), f"PYTHONPATH={source}"]
    variants = {
        "A": (prefix, shlex.split(args.a_options)),
        "B": ([], shlex.split(args.b_options)),
    }
    kinds = ([] if args.no_baseline else ["plain"]) + list(variants)
    runs: dict[str, list[Run]] = {kind: [] for kind in kinds}
    fsync = True
    try:
        for rep in range(args.reps):
            order = kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]
            for kind in order:
                target = out_dir if args.sink == "file" else None
                if target is not None:
                    os.sync()
                if kind == "plain":
                    sink = str(out_dir / "plain.bin") if target else os.devnull
                    run = run_baseline(workload, sink, fsync, count_syscalls=True)
                else:
                    command_prefix, options = variants[kind]
                    run = run_the_daemon(
                        workload, target, fsync, *options, count_syscalls=True,
                        prefix=command_prefix,
                    )  # fmt: skip
                runs[kind].append(run)
                for entry in out_dir.iterdir():
                    entry.unlink()
                figures = f"{run.mb_per_s:7.0f} MB/s  cpu {run.cpu_per_gb:.3f} s/GB"
                status = run_status(run.ok, figures, run.error)
                progress(f"compare rep {rep + 1}/{args.reps} {kind:5} {status}")
    finally:
        for entry in out_dir.iterdir():
            entry.unlink()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    a_label = f"A ({args.ref or 'working tree'}{' ' + args.a_options if args.a_options else ''})"
    b_label = f"B (working tree{' ' + args.b_options if args.b_options else ''})"
    print(f"{args.devices} device(s), {args.channels} channels, {args.sink}, {size >> 20} MiB, "
          f"{args.reps} rounds; A = {a_label}, B = {b_label}")  # fmt: skip
    for kind in kinds:
        rates = [run.mb_per_s for run in runs[kind] if run.ok]
        ok = f"{len(rates)}/{len(runs[kind])}"
        print(f"  {kind:5} MB/s {median_range(rates, '.0f')}  ok {ok}")
    rows = [(kind, [r.counts for r in runs[kind] if r.ok], workload.size) for kind in kinds]
    for line in format_per_gb(rows):
        print("  " + line)
    for attr in ("mb_per_s", "cpu_per_gb"):
        ratios = [
            getattr(b, attr) / getattr(a, attr)
            for a, b in zip(runs["A"], runs["B"], strict=True)
            if a.ok and b.ok and getattr(a, attr) > 0
        ]
        median = f"{statistics.median(ratios):.3f}" if ratios else "-"
        print(f"  B/A {attr} per pair: median {median} {median_range(ratios, '.3f')}")
    print(textwrap.fill(LEGEND, 100))
    failed = sum(not run.ok for kind in kinds for run in runs[kind])
    return 1 if failed else 0


if __name__ == "__main__":
    quiet_sender()
    raise SystemExit(main())
