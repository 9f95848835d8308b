"""The baseline receiver: the strongest naive copy, standard library only, nothing parsed.

    python benchmarks/plain_copy.py --connections N [--sink PATH] [--files F] [--no-fsync]

Listens on 127.0.0.1 (a free port) and prints one JSON line
``{"event": "listening", "address": "tcp:127.0.0.1:PORT"}``; accepts N
connections, one thread each, which ``recv_into`` a reused 1 MiB buffer and
``os.write`` it to its sink fd, under that sink's lock. The sink is one path,
or with ``--files F`` (F > 1) the F paths ``PATH.0``..., connection n writing
to ``PATH.{n % F}`` (as many files as the daemon writes devices). A
regular-file sink is created anew and fsynced at the end (``--no-fsync``:
not). Last, one JSON line ``{"event": "plain_copy_done", "bytes": ...,
"seconds": ..., "end": ..., "phases": {...}, "errors": [...]}``: ``seconds``
from the first byte received to the last byte written (and synced), ``end``
the wall-clock time then, ``phases`` the seconds from the first byte at which
the last byte was received, written and synced (as the daemon's
``migration_completed`` gives them).
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
    connections: int, sink: str, *, fsync: bool = True, splice: bool = False, files: int = 1
) -> list[str]:
    """How a harness starts this script."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--connections", str(connections)]
    cmd += ["--sink", sink, *(["--splice"] if splice else [])]
    cmd += ["--files", str(files)] if files > 1 else []
    return cmd if fsync else [*cmd, "--no-fsync"]


def sink_paths(sink: str, files: int) -> list[str]:
    """The paths ``--sink`` and ``--files`` write to."""
    return [sink] if files <= 1 else [f"{sink}.{n}" for n in range(files)]


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def receive(
    connections: int, sink: str, fsync: bool, splice: bool = False, files: int = 1
) -> int:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(max(connections, 8))
    emit(event="listening", address=f"tcp:127.0.0.1:{server.getsockname()[1]}")
    fds = [
        os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for path in sink_paths(sink, files)
    ]
    regular = stat.S_ISREG(os.fstat(fds[0]).st_mode)
    locks = [threading.Lock() for _ in fds]
    first: list[float] = []  # monotonic time of the first byte received
    last = [0.0, 0.0]  # monotonic: the last byte received, the last byte written
    received = [0] * connections
    errors: list[str] = []

    def move(n: int, conn: socket.socket) -> None:
        """``--splice``: socket -> pipe -> sink in the kernel; no byte enters user space."""
        pipe_r, pipe_w = os.pipe()
        fd, lock = fds[n % len(fds)], locks[n % len(fds)]
        try:
            while got := os.splice(conn.fileno(), pipe_w, BUFFER):
                with lock:
                    last[0] = time.monotonic()
                    if not first:
                        first.append(last[0])
                    done = 0
                    while done < got:
                        done += os.splice(pipe_r, fd, got - done)
                    last[1] = time.monotonic()
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
        fd, lock = fds[n % len(fds)], locks[n % len(fds)]
        try:
            while got := conn.recv_into(buf):
                with lock:
                    last[0] = time.monotonic()
                    if not first:
                        first.append(last[0])
                    done = 0
                    while done < got:
                        done += os.write(fd, view[done:got])
                    last[1] = time.monotonic()
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
    for fd in fds:
        if regular and fsync:
            os.fsync(fd)
        os.close(fd)
    start = first[0] if first else time.monotonic()
    seconds = time.monotonic() - start
    phases = {"received": last[0] - start, "written": last[1] - start, "synced": seconds}
    phases = {name: round(max(0.0, value), 4) for name, value in phases.items()}
    emit(
        event=DONE,
        bytes=sum(received),
        seconds=seconds,
        end=time.time(),
        phases=phases,
        errors=errors,
    )
    return 1 if errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--sink", default=os.devnull, help="where every byte goes (/dev/null)")
    parser.add_argument(
        "--files", type=int, default=1, help="write to F files, SINK.0... (connection n: n %% F)"
    )
    parser.add_argument("--no-fsync", action="store_true", help="do not fsync a file sink")
    parser.add_argument(
        "--splice", action="store_true", help="splice(2) through a pipe: no copy to user space"
    )
    args = parser.parse_args(argv)
    return receive(args.connections, args.sink, not args.no_fsync, args.splice, args.files)


if __name__ == "__main__":
    raise SystemExit(main())
