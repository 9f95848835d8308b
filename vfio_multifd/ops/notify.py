"""What the daemon tells its supervisor: readiness, and progress while it runs.

* :func:`sd_notify` and :func:`notify_ready_fd` - readiness for systemd
  (``READY=1`` on ``$NOTIFY_SOCKET``) and for scripts (a byte on a file descriptor).
* :func:`report_progress` - a ``migration_progress`` log line every few seconds
  while the migration is active (and ``STATUS=`` for systemd).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Mapping

import structlog

from ..core.snapshot import MigrationSnapshot
from ..daemon.session import Session
from ..errors import UsageError
from ..results import SessionStatus

log = structlog.get_logger("vfio_multifd.notify")


def sd_notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to systemd's ``$NOTIFY_SOCKET``.

    The protocol of sd_notify(3), without libsystemd: one datagram on a unix
    socket, whose address starting with ``@`` is in the abstract namespace.
    Returns False when there is no socket to notify (not run by systemd) or
    the send failed; readiness is best effort and never stops the daemon.
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("notify_socket_unsupported", address=address)  # e.g. vsock:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Never block the event loop: a receiver that stopped reading
            # (a full queue) loses the message instead of stalling the data path.
            sock.setblocking(False)
            sock.sendto(message.encode(), address)
    except BlockingIOError:
        log.debug("sd_notify_dropped", address=address.lstrip("\0"))
        return False
    except OSError as error:
        log.warning("sd_notify_failed", address=address.lstrip("\0"), error=str(error))
        return False
    return True


def check_ready_fd(fd: int) -> None:
    """Fail early (a usage error) if ``--ready-fd`` is not an open descriptor."""
    try:
        os.fstat(fd)
    except OSError as error:
        raise UsageError(f"--ready-fd {fd}: {error.strerror}") from None
    except OverflowError:  # a library caller's number (the command line checks its own)
        raise UsageError(f"--ready-fd {fd}: not a file descriptor number") from None


def notify_ready_fd(fd: int) -> None:
    """Write a newline to ``fd`` and close it (the s6 readiness convention)."""
    try:
        os.write(fd, b"\n")
    except OSError as error:
        log.warning("ready_fd_failed", fd=fd, error=str(error))
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


async def report_progress(session: Session, interval: float, *, notify: bool = False) -> None:
    """Log ``migration_progress`` every ``interval`` seconds while the session is active.

    ``bytes_per_s`` is over the last interval (what an operator watching wants to
    know); the summary at the end has the average. With ``notify``, the same goes
    to systemd as ``STATUS=`` (``systemctl status`` shows it, in MB and MB/s).
    """
    last = session.snapshot()
    while True:
        await asyncio.sleep(interval)
        snapshot = session.snapshot()
        rate = (snapshot.received_bytes - last.received_bytes) / (snapshot.now - last.now)
        last = snapshot
        if snapshot.status is not SessionStatus.ACTIVE:
            continue
        session.log.info("migration_progress", bytes_per_s=round(rate), **_figures(snapshot))
        if notify:  # until a message is lost: then systemd is not listening
            notify = sd_notify(
                f"STATUS=active: {snapshot.received_bytes / 1e6:.0f} MB received, "
                f"{rate / 1e6:.1f} MB/s"
            )


def _figures(snapshot: MigrationSnapshot) -> dict[str, object]:
    """What a progress or status line says about the migration."""
    return {
        "bytes": snapshot.received_bytes,
        "bytes_written": snapshot.written_bytes,
        "queued_bytes": snapshot.queued_bytes,
        "next_idx": {str(device.device): device.next_idx for device in snapshot.devices},
        "channels": snapshot.connected,
    }


def log_status(session: Session, why: str) -> None:
    """A ``status_report`` line, whatever the state (SIGUSR1 asks for one)."""
    snapshot = session.snapshot()
    session.log.info(
        "status_report",
        why=why,
        status=snapshot.status.value,
        **_figures(snapshot),
        pending_connections=snapshot.pending_connections,
        refused_connections=snapshot.refused_connections,
    )
