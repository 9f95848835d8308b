"""What ``vfio-multifd send`` shows while it sends: a bar per device on a
terminal (rich, imported only then), ``send_progress`` log lines otherwise."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import structlog

from .plan import SourceDevice

log = structlog.get_logger("vfio_multifd.send_progress")

#: ``progress(device_index, nbytes)``, called by :func:`vfio_multifd.sender.send`
#: from each channel's thread.
SendProgress = Callable[[int, int], None]


@contextlib.contextmanager
def send_progress(
    devices: Sequence[SourceDevice], interval: float | None
) -> Iterator[SendProgress | None]:
    """A bar per device on a terminal; elsewhere a log line every ``interval``
    seconds, or nothing when ``interval`` is None."""
    if sys.stderr.isatty():
        with _bars(devices) as progress:
            yield progress
    elif interval is None:
        yield None
    else:
        with _log_lines(devices, interval) as progress:
            yield progress


@contextlib.contextmanager
def _bars(devices: Sequence[SourceDevice]) -> Iterator[SendProgress]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    ) as bars:
        tasks = [bars.add_task(str(d.key), total=d.size) for d in devices]
        yield lambda device, nbytes: bars.advance(tasks[device], nbytes)


@contextlib.contextmanager
def _log_lines(devices: Sequence[SourceDevice], interval: float) -> Iterator[SendProgress]:
    sent = [0] * len(devices)
    lock = threading.Lock()
    stop = threading.Event()

    def count(device: int, nbytes: int) -> None:
        with lock:
            sent[device] += nbytes

    def report() -> None:
        last, last_time = 0, time.monotonic()
        while not stop.wait(interval):
            with lock:
                per_device = list(sent)
            total, now = sum(per_device), time.monotonic()
            log.info(
                "send_progress",
                bytes=total,
                mb_per_s=round((total - last) / 1e6 / (now - last_time), 1),
                devices={
                    str(d.key): f"{n}/{d.size}" for d, n in zip(devices, per_device, strict=True)
                },
            )
            last, last_time = total, now

    reporter = threading.Thread(target=report, name="send-progress", daemon=True)
    reporter.start()
    try:
        yield count
    finally:
        stop.set()
        reporter.join(timeout=1.0)
