"""vfio-multifd: a QEMU-format multifd device-state migration destination."""

from .config import Address, DeviceSpec, Digest, QueueFullPolicy, ReceiveSettings
from .errors import (
    Cancelled,
    DeviceIOError,
    HandshakeError,
    MultifdError,
    ProtocolError,
    Reason,
    SessionError,
    UsageError,
)
from .session import DeviceResult, Session, SessionResult, SessionStatus
from .wire import DeviceKey

__all__ = [
    "Address",
    "Cancelled",
    "DeviceIOError",
    "DeviceKey",
    "DeviceResult",
    "DeviceSpec",
    "Digest",
    "HandshakeError",
    "MultifdError",
    "ProtocolError",
    "QueueFullPolicy",
    "Reason",
    "ReceiveSettings",
    "Session",
    "SessionError",
    "SessionResult",
    "SessionStatus",
    "UsageError",
]
__version__ = "0.1.0"
