"""vfio-multifd: a QEMU-format multifd device-state migration destination.

The names below are loaded on first use, so that ``import vfio_multifd.wire``
(the pure codec) does not drag in the event loop, sockets and threads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Address, DeviceSpec, Digest, QueueFullPolicy, ReceiveSettings
    from .core.wire import DeviceKey
    from .daemon.session import Session
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
    from .results import DeviceResult, SessionResult, SessionStatus

_EXPORTS = {
    "Address": "config",
    "DeviceSpec": "config",
    "Digest": "config",
    "QueueFullPolicy": "config",
    "ReceiveSettings": "config",
    "Cancelled": "errors",
    "DeviceIOError": "errors",
    "HandshakeError": "errors",
    "MultifdError": "errors",
    "ProtocolError": "errors",
    "Reason": "errors",
    "SessionError": "errors",
    "UsageError": "errors",
    "DeviceResult": "results",
    "Session": "daemon.session",
    "SessionResult": "results",
    "SessionStatus": "results",
    "DeviceKey": "core.wire",
}

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vfio_multifd' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
