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

Each subcommand is one handler, ``<name>_command(args) -> int``, given
options already converted and checked (:mod:`vfio_multifd.cli.options`);
:func:`run_command` parses, runs the handler and maps what it raises to an exit code
(:func:`main` is the same for a caller that goes on running in this process).
``receive``'s handler and its signals are ``receive.py``'s; what the
subcommands print when they end, ``report.py``'s.
"""

from __future__ import annotations

# Before anything imports structlog: structlog without rich.
from . import lean_imports  # noqa: F401

# isort: split
import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from ..config import check_outside
from ..errors import Cancelled, MultifdError, Reason, UsageError
from ..source.replay import Recording, Replay
from ..source.sender import SendTally, Stopped, send, stopped_by
from . import options as cli_options
from .receive import receive_command, receive_settings
from .report import print_replay_plan, print_replay_report, print_send_summary
from .result_file import ReplayFacts, ResultFile, SendFacts
from .runner import (
    EXIT_FAILED,
    EXIT_NO_VERDICT,
    EXIT_OK,
    EXIT_USAGE,
    configure_logging,
    run_loop,
)
from .signals import REPORTING_SIGNALS, STOPPING_SIGNALS

if TYPE_CHECKING:
    from ..tls import TlsClient

__all__ = ["build_parser", "console_main", "main", "receive_settings", "run_command", "run_loop"]

log = structlog.get_logger("vfio_multifd.cli")

def build_parser() -> argparse.ArgumentParser:
    return cli_options.build_parser(
        receive=receive_command,
        send=_send_command,
        status=_status_command,
        replay=_replay_command,
    )


# -- send ---------------------------------------------------------------------------


def _tls_client(args: argparse.Namespace) -> TlsClient | None:
    """``--tls-creds`` and ``--tls-hostname`` of ``send`` and ``replay``."""
    from .. import tls  # ssl contexts: only with TLS

    if args.tls_creds is None and args.tls_hostname is not None:
        raise UsageError("--tls-hostname needs --tls-creds DIR")
    if args.tls_creds is None:
        return None
    return tls.load_client(args.tls_creds, args.connect, args.tls_hostname)


def _send_command(args: argparse.Namespace) -> int:
    from ..source.send_progress import send_progress

    configure_logging(args)
    tally = SendTally()
    report: ResultFile | None = args.result_file
    if report is not None:
        report.begin(SendFacts(args.uuid, args.connect, args.device, tally).document)
    tls_client = _tls_client(args)
    if args.ram is not None:
        return _send_like_qemu(args, tally, tls_client)
    if not args.device:
        raise UsageError("at least one --device is required (or --ram SIZE)")
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


def _send_like_qemu(
    args: argparse.Namespace, tally: SendTally, tls_client: TlsClient | None
) -> int:
    """``send --ram SIZE``: a main channel and RAM beside the devices, as QEMU 10."""
    from ..source.qemu_sender import send_like_qemu

    if args.order != "round-robin":
        raise UsageError("--ram sends as QEMU does: --order round-robin only")
    if args.inject is not None:
        raise UsageError("--inject works without --ram only")
    with _sigterm_stops_sending():
        result, ram = send_like_qemu(
            args.connect,
            args.device,
            ram_size=args.ram,
            channels=args.channels,
            uuid=args.uuid,
            chunk_size=args.chunk_size,
            seed=args.seed,
            digest=args.digest,
            connect_timeout=args.connect_timeout,
            tls=tls_client,
            tally=tally,
        )
    print_send_summary(result, sys.stdout, args.connect, tls=tls_client is not None, ram=ram)
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


# -- replay -------------------------------------------------------------------------


def _replay_command(args: argparse.Namespace) -> int:
    configure_logging(args)
    facts = ReplayFacts(args.directory, args.connect)
    report: ResultFile | None = args.result_file
    if report is not None:
        # Before it is checked: a usage error here writes nothing, not even into DIR.
        check_outside([(f"--result {report.path}", report.path)], args.directory, "DIR")
        report.begin(facts.document)
    # SIGTERM stops it from here on, also while it reads and checks a large recording.
    with _sigterm_stops_sending():
        try:
            recording = Recording.load(args.directory)
        except KeyboardInterrupt as interrupt:
            raise stopped_by(
                interrupt, f"while checking the recording {args.directory} (nothing was sent)"
            ) from None
        replay = facts.replay = Replay(
            recording, args.channels_order, args.seed, verdict_timeout=args.verdict_timeout
        )
        tls_client = _tls_client(args)
        print_replay_plan(replay, sys.stdout, args.channels_order)
        try:
            error = replay.run(args.connect, connect_timeout=args.connect_timeout, tls=tls_client)
        except KeyboardInterrupt as interrupt:
            raise stopped_by(
                interrupt,
                f"after sending {sum(replay.sent)} of {replay.total} bytes to {args.connect} "
                "(its channels are reset)",
            ) from None
    print_replay_report(replay, sys.stdout, args.connect, error, tls=tls_client is not None)
    if error is not None:
        raise error
    return EXIT_OK


# -- status -------------------------------------------------------------------------


def _status_command(args: argparse.Namespace) -> int:
    from ..ops import status_client  # qemu.qmp: only the status command needs it

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
    from ..ops import status_client

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
    return 128 + getattr(error, "signal_number", signal.SIGINT)  # a Stopped says which


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
