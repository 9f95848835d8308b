"""The only place that configures structlog.

JSON lines when stderr is not a terminal (a service's logs go to journald or
a collector), a readable console renderer when it is. Loggers below the level
are filtered at bind time, so a debug call on the hot path costs next to nothing.

Event names follow QEMU's trace points where one exists (``load_thread_start``
for ``vfio_load_bufs_thread_start``, ``buffer_incoming``, ``load_starved``...);
context such as ``channel`` and ``device`` is bound as fields, never formatted
into the event.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("auto", "json", "console")


class _Stderr:
    """Whatever ``sys.stderr`` is at the time of each write.

    A progress display (rich) swaps ``sys.stderr`` for a proxy that prints
    above its bars; log lines written through this follow the swap instead
    of tearing the display.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def resolve_format(log_format: str, stream: TextIO) -> str:
    """``auto`` is ``console`` on a terminal and ``json`` anywhere else."""
    if log_format not in FORMATS:
        raise ValueError(f"unknown log format {log_format!r} (one of {', '.join(FORMATS)})")
    if log_format == "auto":
        return "console" if stream.isatty() else "json"
    return log_format


#: The level :func:`configure` set, while its configuration is structlog's.
_configured: tuple[int, object] | None = None  # (level, wrapper class)


def configure(
    *, log_format: str = "auto", level: str = "info", stream: TextIO | None = None
) -> str:
    """Configure structlog once, at start-up; returns the format chosen (json or console)."""
    global _configured
    out: TextIO = stream if stream is not None else _Stderr()  # type: ignore[assignment]
    log_format = resolve_format(log_format, out)
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if log_format == "json":
        shared.append(structlog.processors.dict_tracebacks)
        renderer = structlog.processors.JSONRenderer()
    else:
        # Plain tracebacks whether or not rich is installed (cli/lean_imports.py).
        renderer = structlog.dev.ConsoleRenderer(
            colors=out.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    number = getattr(logging, level.upper())
    wrapper = structlog.make_filtering_bound_logger(number)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=wrapper,
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    _configured = (number, wrapper)
    return log_format


def debug_enabled(logger: object) -> bool:
    """Would ``logger.debug`` print? Asked once, so that per-packet debug lines cost
    one test when off.

    Unconfigured structlog (a library user who did not configure it) counts as
    off: its default logger prints everything, and a line per packet is not a
    default anyone wants. Configured by :func:`configure`: its level, also on
    structlog before 25.1, whose loggers lack ``is_enabled_for``. Configured by
    someone else: the logger's own ``is_enabled_for`` (structlog >= 25.1) or
    ``isEnabledFor`` (stdlib-style loggers), else off.
    """
    if not structlog.is_configured():
        return False
    if _configured is not None and structlog.get_config()["wrapper_class"] is _configured[1]:
        return _configured[0] <= logging.DEBUG
    for name in ("is_enabled_for", "isEnabledFor"):
        try:
            enabled = getattr(logger, name)
        except AttributeError:
            continue
        return bool(enabled(logging.DEBUG))
    return False
