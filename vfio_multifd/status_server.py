"""The status socket: QMP-shaped answers about one session, on a unix socket.

Like QEMU's monitor, :class:`StatusServer` greets each client with
``{"QMP": ...}`` and answers ``query-migrate`` (a snapshot of the session,
built only when asked, so the data path never pays for it) and
``migrate_cancel``. It runs in the session's event loop.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import structlog

from . import __version__
from .channel import ChannelProtocol, ChannelState
from .errors import UsageError
from .reassembly import ChunkState, DeviceBuffer
from .results import SessionStatus
from .session import Session
from .tls import tls_of
from .unix_path import claim_unix_path

log = structlog.get_logger("vfio_multifd.status")

JSON = dict[str, Any]

#: A request larger than this (without a complete JSON object in it) is dropped.
MAX_REQUEST_BYTES = 64 << 10

COMMANDS = ("qmp_capabilities", "query-commands", "query-migrate", "migrate_cancel")


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
            "paused-time": round(session.admission.paused_seconds * 1000),
            "devices": [_device_info(device) for device in reassembly.devices.values()],
            "channels": _channels_info(session),
            "refused-connections": len(session.registry.refused),
            "tls": session.tls is not None,
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
    tls = session.tls is not None
    registry = session.registry
    accepted = sorted(registry.channels.items())
    handshaking = [p for p in registry.connections if p.state is ChannelState.HANDSHAKE]
    return [_channel_info(p, channel_id, tls) for channel_id, p in accepted] + [
        _channel_info(p, None, tls) for p in handshaking
    ]


def _channel_info(protocol: ChannelProtocol, channel_id: int | None, tls: bool) -> JSON:
    info: JSON = {
        "id": channel_id,
        "state": protocol.state.value,
        "bytes": protocol.decoder.bytes_received,
        "packets": protocol.decoder.packets,
        "peer": protocol.peer,
    }
    if tls:  # the client certificate's subject as --tls-authz compares it (None: not verified)
        transport = tls_of(protocol.transport)
        info["tls-subject"] = (
            None if transport is None else transport.get_extra_info("peer_subject")
        )
    return info


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
        await claim_unix_path(str(self.path), f"--status-socket {self.path}")
        try:
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
