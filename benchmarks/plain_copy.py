"""The baseline receiver: the strongest naive copy, standard library only, nothing parsed.

    python benchmarks/plain_copy.py --connections N [--sink PATH] [--no-fsync]

Listens on 127.0.0.1 (a free port) and prints one JSON line
``{"event": "listening", "address": "tcp:127.0.0.1:PORT"}``; accepts N
connections, one thread each, which ``recv_into`` a reused 1 MiB buffer and
``os.write`` it to the one sink fd, under a lock. A regular-file sink is
created anew and fsynced at the end (``--no-fsync``: not). Last, one JSON line
``{"event": "plain_copy_done", "bytes": ..., "seconds": ..., "end": ...,
"errors": [...]}``: ``seconds`` from the first byte received to the last byte
written (and synced), ``end`` the wall-clock time then.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

BUFFER = 1 << 20
DONE = "plain_copy_done"


def command(
    connections: int, sink: str, *, fsync: bool = True, splice: bool = False
) -> list[str]:
    """How a harness starts this script."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--connections", str(connections)]
    cmd += ["--sink", sink, *(["--splice"] if splice else [])]
    return cmd if fsync else [*cmd, "--no-fsync"]


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def receive(connections: int, sink: str, fsync: bool, splice: bool = False) -> int:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(max(connections, 8))
    emit(event="listening", address=f"tcp:127.0.0.1:{server.getsockname()[1]}")
    fd = os.open(sink, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    regular = stat.S_ISREG(os.fstat(fd).st_mode)
    lock = threading.Lock()
    first: list[float] = []  # monotonic time of the first byte received
    received = [0] * connections
    errors: list[str] = []

    def move(n: int, conn: socket.socket) -> None:
        """``--splice``: socket -> pipe -> sink in the kernel; no byte enters user space."""
        pipe_r, pipe_w = os.pipe()
        try:
            while got := os.splice(conn.fileno(), pipe_w, BUFFER):
                with lock:
                    if not first:
                        first.append(time.monotonic())
                    done = 0
                    while done < got:
                        done += os.splice(pipe_r, fd, got - done)
                received[n] += got
        except OSError as error:
            errors.append(f"connection {n}: {error}")
        finally:
            os.close(pipe_r)
            os.close(pipe_w)
            conn.close()

    def copy(n: int, conn: socket.socket) -> None:
        buf = bytearray(BUFFER)
        view = memoryview(buf)
        try:
            while got := conn.recv_into(buf):
                with lock:
                    if not first:
                        first.append(time.monotonic())
                    done = 0
                    while done < got:
                        done += os.write(fd, view[done:got])
                received[n] += got
        except OSError as error:
            errors.append(f"connection {n}: {error}")
        finally:
            conn.close()

    threads = []
    for n in range(connections):
        conn, _ = server.accept()
        threads.append(threading.Thread(target=move if splice else copy, args=(n, conn)))
        threads[-1].start()
    server.close()
    for thread in threads:
        thread.join()
    if regular and fsync:
        os.fsync(fd)
    os.close(fd)
    seconds = time.monotonic() - first[0] if first else 0.0
    emit(event=DONE, bytes=sum(received), seconds=seconds, end=time.time(), errors=errors)
    return 1 if errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--sink", default=os.devnull, help="where every byte goes (/dev/null)")
    parser.add_argument("--no-fsync", action="store_true", help="do not fsync a file sink")
    parser.add_argument(
        "--splice", action="store_true", help="splice(2) through a pipe: no copy to user space"
    )
    args = parser.parse_args(argv)
    return receive(args.connections, args.sink, not args.no_fsync, args.splice)


if __name__ == "__main__":
    raise SystemExit(main())
