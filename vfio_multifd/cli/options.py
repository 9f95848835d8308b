"""The command line's options: what each subcommand accepts, converted and
checked once, by each option's argparse ``type``.

Options that mean the same on both ends come from one parent parser; an
option's spelling, default and meaning are a contract with users' scripts:
add options, never rename one. What each subcommand runs is given to
:func:`build_parser` (see :mod:`vfio_multifd.cli`), so this module knows
nothing of sessions or sockets.
"""

from __future__ import annotations

import argparse
import difflib
import enum
import functools
import math
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from .. import __version__, logconfig
from ..config import (
    DEFAULT_MAX_PENDING_CONNECTIONS,
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_MISSING_CHANNELS_GRACE,
    Address,
    DeviceSpec,
    Digest,
    QueueFullPolicy,
    check_channels,
    is_number,
    parse_size,
    parse_uuid,
)
from ..core.wire import DEFAULT_MAX_PACKET_SIZE
from ..errors import UsageError
from ..source.faults import FAULTS
from ..source.plan import DEFAULT_CHUNK_SIZE, ORDERS, SourceDevice
from ..source.replay import ORDERS as REPLAY_ORDERS
from ..source.replay import VERDICT_TIMEOUT

T = TypeVar("T")
E = TypeVar("E", bound=enum.StrEnum)
#: What a subcommand runs: its parsed options in, an exit code out.
Handler = Callable[[argparse.Namespace], int]


class EventLoop(enum.StrEnum):
    """``--event-loop``: which event loop runs the daemon."""

    UVLOOP = "uvloop"
    ASYNCIO = "asyncio"  # the standard library's


# -- option types: each converts and checks its option, once ------------------------


class _Parser(argparse.ArgumentParser):
    """A usage error goes through :func:`main` like any other: one line, exit 2.

    Options are spelled in full: argparse's abbreviations would make ``--chan 4``
    mean ``--channels 4`` today and an error once another ``--chan...`` option is
    added, so scripts could break with no change of theirs. A misspelled option
    is named, with the options it may have meant, before anything else is checked.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        arguments = list(sys.argv[1:] if args is None else args)
        self._check_option_names(arguments)
        return super().parse_known_args(arguments, namespace)

    def _check_option_names(self, arguments: list[str]) -> None:
        """Refuse a ``--name`` this parser does not know, suggesting the closest ones.

        Without this, ``send --conect ADDR`` is answered "the following arguments
        are required: --connect", which hides the typo. A parser with subcommands
        looks only at what comes before the subcommand (the rest is its own)."""
        has_subcommands = self._subparsers is not None
        known = sorted(name for name in self._option_string_actions if name.startswith("--"))
        for argument in arguments:
            if argument == "--":
                return
            if has_subcommands and not argument.startswith("-"):
                return
            name = argument.partition("=")[0]
            if not name.startswith("--") or name in self._option_string_actions:
                continue
            self.error(f"unrecognized option {name!r}{_did_you_mean(name, known)}")

    def error(self, message: str) -> NoReturn:
        # "argument --channels: --channels must be 1..256 ...": a message shared
        # with the library already names its option; say it once.
        prefix, _, rest = message.partition(": ")
        if prefix.startswith("argument ") and rest.startswith(prefix.split()[-1] + " "):
            message = rest
        raise UsageError(message)


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    """`` (did you mean --channels?)``: the options ``name`` starts, else the closest."""
    guesses = [option for option in known if option.startswith(name)]
    guesses = guesses or difflib.get_close_matches(name, known, n=1)
    if not guesses:
        return " (see --help)"
    return f" (did you mean {' or '.join(guesses)}?)"


def _option_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse ``type`` from a function that raises :class:`UsageError`:
    its message is kept, and argparse puts the option's name before it."""

    @functools.wraps(parse)
    def convert(text: str) -> T:
        try:
            return parse(text)
        except UsageError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


_size = _option_type(parse_size)
_uuid = _option_type(parse_uuid)
_address = _option_type(Address.parse)
_receive_device = _option_type(DeviceSpec.parse)


def _ram_target(text: str) -> Path | str:
    """``--ram``: a directory, or ``discard``."""
    return "discard" if text == "discard" else Path(text)


@_option_type
def _metrics_address(text: str) -> Address:
    """``tcp:HOST:PORT`` only (port 0 picks a free one)."""
    address = Address.parse(text)
    if address.kind != "tcp":
        raise UsageError(f"not a TCP address: {text!r} (expected tcp:HOST:PORT)")
    return address
_send_device = _option_type(SourceDevice.parse)


@_option_type
def _channels(text: str) -> int:
    try:
        channels = int(text)
    except ValueError:
        raise UsageError(f"not a whole number: {text!r}") from None
    return check_channels(channels)


@_option_type
def _ready_fd(text: str) -> int:
    """A descriptor the daemon inherited, not 0-2: once closed, the next socket would
    take its number, and a channel on 1 would get the summary meant for stdout."""
    if not is_number(text) or int(text) > 0x7FFFFFFF:
        raise UsageError(f"not a file descriptor number: {text!r}")
    fd = int(text)
    if fd <= 2:
        raise UsageError(
            f"{fd} is standard {('input', 'output', 'error')[fd]}; pass a descriptor of its own"
        )
    return fd


@_option_type
def _count(text: str) -> int:
    """A whole number, 1 or more."""
    if not is_number(text) or int(text) < 1:
        raise UsageError(f"must be a whole number of 1 or more, not {text!r}")
    return int(text)


@_option_type
def _zero_or_more(text: str) -> int:
    """A whole number, 0 or more."""
    if not is_number(text):
        raise UsageError(f"must be a whole number of 0 or more, not {text!r}")
    return int(text)


@_option_type
def _queue_bound(text: str) -> int | None:
    """A size; 0 is no bound (None)."""
    return parse_size(text) or None


def _one_of(kind: type[E]) -> dict[str, Any]:
    """``type`` and ``choices`` of an enum option: argparse gives the member
    named by its value (``--digest sha256``), and help shows the values."""

    def parse(text: str) -> E:
        try:
            return kind(text)
        except ValueError:
            choices = ", ".join(repr(member.value) for member in kind)
            raise UsageError(f"invalid choice: {text!r} (choose from {choices})") from None

    return {"type": _option_type(parse), "choices": list(kind)}


def _seconds(text: str, *, zero_disables: bool) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise UsageError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero_disables):
        allowed = "0 (disabled) or a finite number" if zero_disables else "a finite number"
        raise UsageError(f"must be {allowed} of seconds above 0, not {text!r}")
    return seconds


@_option_type
def _positive_seconds(text: str) -> float:
    return _seconds(text, zero_disables=False)


@_option_type
def _seconds_or_off(text: str) -> float | None:
    """0 disables (None)."""
    return _seconds(text, zero_disables=True) or None


# -- the parser: one function per subcommand, shared options in parents -----------


def build_parser(
    *, receive: Handler, send: Handler, status: Handler, replay: Handler
) -> argparse.ArgumentParser:
    """``vfio-multifd``'s parser; each subcommand sets ``handler`` to the one given."""
    parser = _Parser(
        prog="vfio-multifd",
        description="The destination of a QEMU multifd migration's device state: it receives "
        "QEMU 10.x's VFIO multifd device-state packets (vfio-pci's "
        "x-migration-multifd-transfer) on several channels, out of order, and writes each "
        "device's data and config state to files, in place only when complete. A sender that "
        "behaves like QEMU's source, a status client and a replay of recordings come with it. "
        "A real QEMU's main channel, RAM and SYNC packets are not received yet.",
        epilog="Documentation: README.md and docs/ in the source tree (docs/receiving.md, "
        "docs/sending.md, docs/operating.md, docs/qemu.md...), and the manual page "
        "docs/vfio-multifd.1 (man ./docs/vfio-multifd.1 there). Each subcommand's --help "
        "lists its options and exit codes.",
    )
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="print the versions of vfio-multifd, Python, uvloop and structlog, and exit",
    )
    sub = parser.add_subparsers(
        title="commands", dest="command", required=True, parser_class=_Parser, help="what to do"
    )
    _add_receive(sub, receive)
    _add_send(sub, send)
    _add_status(sub, status)
    _add_replay(sub, replay)
    return parser


def version_text() -> str:
    """``vfio-multifd 0.1.0 (Python 3.11.2, uvloop 0.21.0, structlog 25.1.0)``."""
    import importlib.metadata  # 20 ms (it imports email): only for --version

    parts = [f"Python {platform.python_version()}"]
    for package in ("uvloop", "structlog"):
        try:
            parts.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{package} missing")
    return f"vfio-multifd {__version__} ({', '.join(parts)})"


class _VersionAction(argparse.Action):
    """``--version``: the versions are looked up only when asked for."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(version_text())
        parser.exit()


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


Subcommands = argparse._SubParsersAction  # the type of add_subparsers()'s result


def _add_receive(sub: Subcommands[_Parser], handler: Handler) -> None:
    rx = sub.add_parser(
        "receive",
        help="run the destination daemon",
        description="Listen for the migration's --channels channels, write each --device's "
        "data and config state to temporary files as its chunks come, and put them all in "
        "place once every device is complete. Exit 0: every device is complete and its files "
        "are in place; 1: the migration failed (a protocol error, a device I/O error, an "
        "incomplete stream, missing channels, a timeout) or was cancelled with migrate_cancel; "
        "2: usage error; 128+N: stopped by signal N (130 SIGINT, 143 SIGTERM...). On failure "
        "or a signal nothing is put in place.",
        parents=[
            _migration_parent(),
            _reporting_parent(
                progress="log migration_progress this often while active",
                debug="; debug adds QEMU-style trace events (buffer_incoming, load_starved...)",
            ),
            _runtime_parent(uses_loop=True),
        ],
    )
    rx.set_defaults(handler=handler)
    rx.add_argument(
        "--listen",
        type=_address,
        default="tcp:127.0.0.1:4444",
        metavar="tcp:HOST:PORT|unix:PATH",
        help="where to listen (default tcp:127.0.0.1:4444; port 0 picks a free port)",
    )
    rx.add_argument(
        "--device",
        type=_receive_device,
        action="append",
        metavar="idstr=ID,instance=I,data=PATH[,config=PATH]",
        help="a device to receive (repeatable); instance defaults to 0, config to PATH.config; "
        "a comma inside a value is written twice (data=a,,b.bin); at least one, unless --ram",
    )
    rx.add_argument(
        "--main-stream",
        type=Path,
        default=None,
        metavar="PATH",
        help="take QEMU's main migration channel (the connection that begins with QEVM) and "
        "keep its bytes as received at PATH, in place only when the migration completed "
        "(/dev/null drops them); without it a main channel is refused",
    )
    rx.add_argument(
        "--ram",
        type=_ram_target,
        default=None,
        metavar="DIR|discard",
        help="take QEMU's RAM and SYNC packets (needs --main-stream, whose block list names "
        "the RAMBlocks): one sparse file per RAMBlock in DIR (pc.ram...), in place only when "
        "the migration completed; discard reads and counts the pages and keeps none "
        "(a directory named discard: ./discard)",
    )
    _add_receive_limits(rx)
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
    _add_receive_tls(rx)
    rx.add_argument(
        "--record",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep every connection's bytes as received, handshake first, in DIR (new or "
        "empty): channel-<id>.bin, refused-<n>.bin, manifest.json; vfio-multifd replay DIR "
        "sends them again",
    )
    rx.add_argument(
        "--metrics-listen",
        type=_metrics_address,
        default=None,
        metavar="tcp:HOST:PORT",
        help="serve GET /metrics (Prometheus text format) on this address "
        "(port 0 picks a free port: the metrics_listening log line says which)",
    )
    _add_result(rx, "docs/receiving.md")
    rx.add_argument(
        "--ready-fd",
        type=_ready_fd,
        default=None,
        metavar="N",
        help="once listening, write a newline to file descriptor N and close it "
        "(READY=1 also goes to $NOTIFY_SOCKET when systemd sets it)",
    )


def _add_result(parser: argparse.ArgumentParser, page: str) -> None:
    """``--result PATH``: how the command ended, as one JSON document."""
    parser.add_argument(
        "--result",
        type=Path,
        default=None,
        metavar="PATH",
        help="at exit (success, failure or cancel alike) write one JSON document to PATH, "
        "atomically: outcome, exit code, reason, devices, channels... (every field: "
        f"{page})",
    )


def _add_receive_tls(rx: argparse.ArgumentParser) -> None:
    """QEMU's tls-creds-x509 (endpoint=server), verify-peer and tls-authz."""
    group = rx.add_argument_group("TLS (as QEMU's tls-creds-x509, verify-peer, tls-authz)")
    group.add_argument(
        "--tls-creds",
        type=Path,
        default=None,
        metavar="DIR",
        help="TLS on every channel, with QEMU's x509 server credentials in DIR: "
        "ca-cert.pem, server-cert.pem, server-key.pem (and ca-crl.pem if present)",
    )
    group.add_argument(
        "--tls-verify-peer",
        choices=("yes", "no"),
        default=None,
        help="require a client certificate signed by ca-cert.pem (default yes; no logs a warning)",
    )
    group.add_argument(
        "--tls-authz",
        action="append",
        default=None,
        metavar="DN",
        help="accept only a client whose certificate subject is DN, as gnutls prints it "
        "(RDNs in certificate order, e.g. CN=src.example.com,O=Example); repeatable",
    )


def _add_receive_limits(rx: argparse.ArgumentParser) -> None:
    """How much the daemon holds, and how long it waits."""
    rx.add_argument(
        "--max-packet-size",
        type=_size,
        default=DEFAULT_MAX_PACKET_SIZE,
        metavar="SIZE",
        help="largest next_packet_size accepted (default 1048588: QEMU's largest packet, "
        "a 1 MiB chunk and its 12-byte VFIO header)",
    )
    rx.add_argument(
        "--max-queued-bytes",
        type=_queue_bound,
        default=DEFAULT_MAX_QUEUED_BYTES,
        metavar="SIZE",
        help="bound on the memory chunk payloads take from the moment their headers "
        "arrive, all devices together (default 64M; 0: no bound); sizes: 64M or 64MiB is "
        "64 x 2^20 bytes, 64MB 64 x 10^6",
    )
    rx.add_argument(
        "--on-queue-full",
        **_one_of(QueueFullPolicy),
        default=QueueFullPolicy.SPILL,
        help="at the bound: spill to disk (default) or fail like QEMU",
    )
    rx.add_argument(
        "--spill-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where spilled chunks go (default: the first data file's directory)",
    )
    rx.add_argument(
        "--max-spill-bytes",
        type=_queue_bound,
        default=None,
        metavar="SIZE",
        help="fail rather than hold more than this in the spill file (default, and 0: no cap)",
    )
    rx.add_argument(
        "--accept-timeout",
        type=_seconds_or_off,
        default=None,
        metavar="SECONDS",
        help="fail unless every channel connects within this time, even if fewer channels "
        "brought all the data (default, and 0: wait)",
    )
    rx.add_argument(
        "--handshake-timeout",
        type=_positive_seconds,
        default=10.0,
        metavar="SECONDS",
        help="refuse a connection that sends no handshake within this time (default 10)",
    )
    rx.add_argument(
        "--max-pending-connections",
        type=_count,
        default=DEFAULT_MAX_PENDING_CONNECTIONS,
        metavar="N",
        help="connections without a complete handshake held at once; a new one drops the "
        f"oldest (default {DEFAULT_MAX_PENDING_CONNECTIONS}; a real migration has at most 256)",
    )
    rx.add_argument(
        "--reader-threads",
        type=_zero_or_more,
        default=None,
        metavar="N",
        help="threads that read the channels, each with its own event loop, so that several "
        "cores copy from the kernel at once; 0: the main loop reads them all (default: half "
        "the cores, at most --channels, 0 below 4 cores; TLS channels are read on the main "
        "loop)",
    )
    rx.add_argument(
        "--missing-channels-grace",
        type=_seconds_or_off,
        default=DEFAULT_MISSING_CHANNELS_GRACE,
        metavar="SECONDS",
        help="once every channel that connected has ended while others never came (the "
        "source has fewer channels than --channels), log missing_channels and fail this "
        f"much later unless they come (default {DEFAULT_MISSING_CHANNELS_GRACE:g}; 0: wait "
        "for --accept-timeout or --progress-timeout)",
    )
    rx.add_argument(
        "--progress-timeout",
        type=_seconds_or_off,
        default=150.0,
        metavar="SECONDS",
        help="fail after this long without a byte received or written "
        "(default 150, as KubeVirt; 0 disables)",
    )


def _add_send(sub: Subcommands[_Parser], handler: Handler) -> None:
    tx = sub.add_parser(
        "send",
        help="send device state like a QEMU source",
        description="Send device state like a QEMU source, then wait for the daemon's verdict: "
        "it closes every channel cleanly once its outputs are in place, and resets them if the "
        "migration failed. Exit 0: every channel closed cleanly (over TCP, the migration "
        "completed); 1: a connection failed or was reset; 2: usage error; 130/143: SIGINT/SIGTERM.",
        parents=[
            _migration_parent(),
            _reporting_parent(
                progress="without a terminal, log send_progress this often "
                "(on one: a bar per device)",
                debug="",
            ),
            _runtime_parent(uses_loop=False),
        ],
    )
    tx.set_defaults(handler=handler)
    _add_connecting(tx)
    tx.add_argument(
        "--device",
        type=_send_device,
        action="append",
        default=[],
        metavar="idstr=ID,instance=I,(source=FILE|size=BYTES[,seed=S])",
        help="a device to send (repeatable; at least one, unless --ram): data read from FILE, "
        "or BYTES generated from seed S; a comma inside a value is written twice "
        "(source=a,,b.bin)",
    )
    tx.add_argument(
        "--ram",
        type=_size,
        default=None,
        metavar="SIZE",
        help="act like QEMU 10: a main channel first (configuration, the RAM block list, sync "
        "points, the devices' sections), and SIZE bytes of guest RAM (pc.ram, generated from "
        "--seed, sent in 3 rounds) as RAM and SYNC packets on the channels, the devices' "
        "state packets among them; the daemon needs --main-stream and --ram",
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
    tx.add_argument(
        "--seed", type=int, default=0, help="seed of --order random, and of --ram's contents"
    )
    _add_result(tx, "docs/sending.md")
    tx.add_argument(
        "--inject",
        choices=sorted(FAULTS),
        default=None,
        metavar="FAULT",
        help="put one fault into channel 0's stream, to see an error: " + ", ".join(sorted(FAULTS)),
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


def _add_replay(sub: Subcommands[_Parser], handler: Handler) -> None:
    rp = sub.add_parser(
        "replay",
        help="send a recording (receive --record DIR) to a daemon again",
        description="Open one connection per channel recorded in DIR (receive --record DIR), "
        "send each channel's bytes exactly as they were received, end it as it ended, and wait "
        "for the daemon's verdict. Run the daemon with the recording's --channels, --uuid and "
        "devices (the first lines printed say which). Exit 0: the daemon closed every channel "
        "cleanly; 1: a connection failed or was reset; 2: usage error (not a recording, a "
        "file that does not match its digest...); 3: no verdict within --verdict-timeout; "
        "130/143: SIGINT/SIGTERM.",
        parents=[_reporting_parent(progress=None, debug="")],
    )
    rp.set_defaults(handler=handler)
    rp.add_argument(
        "directory",
        type=Path,
        metavar="DIR",
        help="the recording: a directory receive --record wrote, with its manifest.json",
    )
    _add_connecting(rp)
    rp.add_argument(
        "--channels-order",
        choices=REPLAY_ORDERS,
        default="recorded",
        help="the order the channels connect in: recorded (by first byte received, default; "
        "each channel's first and last byte then wait for their recorded moments, gaps kept "
        "up to 0.1 s), reverse, or random (see --seed; both send at once)",
    )
    rp.add_argument(
        "--seed", type=int, default=0, help="seed of --channels-order random (default 0)"
    )
    rp.add_argument(
        "--verdict-timeout",
        type=_positive_seconds,
        default=VERDICT_TIMEOUT,
        metavar="SECONDS",
        help="once every byte is sent, wait this long at most for the daemon to close or "
        f"reset the channels (default {VERDICT_TIMEOUT:g}); then reset them and exit 3",
    )


def _add_status(sub: Subcommands[_Parser], handler: Handler) -> None:
    st = sub.add_parser(
        "status",
        help="ask a running daemon (or QEMU's QMP) for query-migrate",
        description="Ask a daemon's --status-socket (or QEMU's QMP socket) for query-migrate "
        "and print the answer as a table, or as JSON. Exit 0: an answer (with --watch: the "
        "migration completed); 1: no answer (the error says which socket and why), or with "
        "--watch the migration ended otherwise; 2: usage error.",
    )
    st.set_defaults(handler=handler)
    st.add_argument(
        "--socket",
        required=True,
        metavar="PATH",
        help="the daemon's --status-socket (or QEMU's QMP socket)",
    )
    st.add_argument("--json", action="store_true", help="print the reply as JSON")
    st.add_argument(
        "--watch",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help="ask again every SECONDS until the migration ends, print the final state, and "
        "exit 0 if it completed, 1 otherwise",
    )
    st.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=5.0,
        metavar="SECONDS",
        help="give up after this long (default 5)",
    )
