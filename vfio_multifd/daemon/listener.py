"""The listening socket and the connections it accepts, until each is closed.

:class:`Listener` listens (TCP or unix) and accepts connections itself; what
a connection may become (a channel, or refused) is the migration core's
decision, which the session asks for. The listener keeps strangers from
crowding the migration out of descriptors. Anyone who can reach the port can
open connections that never send a handshake; each costs a descriptor. So it
accepts connections itself rather than through an ``asyncio.Server`` (whose
loops differ: the stdlib's logs ``EMFILE`` and retries after a second;
uvloop's libuv drops every waiting connection, then may stop serving for
good), and:

* keeps descriptors free for what the migration opens after it starts
  listening (:data:`RESERVED_DESCRIPTORS`: the spill file, a directory to
  fsync, the status socket and its clients...): when every other descriptor
  of ``RLIMIT_NOFILE`` is taken, it has the oldest handshaking connection shed
  and stops accepting until one closes; accepted channels are never shed;
* after ``EMFILE`` / ``ENFILE`` (something else took the descriptors) has the
  oldest stranger shed and tries again after :data:`ACCEPT_RETRY_SECONDS`,
  never in a busy loop;
* logs at most a burst of :data:`REFUSAL_LOG_BURST` ``channel_refused`` lines
  then one a second, each saying how many were left out before it (the core
  counts every refusal and keeps the last few with their reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import socket
import stat
import time
from collections.abc import Callable

import structlog

from ..config import Address
from ..errors import HandshakeError, UsageError
from .channel import ChannelProtocol
from .unix_path import claim_unix_path

log = structlog.get_logger("vfio_multifd.listener")

#: Descriptors kept free for what the migration opens once it listens: the spill
#: file, a directory to fsync at commit, the status socket and its clients
#: (status_server.MAX_CLIENTS), sd_notify's datagram socket, and spare.
RESERVED_DESCRIPTORS = 32
#: The kernel's queue of connections not yet accepted (capped by somaxconn).
LISTEN_BACKLOG = 1024
#: Connections accepted per readiness callback, so that one flood cannot hog the loop.
ACCEPTS_PER_CALLBACK = 64
#: After EMFILE / ENFILE / ENOBUFS / ENOMEM from accept(): wait this long.
ACCEPT_RETRY_SECONDS = 0.1
#: channel_refused lines: this many at once, then one per second.
REFUSAL_LOG_BURST = 10
REFUSAL_LOG_PER_SECOND = 1.0

_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class RateLimit:
    """A token bucket: ``allow()`` says whether one more line may be written now."""

    def __init__(self, burst: int, per_second: float, clock: Callable[[], float]) -> None:
        self.burst = burst
        self.per_second = per_second
        self.clock = clock
        self.tokens = float(burst)
        self.last = clock()
        self.suppressed = 0  # lines left out since the last one allowed

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.per_second)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.suppressed += 1
        return False


def open_descriptors() -> int | None:
    """How many descriptors this process has open (Linux), or None if unknown."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir used
    except OSError:
        return None


def descriptor_room(reserve: int) -> int | None:
    """Descriptors left under the soft ``RLIMIT_NOFILE`` after those open now and
    ``reserve``; None when there is no limit (or it cannot be known)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = open_descriptors()
    if soft == resource.RLIM_INFINITY or in_use is None:
        return None
    return soft - in_use - reserve


class Listener:
    def __init__(self, *, expected: int, shed: Callable[[str], None]) -> None:
        self.expected = expected  # channels: the descriptor limit must leave room for them
        self._shed = shed  # has the core refuse its oldest handshaking connection
        self.connections: dict[int, ChannelProtocol] = {}  # open: handshaking or accepted
        self.address: Address | None = None  # where we listen, once we do
        self.max_open: int | None = None  # connections the descriptor limit leaves room for
        self.open = 0  # sockets accepted and not yet closed (shed ones included)
        self._factory: Callable[[str], ChannelProtocol] | None = None
        self._wrap: Callable[[ChannelProtocol], asyncio.BaseProtocol] | None = None
        self._sockets: list[socket.socket] = []
        self._reading = False  # the listening sockets are watched
        self._retry: asyncio.TimerHandle | None = None
        self._starting: set[asyncio.Task[None]] = set()
        self._unix_path: str | None = None  # ours to unlink at the end
        self._unix_inode: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket
        self._refusal_log = RateLimit(REFUSAL_LOG_BURST, REFUSAL_LOG_PER_SECOND, time.monotonic)
        self._accept_log = RateLimit(1, REFUSAL_LOG_PER_SECOND, time.monotonic)

    async def listen(
        self,
        address: Address,
        factory: Callable[[str], ChannelProtocol],
        wrap: Callable[[ChannelProtocol], asyncio.BaseProtocol] | None = None,
    ) -> Address:
        """Start accepting connections at ``address``; returns where (port 0 resolved).

        ``factory(peer)`` makes each connection's protocol (and tells the core);
        ``wrap`` puts a layer between the socket and each channel (TLS: the
        channel's transport is then the layer's, see tls_channel.py)."""
        self._wrap = wrap
        loop = asyncio.get_running_loop()
        self._factory = factory
        try:
            if address.kind == "unix":
                await claim_unix_path(address.path, str(address))
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sockets.append(sock)
                sock.bind(address.path)
                self._unix_path = address.path
                info = os.stat(address.path)
                self._unix_inode = (info.st_dev, info.st_ino)
                self.address = address
            else:
                await self._bind_tcp(loop, address)
                port = self._sockets[0].getsockname()[1]
                self.address = Address("tcp", address.host, port)
            for sock in self._sockets:
                sock.listen(LISTEN_BACKLOG)
                sock.setblocking(False)
        except OSError as error:
            self._close_sockets()
            self.remove_socket()
            raise UsageError(f"cannot listen on {address}: {error.strerror or error}") from error
        room = descriptor_room(RESERVED_DESCRIPTORS)
        if room is not None and room < self.expected + 1:
            self._close_sockets()
            self.remove_socket()
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            raise UsageError(
                f"the descriptor limit (RLIMIT_NOFILE {soft}) leaves room for {max(room, 0)} "
                f"connections; {self.expected} channels need {self.expected + 1} (raise it: "
                "ulimit -n, or LimitNOFILE= in a systemd unit)"
            )
        self.max_open = room
        self._start_reading()
        return self.address

    async def _bind_tcp(self, loop: asyncio.AbstractEventLoop, address: Address) -> None:
        infos = await loop.getaddrinfo(
            address.host or None,
            address.port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )
        seen: set[tuple[int, object]] = set()
        for family, kind, proto, _, sockaddr in infos:
            if (family, sockaddr) in seen:
                continue
            seen.add((family, sockaddr))
            sock = socket.socket(family, kind, proto)
            self._sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)

    # -- accepting ------------------------------------------------------------------

    def _start_reading(self) -> None:
        if self._reading or not self._sockets:
            return
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.add_reader(sock.fileno(), self._accept_ready, sock)
        self._reading = True

    def _stop_reading(self) -> None:
        if not self._reading:
            return
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.remove_reader(sock.fileno())
        self._reading = False

    def _accept_ready(self, listening: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_CALLBACK):
            if self.max_open is not None and self.open >= self.max_open:
                # Every descriptor we may use is taken: make room, and accept
                # again once a connection has really closed (closed()).
                self._shed("the descriptor limit is near")
                self._stop_reading()
                return
            try:
                sock, peer = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as error:
                self._accept_failed(error)
                return
            self._start(sock, peer)

    def _accept_failed(self, error: OSError) -> None:
        """Out of descriptors or memory (or worse): shed a stranger, back off, retry."""
        if self._accept_log.allow():
            log.warning(
                "accept_failed",
                error=os.strerror(error.errno) if error.errno else str(error),
                errno=errno.errorcode.get(error.errno or 0, str(error.errno)),
                open_connections=self.open,
                retry_in=ACCEPT_RETRY_SECONDS,
                suppressed=self._accept_log.suppressed,
            )
            self._accept_log.suppressed = 0
        if error.errno in _OUT_OF_RESOURCES:
            self._shed("out of descriptors")
        self._stop_reading()
        if self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(
                ACCEPT_RETRY_SECONDS, self._retry_accepting
            )

    def _retry_accepting(self) -> None:
        self._retry = None
        if self._sockets and (self.max_open is None or self.open < self.max_open):
            self._start_reading()

    def _start(self, sock: socket.socket, peer: object) -> None:
        assert self._factory is not None
        sock.setblocking(False)
        self.open += 1
        protocol = self._factory(describe_peer(peer))
        self.connections[protocol.conn] = protocol
        task = asyncio.get_running_loop().create_task(self._connect(sock, protocol))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _connect(self, sock: socket.socket, protocol: ChannelProtocol) -> None:
        loop = asyncio.get_running_loop()
        try:
            wrap = self._wrap
            layer = protocol if wrap is None else wrap(protocol)
            await loop.connect_accepted_socket(lambda: layer, sock)
        except asyncio.CancelledError:
            if protocol.transport is None:
                sock.close()
                protocol.connection_lost(None)
            raise
        except Exception as error:  # e.g. the peer reset it already: one connection less
            if protocol.transport is None:
                sock.close()
                protocol.connection_lost(error)
            log.debug("connection_setup_failed", error=str(error))

    def closed(self, conn: int) -> None:
        """A connection's socket is closed: its descriptor is free again."""
        if self.connections.pop(conn, None) is None:
            return
        self.open -= 1
        if (
            self._sockets
            and not self._reading
            and self._retry is None
            and (self.max_open is None or self.open < self.max_open)
        ):
            self._start_reading()

    # -- refusals' log lines ----------------------------------------------------------

    def log_refusal(
        self, channel: ChannelProtocol, error: HandshakeError, *, late: bool = False
    ) -> None:
        """``late``: the migration was ending already (its error says why; a channel
        turned away then is no news, so only a debug line)."""
        if late:
            channel.log.debug("channel_refused", error=str(error), reason=error.reason.value)
            return
        if self._refusal_log.allow():
            channel.log.warning(
                "channel_refused",
                error=str(error),
                reason=error.reason.value,
                suppressed=self._refusal_log.suppressed,
            )
            self._refusal_log.suppressed = 0

    def log_suppressed(self, refused: int) -> None:
        """Say how many channel_refused lines were left out since the last one."""
        if self._refusal_log.suppressed:
            log.warning(
                "channel_refused_suppressed",
                suppressed=self._refusal_log.suppressed,
                refused=refused,
            )
            self._refusal_log.suppressed = 0

    def stop(self) -> None:
        """Stop listening (the connections are the session's to close)."""
        self._close_sockets()
        for task in list(self._starting):
            task.cancel()

    def _close_sockets(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        with contextlib.suppress(RuntimeError):  # no running loop: nothing is watched
            self._stop_reading()
        self._reading = False
        sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()

    def remove_socket(self) -> None:
        """Unlink the unix socket we listened on, if the path is still that socket
        (same inode): never another daemon's, nor a file put there since."""
        path, self._unix_path = self._unix_path, None
        inode, self._unix_inode = self._unix_inode, None
        if path is not None and inode is not None:
            remove_own_socket(path, inode)


def describe_peer(peer: object) -> str:
    """``host:port`` of a TCP peer, ``unix`` for a unix socket's (unnamed) peer."""
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "unix")


def remove_own_socket(path: str, inode: tuple[int, int]) -> None:
    """Unlink ``path`` only if it is still the socket whose (st_dev, st_ino) is ``inode``."""
    try:
        info = os.lstat(path)
    except OSError:
        return
    if stat.S_ISSOCK(info.st_mode) and (info.st_dev, info.st_ino) == inode:
        with contextlib.suppress(OSError):
            os.unlink(path)
