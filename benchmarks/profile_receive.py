"""Where the daemon's CPU goes: py-spy ``--native`` over one run, per thread.

    python benchmarks/profile_receive.py [--size 3G] [--channels 4] [--devices 1]
        [--rate 250] [--top 12] [--out DIR] [-- RECEIVE OPTIONS...]

Runs ``py-spy record --native --threads --format raw`` around the daemon
(``receive`` to /dev/null, the same pre-built streams and replay sender as
``throughput.py``) and reads the collapsed stacks back. For each thread it
prints how busy it was (its non-idle samples over the samples a fully busy
thread would have had between its first and last sample) and the frames
where its samples end (self time, native frames included: the kernel's
``read`` shows as the libc call that enters it). A thread near 100 % is the
bottleneck. The raw stacks stay in ``--out`` (``profile.txt``; feed them to
any flame graph tool).

Needs py-spy (``pip install py-spy``; not a dependency of the package) and
permission to ptrace a child (root, or ``kernel.yama.ptrace_scope`` 0/1).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from daemon import daemon_command, run_receiver
from vfio_multifd.config import parse_size
from workload import build_workload

# py-spy's raw format: "process NNN:\"cmd\";thread (0x7f..);frame (file:line);... COUNT"
# (the process and thread parts depend on --threads and subprocess handling).
THREAD = re.compile(r"thread \((\w+)\)(?::\s*([^;]+))?")


def profile(
    size: int, channels: int, devices: int, rate: int, out: Path, options: Sequence[str]
) -> Path:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    workload = build_workload([size // devices] * devices, channels=channels)
    raw = out / "profile.txt"
    native = [] if os.environ.get("PROFILE_PYTHON_ONLY") else ["--native"]
    record = [py_spy, "record", *native, "--threads", "--format", "raw"]
    record += ["--nonblocking"] if not native else []
    record += ["--rate", str(rate), "--output", str(raw), "--"]
    started = time.monotonic()
    finished = run_receiver([*record, *daemon_command(workload, None, *options)], workload)
    if finished.error:
        raise SystemExit(f"profile run failed: {finished.error}")
    print(f"profiled {size / 1e9:.2f} GB in {time.monotonic() - started:.1f} s -> {raw}")
    return raw


def report(raw: Path, rate: int, top: int) -> None:
    by_thread: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    names: dict[str, str] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        match = next(filter(None, map(THREAD.match, frames)), None)
        key = match.group(1) if match else "?"
        names.setdefault(key, (match and match.group(2)) or _thread_name(frames))
        by_thread[key][_leaf(frames)] += int(count)
    # Without --idle py-spy drops idle samples, so a thread's share of the busiest
    # thread's ceiling (rate x the run) is its busy fraction.
    busiest = max((sum(c.values()) for c in by_thread.values()), default=0)
    print(f"{'thread':<34} {'samples':>8}  share of busiest")
    for key, counter in sorted(by_thread.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(counter.values())
        print(f"{names[key]:<34} {total:>8}  {total / busiest:6.1%}")
        for frame, n in counter.most_common(top):
            print(f"    {n / total:6.1%}  {frame[:110]}")
    print(f"(rate {rate}/s: a thread busy for the whole run has about {rate} samples per second)")


def _leaf(frames: list[str]) -> str:
    return frames[-1] if frames else "?"


def _thread_name(frames: list[str]) -> str:
    """The thread's outermost Python function tells what it is (loop, writer, ...)."""
    python = [f for f in frames if ".py:" in f]
    for frame in python:
        for marker in ("_worker", "run_forever", "_reader_thread", "main"):
            if marker in frame:
                return frame.split(" ")[0][:33]
    return (python[0].split(" ")[0] if python else frames[0])[:33]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="3G")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--rate", type=int, default=250)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("options", nargs="*", help="extra receive options (after --)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="vfio-multifd-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    raw = profile(
        parse_size(args.size), args.channels, args.devices, args.rate, out, args.options
    )
    report(raw, args.rate, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
