"""Claiming a unix socket path before listening on it (channels and the status socket).

asyncio (and uvloop) silently unlink whatever socket is at the path, even
one another daemon is serving: look first, without blocking the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat

from ..errors import UsageError

#: How long a live socket may take to accept our probe.
PROBE_TIMEOUT = 1.0


async def claim_unix_path(path: str, what: str) -> None:
    """Remove a stale socket at ``path``; refuse a live one or any other file.

    ``what`` names the path in the error: ``unix:/run/mig.sock``, ``--status-socket PATH``.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"cannot listen on {what}: the path exists and is not a socket")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), PROBE_TIMEOUT)
    except (OSError, TimeoutError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # nobody accepts: stale
        return
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    raise UsageError(f"cannot listen on {what}: another process is listening there")
