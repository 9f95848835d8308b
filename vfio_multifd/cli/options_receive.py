"""The ``receive`` subcommand's options: what the daemon takes, where it puts it,
how much it holds and how long it waits."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import (
    DEFAULT_MAX_PENDING_CONNECTIONS,
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_MISSING_CHANNELS_GRACE,
    QueueFullPolicy,
)
from ..core.wire import DEFAULT_MAX_PACKET_SIZE
from .option_groups import (
    Handler,
    Subcommands,
    _add_result,
    _migration_parent,
    _reporting_parent,
    _runtime_parent,
)
from .option_types import (
    _address,
    _count,
    _metrics_address,
    _one_of,
    _Parser,
    _positive_seconds,
    _queue_bound,
    _ram_target,
    _ready_fd,
    _receive_device,
    _seconds_or_off,
    _size,
    _zero_or_more,
)


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
    _add_receive_inputs(rx)
    _add_receive_limits(rx)
    _add_receive_outputs(rx)


def _add_receive_inputs(rx: argparse.ArgumentParser) -> None:
    """Where it listens and what it takes: devices, the main channel, RAM."""
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


def _add_receive_outputs(rx: argparse.ArgumentParser) -> None:
    """How outputs are kept, and what it tells: status, TLS, records, metrics, result."""
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
    _add_receive_memory(rx)
    _add_receive_waits(rx)


def _add_receive_memory(rx: argparse.ArgumentParser) -> None:
    """How much memory chunks take, and where the rest goes."""
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


def _add_receive_waits(rx: argparse.ArgumentParser) -> None:
    """Connections: how many are held, who reads them, and how long each wait lasts."""
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
