"""``vfio-multifd receive | send | status``: the command line.

The only place that picks the event loop (``--event-loop``: uvloop by default,
or the standard library's asyncio) and turns outcomes into
exit codes: 0 complete, 1 the migration failed (or was cancelled with
``migrate_cancel``), 2 usage error, 128+N when stopped by signal N (130 for
SIGINT, 143 for SIGTERM).

Each subcommand is one handler, ``_<name>_command(args) -> int``, given
options already converted and checked (:mod:`vfio_multifd.cli_options`);
:func:`main` parses, runs the handler and maps what it raises to an exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import os
import signal
import sys
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TextIO, TypeVar

import structlog

from . import cli_options, logconfig, notify, status_client, status_server
from .config import ReceiveSettings
from .errors import Cancelled, MultifdError, UsageError
from .results import SessionResult
from .send_progress import send_progress
from .sender import SendResult, send
from .session import Session

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

log = structlog.get_logger("vfio_multifd.cli")

T = TypeVar("T")


def build_parser() -> argparse.ArgumentParser:
    return cli_options.build_parser(
        receive=_receive_command, send=_send_command, status=_status_command
    )


# -- receive ------------------------------------------------------------------------


def receive_settings(args: argparse.Namespace) -> ReceiveSettings:
    """The session's settings from ``receive``'s options (converted and checked)."""
    return ReceiveSettings(
        devices=tuple(args.device),
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
        progress_timeout=args.progress_timeout,
        digest=args.digest,
        fsync=not args.no_fsync,
    )


def _receive_command(args: argparse.Namespace) -> int:
    _configure_logging(args)
    settings = receive_settings(args)
    if args.ready_fd is not None:
        notify.check_ready_fd(args.ready_fd)
    options = DaemonOptions(
        status_socket=args.status_socket,
        ready_fd=args.ready_fd,
        progress_interval=args.progress_interval,
    )
    result = run_loop(_receive(settings, options), args.event_loop)
    print_receive_summary(result, sys.stdout)
    return EXIT_OK


@dataclass(frozen=True, slots=True)
class DaemonOptions:
    """What the daemon does around the session: status socket, readiness, progress."""

    status_socket: str | None = None
    ready_fd: int | None = None
    progress_interval: float | None = 5.0


async def _receive(settings: ReceiveSettings, options: DaemonOptions) -> SessionResult:
    session = Session(settings)
    # Everything allocated so far lives for the whole run: keep the collector
    # from walking it again and again while packets stream through.
    gc.freeze()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        name = signal.Signals(signum).name
        loop.add_signal_handler(
            signum, functools.partial(session.cancel, f"cancelled by {name}", signal_number=signum)
        )
    run = asyncio.create_task(session.run(), name="session")
    try:
        async with contextlib.AsyncExitStack() as stack:
            listening = asyncio.create_task(session.listening.wait())
            await asyncio.wait([run, listening], return_when=asyncio.FIRST_COMPLETED)
            if not listening.done():
                listening.cancel()
                return await run  # it failed before listening: raises why
            if options.status_socket is not None:
                server = status_server.StatusServer(session, options.status_socket)
                try:
                    await server.start()
                except BaseException:
                    run.cancel()  # the session discards its outputs
                    await asyncio.gather(run, return_exceptions=True)
                    raise
                stack.push_async_callback(server.close)
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
            return await run
    finally:
        if not run.done():  # cancelled from outside (KeyboardInterrupt without a handler)
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


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


def run_loop(
    main: Coroutine[Any, Any, T], event_loop: cli_options.EventLoop = cli_options.EventLoop.UVLOOP
) -> T:
    """Run ``main`` to the end on ``event_loop``: the one place the event loop is chosen."""
    if event_loop is cli_options.EventLoop.ASYNCIO:
        return asyncio.run(main)
    try:
        import uvloop
    except ImportError as error:
        main.close()
        raise UsageError(
            f"--event-loop uvloop: cannot import uvloop ({error}); --event-loop asyncio needs nothing"
        ) from None
    return uvloop.run(main)


def print_receive_summary(result: SessionResult, out: TextIO) -> None:
    for d in result.devices:
        print(
            f"device {d.device}: {d.bytes} bytes in {d.chunks} chunks, "
            f"config {d.config_bytes} bytes, {d.seconds:.3f} s "
            f"({d.bytes / 1e6 / d.seconds if d.seconds > 0 else 0.0:.1f} MB/s), "
            f"{d.digest} -> {d.data_path}",
            file=out,
        )
    print(
        f"received {result.data_bytes} bytes in {result.seconds:.3f} s "
        f"({result.mb_per_s:.1f} MB/s); peak queued {result.peak_queued_bytes} bytes, "
        f"spilled {result.spilled_bytes} bytes, paused {result.paused_seconds:.3f} s",
        file=out,
    )


# -- send ---------------------------------------------------------------------------


def _send_command(args: argparse.Namespace) -> int:
    _configure_logging(args)
    with send_progress(args.device, args.progress_interval) as progress:
        result = send(
            args.connect,
            args.device,
            channels=args.channels,
            uuid=args.uuid,
            chunk_size=args.chunk_size,
            order=args.order,
            seed=args.seed,
            digest=args.digest,
            connect_timeout=args.connect_timeout,
            inject=args.inject,
            progress=progress,
        )
    print_send_summary(result, sys.stdout)
    return EXIT_OK


def print_send_summary(result: SendResult, out: TextIO) -> None:
    for key, size, chunks, digest in result.devices:
        print(f"device {key}: {size} bytes in {chunks} chunks, {digest}", file=out)
    print(
        f"sent {sum(d[1] for d in result.devices)} bytes in {result.seconds:.3f} s "
        f"({result.mb_per_s:.1f} MB/s) over {len(result.channel_bytes)} channels",
        file=out,
    )


# -- status -------------------------------------------------------------------------


def _status_command(args: argparse.Namespace) -> int:
    try:
        reply = status_client.query(args.socket, timeout=args.timeout)
    except (OSError, ValueError) as error:
        print(f"vfio-multifd: error: {args.socket}: {error}", file=sys.stderr)
        return EXIT_FAILED
    if "error" in reply:
        print(f"vfio-multifd: error: {reply['error'].get('desc', reply)}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(reply["return"], indent=2))
    else:
        print(status_client.format_table(reply["return"]))
    return EXIT_OK


# -- entry points -------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run its subcommand's handler, and map the outcome to an exit code."""
    try:
        args = build_parser().parse_args(argv)
        handler: cli_options.Handler = args.handler
        return handler(args)
    except UsageError as error:
        print(f"vfio-multifd: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Cancelled as error:
        print(f"vfio-multifd: {error}", file=sys.stderr)
        if error.signal_number is not None:
            return 128 + error.signal_number
        return EXIT_FAILED  # migrate_cancel: not a signal, and not complete
    except MultifdError as error:
        log.error("migration_failed", error=str(error), reason=error.reason.value)
        print(f"vfio-multifd: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as error:
        print(f"vfio-multifd: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


def _configure_logging(args: argparse.Namespace) -> None:
    logconfig.configure(log_format=args.log_format, level=args.log_level)


def console_main() -> None:
    """The console script: :func:`main`, then exit even past a stuck writer thread.

    A write to a FIFO that nobody reads cannot be interrupted; the session
    abandons such a thread after a short wait (and has already removed its
    temporary files), and the process must not then hang at exit joining it.
    """
    code = main()
    stuck = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if stuck:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)
