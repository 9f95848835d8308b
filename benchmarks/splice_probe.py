"""Would splice(2) pay? The plain copy with ``recv_into`` against the same with ``splice``.

    python benchmarks/splice_probe.py [--size 2G] [--reps 5]

The throughput issue asked for a measured try of copies that never enter user
space (socket -> pipe -> sink). This measures the most they could save: the
baseline receiver (``plain_copy.py``, 4 connections, /dev/null) reading into a
reused buffer, against the same receiver splicing through a pipe, alternated,
the same pre-built streams. The daemon itself cannot splice without giving up
its digest (xxh3 by default: the bytes must pass through user space to be
hashed), so unless splice is much cheaper here, there is nothing to try in it.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Sequence

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
    runs: dict[str, list[tuple[float, float]]] = {"recv_into": [], "splice": []}
    for _ in range(args.reps):
        for kind, results in runs.items():
            command = plain_copy.command(4, os.devnull, splice=kind == "splice")
            finished = run_receiver(command, workload)
            done = finished.named(plain_copy.DONE)
            if finished.error or not done or done[-1]["bytes"] != sum(workload.channel_bytes):
                print(f"{kind}: failed ({finished.error or 'no report'})")
                return 1
            results.append((finished.cpu / (size / 1e9), size / 1e6 / float(done[-1]["seconds"])))
    print(f"plain copy, 4 connections, /dev/null, {size >> 20} MiB, {args.reps} runs each:")
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
