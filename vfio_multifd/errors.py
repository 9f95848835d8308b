"""One exception hierarchy, split by who is at fault.

* :class:`ProtocolError` - the peer (the migration source) broke the protocol.
  :class:`HandshakeError` is the subset that refuses only one connection.
* :class:`UsageError` - we were misconfigured (bad command line, bad paths).
* :class:`DeviceIOError` - writing a device's data or config file failed.
* :class:`SessionError` - the migration as a whole could not finish
  (incomplete streams, timeouts, cancellation, memory policy).
* :class:`SendError` - the sender's side: it could not connect, or the daemon
  reset a channel (it refused the channel, or the migration failed there).

Every error carries the channel, device and idx it concerns (where known)
and a stable ``reason`` code, so tests and scripts need not parse messages.
The message a user sees is ``channel 1: device 0000:00:02.0/vfio: state
buffer 7 already filled``: context first, then what was expected and what came.
"""

from __future__ import annotations

import enum
import errno as errno_module


class Reason(enum.StrEnum):
    # handshake (refuses one connection)
    HANDSHAKE_MAGIC = "handshake-magic"
    HANDSHAKE_VERSION = "handshake-version"
    HANDSHAKE_UUID = "handshake-uuid"
    HANDSHAKE_CHANNEL_ID = "handshake-channel-id"
    HANDSHAKE_DUPLICATE_CHANNEL = "handshake-duplicate-channel"
    HANDSHAKE_MAIN_CHANNEL = "handshake-main-channel"
    HANDSHAKE_CLOSED = "handshake-closed"
    HANDSHAKE_TIMEOUT = "handshake-timeout"
    HANDSHAKE_SHED = "handshake-shed"  # dropped to make room for newer connections
    TLS = "tls"  # the TLS handshake failed, or the client's certificate is not allowed
    # packet
    PACKET_MAGIC = "packet-magic"
    PACKET_VERSION = "packet-version"
    PACKET_RAM = "packet-ram"
    PACKET_SYNC = "packet-sync"
    PACKET_COMPRESSION = "packet-compression"
    PACKET_FLAGS = "packet-flags"
    PACKET_IDSTR = "packet-idstr"
    PACKET_SIZE = "packet-size"
    PACKET_TRUNCATED = "packet-truncated"
    # routing
    UNKNOWN_DEVICE = "unknown-device"
    # QEMU's main channel (core/mainstream.py)
    MAIN_MAGIC = "main-magic"
    MAIN_VERSION = "main-version"
    MAIN_RECORD = "main-record"  # an unknown or malformed record, a size over its bound
    MAIN_SECTION = "main-section"  # section ids, footers
    MAIN_UNSUPPORTED = "main-unsupported"  # postcopy, return path, mapped-ram... (named)
    MAIN_RAM = "main-ram"  # the ram section's block list and page records
    MAIN_VFIO = "main-vfio"  # VFIO's framing inside its sections
    MAIN_TRUNCATED = "main-truncated"
    MAIN_END = "main-end"  # no verifiable end, or bytes after it
    # RAM packets on multifd channels (core/ram.py) and the RAM images
    RAM_PACKET = "ram-packet"  # counts, ramblock field
    RAM_BLOCK = "ram-block"  # a block not in the main stream's list, or a bad block name
    RAM_OFFSET = "ram-offset"  # a page offset unaligned or past the block's used length
    RAM_SYNC = "ram-sync"  # sync points that do not pair up across channels
    RAM_NO_SPACE = "ram-no-space"  # the block list does not fit the filesystem
    # VFIO payload
    VFIO_SHORT = "vfio-short"
    VFIO_VERSION = "vfio-version"
    VFIO_INVALID_IDX = "vfio-invalid-idx"
    VFIO_ALREADY_FILLED = "vfio-already-filled"
    VFIO_AFTER_CONFIG = "vfio-after-config"
    VFIO_SECOND_CONFIG = "vfio-second-config"
    VFIO_CONFIG_BLOB = "vfio-config-blob"
    # limits
    QUEUE_FULL = "queue-full"
    SPILL_FULL = "spill-full"
    # device I/O
    DEVICE_WRITE = "device-write"
    # session
    INCOMPLETE = "incomplete"
    ACCEPT_TIMEOUT = "accept-timeout"
    PROGRESS_TIMEOUT = "progress-timeout"
    MISSING_CHANNELS = "missing-channels"  # the connected channels ended, others never came
    CANCELLED = "cancelled"
    INTERNAL = "internal"  # a bug: reported cleanly all the same
    # usage
    USAGE = "usage"
    # the sender (vfio-multifd send)
    CONNECT_FAILED = "connect-failed"
    CHANNEL_RESET = "channel-reset"
    SEND_FAILED = "send-failed"
    NO_VERDICT = "no-verdict"  # replay: the daemon neither closed nor reset in time


class MultifdError(Exception):
    """Base of every error this package raises on purpose."""

    reason: Reason

    def __init__(
        self,
        reason: Reason,
        message: str,
        *,
        channel: int | None = None,
        device: str | None = None,
        idx: int | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.channel = channel
        self.device = device
        self.idx = idx

    def with_context(
        self, *, channel: int | None = None, device: str | None = None
    ) -> MultifdError:
        """Fill in context the raiser could not know (pure code knows no channel)."""
        if self.channel is None and channel is not None:
            self.channel = channel
        if self.device is None and device is not None:
            self.device = device
        return self

    def __str__(self) -> str:
        parts = []
        if self.channel is not None:
            parts.append(f"channel {self.channel}")
        if self.device is not None:
            parts.append(f"device {self.device}")
        parts.append(self.message)
        return ": ".join(parts)


class ProtocolError(MultifdError):
    """The peer sent something the protocol does not allow."""


class HandshakeError(ProtocolError):
    """A connection failed the channel handshake; only that connection is refused."""


class UsageError(MultifdError):
    """We were asked to do something impossible (command line, configuration)."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.USAGE, message)


class DeviceIOError(MultifdError):
    """Writing a device's data or config file (or spilling its chunks) failed; ``errno`` says why."""

    def __init__(
        self,
        message: str,
        *,
        device: str,
        errno: int | None,
        idx: int | None = None,
        channel: int | None = None,
    ) -> None:
        super().__init__(Reason.DEVICE_WRITE, message, device=device, idx=idx, channel=channel)
        self.errno = errno


def os_error_text(error: OSError) -> str:
    """``No space left on device (ENOSPC, errno 28)``: the reason, and the code to search for."""
    reason = error.strerror or str(error)
    if not error.errno:
        return reason
    code = errno_module.errorcode.get(error.errno, str(error.errno))
    return f"{reason} ({code}, errno {error.errno})"


class SendError(MultifdError):
    """The sender could not connect, or a channel ended without the daemon's clean close."""


class SessionError(MultifdError):
    """The migration as a whole cannot complete."""


class Cancelled(SessionError):
    """Stopped on request (a signal or migrate_cancel)."""

    def __init__(self, message: str, *, signal_number: int | None = None) -> None:
        super().__init__(Reason.CANCELLED, message)
        self.signal_number = signal_number
