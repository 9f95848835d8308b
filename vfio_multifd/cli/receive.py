"""``vfio-multifd receive``: the daemon's settings, and what runs around the session.

The session (``daemon/session.py``) receives; around it, for as long as it
runs, come the signal handlers, the status socket, the metrics, readiness and
the progress lines, in that order once it listens.

Signals (``signals.py``): every signal whose default action would end the
process, real-time signals included (:data:`~.signals.STOPPING_SIGNALS`),
stops the migration like SIGTERM, with the same cleanup: temporary files
removed, sockets unlinked. SIGUSR1 ends nothing: it logs a ``status_report``
line. SIGKILL cannot be caught. Once the outcome is decided they are all
ignored until the process exits: after the commit, the exit status is 0
whatever arrives.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import Address, ReceiveSettings, RecordSettings, TlsSettings
from ..daemon.session import Session
from ..errors import UsageError
from ..ops import notify
from ..results import SessionResult
from .report import print_receive_summary
from .result_file import ReceiveFacts, ResultFile
from .runner import EXIT_OK, configure_logging, run_loop
from .signals import DaemonSignals


def receive_settings(args: argparse.Namespace) -> ReceiveSettings:
    """The session's settings from ``receive``'s options (converted and checked)."""
    return ReceiveSettings(
        devices=tuple(args.device or ()),
        listen=args.listen,
        channels=args.channels,
        uuid=args.uuid,
        max_packet_size=args.max_packet_size,
        max_queued_bytes=args.max_queued_bytes,
        on_queue_full=args.on_queue_full,
        spill_dir=args.spill_dir,
        max_spill_bytes=args.max_spill_bytes,
        accept_timeout=args.accept_timeout,
        handshake_timeout=args.handshake_timeout,
        max_pending_connections=args.max_pending_connections,
        progress_timeout=args.progress_timeout,
        missing_channels_grace=args.missing_channels_grace,
        digest=args.digest,
        fsync=not args.no_fsync,
        tls=receive_tls(args),
        reader_threads=args.reader_threads,
        record=None if args.record is None else RecordSettings(args.record),
        main_stream=args.main_stream,
        ram=args.ram,
    )


def receive_tls(args: argparse.Namespace) -> TlsSettings | None:
    """``--tls-creds``, ``--tls-verify-peer``, ``--tls-authz``: TLS settings, or None."""
    if args.tls_creds is None:
        given = [
            name
            for name, value in (
                ("--tls-verify-peer", args.tls_verify_peer),
                ("--tls-authz", args.tls_authz),
            )
            if value is not None
        ]
        if given:
            raise UsageError(f"{' and '.join(given)} need --tls-creds DIR")
        return None
    return TlsSettings(
        creds_dir=args.tls_creds,
        verify_peer=args.tls_verify_peer != "no",
        authz=tuple(args.tls_authz or ()),
    )


def receive_command(args: argparse.Namespace) -> int:
    configure_logging(args)
    facts = ReceiveFacts(args.uuid, args.device or ())  # none: a RAM-only migration
    report: ResultFile | None = args.result_file
    if report is not None:
        report.begin(facts.document)
    settings = receive_settings(args)
    extra_paths = []
    if args.status_socket is not None:  # before anything starts, as for the other paths
        extra_paths.append((f"--status-socket {args.status_socket}", Path(args.status_socket)))
    if args.result is not None:
        extra_paths.append((f"--result {args.result}", args.result))
    settings.check_paths(*extra_paths)
    if args.ready_fd is not None:
        notify.check_ready_fd(args.ready_fd)
    options = DaemonOptions(
        status_socket=args.status_socket,
        metrics_listen=args.metrics_listen,
        ready_fd=args.ready_fd,
        progress_interval=args.progress_interval,
    )
    result = facts.result = run_loop(_receive(settings, options, facts), args.event_loop)
    print_receive_summary(result, sys.stdout, max_queued_bytes=settings.max_queued_bytes)
    return EXIT_OK


@dataclass(frozen=True, slots=True)
class DaemonOptions:
    """What the daemon does around the session: status socket, readiness, progress."""

    status_socket: str | None = None
    metrics_listen: Address | None = None
    ready_fd: int | None = None
    progress_interval: float | None = 5.0


async def _receive(
    settings: ReceiveSettings, options: DaemonOptions, facts: ReceiveFacts | None = None
) -> SessionResult:
    session = Session(settings)
    if facts is not None:
        facts.session = session
    # Everything allocated so far lives for the whole run: keep the collector
    # from walking it again and again while packets stream through.
    gc.freeze()
    signals = DaemonSignals(asyncio.get_running_loop(), session)
    signals.install()
    run = asyncio.create_task(session.run(), name="session")
    try:
        async with contextlib.AsyncExitStack() as stack:
            listening = asyncio.create_task(session.listening.wait())
            await asyncio.wait([run, listening], return_when=asyncio.FIRST_COMPLETED)
            if not listening.done():
                listening.cancel()
                return await run  # it failed before listening: raises why
            await _serve(session, run, options, stack)
            return await run
    finally:
        if not run.done():  # cancelled from outside (KeyboardInterrupt without a handler)
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        signals.ignore_until_exit()  # the outcome is decided: nothing may change it now


async def _serve(
    session: Session,
    run: asyncio.Task[SessionResult],
    options: DaemonOptions,
    stack: contextlib.AsyncExitStack,
) -> None:
    """Around a listening session: the status socket, the metrics, readiness and the
    progress lines, each stopped by ``stack`` when the session ends."""
    if options.status_socket is not None:
        from ..ops import status_server  # what a receive without it need not import

        server = status_server.StatusServer(session, options.status_socket)
        await _start_or_abort(run, server.start)
        stack.push_async_callback(server.close)
    if options.metrics_listen is not None:
        from ..ops import metrics

        scraped = metrics.MetricsServer(session, options.metrics_listen)
        await _start_or_abort(run, scraped.start)
        stack.push_async_callback(scraped.close)
    _notify_ready(session, options)
    if options.progress_interval is not None:
        reporter = asyncio.create_task(
            notify.report_progress(
                session,
                options.progress_interval,
                notify=bool(os.environ.get("NOTIFY_SOCKET")),
            ),
            name="progress",
        )
        stack.push_async_callback(_stop, reporter)


async def _start_or_abort(
    run: asyncio.Task[SessionResult], start: Callable[[], Awaitable[object]]
) -> None:
    """Start a server beside the session; if it cannot, the session is cancelled too
    (and discards its outputs) before the error goes on."""
    try:
        await start()
    except BaseException:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        raise


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _notify_ready(session: Session, options: DaemonOptions) -> None:
    """The channel socket (and the status socket) accept connections: say so."""
    if options.ready_fd is not None:
        notify.notify_ready_fd(options.ready_fd)
    notify.sd_notify(
        f"READY=1\nSTATUS=waiting for {session.settings.channels} channel(s) on {session.address}"
    )
