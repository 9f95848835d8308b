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
from .sender import SendTally

log = structlog.get_logger("vfio_multifd.send_progress")

#: ``progress(device_index, nbytes)``, called by :func:`vfio_multifd.sender.send`
#: from each channel's thread.
SendProgress = Callable[[int, int], None]


@contextlib.contextmanager
def send_progress(
    devices: Sequence[SourceDevice], interval: float | None, tally: SendTally | None = None
) -> Iterator[SendProgress | None]:
    """A bar per device on a terminal; elsewhere a log line every ``interval``
    seconds, or nothing when ``interval`` is None. ``tally`` (the one given to
    :func:`vfio_multifd.sender.send`) times the lines' rate as the summary's."""
    if sys.stderr.isatty():
        with _bars(devices) as progress:
            yield progress
    elif interval is None:
        yield None
    else:
        with _log_lines(devices, interval, tally or SendTally()) as progress:
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
def _log_lines(
    devices: Sequence[SourceDevice], interval: float, tally: SendTally
) -> Iterator[SendProgress]:
    """``send_progress`` lines: data bytes sent, each device's bytes sent and size, and
    ``bytes_per_s`` averaged from the send's start (``tally.started``), as the summary's
    rate is; a last line when the send ends, whose rate is the summary's."""
    sent = [0] * len(devices)
    lock = threading.Lock()
    stop = threading.Event()

    def count(device: int, nbytes: int) -> None:
        with lock:
            sent[device] += nbytes

    def line(now: float) -> None:
        with lock:
            per_device = list(sent)
        total = sum(per_device)
        started = tally.started
        seconds = 0.0 if started is None else now - started
        log.info(
            "send_progress",
            bytes=total,
            seconds=round(seconds, 3),
            bytes_per_s=round(total / seconds) if seconds > 0 else 0,
            devices={
                str(d.key): {"bytes": n, "size": d.size}
                for d, n in zip(devices, per_device, strict=True)
            },
        )

    def report() -> None:
        while not stop.wait(interval):
            line(time.monotonic())

    reporter = threading.Thread(target=report, name="send-progress", daemon=True)
    reporter.start()
    try:
        yield count
    finally:
        stop.set()
        reporter.join(timeout=1.0)
        if tally.started is not None:
            line(time.monotonic() if tally.ended is None else tally.ended)
