"""The client side of the status socket: ``vfio-multifd status``, on ``qemu.qmp``.

:func:`query` runs one command on a status socket (ours, or QEMU's own QMP
monitor) with the QEMU project's asyncio QMP library, :func:`watch` asks
again every few seconds until the migration ends, and :func:`format_table`
turns ``query-migrate``'s answer into a few aligned tables for a person.
Where nothing answers, the error says which socket and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Callable, Iterable
from typing import Any

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    QMPClient,
    StateError,
)

from ..errors import os_error_text

JSON = dict[str, Any]
#: ``query-migrate`` statuses after which nothing changes any more.
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
#: Statuses of a migration that did not or will not complete: ``status`` exits 1.
UNSUCCESSFUL_STATUSES = frozenset({"failed", "cancelling", "cancelled"})

# qemu.qmp logs its own failures (through the logging module); this client
# reports them itself, once, naming the socket: keep them off stderr.
_qmp_log = logging.getLogger("qemu.qmp")
_qmp_log.addHandler(logging.NullHandler())
_qmp_log.propagate = False


class StatusError(OSError):
    """No answer from a status socket; the message names the socket and says why."""


def query(path: str, command: str = "query-migrate", timeout: float = 5.0) -> JSON:
    """Run one command on a status socket (ours or QEMU's QMP) and return its reply:
    ``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}``, as sent.

    Raises :class:`StatusError` saying which socket, whether it exists and what it did.
    """

    async def once() -> JSON:
        async with _connected(path, timeout) as client:
            return await _execute(client, path, command, timeout)

    return asyncio.run(once())


def watch(
    path: str, interval: float, show: Callable[[JSON, bool], None], timeout: float = 5.0
) -> JSON:
    """``query-migrate`` every ``interval`` seconds, each answer given to ``show(info,
    final)``, until the migration ends; returns the final answer.

    One connection for the whole watch. The daemon exits (and takes its socket with
    it) as soon as the migration ends, too soon to be asked again: its final
    ``MIGRATION`` event carries its figures at the end (``info``), and those are the
    final answer. An event without them (QEMU's own) is followed by one more
    ``query-migrate``; if that cannot be had, the final answer is the last one seen
    with the event's status, and its ``note`` says so.
    """

    async def run() -> JSON:
        async with _connected(path, timeout) as client:
            events = EventListener(("MIGRATION",))
            with client.listen(events):
                return await _watch(client, events, path, interval, show, timeout)

    return asyncio.run(run())


async def _watch(
    client: QMPClient,
    events: EventListener,
    path: str,
    interval: float,
    show: Callable[[JSON, bool], None],
    timeout: float,
) -> JSON:
    last: JSON = {}
    ended: JSON | None = None  # the data of a MIGRATION event with a final status
    while True:
        if ended is not None and isinstance(ended.get("info"), dict):
            info: JSON = ended["info"]  # the daemon's own figures at the end
            show(info, True)
            return info
        try:
            reply = await _execute(client, path, "query-migrate", timeout)
        except StatusError:
            ended = _final_event_data(events.clear()) or ended
            if ended is not None and isinstance(ended.get("info"), dict):
                continue
            if ended is None or not last:
                raise
            info = {
                **last,
                "status": ended["status"],
                "note": f"the migration ended {ended['status']}; the other figures are the "
                "last seen before that: the status socket closed before it could be asked again",
            }
            show(info, True)
            return info
        if "error" in reply:
            raise StatusError(f"status socket {path}: {reply['error'].get('desc')}")
        last = reply["return"]
        done = str(last.get("status")) in FINAL_STATUSES
        show(last, done)
        if done:
            return last
        with contextlib.suppress(TimeoutError):  # less when the status changes
            ended = _final_event_data([await asyncio.wait_for(events.get(), interval)]) or ended


def _final_event_data(messages: Iterable[Any]) -> JSON | None:
    """The data of the last of ``messages`` (MIGRATION events) announcing a final status."""
    ended = None
    for message in messages:
        data = message.get("data") if hasattr(message, "get") else None
        if isinstance(data, dict) and str(data.get("status")) in FINAL_STATUSES:
            ended = data
    return ended


class _connected:
    """A negotiated :class:`QMPClient` on ``path``: connected with a plain socket first,
    so that a socket that does not answer is explained as before."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path, self.timeout = path, timeout
        self.client = QMPClient("vfio-multifd-status")

    async def __aenter__(self) -> QMPClient:
        path, timeout = self.path, self.timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            await asyncio.to_thread(sock.connect, path)
        except OSError as error:
            sock.close()
            raise StatusError(_cannot_connect(path, error, timeout)) from None
        sock.setblocking(False)
        try:
            await asyncio.wait_for(self.client.connect(sock), timeout)
        except TimeoutError:
            sock.close()
            raise StatusError(
                f"status socket {path} accepted the connection but sent no answer within "
                f"{timeout:g} s (--timeout): is a vfio-multifd daemon or QEMU's QMP monitor "
                "behind it?"
            ) from None
        except ConnectError as error:
            sock.close()
            raise StatusError(_handshake_failed(path, error.exc)) from None
        return self.client

    async def __aexit__(self, *exc_info: object) -> None:
        # The answer is had: how the connection ended is not news.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.disconnect(), self.timeout)


async def _execute(client: QMPClient, path: str, command: str, timeout: float) -> JSON:
    try:
        value = await asyncio.wait_for(
            client.execute_msg(client.make_execute_msg(command)), timeout
        )
    except ExecuteError as error:
        return {"error": {"class": error.error_class, "desc": str(error)}}
    except TimeoutError:
        raise StatusError(
            f"status socket {path} sent no answer to {command} within {timeout:g} s (--timeout)"
        ) from None
    except (ExecInterruptedError, StateError, EOFError, OSError) as error:
        raise StatusError(
            f"status socket {path} closed the connection before answering {command} ({error})"
        ) from None
    return {"return": value}


def _handshake_failed(path: str, cause: BaseException) -> str:
    """Why the greeting or the negotiation failed, connected as we were."""
    if isinstance(cause, EOFError):
        return f"status socket {path}: it closed the connection before answering"
    if isinstance(cause, OSError):
        return f"status socket {path}: {os_error_text(cause)}"
    return f"status socket {path} answered with something that is not QMP JSON: {cause}"


def _cannot_connect(path: str, error: OSError, timeout: float) -> str:
    """Why nothing answers at ``path``: whether it exists, and what it is."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return (
            f"status socket {path} does not exist: no daemon listens there (receive "
            "--status-socket creates it, and removes it when the migration ends)"
        )
    except OSError as stat_error:
        return f"status socket {path}: {os_error_text(stat_error)}"
    if not stat.S_ISSOCK(mode):
        kind = "directory" if stat.S_ISDIR(mode) else "regular file" if stat.S_ISREG(mode) else "file"
        return (
            f"{path} is a {kind}, not a socket: give the path of receive --status-socket "
            "(or of QEMU's QMP socket)"
        )
    if isinstance(error, ConnectionRefusedError):
        return (
            f"status socket {path} exists, but nothing listens on it: the daemon that made "
            "it is gone (its exit code is the final word)"
        )
    if isinstance(error, TimeoutError):
        return (
            f"status socket {path} exists, but did not accept the connection within "
            f"{timeout:g} s (--timeout)"
        )
    if isinstance(error, PermissionError):
        return (
            f"status socket {path} exists, but connecting is not allowed: "
            f"{os_error_text(error)}; it is private to the user who started the daemon"
        )
    return f"status socket {path} exists, but connecting failed: {os_error_text(error)}"


def format_table(info: JSON) -> str:
    """``query-migrate``'s answer as a few aligned tables, for a person."""
    ram = info.get("ram", {})  # where QEMU's own query-migrate puts them
    transferred = info.get("transferred", ram.get("transferred", 0))
    mbps = info.get("mbps", ram.get("mbps", 0))
    lines = [
        f"status: {info.get('status', '?')}   total-time: {info.get('total-time', 0)} ms   "
        f"transferred: {transferred} bytes   mbps: {mbps} (megabits/s)"
    ]
    if "error-desc" in info:
        lines.append(f"error: {info['error-desc']}")
    if "note" in info:
        lines.append(f"note: {info['note']}")
    if "queued-bytes" in info:
        lines.append(
            f"queued: {info['queued-bytes']} bytes (peak {info.get('peak-queued-bytes', 0)} "
            f"bytes), spilled: {info.get('spilled-bytes', 0)} bytes, "
            f"paused: {info.get('paused-time', 0)} ms, "
            f"refused connections: {info.get('refused-connections', 0)}"
        )
    devices = info.get("devices") or []
    if devices:
        lines.append("")
        lines += _table(
            ["device", "bytes-written", "next-idx", "last-idx", "queued-bytes", "complete"],
            [
                [
                    d.get("device"),
                    d.get("bytes-written"),
                    d.get("next-idx"),
                    d.get("last-idx", "-"),
                    d.get("queued-bytes"),
                    "yes" if d.get("complete") else "no",
                ]
                for d in devices
            ],
        )
    channels = info.get("channels") or []
    if channels:
        lines.append("")
        tls = info.get("tls", False)  # then: each client certificate's subject
        lines += _table(
            ["channel", "state", "bytes", "packets", "peer", *(["tls subject"] if tls else [])],
            [
                [
                    "-" if c.get("id") is None else c["id"],
                    c.get("state"),
                    c.get("bytes"),
                    c.get("packets"),
                    c.get("peer"),
                    *([c.get("tls-subject") or "-"] if tls else []),
                ]
                for c in channels
            ],
        )
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [header, *[[str(cell) for cell in row] for row in rows]]
    widths = [max(len(row[n]) for row in cells) for n in range(len(header))]
    # Text columns align left, numbers right.
    numeric = [
        all(row[n].isdigit() or row[n] == "-" for row in cells[1:]) for n in range(len(header))
    ]
    return [
        "  ".join(
            cell.rjust(width) if numeric[n] else cell.ljust(width)
            for n, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    ]
