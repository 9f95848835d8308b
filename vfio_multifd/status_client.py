"""The client side of the status socket: ``vfio-multifd status``.

:func:`query` runs one command on a status socket (ours, or QEMU's own QMP
monitor) and :func:`format_table` turns ``query-migrate``'s answer into a
few aligned tables for a person.
"""

from __future__ import annotations

import json
import socket
from typing import Any

JSON = dict[str, Any]


def query(path: str, command: str = "query-migrate", timeout: float = 5.0) -> JSON:
    """Run one command on a status socket (ours or QEMU's QMP) and return its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        stream = sock.makefile("rwb")
        _read_reply(stream)  # the greeting
        for execute in ("qmp_capabilities", command):
            stream.write(json.dumps({"execute": execute}).encode() + b"\n")
            stream.flush()
            reply = _read_reply(stream)
        return reply


def _read_reply(stream: Any) -> JSON:
    while True:
        line = stream.readline()
        if not line:
            raise ConnectionError("the status socket closed the connection")
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
        f"transferred: {transferred} bytes   mbps: {mbps}"
    ]
    if "error-desc" in info:
        lines.append(f"error: {info['error-desc']}")
    if "queued-bytes" in info:
        lines.append(
            f"queued: {info['queued-bytes']} bytes (peak {info.get('peak-queued-bytes', 0)}), "
            f"spilled: {info.get('spilled-bytes', 0)} bytes, "
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
