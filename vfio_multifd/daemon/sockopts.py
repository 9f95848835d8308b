"""Socket options of an accepted channel.

A channel's receive buffer is set to :data:`CHANNEL_RCVBUF` rather than
left to the kernel's autotuning, which on loopback grows it to tens of MiB:
with every channel's socket holding that much, the channels drift apart
(chunks are written in order, so what one channel brings early waits in
memory for another's), and the daemon reads, wakes and pauses more (what it
saves: docs/benchmarks.md). A size is set only where ``net.core.rmem_max`` allows it
whole: setting it turns autotuning off for the socket, and a request the
kernel cuts down (208 KiB on many systems) would leave a buffer far too
small for 1 MiB chunks.
"""

from __future__ import annotations

import contextlib
import functools
import socket
from pathlib import Path

#: The receive buffer asked for each channel (the kernel doubles it for its overhead).
CHANNEL_RCVBUF = 4 << 20
_RMEM_MAX = Path("/proc/sys/net/core/rmem_max")


@functools.cache
def rmem_max() -> int:
    """The largest receive buffer a process may ask for (0 if unknown)."""
    try:
        return int(_RMEM_MAX.read_text())
    except (OSError, ValueError):
        return 0


def size_receive_buffer(sock: object, size: int = CHANNEL_RCVBUF) -> bool:
    """Set a TCP socket's receive buffer to ``size`` if the system allows that much;
    returns whether it did (otherwise autotuning stays on). Never raises."""
    family = getattr(sock, "family", None)
    if family not in (socket.AF_INET, socket.AF_INET6) or rmem_max() < size:
        return False
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)  # type: ignore[attr-defined]
        return True
    return False
