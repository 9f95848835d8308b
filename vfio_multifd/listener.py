"""The listening socket and the channels it brought: accepted, refused, closed.

:class:`ChannelRegistry` listens (TCP or unix), keeps every connection until
it is accepted or refused, and decides whether a completed handshake may join
the migration (PROTOCOL.md 3.1: magic, version, uuid, channel id, and no id
twice). It knows channels, not devices: what they carry goes elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

import structlog

from .channel import ChannelProtocol, ChannelState
from .config import Address
from .errors import HandshakeError, Reason, UsageError
from .unix_path import claim_unix_path
from .wire import ChannelHandshake, check_handshake

log = structlog.get_logger("vfio_multifd.listener")


class ChannelRegistry:
    def __init__(self, *, channels: int, uuid: bytes) -> None:
        self.expected = channels
        self.uuid = uuid
        self.channels: dict[int, ChannelProtocol] = {}  # accepted, by channel id
        self.connections: set[ChannelProtocol] = set()  # open: handshaking or accepted
        self.refused: list[tuple[str, HandshakeError]] = []  # (peer, why)
        self.address: Address | None = None  # where we listen, once we do
        self._server: asyncio.Server | None = None
        self._unix_path: str | None = None  # ours to unlink at the end

    async def listen(
        self,
        address: Address,
        factory: Callable[[], ChannelProtocol],
        wrap: Callable[[ChannelProtocol], asyncio.BaseProtocol] | None = None,
    ) -> Address:
        """Start accepting connections at ``address``; returns where (port 0 resolved).

        ``wrap`` puts a layer between the socket and each channel (TLS: the
        channel's transport is then the layer's, see tls.py)."""

        def protocol() -> asyncio.BaseProtocol:
            channel = factory()
            self.connections.add(channel)
            return channel if wrap is None else wrap(channel)

        loop = asyncio.get_running_loop()
        try:
            if address.kind == "unix":
                await claim_unix_path(address.path, str(address))
                self._server = await loop.create_unix_server(protocol, address.path)
                self._unix_path = address.path
                self.address = address
            else:
                self._server = await loop.create_server(
                    protocol, address.host, address.port, reuse_address=True
                )
                port = self._server.sockets[0].getsockname()[1]
                self.address = Address("tcp", address.host, port)
        except OSError as error:
            raise UsageError(f"cannot listen on {address}: {error.strerror or error}") from error
        return self.address

    def accept(self, channel: ChannelProtocol, handshake: ChannelHandshake) -> None:
        """Admit a completed handshake, or raise :class:`HandshakeError` to refuse it."""
        check_handshake(handshake, uuid=self.uuid, channels=self.expected)
        if handshake.channel_id in self.channels:
            raise HandshakeError(
                Reason.HANDSHAKE_DUPLICATE_CHANNEL,
                f"channel id {handshake.channel_id} is already connected",
            )
        self.channels[handshake.channel_id] = channel

    def refuse(self, channel: ChannelProtocol, error: HandshakeError) -> None:
        self.connections.discard(channel)
        self.refused.append((channel.peer, error))
        channel.log.warning("channel_refused", error=str(error), reason=error.reason.value)

    @property
    def all_closed(self) -> bool:
        """Every expected channel connected and reached a clean end of stream."""
        return len(self.channels) == self.expected and all(
            channel.state is ChannelState.CLOSED for channel in self.channels.values()
        )

    @property
    def reading(self) -> int:
        """Accepted channels still reading."""
        return sum(channel.state is ChannelState.ACTIVE for channel in self.channels.values())

    @property
    def bytes_received(self) -> int:
        """Bytes of the accepted channels, handshakes included (refused strays are not traffic)."""
        return sum(channel.decoder.bytes_received for channel in self.channels.values())

    def close(self) -> None:
        """Stop listening and hang up on every connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for channel in list(self.connections):
            channel.close()

    def remove_socket(self) -> None:
        """Unlink the unix socket we listened on (never another daemon's)."""
        path, self._unix_path = self._unix_path, None
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)
