"""A hostile peer in its own process (its descriptors are not the test's).

``python flood.py hold HOST PORT N``: open N connections that never send a
byte, print ``held N`` and keep them until stdin closes.

``python flood.py refuse HOST PORT N``: N connections one after the other,
each sending a bad handshake magic and closing; print ``done N``.

Only loopback addresses are used by the tests; every connect has a timeout.
"""

from __future__ import annotations

import resource
import socket
import sys


def _raise_own_limit(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = n + 64
    if soft < wanted <= hard or (hard == resource.RLIM_INFINITY and soft < wanted):
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def hold(host: str, port: int, n: int) -> None:
    _raise_own_limit(n)
    held = []
    for _ in range(n):
        held.append(socket.create_connection((host, port), timeout=10))
    print(f"held {len(held)}", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    for sock in held:
        sock.close()


def refuse(host: str, port: int, n: int) -> None:
    for _ in range(n):
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"\0\0\0\0")
            sock.settimeout(10)
            try:
                while sock.recv(4096):  # until the daemon hangs up
                    pass
            except ConnectionResetError:
                pass
    print(f"done {n}", flush=True)


def main() -> None:
    mode, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    {"hold": hold, "refuse": refuse}[mode](host, port, n)


if __name__ == "__main__":
    main()
