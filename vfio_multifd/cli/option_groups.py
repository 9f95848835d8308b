"""Options shared by several subcommands: parent parsers and the option groups
that more than one subcommand adds (--result, where to connect)."""

from __future__ import annotations

import argparse
import enum
from collections.abc import Callable
from pathlib import Path

from .. import logconfig
from ..config import Digest
from .option_types import (
    _address,
    _channels,
    _one_of,
    _Parser,
    _positive_seconds,
    _seconds_or_off,
    _uuid,
)

#: What a subcommand runs: its parsed options in, an exit code out.
Handler = Callable[[argparse.Namespace], int]
Subcommands = argparse._SubParsersAction  # the type of add_subparsers()'s result


class EventLoop(enum.StrEnum):
    """``--event-loop``: which event loop runs the daemon."""

    UVLOOP = "uvloop"
    ASYNCIO = "asyncio"  # the standard library's


def _migration_parent() -> _Parser:
    """Options that identify the migration, the same on both ends."""
    parent = _Parser(add_help=False)
    group = parent.add_argument_group("common to receive and send")
    group.add_argument(
        "--channels",
        type=_channels,
        default=2,
        metavar="N",
        help="multifd channels, one connection each: 1..256 (default 2, as QEMU); "
        "a migration needs all of them",
    )
    group.add_argument(
        "--uuid",
        type=_uuid,
        default="00000000-0000-0000-0000-000000000000",
        metavar="UUID",
        help="the source VM's UUID (default all zero)",
    )
    group.add_argument(
        "--digest",
        **_one_of(Digest),
        default=Digest.XXH3_128,
        help="digest of each device's data in the summary (default xxh3-128); none "
        "computes none and prints none (receive: the upper bound of what the digest costs; "
        "not with --record)",
    )
    return parent


def _runtime_parent(*, uses_loop: bool) -> _Parser:
    """How the process runs, the same options on both ends."""
    parent = _Parser(add_help=False)
    group = parent.add_argument_group("runtime")
    loop_help = (
        "the event loop that runs the daemon: uvloop (default) or asyncio, the standard library's"
        if uses_loop
        else "accepted as receive takes it; the sender uses threads, not an event loop"
    )
    group.add_argument(
        "--event-loop",
        **_one_of(EventLoop),
        default=EventLoop.UVLOOP,
        help=loop_help,
    )
    return parent


def _reporting_parent(*, progress: str | None, debug: str) -> _Parser:
    """Log lines on stderr, and progress while it runs; ``progress`` and ``debug``
    say what the subcommand reports (``progress`` None: it reports none)."""
    parent = _Parser(add_help=False)
    group = parent.add_argument_group("progress and logging" if progress else "logging")
    if progress is not None:
        group.add_argument(
            "--progress-interval",
            type=_seconds_or_off,
            default=5.0,
            metavar="SECONDS",
            help=f"{progress} (default 5; 0 disables)",
        )
    group.add_argument(
        "--log-format",
        choices=logconfig.FORMATS,
        default="auto",
        help="log lines on stderr: auto (default) is console on a terminal, JSON otherwise",
    )
    group.add_argument(
        "--log-level",
        choices=logconfig.LEVELS,
        default="info",
        help=f"log lines below this level are left out (default info){debug}",
    )
    return parent


def _add_result(parser: argparse.ArgumentParser, page: str) -> None:
    """``--result PATH``: how the command ended, as one JSON document."""
    parser.add_argument(
        "--result",
        type=Path,
        default=None,
        metavar="PATH",
        help="at exit (success, failure or cancel alike) write one JSON document to PATH, "
        "atomically: outcome, exit code, reason, channels... (every field: "
        f"{page})",
    )


def _add_connecting(parser: argparse.ArgumentParser) -> None:
    """Where and how send and replay connect: --connect, QEMU's tls-creds-x509
    (endpoint=client) and tls-hostname, --connect-timeout."""
    parser.add_argument(
        "--connect",
        type=_address,
        required=True,
        metavar="tcp:HOST:PORT|unix:PATH",
        help="the receiving daemon's --listen address",
    )
    parser.add_argument(
        "--tls-creds",
        type=Path,
        default=None,
        metavar="DIR",
        help="TLS on every channel, with QEMU's x509 client credentials in DIR: "
        "ca-cert.pem, client-cert.pem, client-key.pem",
    )
    parser.add_argument(
        "--tls-hostname",
        default=None,
        metavar="NAME",
        help="the name the receiver's certificate must carry (default: the host of "
        "--connect; required with unix:)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=_positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="while nothing listens at --connect, retry each channel's connection for this "
        "long (default 30); a connect_retrying log line says until when",
    )
