"""``vfio-multifd receive | send | status | replay``: the command line.

The only place that picks the event loop (``--event-loop``: uvloop by default,
or the standard library's asyncio) and turns outcomes into
exit codes: 0 complete, 1 the migration failed (or was cancelled with
``migrate_cancel``), 2 usage error, 128+N when stopped by signal N (129
SIGHUP, 130 SIGINT, 131 SIGQUIT, 140 SIGUSR2, 142 SIGALRM, 143 SIGTERM...).
For ``send`` and ``replay``, 0 means the daemon closed every channel cleanly
(which it does only once its outputs are in place) and 1 that a connection
failed or was reset; for ``replay``, 3 that the daemon gave no verdict within
``--verdict-timeout`` of the last byte; for ``status``, 1 that nothing answered
or that the migration failed or is being or was cancelled (with ``--watch``:
that it ended otherwise than completed).

Signals (``receive``): every signal whose default action would end the
process, real-time signals included
(:data:`~vfio_multifd.daemon_signals.STOPPING_SIGNALS`), stops the migration
like SIGTERM, with the same cleanup: temporary files removed, sockets
unlinked. SIGUSR1 ends nothing: it logs a ``status_report`` line. SIGKILL
cannot be caught. Once the outcome is decided they are all ignored until the
process exits: after the commit, the exit status is 0 whatever arrives.

Each subcommand is one handler, ``_<name>_command(args) -> int``, given
options already converted and checked (:mod:`vfio_multifd.cli_options`);
:func:`main` parses, runs the handler and maps what it raises to an exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import signal
import sys
import threading
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import structlog

from . import cli_options, logconfig, notify
from .config import Address, ReceiveSettings, RecordSettings, TlsSettings
from .daemon_signals import REPORTING_SIGNALS, STOPPING_SIGNALS, DaemonSignals
from .errors import Cancelled, MultifdError, Reason, SendError, UsageError
from .replay import ENDING_TEXT, Recording, Replay
from .result_file import ReceiveFacts, ResultFile, SendFacts
from .results import SessionResult
from .sender import SendResult, SendTally, Stopped, send
from .session import Session

if TYPE_CHECKING:
    from .tls import TlsClient

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_VERDICT = 3  # replay: the daemon neither closed nor reset the channels in time

log = structlog.get_logger("vfio_multifd.cli")

T = TypeVar("T")


def build_parser() -> argparse.ArgumentParser:
    return cli_options.build_parser(
        receive=_receive_command,
        send=_send_command,
        status=_status_command,
        replay=_replay_command,
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
        max_pending_connections=args.max_pending_connections,
        progress_timeout=args.progress_timeout,
        missing_channels_grace=args.missing_channels_grace,
        digest=args.digest,
        fsync=not args.no_fsync,
        tls=receive_tls(args),
        reader_threads=args.reader_threads,
        record=None if args.record is None else RecordSettings(args.record),
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


def _receive_command(args: argparse.Namespace) -> int:
    _configure_logging(args)
    facts = ReceiveFacts(args.uuid, args.device)
    report: ResultFile | None = args.result_file
    if report is not None:
        report.check()
        report.describe = facts.document
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
            if options.status_socket is not None:
                from . import status_server  # what a receive without it need not import

                server = status_server.StatusServer(session, options.status_socket)
                try:
                    await server.start()
                except BaseException:
                    run.cancel()  # the session discards its outputs
                    await asyncio.gather(run, return_exceptions=True)
                    raise
                stack.push_async_callback(server.close)
            if options.metrics_listen is not None:
                from . import metrics

                scraped = metrics.MetricsServer(session, options.metrics_listen)
                try:
                    await scraped.start()
                except BaseException:
                    run.cancel()
                    await asyncio.gather(run, return_exceptions=True)
                    raise
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
            return await run
    finally:
        if not run.done():  # cancelled from outside (KeyboardInterrupt without a handler)
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        signals.ignore_until_exit()  # the outcome is decided: nothing may change it now


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


def printable(text: object) -> str:
    """``str(text)`` that any UTF-8 stream can print: a path's bytes that are not
    UTF-8 (surrogate escapes) are shown as ``\\xNN``, as device names are."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def print_receive_summary(
    result: SessionResult, out: TextIO, *, max_queued_bytes: int | None = None
) -> None:
    """One line per device, one for the migration (MB/s: 10^6 bytes a second)."""
    for d in result.devices:
        print(
            f"device {d.device}: {d.bytes} bytes in {d.chunks} chunks, "
            f"config {d.config_bytes} bytes, {d.seconds:.3f} s "
            f"({d.bytes / 1e6 / d.seconds if d.seconds > 0 else 0.0:.1f} MB/s), "
            f"{d.digest} -> {printable(d.data_path)}",
            file=out,
        )
    spilled = f"spilled {result.spilled_bytes} bytes"
    if result.spilled_bytes:
        spilled += (
            " (chunks that came early went to disk and were read back in their turn, "
            f"to keep queued memory under --max-queued-bytes {max_queued_bytes})"
        )
    print(
        f"received {result.data_bytes} bytes in {result.seconds:.3f} s "
        f"({result.mb_per_s:.1f} MB/s); peak queued {result.peak_queued_bytes} bytes, "
        f"{spilled}, paused {result.paused_seconds:.3f} s",
        file=out,
    )
    if result.reader_threads:
        print(f"channels read on {result.reader_threads} reader threads", file=out)
    tls = result.tls_summary()
    if tls is not None:
        print(tls, file=out)


# -- send ---------------------------------------------------------------------------


def _tls_client(args: argparse.Namespace) -> TlsClient | None:
    """``--tls-creds`` and ``--tls-hostname`` of ``send`` and ``replay``."""
    from . import tls  # ssl contexts: only with TLS

    if args.tls_creds is None and args.tls_hostname is not None:
        raise UsageError("--tls-hostname needs --tls-creds DIR")
    if args.tls_creds is None:
        return None
    return tls.load_client(args.tls_creds, args.connect, args.tls_hostname)


def _send_command(args: argparse.Namespace) -> int:
    from .send_progress import send_progress

    _configure_logging(args)
    tally = SendTally()
    report: ResultFile | None = args.result_file
    if report is not None:
        report.check()
        report.describe = SendFacts(args.uuid, args.connect, args.device, tally).document
    tls_client = _tls_client(args)
    with (
        _sigterm_stops_sending(),
        send_progress(args.device, args.progress_interval, tally) as progress,
    ):
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
            tls=tls_client,
            tally=tally,
        )
    print_send_summary(result, sys.stdout, args.connect, tls=tls_client is not None)
    return EXIT_OK


@contextlib.contextmanager
def _sigterm_stops_sending() -> Iterator[None]:
    """SIGTERM stops send and replay as SIGINT does; their message says what was sent."""
    previous = signal.signal(signal.SIGTERM, _stop_sending)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_sending(signum: int, frame: object) -> None:
    raise Stopped(signum)


def print_send_summary(
    result: SendResult, out: TextIO, address: Address, *, tls: bool = False
) -> None:
    """One line per device, one for the whole (MB/s: 10^6 bytes a second), which says
    what the daemon's clean close of every channel means over this transport (over a
    unix socket, only TLS's close_notify proves it: a failure there cannot reset)."""
    for key, size, chunks, digest in result.devices:
        print(f"device {key}: {size} bytes in {chunks} chunks, {digest}", file=out)
    verdict = (
        "the daemon closed every channel cleanly: it completed the migration"
        if address.kind == "tcp" or tls
        else "the daemon closed every channel (over a unix socket that does not prove it "
        "completed: its exit code says)"
    )
    print(
        f"sent {sum(d[1] for d in result.devices)} bytes in {result.seconds:.3f} s "
        f"({result.mb_per_s:.1f} MB/s) over {len(result.channel_bytes)} channels; {verdict}",
        file=out,
    )


# -- replay -------------------------------------------------------------------------


def _replay_command(args: argparse.Namespace) -> int:
    _configure_logging(args)
    recording = Recording.load(args.directory)
    tls_client = _tls_client(args)
    replay = Replay(
        recording, args.channels_order, args.seed, verdict_timeout=args.verdict_timeout
    )
    print_replay_plan(replay, sys.stdout, args.channels_order)
    try:
        with _sigterm_stops_sending():
            error = replay.run(args.connect, connect_timeout=args.connect_timeout, tls=tls_client)
    except KeyboardInterrupt as interrupt:
        signum = getattr(interrupt, "signal_number", signal.SIGINT)
        raise Cancelled(
            f"stopped by {signal.Signals(signum).name} after sending {sum(replay.sent)} of "
            f"{replay.total} bytes to {args.connect} (its channels are reset)",
            signal_number=signum,
        ) from None
    print_replay_report(replay, sys.stdout, args.connect, error, tls=tls_client is not None)
    if error is not None:
        raise error
    return EXIT_OK


def print_replay_plan(replay: Replay, out: TextIO, order: str) -> None:
    """What was recorded, what the daemon must be told, and the connection order."""
    manifest = replay.recording.manifest
    outcome = manifest.outcome
    if manifest.error is not None:
        outcome += f": {manifest.error.message}"
    print(
        f"replaying {printable(replay.recording.directory)}: recorded {manifest.started_at} "
        f"by {manifest.tool}, {len(manifest.recorded_channels)} of {manifest.channels} "
        f"channels, outcome {outcome}",
        file=out,
    )
    devices = " ".join(
        f"--device idstr={device.idstr.replace(',', ',,')},instance={device.instance},data=..."
        for device in manifest.devices
    )
    print(
        f"the daemon needs: --channels {manifest.channels} --uuid {manifest.uuid} {devices}",
        file=out,
    )
    if manifest.tls:
        print(
            "the channels used TLS: the recording holds their plaintext (replay it to a daemon "
            "without --tls-creds, or give --tls-creds)",
            file=out,
        )
    if not manifest.complete:
        print(
            f"the recording is incomplete ({manifest.stopped}): only what was recorded is sent",
            file=out,
        )
    ids = ", ".join(str(channel.id) for channel in replay.channels)
    print(f"connection order ({order}): channel ids {ids}", file=out, flush=True)


def print_replay_report(
    replay: Replay, out: TextIO, address: Address, error: SendError | None, *, tls: bool = False
) -> None:
    """One line per channel (bytes sent, how it ended), one for the whole (which says
    what a clean close means over this transport, as :func:`print_send_summary`)."""
    for channel, sent in zip(replay.channels, replay.sent, strict=True):
        ending = ENDING_TEXT[channel.end] if sent == channel.bytes else "then stopped"
        print(f"channel {channel.id}: sent {sent} of {channel.bytes} bytes, {ending}", file=out)
    if error is not None:
        verdict = "not every channel ended cleanly (the error below says which, and why)"
    elif address.kind == "tcp" or tls:
        verdict = "the daemon closed every channel cleanly"
    else:
        verdict = (
            "the daemon closed every channel (over a unix socket that does not prove it "
            "completed: its exit code says)"
        )
    print(
        f"replayed {sum(replay.sent)} of {replay.total} bytes over {len(replay.channels)} "
        f"channels in {replay.seconds:.3f} s to {address}; {verdict}",
        file=out,
    )


# -- status -------------------------------------------------------------------------


def _status_command(args: argparse.Namespace) -> int:
    from . import status_client  # qemu.qmp: only the status command needs it

    if args.watch is not None:
        return _watch_status(args)
    try:
        reply = status_client.query(args.socket, timeout=args.timeout)
    except status_client.StatusError as error:
        print(f"vfio-multifd: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    if "error" in reply:
        print(f"vfio-multifd: error: {reply['error'].get('desc', reply)}", file=sys.stderr)
        return EXIT_FAILED
    info = reply["return"]
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(status_client.format_table(info))
    # As --watch: 1 for a migration that did not or will not complete.
    failed = isinstance(info, dict) and info.get("status") in status_client.UNSUCCESSFUL_STATUSES
    return EXIT_FAILED if failed else EXIT_OK


def _watch_status(args: argparse.Namespace) -> int:
    """``status --watch S``: every S seconds until the migration ends; 0 only if it completed."""
    from . import status_client

    clear = sys.stdout.isatty() and not args.json

    def show(info: dict[str, Any], final: bool) -> None:
        if args.json:
            print(json.dumps(info), flush=True)  # one line per answer
            return
        if clear:
            print("\x1b[H\x1b[2J", end="")
        print(status_client.format_table(info), end="\n\n" if not final else "\n", flush=True)

    try:
        final = status_client.watch(args.socket, args.watch, show, timeout=args.timeout)
    except status_client.StatusError as error:
        print(f"vfio-multifd: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if final.get("status") == "completed" else EXIT_FAILED


# -- entry points -------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """:func:`run_command` for a caller that goes on running in this process: the
    signals ``receive`` ignores once its outcome is decided are given back."""
    taken = (*STOPPING_SIGNALS, *REPORTING_SIGNALS)
    saved = {signum: signal.getsignal(signum) for signum in taken}
    try:
        return run_command(argv)
    finally:
        for signum, handler in saved.items():
            if handler is not None:  # None: not set from Python, left as it is
                signal.signal(signum, handler)


def run_command(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run its subcommand's handler, and map the outcome to an exit code
    (then write ``--result``, which says that exit code)."""
    report: ResultFile | None = None
    error: BaseException | None = None
    try:
        args = build_parser().parse_args(argv)
        result_path = getattr(args, "result", None)
        report = args.result_file = None if result_path is None else ResultFile(result_path)
        handler: cli_options.Handler = args.handler
        code = handler(args)
    except (MultifdError, OSError, KeyboardInterrupt) as raised:
        error = raised
        code = _exit_code(raised)
    if report is not None:
        code = report.write(code, error)
    return code


def _exit_code(error: MultifdError | OSError | KeyboardInterrupt) -> int:
    """Say why the command ended (one line on stderr), and return its exit code."""
    if isinstance(error, UsageError):
        print(f"vfio-multifd: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(error, Cancelled):
        print(f"vfio-multifd: {error}", file=sys.stderr)
        if error.signal_number is not None:
            return 128 + error.signal_number
        return EXIT_FAILED  # migrate_cancel: not a signal, and not complete
    if isinstance(error, MultifdError):
        log.error("migration_failed", error=str(error), reason=error.reason.value)
        print(f"vfio-multifd: error: {error}", file=sys.stderr)
        return EXIT_NO_VERDICT if error.reason is Reason.NO_VERDICT else EXIT_FAILED
    if isinstance(error, OSError):
        print(f"vfio-multifd: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    return 128 + signal.SIGINT


def _configure_logging(args: argparse.Namespace) -> None:
    logconfig.configure(log_format=args.log_format, level=args.log_level)


def console_main() -> None:
    """The console script: :func:`run_command`, then exit even past a stuck writer thread.

    A write to a FIFO that nobody reads cannot be interrupted; the session
    abandons such a thread after a short wait (and has already removed its
    temporary files), and the process must not then hang at exit joining it.
    The signals ``receive`` ignores once its outcome is decided stay ignored
    until the process is gone (Python's finalization keeps ``SIG_IGN``).
    """
    code = run_command()
    stuck = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if stuck:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)
