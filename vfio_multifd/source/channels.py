"""The source's channels: connect, send each channel's stream on its own thread,
and wait for the daemon's verdict (a clean close once it completed, a reset otherwise).
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import errno
import fcntl
import socket
import ssl
import struct
import termios
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import structlog

from ..config import Address
from ..errors import Reason, SendError, os_error_text

if TYPE_CHECKING:
    from ..tls import TlsClient

log = structlog.get_logger("vfio_multifd.sender")


def connect(address: Address, timeout: float, *, channel: int | None = None) -> socket.socket:
    """Connect, retrying while nothing listens at ``address`` yet (for ``timeout`` seconds;
    a log line says so, and until when). Raises :class:`SendError` naming the address."""
    deadline = time.monotonic() + timeout
    retrying = False
    while True:
        try:
            return _connect_once(address, timeout)
        except (ConnectionRefusedError, FileNotFoundError) as error:
            left = deadline - time.monotonic()
            if left < 0:
                raise SendError(
                    Reason.CONNECT_FAILED,
                    f"cannot connect to {address} within {timeout:g} s (--connect-timeout): "
                    f"{_why(error)}",
                    channel=channel,
                ) from None
            if not retrying:
                retrying = True
                until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=left)
                log.warning(
                    "connect_retrying",
                    channel=channel,
                    address=str(address),
                    error=_why(error),
                    until=until.strftime("%Y-%m-%dT%H:%M:%SZ"),  # as the log's timestamps
                    connect_timeout=timeout,
                )
            time.sleep(0.05)
        except OSError as error:
            raise SendError(
                Reason.CONNECT_FAILED,
                f"cannot connect to {address}: {_why(error)}",
                channel=channel,
            ) from None


def _connect_once(address: Address, timeout: float) -> socket.socket:
    if address.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(address.path)
        except BaseException:
            sock.close()
            raise
        return sock
    sock = socket.create_connection((address.host, address.port), timeout=timeout)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _why(error: OSError) -> str:
    if isinstance(error, socket.gaierror):  # a host name that does not resolve
        return str(error.strerror)
    if isinstance(error, TimeoutError) and not error.errno:
        return "timed out"
    return os_error_text(error)


def send_all(sock: socket.socket, buffers: list[bytes | memoryview]) -> int:
    """``sendmsg`` until every byte of ``buffers`` is out (over TLS, which has no
    ``sendmsg``: each buffer in turn, cut into records by OpenSSL)."""
    total = sum(len(b) for b in buffers)
    if isinstance(sock, ssl.SSLSocket):
        for buffer in buffers:
            sock.sendall(buffer)
        return total
    sent = sock.sendmsg(buffers)
    if sent < total:  # rare on a blocking socket: finish the rest plainly
        rest = b"".join(bytes(b) for b in buffers)[sent:]
        sock.sendall(rest)
    return total


ChannelStream = Callable[[socket.socket], int]


class StreamEnd(enum.Enum):
    """What a channel does once its stream is sent (``run_channels``' ``ends``)."""

    CLOSE = "close"  # end the stream (a FIN; over TLS close_notify first), await the verdict
    KEEP_OPEN = "keep-open"  # await the verdict without ending the stream
    RESET = "reset"  # reset the connection, as a source that broke off: no verdict to await


def run_channels(
    address: Address,
    streams: Sequence[ChannelStream],
    timeout: float,
    *,
    stop: threading.Event | None = None,
    tls: TlsClient | None = None,
    channel_ids: Sequence[int | None] | None = None,
    ends: Sequence[StreamEnd] | None = None,
    reset_hint: str = "",
) -> list[int]:
    """Connect every channel, run each stream on its own thread, then wait for the
    daemon's verdict; returns the bytes each channel sent.

    The daemon answers nothing on a channel: it closes every channel cleanly once
    the migration completed (its outputs in place) and resets them when it failed
    or refused one. A reset, or any other error, raises :class:`SendError` naming
    the channel and the address, and resets every other channel at once (so that
    the daemon fails too, rather than wait for them). ``stop`` is set then: a
    stream that checks it between packets stops early. With ``tls`` each channel
    does its TLS handshake first, and ends with ``close_notify``; a clean close
    is then the daemon's ``close_notify`` and a FIN, and an end without its
    ``close_notify`` is a failure too (over a unix socket, where a reset cannot
    be sent, that is how the daemon says the migration failed).

    Streams connect in the order given; ``channel_ids`` names them in errors and
    logs (default 0, 1...: their place; None: QEMU's main channel). ``ends`` says how each ends once sent
    (default: all :attr:`StreamEnd.CLOSE`); a replay ends each as it was recorded.
    ``reset_hint`` is added to the message of a reset: what else could explain it.
    """
    ids: list[int | None] = (
        list(range(len(streams))) if channel_ids is None else list(channel_ids)
    )
    socks = _connect_all(address, timeout, ids, tls)
    endings = [StreamEnd.CLOSE] * len(streams) if ends is None else list(ends)
    run = _ChannelRun(address, socks, streams, ids, endings, stop or threading.Event(), tls)
    run.reset_hint = reset_hint
    return run.join()


def _connect_all(
    address: Address, timeout: float, ids: list[int | None], tls: TlsClient | None
) -> list[socket.socket]:
    """One connection per channel, in order; if one fails, the others are reset."""
    socks: list[socket.socket] = []
    try:
        for channel in ids:
            sock = connect(address, timeout, channel=channel)
            socks.append(sock if tls is None else tls.wrap(sock))
    except BaseException:
        for sock in socks:
            reset_on_close(sock)
            sock.close()
        raise
    return socks


class _ChannelRun:
    """Every channel's stream on a thread of its own; the first error resets them all."""

    def __init__(
        self,
        address: Address,
        socks: list[socket.socket],
        streams: Sequence[ChannelStream],
        ids: list[int | None],
        endings: list[StreamEnd],
        stop: threading.Event,
        tls: TlsClient | None,
    ) -> None:
        self.address = address
        self.socks = socks
        self.streams = streams
        self.ids = ids
        self.endings = endings
        self.stop = stop
        self.tls = tls is not None
        self.sent = [0] * len(streams)
        self.errors: list[BaseException] = []
        self.finished: list[int] = []  # channels that sent their whole stream
        self.lock = threading.Lock()
        self.reset_hint = ""  # added to a reset's message: what else could explain it

    def join(self) -> list[int]:
        """Run every channel to its verdict; the bytes each sent, or the first error."""
        threads = [
            threading.Thread(
                target=self.worker,
                args=(n,),
                name=f"send-channel-{'main' if self.ids[n] is None else self.ids[n]}",
                daemon=True,
            )
            for n in range(len(self.streams))
        ]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                thread.join()
        except BaseException:  # SIGINT, SIGTERM: the daemon sees the channels reset
            self.abort()
            deadline = time.monotonic() + 1.0  # a thread stuck in sendmsg is left to exit
            for thread in threads:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
            raise
        if self.errors:
            raise self.errors[0]
        return self.sent

    def abort(self) -> None:
        self.stop.set()
        for sock in self.socks:
            reset_on_close(sock)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)  # wakes a thread waiting for the verdict

    def worker(self, n: int) -> None:
        sock = self.socks[n]
        try:
            try:
                self.sent[n] = self.streams[n](sock)
            except OSError as error:
                if not self.stop.is_set():
                    raise channel_error(
                        self.ids[n], self.address, error, sent=None, sock=sock, hint=self.reset_hint
                    ) from None
                return
            if not self.stop.is_set():
                self._all_sent(n)
                self._end(n, sock)
        except BaseException as error:  # reported by the caller
            with self.lock:
                self.errors.append(error)
            self.abort()
        finally:
            sock.close()

    def _all_sent(self, n: int) -> None:
        with self.lock:
            self.finished.append(n)
            if len(self.finished) == len(self.streams):
                log.info(
                    "waiting_for_daemon",
                    address=str(self.address),
                    bytes=sum(self.sent),
                    why="everything is sent; the daemon closes every channel once its "
                    "outputs are in place, or resets them if the migration failed",
                )

    def _end(self, n: int, sock: socket.socket) -> None:
        """End channel ``n`` as asked, and wait for the daemon's verdict on it."""
        ending = self.endings[n]
        if ending is StreamEnd.RESET:
            _reset_once_delivered(sock)  # the close (in worker) is the reset
            return
        try:
            if ending is StreamEnd.CLOSE:
                _end_stream(sock)
            # Kept open over TLS, the stream is still TLS: no close_notify was sent.
            _await_verdict(sock, tls=self.tls and ending is StreamEnd.KEEP_OPEN)
        except OSError as error:
            if not self.stop.is_set():
                sent = self.sent[n]
                raise channel_error(
                    self.ids[n], self.address, error, sent=sent, sock=sock, hint=self.reset_hint
                ) from None


def _end_stream(sock: socket.socket) -> None:
    """The clean end of a channel: a FIN, or over TLS a ``close_notify``.

    Over TLS this waits for the daemon's ``close_notify``, which it sends only with
    its outputs in place (then a FIN, see :func:`_await_verdict`); a reset, or an end
    without it, raises :class:`OSError`, whatever the daemon did before."""
    if isinstance(sock, ssl.SSLSocket):
        sock.unwrap()  # the SSLSocket reads and writes plainly from now on
    else:
        sock.shutdown(socket.SHUT_WR)


def _await_verdict(sock: socket.socket, *, tls: bool) -> None:
    """Return once the daemon closed the channel cleanly: a FIN, after its ``close_notify``
    (ours in return) if the stream is still ``tls``. A reset raises :class:`OSError`,
    and so does, over TLS, an end without ``close_notify`` (:class:`ssl.SSLEOFError`:
    ragged ends are not suppressed, see ``tls.py``). The destination answers nothing
    else: a byte it sends is ignored."""
    if tls and isinstance(sock, ssl.SSLSocket):
        while sock.recv(4096):
            pass
        sock.unwrap()
    while sock.recv(4096):
        pass


def reset_on_close(sock: socket.socket) -> None:
    """Make the socket's close a reset (TCP RST), not a clean end of stream."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


#: ``tcpi_state`` of a TCP connection that is gone (linux/tcp_states.h).
_TCP_CLOSE = 7


def _was_reset(sock: socket.socket) -> bool:
    """The daemon reset this TCP connection (we never end one with a FIN before the
    verdict, so a closed state means a reset)."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_CLOSE
    except OSError:  # a unix socket: no TCP state, and no reset either
        return False


#: How long a stream that ends in a reset waits for the daemon to have its bytes.
RESET_DELIVERY_TIMEOUT = 5.0


def _reset_once_delivered(sock: socket.socket) -> None:
    """Make the close a reset, once the daemon's kernel has acknowledged every byte
    sent (for at most :data:`RESET_DELIVERY_TIMEOUT`): a reset discards what the
    socket still holds, and the daemon must read all a replayed stream had."""
    outq = getattr(termios, "TIOCOUTQ", None)  # SIOCOUTQ: bytes not yet acknowledged
    if outq is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        deadline = time.monotonic() + RESET_DELIVERY_TIMEOUT
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline:
                (unacknowledged,) = struct.unpack("i", fcntl.ioctl(sock.fileno(), outq, bytes(4)))
                if not unacknowledged:
                    break
                time.sleep(0.005)
    reset_on_close(sock)


def channel_error(
    channel: int | None,
    address: Address,
    error: OSError,
    *,
    sent: int | None,
    sock: socket.socket | None = None,
    hint: str = "",
) -> SendError:
    """Why channel ``channel`` ended (None: the main channel): ``sent`` is its byte count
    if it had sent everything."""
    where = f"{address}" if channel is not None else f"main channel: {address}"
    when = (
        "while this channel was sending"
        if sent is None
        else f"after this channel sent all its {sent} bytes"
    )
    verdict = (
        f"it refused this channel or the migration failed (the daemon's error says which{hint})"
    )
    # Over TLS a reset is mostly reported as an end without close_notify: TCP says which.
    if isinstance(error, ssl.SSLEOFError) and (sock is None or not _was_reset(sock)):
        return SendError(
            Reason.CHANNEL_RESET,
            f"{where}: the daemon ended the connection without TLS close_notify {when}: "
            f"{verdict}",
            channel=channel,
        )
    # ENOTCONN: the reset came before our shutdown(SHUT_WR), and Linux then reports
    # the connection gone rather than the reset that ended it.
    if (
        isinstance(error, ConnectionResetError | BrokenPipeError | ssl.SSLEOFError)
        or error.errno == errno.ENOTCONN
    ):
        return SendError(
            Reason.CHANNEL_RESET,
            f"{where}: the daemon reset the connection {when}: {verdict}",
            channel=channel,
        )
    return SendError(Reason.SEND_FAILED, f"{where}: {_why(error)} {when}", channel=channel)
