"""The client side of the status socket: ``vfio-multifd status``.

:func:`query` runs one command on a status socket (ours, or QEMU's own QMP
monitor) and :func:`format_table` turns ``query-migrate``'s answer into a
few aligned tables for a person.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from typing import Any

from .errors import os_error_text

JSON = dict[str, Any]


class StatusError(OSError):
    """No answer from a status socket; the message names the socket and says why."""


def query(path: str, command: str = "query-migrate", timeout: float = 5.0) -> JSON:
    """Run one command on a status socket (ours or QEMU's QMP) and return its reply.

    Raises :class:`StatusError` saying which socket, whether it exists and what it did.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as error:
            raise StatusError(_cannot_connect(path, error, timeout)) from None
        try:
            stream = sock.makefile("rwb")
            _read_reply(stream)  # the greeting
            for execute in ("qmp_capabilities", command):
                stream.write(json.dumps({"execute": execute}).encode() + b"\n")
                stream.flush()
                reply = _read_reply(stream)
        except TimeoutError:
            raise StatusError(
                f"status socket {path} accepted the connection but sent no answer within "
                f"{timeout:g} s (--timeout): is a vfio-multifd daemon or QEMU's QMP monitor "
                "behind it?"
            ) from None
        except ValueError as error:
            raise StatusError(
                f"status socket {path} answered with something that is not QMP JSON: {error}"
            ) from None
        except OSError as error:
            raise StatusError(f"status socket {path}: {os_error_text(error)}") from None
        return reply


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


def _read_reply(stream: Any) -> JSON:
    while True:
        line = stream.readline()
        if not line:
            raise ConnectionError("it closed the connection before answering")
        message = json.loads(line)
        if isinstance(message, dict) and "event" not in message:
            return message  # QEMU may interleave asynchronous events


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
