"""The status socket: QMP-shaped answers about one session, on a unix socket.

Like QEMU's monitor, :class:`StatusServer` greets each client with
``{"QMP": ...}`` and answers ``query-migrate`` (the core's snapshot, rendered,
built only when asked, so the data path never pays for it) and
``migrate_cancel``. It runs in the session's event loop.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path

import structlog

from .. import __version__
from ..daemon.listener import remove_own_socket
from ..daemon.session import Session
from ..daemon.unix_path import claim_unix_path
from ..errors import UsageError
from ..results import SessionStatus
from .clients import Clients
from .status_info import JSON, query_migrate

# query_migrate is status_info's; importers take it from here too.
__all__ = ["COMMANDS", "JSON", "StatusServer", "greeting", "query_migrate"]

log = structlog.get_logger("vfio_multifd.status")


#: A request larger than this (without a complete JSON object in it) is answered
#: with an error and the client dropped, whatever the bytes are (spaces too).
MAX_REQUEST_BYTES = 64 << 10
#: Arrays and objects nested deeper than this are an error (QMP commands use 3 or 4).
MAX_DEPTH = 32
#: Clients connected at once; one more is hung up on.
MAX_CLIENTS = 16
#: Answers a client has not read: past this many bytes, or not drained within
#: this many seconds, the client is dropped.
MAX_CLIENT_BUFFER = 256 << 10
CLIENT_WRITE_TIMEOUT = 5.0

COMMANDS = ("qmp_capabilities", "query-commands", "query-migrate", "migrate_cancel")


class StatusServer:
    """QMP-shaped status socket of one session.

    Like QEMU's monitor it greets each client with ``{"QMP": ...}`` and answers
    one JSON object per command, each on its own line, echoing the request's
    ``id``; requests are framed by their JSON, not by lines.
    ``qmp_capabilities`` is accepted but not required.

    Whoever can connect can cancel: the socket is created mode 0600 in a
    private directory and only then linked at its path, so it is never
    reachable with wider permissions. No client can hold the daemon: at most
    :data:`MAX_CLIENTS` at once, each request at most :data:`MAX_REQUEST_BYTES`
    (whatever the bytes are) and :data:`MAX_DEPTH` levels deep, answers
    that a client does not read within :data:`CLIENT_WRITE_TIMEOUT` seconds
    (or past :data:`MAX_CLIENT_BUFFER` bytes) drop it, and closing never waits
    for a client.
    """

    def __init__(self, session: Session, path: str | os.PathLike[str]) -> None:
        self.session = session
        self.path = Path(path)
        self._server: asyncio.Server | None = None
        self._clients = Clients(MAX_CLIENTS)
        #: Clients that sent qmp_capabilities: only they get events (QEMU sends none
        #: during capabilities negotiation, and a client would take one for the answer).
        self._negotiated: set[asyncio.StreamWriter] = set()
        self._inode: tuple[int, int] | None = None  # of the socket we made, to unlink only it
        self.log = log.bind(status_socket=str(self.path))

    async def start(self) -> None:
        self.session.settings.check_paths((f"--status-socket {self.path}", self.path))
        await claim_unix_path(str(self.path), f"--status-socket {self.path}")
        try:
            sock = self._bind_private()
            try:
                self._server = await asyncio.start_unix_server(
                    self._serve, sock=sock, limit=MAX_REQUEST_BYTES
                )
            except BaseException:
                sock.close()
                raise
        except OSError as error:
            await self.close()
            raise UsageError(
                f"cannot listen on --status-socket {self.path}: {error.strerror or error}"
            ) from error
        self.session.status_listeners.append(self._announce)
        self.log.info("status_socket_listening")

    def _announce(self, status: SessionStatus) -> None:
        """QEMU's ``MIGRATION`` event to every client, after the answer being written
        (a ``migrate_cancel``'s ``{"return": {}}`` comes first, as from QEMU).

        A final status's event also carries ``info``, ``query-migrate``'s answer at
        that moment: the daemon exits right after, too soon to be asked again.
        """
        now = time.time()
        data: JSON = {"status": status.value}
        if status.final:
            data["info"] = query_migrate(self.session.snapshot())
        event = {
            "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)},
            "event": "MIGRATION",
            "data": data,
        }
        line = json.dumps(event).encode() + b"\r\n"

        def send() -> None:
            for writer in list(self._negotiated):
                if writer.transport.is_closing():
                    continue
                writer.write(line)  # never waits: a client that does not read is dropped
                if writer.transport.get_write_buffer_size() > MAX_CLIENT_BUFFER:
                    writer.transport.abort()

        asyncio.get_running_loop().call_soon(send)

    def _bind_private(self) -> socket.socket:
        """A listening socket at ``self.path`` that was never reachable but by us.

        Bound in a fresh directory of mode 0700 beside the path, made 0600 there,
        then hard-linked at the path (which fails rather than replace a file that
        appeared meanwhile). No umask is touched: it is the whole process's.
        """
        private = tempfile.mkdtemp(dir=self.path.parent, prefix=".vfio-multifd-status.")
        temporary = os.path.join(private, "s")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(temporary)
            os.chmod(temporary, 0o600)
            sock.listen(16)
            os.link(temporary, self.path)
            info = os.stat(self.path)
            self._inode = (info.st_dev, info.st_ino)
        except BaseException:
            sock.close()
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            with contextlib.suppress(OSError):
                os.rmdir(private)
        return sock

    async def close(self) -> None:
        """Stop listening, unlink the socket (if it is still ours), drop every client.

        Returns at once: a client that does not read cannot keep the daemon alive.
        """
        server, self._server = self._server, None
        if server is not None:
            server.close()
        with contextlib.suppress(ValueError):
            self.session.status_listeners.remove(self._announce)
        inode, self._inode = self._inode, None
        if inode is not None:
            remove_own_socket(str(self.path), inode)
        await self._clients.close()

    async def __aenter__(self) -> StatusServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None or not self._clients.admit(writer):
            writer.transport.abort()
            self.log.warning("status_client_refused", clients=len(self._clients))
            return
        try:
            await self._converse(reader, writer)
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass  # the client went away, or we are closing
        except _SlowClient:
            self.log.warning("status_client_dropped", why="does not read its answers")
        finally:
            self._clients.done()
            self._negotiated.discard(writer)
            writer.transport.abort()  # never wait for a client to read what is left

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _send(writer, greeting())
        decoder = json.JSONDecoder()
        text_decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pending = ""
        while data := await reader.read(4096):
            pending = (pending + text_decoder.decode(data)).lstrip()
            while pending:
                reply, pending, done = self._next_request(decoder, pending, writer)
                if reply is not None:
                    await _send(writer, reply)
                if done:
                    return
                if reply is None:
                    break  # incomplete: read more

    def _next_request(
        self, decoder: json.JSONDecoder, pending: str, writer: asyncio.StreamWriter
    ) -> tuple[JSON | None, str, bool]:
        """The answer to the first request in ``pending`` (None: incomplete), what is
        left after it, and whether to hang up.

        As QEMU's monitor does, a request is framed by its JSON, not by lines: an
        object ends where its brackets balance, whatever lines it spans and however
        many reads it took to arrive. Anything else ends at the end of its line.
        """
        framed = pending.startswith(("{", "["))
        try:
            end = _json_end(pending) if framed else None
        except _TooDeep:
            return _error("GenericError", f"JSON nested deeper than {MAX_DEPTH}"), "", True
        if framed and end is None:
            return _incomplete(pending)
        try:
            request, parsed = decoder.raw_decode(pending[:end])
        except ValueError as error:
            if not framed and "\n" not in pending:
                return _incomplete(pending)
            rest = pending[end:] if framed else pending.partition("\n")[2]
            return _error("GenericError", f"JSON parse error, {error}"), rest.lstrip(), False
        reply = self.execute(request)
        if isinstance(request, dict) and request.get("execute") == "qmp_capabilities":
            self._negotiated.add(writer)  # events from now on, as QEMU sends them
        return reply, pending[parsed:].lstrip(), False

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
            reply = {"return": query_migrate(self.session.snapshot())}
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


def _incomplete(pending: str) -> tuple[JSON | None, str, bool]:
    """Wait for the rest of a request, up to :data:`MAX_REQUEST_BYTES` of it."""
    if len(pending.encode()) >= MAX_REQUEST_BYTES:
        return _error("GenericError", f"request longer than {MAX_REQUEST_BYTES} bytes"), "", True
    return None, pending, False


def _error(kind: str, desc: str) -> JSON:
    return {"error": {"class": kind, "desc": desc}}


class _SlowClient(Exception):
    """A client that does not read its answers."""


async def _send(writer: asyncio.StreamWriter, message: JSON) -> None:
    writer.write(json.dumps(message).encode() + b"\r\n")
    if writer.transport.get_write_buffer_size() > MAX_CLIENT_BUFFER:
        raise _SlowClient
    try:
        await asyncio.wait_for(writer.drain(), CLIENT_WRITE_TIMEOUT)
    except TimeoutError:
        raise _SlowClient from None


class _TooDeep(Exception):
    """A request nests arrays and objects deeper than :data:`MAX_DEPTH`."""


#: A whole JSON string, a string not closed yet (a lone quote), or a bracket.
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|["\[\]{}]')


def _json_end(text: str) -> int | None:
    """Where the object or array ``text`` starts with ends: just past the bracket that
    balances its first (strings skipped), or None if it has not arrived yet.

    Raises :class:`_TooDeep` past :data:`MAX_DEPTH`: json's parser recurses, and a
    few thousand ``[`` would raise RecursionError.
    """
    depth = 0
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token == '"':
            return None  # inside a string that goes on in the next read
        if token in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise _TooDeep
        elif token in "]}":
            depth -= 1
            if depth == 0:
                return match.end()
    return None
