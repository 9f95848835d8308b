"""Where the daemon's CPU goes, per thread: exact CPU time from /proc, frames from py-spy.

    python benchmarks/profile_receive.py [--size 2G] [--channels 4] [--devices 1]
        [--rate 250] [--top 8] [--python-only] [--out DIR] [-- RECEIVE OPTIONS...]

Runs the daemon (``receive`` to /dev/null, the same pre-built streams and
replay sender as ``throughput.py``) under ``py-spy record --threads --format
raw`` (``--native`` unless ``--python-only``, which also samples without
stopping the process) and, meanwhile, reads each of the daemon's threads'
user and system time from ``/proc/PID/task/TID/stat``. For each thread it
prints its CPU seconds and how busy it was (CPU time over the time from the
first byte received to the last device complete, the daemon's own clock: a
thread near 100 % is the bottleneck), then the frames its samples end in
(self time; native frames include the libc call that enters the kernel, and a
thread waiting in ``epoll_pwait`` or on a lock is sampled there too: the CPU
column, not the samples, says how busy it is). The raw stacks stay in
``--out`` (``profile.txt``; any flame graph tool reads them).

py-spy's own sampling slows the daemon down (with ``--native`` it stops the
process for each sample): the shares between threads are what to read, not
the throughput. Needs py-spy (``pip install py-spy``; not a dependency of the
package) and permission to ptrace a child (root, or ``kernel.yama.ptrace_scope``
0 or 1).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from daemon import daemon_command, run_receiver
from vfio_multifd.config import parse_size
from workload import build_workload

# py-spy's raw format: "thread (TID): NAME;frame (file:line);... COUNT" with --threads.
THREAD = re.compile(r"thread \((\w+)\)(?::\s*([^;]+))?")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ThreadClock(threading.Thread):
    """Polls the CPU time of every thread of the profiled daemon (py-spy's child)."""

    def __init__(self, parent: int) -> None:
        super().__init__(daemon=True)
        self.parent = parent
        self.cpu: dict[int, tuple[float, float]] = {}  # tid -> (user, system) seconds
        self.stop = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stop.wait(0.005):
            for pid in self._children():
                self._read(pid)

    def _children(self) -> list[int]:
        try:
            tasks = os.listdir(f"/proc/{self.parent}/task")
        except OSError:
            return []
        children = []
        for task in tasks:
            with contextlib.suppress(OSError, ValueError):
                text = Path(f"/proc/{self.parent}/task/{task}/children").read_text()
                children += [int(pid) for pid in text.split()]
        return children

    def _read(self, pid: int) -> None:
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    stat = Path(f"/proc/{pid}/task/{task}/stat").read_text()
                    fields = stat[stat.rindex(")") + 2 :].split()
                    user, system = int(fields[11]), int(fields[12])
                    self.cpu[int(task)] = (user / CLOCK_TICKS, system / CLOCK_TICKS)


def profile(
    size: int,
    channels: int,
    devices: int,
    rate: int,
    out: Path,
    options: Sequence[str],
    *,
    native: bool = True,
) -> tuple[Path, dict[int, tuple[float, float]], float]:
    """Profile one run: the raw stacks, each thread's CPU, and the daemon's own seconds."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    workload = build_workload([size // devices] * devices, channels=channels)
    raw = out / "profile.txt"
    record = [py_spy, "record", "--threads", "--format", "raw", "--rate", str(rate)]
    record += ["--native"] if native else ["--nonblocking"]
    record += ["--output", str(raw), "--"]
    clocks: list[ThreadClock] = []
    command = [*record, *daemon_command(workload, None, *options)]
    finished = run_receiver(command, workload, started=lambda pid: clocks.append(ThreadClock(pid)))
    for clock in clocks:
        clock.stop.set()
        clock.join()
    if finished.error:
        raise SystemExit(f"profile run failed: {finished.error}")
    summary = finished.named("migration_completed")
    seconds = float(summary[-1]["seconds"]) if summary else 0.0
    print(f"profiled {size / 1e9:.2f} GB, the daemon's own {seconds:.2f} s -> {raw}")
    return raw, clocks[0].cpu if clocks else {}, seconds


def report(
    raw: Path, cpu: dict[int, tuple[float, float]], seconds: float, top: int
) -> None:
    by_thread: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    names: dict[str, str] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        match = next(filter(None, map(THREAD.match, frames)), None)
        key = match.group(1) if match else "?"
        names.setdefault(key, (match and match.group(2)) or f"thread {key}")
        by_thread[key][frames[-1]] += int(count)
    total_cpu = sum(user + system for user, system in cpu.values())
    print(f"daemon CPU {total_cpu:.2f} s (user + system, all threads, start to exit)")
    print(f"{'thread':<34} {'CPU s':>6} {'busy':>6}  (CPU over the daemon's {seconds:.2f} s)")
    rows = []
    for key, counter in by_thread.items():
        tid = int(key) if key.isdigit() else None
        user, system = cpu.get(tid, (0.0, 0.0)) if tid is not None else (0.0, 0.0)
        rows.append((user + system, key, counter, user, system))
    for used, key, counter, user, system in sorted(rows, key=lambda row: -row[0]):
        busy = f"{used / seconds:6.0%}" if seconds > 0 else "     ?"
        print(f"{names[key][:34]:<34} {used:6.2f} {busy}  user {user:.2f}, system {system:.2f}")
        total = sum(counter.values())
        for frame, n in counter.most_common(top):
            print(f"    {n / total:6.1%}  {frame[:110]}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="2G")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--rate", type=int, default=250)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--python-only", action="store_true", help="no --native frames")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("options", nargs="*", help="extra receive options (after --)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="vfio-multifd-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    raw, cpu, seconds = profile(
        parse_size(args.size),
        args.channels,
        args.devices,
        args.rate,
        out,
        args.options,
        native=not args.python_only,
    )
    report(raw, cpu, seconds, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
