"""What a Prometheus scrape costs the data path: the daemon with and without one every 100 ms.

    python benchmarks/scrape_cost.py [--size 2G] [--reps 5] [--channels 4] [--interval 0.1]

One device over ``--channels`` channels into /dev/null, a/b alternated
``--reps`` times: (a) ``receive`` as usual, (b) ``receive --metrics-listen
tcp:127.0.0.1:PORT`` with a thread that sends ``GET /metrics`` every
``--interval`` seconds from before the first byte to after the last. MB/s is
the daemon's own (``migration_completed``); CPU is the receiving process's
user + system per 1e9 data bytes. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
from collections.abc import Sequence

from daemon import DaemonRun, run_daemon
from report import median_range, progress
from vfio_multifd.config import parse_size
from workload import build_workload


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Scraper(threading.Thread):
    """``GET /metrics`` every ``interval`` seconds until stopped; counts the 200 answers."""

    def __init__(self, port: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.port, self.interval = port, interval
        self.stop = threading.Event()
        self.answered = 0
        self.biggest = 0

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
                    data = b""
                    while chunk := sock.recv(65536):
                        data += chunk
            except OSError:
                continue  # not listening yet, or gone already
            if data.startswith(b"HTTP/1.1 200 "):
                self.answered += 1
                self.biggest = max(self.biggest, len(data))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2G")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--interval", type=float, default=0.1)
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    workload = build_workload([size], channels=args.channels)
    progress(
        f"scrape cost: {size >> 20} MiB, 1 device, {args.channels} channels, /dev/null, "
        f"{args.reps} a/b pairs, a scrape every {args.interval:g} s"
    )
    plain: list[DaemonRun] = []
    scraped: list[DaemonRun] = []
    scrapes: list[int] = []
    biggest = 0
    for rep in range(args.reps):
        for kind in ("plain", "scraped") if rep % 2 == 0 else ("scraped", "plain"):
            if kind == "plain":
                plain.append(run_daemon(workload, None))
                continue
            port = free_port()
            scraper = Scraper(port, args.interval)
            scraper.start()
            try:
                scraped.append(
                    run_daemon(workload, None, "--metrics-listen", f"tcp:127.0.0.1:{port}")
                )
            finally:
                scraper.stop.set()
                scraper.join(5)
            scrapes.append(scraper.answered)
            biggest = max(biggest, scraper.biggest)
    failed = [run.error for run in (*plain, *scraped) if not run.ok]
    ok_plain = [run for run in plain if run.ok]
    ok_scraped = [run for run in scraped if run.ok]
    if not ok_plain or not ok_scraped:
        print(f"scrape cost: no successful run to compare: {failed}")
        return 1

    def mbps(runs: list[DaemonRun]) -> list[float]:
        return [run.mb_per_s for run in runs]

    def cpu(runs: list[DaemonRun]) -> list[float]:
        return [run.cpu / (size / 1e9) for run in runs]

    ratio = statistics.median(mbps(ok_scraped)) / statistics.median(mbps(ok_plain))
    label = f"scrape every {args.interval:g} s"
    print(f"{'':28}{'MB/s':>22}{'CPU s/GB':>22}")
    for name, runs in (("no scrape", ok_plain), (label, ok_scraped)):
        rate, seconds = median_range(mbps(runs), ".0f"), median_range(cpu(runs), ".2f")
        print(f"{name:28}{rate:>22}{seconds:>22}")
    print(
        f"scraped/plain MB/s (medians): {ratio:.3f}; scrapes answered per run: {scrapes} "
        f"(largest answer {biggest} bytes); ok runs {len(ok_plain)}+{len(ok_scraped)} "
        f"of {2 * args.reps}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
