"""One incoming channel's TLS session, run by the daemon itself.

:class:`TlsServerProtocol` sits between the plain socket transport and the
channel's own protocol, and is the channel's transport (:class:`TlsTransport`).
It runs the record layer on :class:`ssl.MemoryBIO` instead of
``loop.start_tls`` or ``create_server(ssl=...)``, because both loops' SSL
transports get the end of a stream wrong for this use (measured, asyncio 3.11
and uvloop 0.23): when a source sends its last packets, ``close_notify`` and a
FIN back to back (as QEMU's ``gnutls_bye(GNUTLS_SHUT_WR)`` then ``close``
does), asyncio delivers only part of the buffered data and then reports a
clean EOF, and uvloop drops the data and the EOF alike; asyncio also reports a
FIN without ``close_notify`` as a clean EOF. And with ``ssl=`` on the server, a
failed handshake never reaches the protocol. Here every byte that was
decrypted is delivered before the end is decided; the end is clean only on
``close_notify``; a failed handshake, for any reason, is a refusal with reason
``tls`` through the channel's own refusal path; and the behaviour is the same
under both loops, which only move plain bytes. Credentials and contexts are
``tls.py``'s.

The end of a channel carries the migration's verdict, as over plaintext: the
peer's ``close_notify`` is not answered at once; the channel stays open until
the session closes it, with our ``close_notify`` and a FIN once the outputs
are in place, with a reset (never ``close_notify``) otherwise. A stream that
ends without ``close_notify`` is answered with a reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ssl
from typing import TYPE_CHECKING, Any, cast

from ..errors import HandshakeError, Reason
from ..tls import MAX_PENDING_CIPHERTEXT, TlsServer
from .channel import reset

if TYPE_CHECKING:
    from .channel import ChannelProtocol


class _State(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    ENDED = "ended"  # the peer's close_notify was read; ours waits for the verdict
    CLOSED = "closed"


def _describe(error: ssl.SSLError) -> str:
    """Why a handshake failed, in words, with OpenSSL's reason code."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"client certificate rejected: {error.verify_message or error.reason}"
    if isinstance(error, ssl.SSLEOFError):
        return "connection closed during the TLS handshake"
    reason = error.reason or str(error)
    words = {
        "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate "
        "(--tls-verify-peer yes requires one)",
        "WRONG_VERSION_NUMBER": "not a TLS client hello (plaintext?)",
        "HTTP_REQUEST": "not a TLS client hello (plaintext HTTP)",
        "UNSUPPORTED_PROTOCOL": "the client offers no TLS version from 1.2 up",
        "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust our certificate (unknown CA)",
        "SSLV3_ALERT_BAD_CERTIFICATE": "the client rejected our certificate",
    }.get(reason)
    return f"{words} ({reason})" if words else reason


class TlsServerProtocol(asyncio.BufferedProtocol):
    """One channel's TLS session: the plain transport's protocol, the channel's transport.

    Ciphertext from the socket goes into an incoming :class:`ssl.MemoryBIO`; once
    the handshake is done (and the peer allowed), plaintext is decrypted straight
    into the buffer the channel asks for (``get_buffer``: for a payload, the
    chunk's own buffer). What OpenSSL wants sent (handshake, alerts,
    ``close_notify``) is written to the socket as it appears.
    """

    def __init__(self, server: TlsServer, app: ChannelProtocol) -> None:
        self._server = server
        self._app = app
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = server.context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._transport: asyncio.Transport | None = None
        self._state = _State.HANDSHAKE
        self._app_reading = True  # the channel wants plaintext
        self._socket_reading = True
        self._busy = False  # inside _advance: a nested call is picked up by its loop
        self._eof = False  # the socket reached its end (what it brought is still read)
        self._app_lost = False  # the channel was told the connection is gone
        self._scheduled = False
        self.subject: str | None = None
        self.app_transport = TlsTransport(self)

    # -- the plain transport's side -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        # The channel starts its handshake timer now: it covers the TLS handshake.
        self._app.connection_made(self.app_transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        # The server's one buffer: no connection costs one of its own (a stranger
        # that never speaks costs no more than over plaintext).
        return self._server.receive_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._incoming.write(self._server.receive_buffer[:nbytes])  # copied out at once
        self._advance()

    def eof_received(self) -> bool:
        self._eof = True
        self._incoming.write_eof()  # what is buffered is still read; then the end is decided
        self._advance()
        return True  # we close the socket once the end is decided

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state is _State.HANDSHAKE:
            self._state = _State.CLOSED
            why = f"connection lost during the TLS handshake: {exc or 'closed'}"
            self._lose(HandshakeError(Reason.TLS, why))
        else:
            self._state = _State.CLOSED
            self._lose(exc)

    # -- the record layer -----------------------------------------------------------

    def _advance(self) -> None:
        """Handshake, then decrypt into the channel's buffers while it reads."""
        self._scheduled = False
        if self._busy:
            return
        self._busy = True
        try:
            if self._state is _State.HANDSHAKE:
                self._handshake()
            if self._state is _State.OPEN and self._app_reading:
                self._read()
            self._flush()
            self._control_socket_reading()
        finally:
            self._busy = False

    def _handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            return
        except ssl.SSLError as error:
            self._flush()  # the alert that tells the client why
            self._refuse(HandshakeError(Reason.TLS, f"TLS handshake failed: {_describe(error)}"))
            return
        try:
            self.subject = self._server.check_peer(self._ssl)
        except HandshakeError as error:
            self._refuse(error)
            return
        self._state = _State.OPEN
        self._app.log.info(
            "tls_established",
            version=self._ssl.version(),
            cipher=(self._ssl.cipher() or ("?",))[0],
            subject=self.subject,
        )

    def _read(self) -> None:
        app = self._app
        sslobj = self._ssl
        while self._state is _State.OPEN and self._app_reading:
            buffer = app.get_buffer(-1)
            wanted = len(buffer)
            got = 0
            end: str | None = None
            try:
                while got < wanted:
                    # With a buffer, read() returns a count (typeshed says bytes).
                    count = cast(int, sslobj.read(wanted - got, buffer[got:]))  # type: ignore[arg-type]
                    if count == 0:
                        end = "close_notify"
                        break
                    got += count
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLEOFError:
                end = "the peer closed the connection without TLS close_notify"
            except ssl.SSLError as error:
                end = f"TLS error: {error.reason or error}"
            if got:
                app.buffer_updated(got)
            if end == "close_notify":
                self._clean_end()
                return
            if end is not None:
                self._abrupt_end(end)
                return
            if got < wanted:
                return  # no more complete records: wait for the socket

    def _clean_end(self) -> None:
        """The peer's ``close_notify``: the channel decides whether it ended at a packet
        boundary. Ours comes only with the verdict (:meth:`close`), as over plaintext a
        FIN does: answered now, it would tell the source the migration completed."""
        if self._state is not _State.OPEN:
            return
        self._app.eof_received()
        if self._state is _State.OPEN:  # else the channel failed (truncated) and reset
            self._state = _State.ENDED

    def _abrupt_end(self, why: str) -> None:
        """The stream ended without ``close_notify``, or broke: never a clean end, and
        answered with a reset (before the channel is told: its own reset then finds
        the session closed and could not make it one)."""
        self._state = _State.CLOSED
        if self._transport is not None:
            reset(self._transport)
        self._lose(ConnectionResetError(why))

    def _refuse(self, error: HandshakeError) -> None:
        """The connection failed TLS: the channel refuses it (log, count); we hang up."""
        self._state = _State.CLOSED
        self._lose(error)
        if self._transport is not None:
            self._transport.abort()

    def _lose(self, exc: Exception | None) -> None:
        if not self._app_lost:
            self._app_lost = True
            self._app.connection_lost(exc)

    def _flush(self) -> None:
        if self._outgoing.pending and self._transport is not None:
            data = self._outgoing.read()
            if not self._transport.is_closing():
                self._transport.write(data)

    def _control_socket_reading(self) -> None:
        """Stop reading the socket while the channel does not read and ciphertext piles up."""
        transport = self._transport
        if transport is None or self._eof or self._state is _State.CLOSED or transport.is_closing():
            return
        wanted = self._incoming.pending < MAX_PENDING_CIPHERTEXT
        if wanted != self._socket_reading:
            self._socket_reading = wanted
            if wanted:
                transport.resume_reading()
            else:
                transport.pause_reading()

    # -- what the channel does with its transport ------------------------------------

    def pause_app(self) -> None:
        self._app_reading = False

    def resume_app(self) -> None:
        if self._app_reading:
            return
        self._app_reading = True
        # Not now: the channel calls this from inside its own callbacks.
        if not self._busy and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._advance)

    @property
    def app_reading(self) -> bool:
        return self._app_reading

    def close(self) -> None:
        """Hang up cleanly: our ``close_notify`` (if the session is open), then a FIN.

        The FIN goes out at once (``write_eof``), not only when the socket is closed:
        a peer that answers our ``close_notify`` with its own before we close would
        otherwise leave unread bytes, and the kernel would close with a reset."""
        if self._state in (_State.OPEN, _State.ENDED):
            self._state = _State.CLOSED
            with contextlib.suppress(ssl.SSLError):  # the peer need not answer ours
                self._ssl.unwrap()
            self._flush()
        self._state = _State.CLOSED
        transport = self._transport
        if transport is not None:
            if transport.can_write_eof() and not transport.is_closing():
                transport.write_eof()
            transport.close()

    def abort(self) -> None:
        self._state = _State.CLOSED
        if self._transport is not None:
            self._transport.abort()

    def is_closing(self) -> bool:
        return (
            self._state is _State.CLOSED
            or self._transport is None
            or (self._transport.is_closing())
        )

    def extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._ssl
        if name == "peer_subject":
            return self.subject
        if name in ("peercert", "cipher", "tls_version"):
            if self._state is _State.HANDSHAKE:
                return default
            if name == "peercert":
                return self._ssl.getpeercert()
            return self._ssl.cipher() if name == "cipher" else self._ssl.version()
        if self._transport is None:
            return default
        return self._transport.get_extra_info(name, default)


class TlsTransport(asyncio.Transport):
    """What a channel sees as its transport under TLS (it only reads)."""

    def __init__(self, session: TlsServerProtocol) -> None:
        super().__init__()
        self._session = session

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Also ``ssl_object``, ``peercert``, ``cipher``, ``tls_version`` and
        ``peer_subject`` (:func:`subject_dn`, None without a verified certificate)."""
        return self._session.extra_info(name, default)

    def is_closing(self) -> bool:
        return self._session.is_closing()

    def close(self) -> None:
        self._session.close()

    def abort(self) -> None:
        self._session.abort()

    def pause_reading(self) -> None:
        self._session.pause_app()

    def resume_reading(self) -> None:
        self._session.resume_app()

    def is_reading(self) -> bool:
        return self._session.app_reading


def tls_of(transport: asyncio.BaseTransport | None) -> TlsTransport | None:
    """The channel's TLS transport, or None for a plaintext channel."""
    return transport if isinstance(transport, TlsTransport) else None
