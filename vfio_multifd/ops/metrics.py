"""``receive --metrics-listen tcp:HOST:PORT``: ``GET /metrics`` in Prometheus' text format.

The metrics are rendered at scrape time from the migration core's snapshot,
the one ``query-migrate`` renders too: the data path does not know a scrape
exists.

The responder is a small asyncio server in the session's own event loop
rather than ``prometheus_client``'s HTTP server, which serves from a thread of
its own: a scrape there would walk the session's dicts while the loop changes
them, needing locks on the data path (or risking "dictionary changed size
during iteration"), and would compete with the loop for the GIL in the middle
of a transfer. Here a scrape runs between two callbacks of the loop, sees one
consistent state and takes no lock. It answers HTTP/1.0 and 1.1 ``GET`` (and
``HEAD``) of ``/metrics``, one request per connection; it is bounded like the
status socket: at most :data:`MAX_CLIENTS` at once, a request head of at most
:data:`MAX_REQUEST_BYTES` within :data:`REQUEST_TIMEOUT` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterable, Iterator

import structlog

from ..config import Address
from ..core.snapshot import MigrationSnapshot
from ..core.state import ChannelState
from ..daemon.session import Session
from ..errors import UsageError
from ..results import SessionStatus
from .clients import Clients

log = structlog.get_logger("vfio_multifd.metrics")

#: The request line and headers, at most (a Prometheus scrape sends a few hundred bytes).
MAX_REQUEST_BYTES = 8 << 10
#: A client must send its request head within this many seconds, and read the answer too.
REQUEST_TIMEOUT = 5.0
#: Scrapers connected at once; one more is hung up on.
MAX_CLIENTS = 16
#: What Prometheus asks for with ``Accept: text/plain``: the text format 0.0.4.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: The channel states a channel that passed its handshake (or is in it) can be in.
CHANNEL_STATES = (
    ChannelState.HANDSHAKE,
    ChannelState.ACTIVE,
    ChannelState.CLOSED,
    ChannelState.FAILED,
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


class _Family:
    """One metric family: its HELP and TYPE lines, then its samples."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        self.name = name

    def add(self, value: float, **labels: str) -> _Family:
        if labels:
            inner = ",".join(f'{key}="{_escape(text)}"' for key, text in labels.items())
            self.lines.append(f"{self.name}{{{inner}}} {_number(value)}")
        else:
            self.lines.append(f"{self.name} {_number(value)}")
        return self


def collect(snapshot: MigrationSnapshot) -> Iterator[_Family]:
    """Every metric family of a migration's snapshot."""
    received = _Family(
        "vfio_multifd_received_bytes_total",
        "counter",
        "Bytes received on each accepted channel, its 64-byte handshake included.",
    )
    for channel in snapshot.channels:
        if channel.id is not None:
            received.add(channel.received_bytes, channel=str(channel.id))
    yield received
    yield from _devices(snapshot)
    yield _Family(
        "vfio_multifd_queued_bytes",
        "gauge",
        "Bytes queued in memory for the writers (what counts against --max-queued-bytes).",
    ).add(snapshot.queued_bytes)
    yield _Family(
        "vfio_multifd_peak_queued_bytes",
        "gauge",
        "The most bytes ever queued in memory at once in this migration.",
    ).add(snapshot.peak_queued_bytes)
    yield _Family(
        "vfio_multifd_spilled_bytes_total",
        "counter",
        "Bytes of chunks that went to the spill file to keep memory under the bound.",
    ).add(snapshot.spilled_bytes)
    refused = _Family(
        "vfio_multifd_refused_connections_total",
        "counter",
        "Connections refused before joining the migration, by reason.",
    )
    for reason, count in snapshot.refused_by_reason:
        refused.add(count, reason=reason)
    yield refused
    yield _channel_states(snapshot)
    status = _Family(
        "vfio_multifd_migration_status",
        "gauge",
        "The migration's status: 1 for the current one, 0 for the others.",
    )
    for value in SessionStatus:
        status.add(1 if snapshot.status is value else 0, status=value.value)
    yield status
    yield from _qemu_streams(snapshot)
    yield _Family(
        "vfio_multifd_paused_seconds_total",
        "counter",
        "Seconds with at least one channel's reading paused, waiting for memory.",
    ).add(snapshot.paused_seconds)


def _devices(snapshot: MigrationSnapshot) -> Iterator[_Family]:
    written = _Family(
        "vfio_multifd_written_bytes_total",
        "counter",
        "Data bytes of each device written to its output file, in idx order.",
    )
    chunks = _Family(
        "vfio_multifd_chunks_written_total",
        "counter",
        "Data chunks of each device written to its output file.",
    )
    for device in snapshot.devices:
        written.add(device.bytes_written, device=str(device.device))
        chunks.add(device.chunks_written, device=str(device.device))
    yield written
    yield chunks


def _qemu_streams(snapshot: MigrationSnapshot) -> Iterator[_Family]:
    """RAM pages and sync points with --ram, the main stream's bytes with --main-stream."""
    qemu = snapshot.qemu
    if qemu.ram:
        yield _Family(
            "vfio_multifd_ram_pages_total",
            "counter",
            "RAM pages received, by kind: normal (with data) or zero (no data).",
        ).add(qemu.normal_pages, kind="normal").add(qemu.zero_pages, kind="zero")
        yield _Family(
            "vfio_multifd_sync_points_total",
            "counter",
            "Sync points every channel and the main stream have reached.",
        ).add(qemu.sync_points)
    if qemu.main_stream:
        yield _Family(
            "vfio_multifd_main_stream_bytes_total",
            "counter",
            "Bytes received on QEMU's main channel.",
        ).add(qemu.main_stream_bytes)


def _channel_states(snapshot: MigrationSnapshot) -> _Family:
    states = dict.fromkeys(CHANNEL_STATES, 0)
    for channel in snapshot.channels:
        if channel.state in states:
            states[channel.state] += 1
    channels = _Family(
        "vfio_multifd_channels",
        "gauge",
        "Channels by state: handshake (connected, no complete handshake yet), active, "
        "closed (clean end of stream), failed.",
    )
    for state, count in states.items():
        channels.add(count, state=state.value)
    return channels


def render(snapshot: MigrationSnapshot) -> str:
    """The whole exposition, as ``GET /metrics`` answers it."""
    return "".join(line + "\n" for family in collect(snapshot) for line in family.lines)


class MetricsServer:
    """``GET /metrics`` of one session, on a TCP address, in the session's event loop."""

    def __init__(
        self, session: Session, address: Address, *, request_timeout: float = REQUEST_TIMEOUT
    ) -> None:
        self.session = session
        self.address = address
        self.request_timeout = request_timeout  # a parameter: tests need not wait 5 s
        self._server: asyncio.Server | None = None
        self._clients = Clients(MAX_CLIENTS)
        self.bound: Address | None = None  # where it listens, a port 0 resolved

    async def start(self) -> Address:
        """Listen; a port in use or an address that cannot be bound is a :class:`UsageError`."""
        try:
            self._server = await asyncio.start_server(
                self._serve,
                self.address.host,
                self.address.port,
                limit=MAX_REQUEST_BYTES,
                reuse_address=True,
            )
        except (OSError, ValueError) as error:
            text = getattr(error, "strerror", None) or str(error)
            raise UsageError(f"cannot listen on --metrics-listen {self.address}: {text}") from None
        host, port = self._server.sockets[0].getsockname()[:2]
        self.bound = Address("tcp", host=host, port=port)
        log.info("metrics_listening", address=str(self.bound))
        return self.bound

    async def close(self) -> None:
        """Stop listening and drop every scraper at once."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await self._clients.close()

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:
            writer.transport.abort()
            return
        if not self._clients.admit(writer):
            return
        try:
            await asyncio.wait_for(self._answer(reader, writer), self.request_timeout)
        except (TimeoutError, ConnectionError, OSError, asyncio.CancelledError):
            pass
        except _BadHead as error:
            with contextlib.suppress(Exception):
                writer.write(_response(400, "Bad Request", f"request head {error}\n"))
        finally:
            self._clients.done()
            writer.close()  # never waits: what is left unsent is the client's loss

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await _read_head(reader)
        method, target, *_ = [*head.split(b"\n", 1)[0].decode("latin-1").split(), "", ""]
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            reply = _response(405, "Method Not Allowed", "only GET /metrics\n", allow="GET, HEAD")
        elif path != "/metrics":
            reply = _response(404, "Not Found", "metrics are at /metrics\n")
        else:
            body = render(self.session.snapshot())
            reply = _response(200, "OK", body, content_type=CONTENT_TYPE, head=method == "HEAD")
        writer.write(reply)
        await writer.drain()


class _BadHead(Exception):
    """A request head too long, or cut by the end of the connection."""


#: The empty line that ends a request head: CRLF as HTTP says, or a bare LF, as
#: most servers accept (RFC 9112 section 2.2), in any mix.
_HEAD_END = re.compile(rb"\n\r?\n")


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """The request line and headers: up to the empty line, at most
    :data:`MAX_REQUEST_BYTES` with it (never more is read)."""
    head = b""
    while (end := _HEAD_END.search(head)) is None:
        if len(head) >= MAX_REQUEST_BYTES:
            raise _BadHead(f"longer than {MAX_REQUEST_BYTES} bytes")
        data = await reader.read(MAX_REQUEST_BYTES - len(head))
        if not data:
            raise _BadHead("cut: the connection ended before the empty line")
        head += data
    return head[: end.start()]


def _response(
    code: int,
    phrase: str,
    body: str,
    *,
    content_type: str = "text/plain; charset=utf-8",
    head: bool = False,
    allow: str | None = None,
) -> bytes:
    data = body.encode()
    lines: Iterable[str] = [
        f"HTTP/1.1 {code} {phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(data)}",
        "Connection: close",
        *([f"Allow: {allow}"] if allow else []),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head else data)
