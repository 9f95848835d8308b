"""How a running daemon tells the outside world where it is.

* :class:`StatusServer` - a unix socket that answers QMP-shaped JSON:
  ``query-migrate`` (a snapshot of the session) and ``migrate_cancel``.
  It runs in the session's event loop and builds a reply only when asked,
  so the data path never pays for it.
* :func:`report_progress` - a ``migration_progress`` log line every few seconds
  while the migration is active.
* :func:`sd_notify` and :func:`notify_ready_fd` - readiness for systemd
  (``READY=1`` on ``$NOTIFY_SOCKET``) and for scripts (a byte on a file descriptor).
* :func:`query` and :func:`format_table` - the client side, for ``vfio-multifd status``.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from . import __version__
from .channel import ChannelState
from .errors import UsageError
from .reassembly import ChunkState, DeviceBuffer
from .session import Session, SessionStatus

log = structlog.get_logger("vfio_multifd.status")

JSON = dict[str, Any]

#: A request larger than this (without a complete JSON object in it) is dropped.
MAX_REQUEST_BYTES = 64 << 10

COMMANDS = ("qmp_capabilities", "query-commands", "query-migrate", "migrate_cancel")


# -- the reply -------------------------------------------------------------------


def query_migrate(session: Session, now: float) -> JSON:
    """``query-migrate``'s answer: QEMU's MigrationInfo names, plus devices and channels.

    ``now`` is ``time.monotonic()`` (a parameter, so tests can pin it). Times
    count from the first channel accepted, as the session's own summary does.
    """
    started, finished = session.started, session.finished
    seconds = 0.0 if started is None else (finished or now) - started
    transferred = session.bytes_received
    info: JSON = {
        "status": session.status.value,
        "total-time": round(seconds * 1000),
        "transferred": transferred,
        # QEMU's mbps is megabits per second; this is the average since the start.
        "mbps": round(transferred * 8 / 1e6 / seconds, 3) if seconds > 0 else 0.0,
    }
    if session.status is SessionStatus.FAILED and session.error is not None:
        info["error-desc"] = str(session.error)
    reassembly = session.reassembly
    info.update(
        {
            "address": None if session.address is None else str(session.address),
            "queued-bytes": reassembly.queued_bytes,
            "peak-queued-bytes": reassembly.peak_queued_bytes,
            "spilled-bytes": reassembly.spilled_bytes,
            "paused-time": round(session.paused_seconds * 1000),
            "devices": [_device_info(device) for device in reassembly.devices.values()],
            "channels": _channels_info(session),
            "refused-connections": len(session.refused),
        }
    )
    return info


def _device_info(device: DeviceBuffer) -> JSON:
    queued = spilled = 0
    for chunk in device.chunks.values():
        if chunk.state is ChunkState.SPILLED:
            spilled += chunk.size
        else:
            queued += chunk.size
    info: JSON = {
        "device": str(device.key),
        "instance-id": device.key.instance_id,
        "bytes-written": device.bytes_written,
        "chunks-written": device.chunks_written,
        "next-idx": device.next_idx,
    }
    if device.last_idx is not None:
        info["last-idx"] = device.last_idx
    info.update(
        {
            "queued-chunks": len(device.chunks),
            "queued-bytes": queued,
            "spilled-bytes": spilled,
            "complete": device.complete,
        }
    )
    return info


def _channels_info(session: Session) -> list[JSON]:
    channels: list[JSON] = []
    for channel_id, protocol in sorted(session.channels.items()):
        channels.append(
            {
                "id": channel_id,
                "state": protocol.state.value,
                "bytes": protocol.decoder.bytes_received,
                "packets": protocol.decoder.packets,
                "peer": protocol.peer,
            }
        )
    for protocol in session.connections:
        if protocol.state is ChannelState.HANDSHAKE:
            channels.append(
                {
                    "id": None,
                    "state": protocol.state.value,
                    "bytes": protocol.decoder.bytes_received,
                    "packets": 0,
                    "peer": protocol.peer,
                }
            )
    return channels


# -- the server ------------------------------------------------------------------


class StatusServer:
    """QMP-shaped status socket of one session.

    Like QEMU's monitor it greets each client with ``{"QMP": ...}`` and answers
    one JSON object per command, each on its own line, echoing the request's
    ``id``. ``qmp_capabilities`` is accepted but not required.
    """

    def __init__(self, session: Session, path: str | os.PathLike[str]) -> None:
        self.session = session
        self.path = Path(path)
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self.log = log.bind(status_socket=str(self.path))

    async def start(self) -> None:
        if await _answers(self.path):
            raise UsageError(
                f"cannot listen on --status-socket {self.path}: another process is listening there"
            )
        try:
            # asyncio (and uvloop) remove a stale socket left at the path.
            self._server = await asyncio.start_unix_server(self._serve, str(self.path))
            os.chmod(self.path, 0o600)  # anyone who can connect can cancel
        except OSError as error:
            await self.close()
            raise UsageError(
                f"cannot listen on --status-socket {self.path}: {error.strerror or error}"
            ) from error
        self.log.info("status_socket_listening")

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(OSError):
                self.path.unlink()
        clients = list(self._clients)
        for task in clients:
            task.cancel()
        if clients:
            await asyncio.gather(*clients, return_exceptions=True)

    async def __aenter__(self) -> StatusServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            await self._converse(reader, writer)
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass  # the client went away, or we are closing
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _send(writer, greeting())
        decoder = json.JSONDecoder()
        text_decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pending = ""
        while data := await reader.read(4096):
            pending += text_decoder.decode(data)
            while pending.strip():
                text = pending.lstrip()
                try:
                    request, end = decoder.raw_decode(text)
                except ValueError as error:
                    # Incomplete until the line ends; a complete bad line gets an error.
                    if "\n" not in text and len(text) < MAX_REQUEST_BYTES:
                        break
                    pending = text.partition("\n")[2]
                    await _send(writer, _error("GenericError", f"JSON parse error, {error}"))
                    continue
                pending = text[end:]
                await _send(writer, self.execute(request))

    def execute(self, request: object) -> JSON:
        """Answer one QMP command."""
        if not isinstance(request, dict) or not isinstance(request.get("execute"), str):
            return _error("GenericError", "QMP input must be an object with an 'execute' key")
        command = request["execute"]
        reply: JSON
        if command == "qmp_capabilities":
            reply = {"return": {}}
        elif command == "query-commands":
            reply = {"return": [{"name": name} for name in COMMANDS]}
        elif command == "query-migrate":
            reply = {"return": query_migrate(self.session, time.monotonic())}
        elif command in ("migrate_cancel", "migrate-cancel"):
            self.log.info("migrate_cancel")
            self.session.cancel("cancelled by migrate_cancel")
            reply = {"return": {}}
        else:
            reply = _error("CommandNotFound", f"The command {command} has not been found")
        if "id" in request:
            reply["id"] = request["id"]
        return reply


async def _answers(path: Path) -> bool:
    """Someone listens on the unix socket at ``path`` (asyncio would unlink it from under them)."""
    if not path.is_socket():
        return False
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 1.0)
    except (OSError, TimeoutError):
        return False  # a stale socket: nobody accepts
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def greeting() -> JSON:
    major, minor, micro = (int(part) for part in __version__.split(".")[:3])
    return {
        "QMP": {
            "version": {
                "qemu": {"major": major, "minor": minor, "micro": micro},
                "package": f"vfio-multifd {__version__}",
            },
            "capabilities": [],
        }
    }


def _error(kind: str, desc: str) -> JSON:
    return {"error": {"class": kind, "desc": desc}}


async def _send(writer: asyncio.StreamWriter, message: JSON) -> None:
    writer.write(json.dumps(message).encode() + b"\r\n")
    await writer.drain()


# -- progress --------------------------------------------------------------------


async def report_progress(session: Session, interval: float, *, notify: bool = False) -> None:
    """Log ``migration_progress`` every ``interval`` seconds while the session is active.

    MB/s is over the last interval (what an operator watching wants to know);
    the summary at the end has the average. With ``notify``, the same goes to
    systemd as ``STATUS=`` (``systemctl status`` shows it).
    """
    last_bytes, last_time = session.bytes_received, time.monotonic()
    while True:
        await asyncio.sleep(interval)
        now = time.monotonic()
        received = session.bytes_received
        rate = (received - last_bytes) / 1e6 / (now - last_time)
        last_bytes, last_time = received, now
        if session.status is not SessionStatus.ACTIVE:
            continue
        devices = session.reassembly.devices.values()
        written = sum(device.bytes_written for device in devices)
        session.log.info(
            "migration_progress",
            bytes=received,
            bytes_written=written,
            mb_per_s=round(rate, 1),
            queued_bytes=session.reassembly.queued_bytes,
            next_idx={str(device.key): device.next_idx for device in devices},
            channels=len(session.channels),
        )
        if notify:  # until a message is lost: then systemd is not listening
            notify = sd_notify(f"STATUS=active: {received / 1e6:.0f} MB received, {rate:.1f} MB/s")


# -- readiness -------------------------------------------------------------------


def sd_notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to systemd's ``$NOTIFY_SOCKET``.

    The protocol of sd_notify(3), without libsystemd: one datagram on a unix
    socket, whose address starting with ``@`` is in the abstract namespace.
    Returns False when there is no socket to notify (not run by systemd) or
    the send failed; readiness is best effort and never stops the daemon.
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("notify_socket_unsupported", address=address)  # e.g. vsock:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Never block the event loop: a receiver that stopped reading
            # (a full queue) loses the message instead of stalling the data path.
            sock.setblocking(False)
            sock.sendto(message.encode(), address)
    except BlockingIOError:
        log.debug("sd_notify_dropped", address=address.lstrip("\0"))
        return False
    except OSError as error:
        log.warning("sd_notify_failed", address=address.lstrip("\0"), error=str(error))
        return False
    return True


def check_ready_fd(fd: int) -> None:
    """Fail early (a usage error) if ``--ready-fd`` is not an open descriptor."""
    try:
        os.fstat(fd)
    except OSError as error:
        raise UsageError(f"--ready-fd {fd}: {error.strerror}") from None


def notify_ready_fd(fd: int) -> None:
    """Write a newline to ``fd`` and close it (the s6 readiness convention)."""
    try:
        os.write(fd, b"\n")
    except OSError as error:
        log.warning("ready_fd_failed", fd=fd, error=str(error))
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


# -- the client ------------------------------------------------------------------


def query(path: str, command: str = "query-migrate", timeout: float = 5.0) -> JSON:
    """Run one command on a status socket (ours or QEMU's QMP) and return its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        stream = sock.makefile("rwb")
        _read_reply(stream)  # the greeting
        for execute in ("qmp_capabilities", command):
            stream.write(json.dumps({"execute": execute}).encode() + b"\n")
            stream.flush()
            reply = _read_reply(stream)
        return reply


def _read_reply(stream: Any) -> JSON:
    while True:
        line = stream.readline()
        if not line:
            raise ConnectionError("the status socket closed the connection")
        message = json.loads(line)
        if isinstance(message, dict) and "event" not in message:
            return message  # QEMU may interleave asynchronous events


def format_table(info: JSON) -> str:
    """``query-migrate``'s answer as a few aligned tables, for a person."""
    ram = info.get("ram", {})  # where QEMU's own query-migrate puts them
    transferred = info.get("transferred", ram.get("transferred", 0))
    mbps = info.get("mbps", ram.get("mbps", 0))
    lines = [
        f"status: {info.get('status', '?')}   total-time: {info.get('total-time', 0)} ms   "
        f"transferred: {transferred} bytes   mbps: {mbps}"
    ]
    if "error-desc" in info:
        lines.append(f"error: {info['error-desc']}")
    if "queued-bytes" in info:
        lines.append(
            f"queued: {info['queued-bytes']} bytes (peak {info.get('peak-queued-bytes', 0)}), "
            f"spilled: {info.get('spilled-bytes', 0)} bytes, "
            f"refused connections: {info.get('refused-connections', 0)}"
        )
    devices = info.get("devices") or []
    if devices:
        lines.append("")
        lines += _table(
            ["device", "bytes-written", "next-idx", "last-idx", "queued-bytes", "complete"],
            [
                [
                    d.get("device"),
                    d.get("bytes-written"),
                    d.get("next-idx"),
                    d.get("last-idx", "-"),
                    d.get("queued-bytes"),
                    "yes" if d.get("complete") else "no",
                ]
                for d in devices
            ],
        )
    channels = info.get("channels") or []
    if channels:
        lines.append("")
        lines += _table(
            ["channel", "state", "bytes", "packets", "peer"],
            [
                [
                    "-" if c.get("id") is None else c["id"],
                    c.get("state"),
                    c.get("bytes"),
                    c.get("packets"),
                    c.get("peer"),
                ]
                for c in channels
            ],
        )
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [header, *[[str(cell) for cell in row] for row in rows]]
    widths = [max(len(row[n]) for row in cells) for n in range(len(header))]
    # Text columns align left, numbers right.
    numeric = [
        all(row[n].isdigit() or row[n] == "-" for row in cells[1:]) for n in range(len(header))
    ]
    return [
        "  ".join(
            cell.rjust(width) if numeric[n] else cell.ljust(width)
            for n, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    ]
