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
import platform
from pathlib import Path
from typing import Any

from .. import __version__
from ..source.faults import FAULTS
from ..source.plan import DEFAULT_CHUNK_SIZE, ORDERS
from ..source.replay import ORDERS as REPLAY_ORDERS
from ..source.replay import VERDICT_TIMEOUT
from .option_groups import (
    EventLoop,
    Handler,
    Subcommands,
    _add_connecting,
    _add_result,
    _migration_parent,
    _reporting_parent,
    _runtime_parent,
)
from .option_types import _Parser, _positive_seconds, _send_device, _size
from .options_receive import _add_receive

__all__ = ["EventLoop", "Handler", "build_parser", "version_text"]


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
    _add_send_data(tx)
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


def _add_send_data(tx: argparse.ArgumentParser) -> None:
    """What it sends: the devices, and guest RAM as QEMU 10 sends it."""
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
    _add_result(rp, "docs/record-replay.md")


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
