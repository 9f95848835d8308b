"""Naive receivers side by side: what a copy costs before the daemon does anything.

    python benchmarks/baselines.py [--size 2G] [--reps 5]

Three receivers that parse nothing, 4 connections to /dev/null, alternated
over the same pre-built streams: ``recv_into`` (``plain_copy.py``, the
baseline of ``throughput.py``: a thread per connection), ``splice``
(``plain_copy.py --splice``: socket -> pipe -> sink, no byte in user space)
and ``loop`` (``loop_copy.py``: one uvloop thread, a ``BufferedProtocol`` per
connection). The throughput issue asked for a measured try of copies that
never enter user space: ``splice`` against ``recv_into`` is the most they
could save, and the daemon could splice only bytes it does not hash (it
hashes every byte by default). ``loop`` against ``recv_into`` is what one
event loop thread costs in itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import loop_copy
import plain_copy
from daemon import run_receiver
from vfio_multifd.config import parse_size
from workload import build_workload


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="2G")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    workload = build_workload([size], channels=4)
    loop = [sys.executable, str(Path(loop_copy.__file__).resolve()), "--connections", "4"]
    commands = {
        "recv_into": plain_copy.command(4, os.devnull),
        "splice": plain_copy.command(4, os.devnull, splice=True),
        "loop": loop,
    }
    runs: dict[str, list[tuple[float, float]]] = {kind: [] for kind in commands}
    for _ in range(args.reps):
        for kind, results in runs.items():
            command = commands[kind]
            finished = run_receiver(command, workload)
            done = finished.named(plain_copy.DONE)
            if finished.error or not done or done[-1]["bytes"] != sum(workload.channel_bytes):
                print(f"{kind}: failed ({finished.error or 'no report'})")
                return 1
            results.append((finished.cpu / (size / 1e9), size / 1e6 / float(done[-1]["seconds"])))
    print(f"naive receivers, 4 connections, /dev/null, {size >> 20} MiB, {args.reps} runs each:")
    for kind, results in runs.items():
        cpu = [c for c, _ in results]
        rate = statistics.median(m for _, m in results)
        print(
            f"  {kind:9}  CPU {statistics.median(cpu):.3f} s/GB [{min(cpu):.3f}..{max(cpu):.3f}]"
            f"  {rate:.0f} MB/s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
