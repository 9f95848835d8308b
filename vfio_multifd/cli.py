"""``vfio-multifd receive | send | status``: the command line.

The only place that picks the event loop (uvloop) and turns outcomes into
exit codes: 0 complete, 1 the migration failed (or was cancelled with
``migrate_cancel``), 2 usage error, 128+N when stopped by signal N (130 for
SIGINT, 143 for SIGTERM).
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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TextIO

import structlog

from . import logconfig, notify, status_client, status_server
from .config import (
    DEFAULT_MAX_QUEUED_BYTES,
    Address,
    DeviceSpec,
    Digest,
    QueueFullPolicy,
    ReceiveSettings,
    parse_size,
    parse_uuid,
)
from .errors import Cancelled, MultifdError, UsageError
from .results import SessionResult
from .sender import DEFAULT_CHUNK_SIZE, FAULTS, ORDERS, SendResult, SourceDevice, send
from .session import Session
from .wire import DEFAULT_MAX_PACKET_SIZE

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

log = structlog.get_logger("vfio_multifd.cli")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _seconds(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    return None if value <= 0 else value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vfio-multifd",
        description="QEMU-format multifd device-state migration: destination and source.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    rx = sub.add_parser("receive", help="run the destination daemon")
    rx.add_argument(
        "--listen",
        default="tcp:127.0.0.1:4444",
        metavar="tcp:HOST:PORT|unix:PATH",
        help="where to listen (default tcp:127.0.0.1:4444; port 0 picks a free port)",
    )
    rx.add_argument(
        "--channels",
        type=int,
        default=2,
        metavar="N",
        help="multifd channels to expect (default 2, as QEMU)",
    )
    rx.add_argument(
        "--uuid",
        default="00000000-0000-0000-0000-000000000000",
        help="the source VM's UUID (default all zero)",
    )
    rx.add_argument(
        "--device",
        action="append",
        required=True,
        metavar="idstr=ID,instance=I,data=PATH[,config=PATH]",
        help="a device to receive (repeatable); instance defaults to 0, config to PATH.config",
    )
    rx.add_argument(
        "--max-packet-size",
        type=_size,
        default=DEFAULT_MAX_PACKET_SIZE,
        metavar="SIZE",
        help="largest next_packet_size accepted (default 4M)",
    )
    rx.add_argument(
        "--max-queued-bytes",
        type=_size,
        default=DEFAULT_MAX_QUEUED_BYTES,
        metavar="SIZE",
        help="bound on chunk bytes held in memory, all devices together (default 64M; 0: no bound)",
    )
    rx.add_argument(
        "--on-queue-full",
        choices=[p.value for p in QueueFullPolicy],
        default=QueueFullPolicy.SPILL.value,
        help="at the bound: spill to disk (default) or fail like QEMU",
    )
    rx.add_argument(
        "--spill-dir",
        default=None,
        metavar="DIR",
        help="where spilled chunks go (default: the first data file's directory)",
    )
    rx.add_argument(
        "--accept-timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="fail unless every channel connects within this time (default: wait)",
    )
    rx.add_argument(
        "--handshake-timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="refuse a connection that sends no handshake within this time (10)",
    )
    rx.add_argument(
        "--progress-timeout",
        type=_seconds,
        default=150.0,
        metavar="SECONDS",
        help="fail after this long without a byte received or written "
        "(default 150, as KubeVirt; 0 disables)",
    )
    rx.add_argument(
        "--digest",
        choices=[d.value for d in Digest],
        default=Digest.XXH3_128.value,
        help="digest of each device's data in the summary (default xxh3-128)",
    )
    rx.add_argument(
        "--no-fsync",
        action="store_true",
        help="do not fsync outputs before renaming them into place",
    )
    rx.add_argument(
        "--status-socket",
        default=None,
        metavar="PATH",
        help="answer QMP-shaped query-migrate and migrate_cancel on this unix socket",
    )
    rx.add_argument(
        "--ready-fd",
        type=int,
        default=None,
        metavar="N",
        help="once listening, write a newline to file descriptor N and close it "
        "(READY=1 also goes to $NOTIFY_SOCKET when systemd sets it)",
    )
    _progress_option(rx, "log migration_progress this often while active")
    _log_options(rx)

    tx = sub.add_parser("send", help="send device state like a QEMU source")
    tx.add_argument("--connect", required=True, metavar="tcp:HOST:PORT|unix:PATH")
    tx.add_argument("--channels", type=int, default=2, metavar="N")
    tx.add_argument("--uuid", default="00000000-0000-0000-0000-000000000000")
    tx.add_argument(
        "--device",
        action="append",
        required=True,
        metavar="idstr=ID,instance=I,(source=FILE|size=BYTES[,seed=S])",
        help="a device to send (repeatable)",
    )
    tx.add_argument(
        "--chunk-size",
        type=_size,
        default=DEFAULT_CHUNK_SIZE,
        metavar="SIZE",
        help="largest chunk (default 1M, as QEMU)",
    )
    tx.add_argument(
        "--order",
        choices=ORDERS,
        default="round-robin",
        help="packet order: round-robin as QEMU, or reverse / random",
    )
    tx.add_argument("--seed", type=int, default=0, help="seed of --order random")
    tx.add_argument("--digest", choices=[d.value for d in Digest], default=Digest.XXH3_128.value)
    tx.add_argument(
        "--inject",
        choices=sorted(FAULTS),
        default=None,
        metavar="FAULT",
        help="put one fault into channel 0's stream, to see an error: " + ", ".join(sorted(FAULTS)),
    )
    tx.add_argument(
        "--connect-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="keep retrying to connect for this long (default 30)",
    )
    _progress_option(
        tx, "without a terminal, log send_progress this often (on one: a bar per device)"
    )
    _log_options(tx)

    st = sub.add_parser("status", help="ask a running daemon (or QEMU's QMP) for query-migrate")
    st.add_argument("--socket", required=True, metavar="PATH", help="the --status-socket")
    st.add_argument("--json", action="store_true", help="print the reply as JSON")
    st.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="give up after (5)"
    )
    return parser


def _progress_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--progress-interval",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help=f"{what} (default 5; 0 disables)",
    )


def _log_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=logconfig.FORMATS,
        default="auto",
        help="log lines on stderr: auto (default) is console on a terminal, JSON otherwise",
    )
    parser.add_argument(
        "--log-level",
        choices=logconfig.LEVELS,
        default="info",
        help="debug adds QEMU-style trace events (buffer_incoming, load_starved...)",
    )


def receive_settings(args: argparse.Namespace) -> ReceiveSettings:
    from pathlib import Path

    if args.channels < 1:
        raise UsageError(f"--channels must be at least 1, not {args.channels}")
    return ReceiveSettings(
        devices=tuple(DeviceSpec.parse(text) for text in args.device),
        listen=Address.parse(args.listen),
        channels=args.channels,
        uuid=parse_uuid(args.uuid),
        max_packet_size=args.max_packet_size,
        max_queued_bytes=args.max_queued_bytes or None,
        on_queue_full=QueueFullPolicy(args.on_queue_full),
        spill_dir=Path(args.spill_dir) if args.spill_dir else None,
        accept_timeout=args.accept_timeout,
        handshake_timeout=args.handshake_timeout or 10.0,
        progress_timeout=args.progress_timeout,
        digest=Digest(args.digest),
        fsync=not args.no_fsync,
    )


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


def run_loop(coro_factory: object) -> object:
    import uvloop

    return uvloop.run(coro_factory)  # type: ignore[arg-type]


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


def print_send_summary(result: SendResult, out: TextIO) -> None:
    for key, size, chunks, digest in result.devices:
        print(f"device {key}: {size} bytes in {chunks} chunks, {digest}", file=out)
    print(
        f"sent {sum(d[1] for d in result.devices)} bytes in {result.seconds:.3f} s "
        f"({result.mb_per_s:.1f} MB/s) over {len(result.channel_bytes)} channels",
        file=out,
    )


def _send(args: argparse.Namespace) -> SendResult:
    devices = [SourceDevice.parse(text) for text in args.device]
    with _send_progress(devices, args.progress_interval) as progress:
        return send(
            Address.parse(args.connect),
            devices,
            channels=args.channels,
            uuid=parse_uuid(args.uuid),
            chunk_size=args.chunk_size,
            order=args.order,
            seed=args.seed,
            digest=Digest(args.digest),
            connect_timeout=args.connect_timeout,
            inject=args.inject,
            progress=progress,
        )


SendProgress = Callable[[int, int], None]


@contextlib.contextmanager
def _send_progress(
    devices: Sequence[SourceDevice], interval: float | None
) -> Iterator[SendProgress | None]:
    """A bar per device on a terminal, ``send_progress`` log lines otherwise."""
    if sys.stderr.isatty():
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
        return
    if interval is None:
        yield None
        return
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


def _status(args: argparse.Namespace) -> int:
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


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as error:
        print(f"vfio-multifd: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "status":
        return _status(args)
    logconfig.configure(log_format=args.log_format, level=args.log_level)
    try:
        if args.command == "receive":
            settings = receive_settings(args)
            if args.ready_fd is not None:
                notify.check_ready_fd(args.ready_fd)
            options = DaemonOptions(
                status_socket=args.status_socket,
                ready_fd=args.ready_fd,
                progress_interval=args.progress_interval,
            )
            result = run_loop(_receive(settings, options))
            assert isinstance(result, SessionResult)
            print_receive_summary(result, sys.stdout)
        else:
            print_send_summary(_send(args), sys.stdout)
        return EXIT_OK
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
