"""A raw capture receiver: accept N connections on 127.0.0.1, keep each one's bytes.

Stands in for a migration destination that never answers (QEMU's default: no
return path), so a real source's streams can be recorded as they are on the
wire: connection K (in accept order) goes to ``conn-K.bin``. Which one is the
main channel is in its first bytes (``QEVM``), not in K.

    python tests/qemu/capture.py --connections 3 --dir DIR [--port P]

prints the port, then waits until every connection has closed.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path

MAIN_MAGIC = b"QEVM"


class CaptureReceiver:
    """Accepts ``connections`` connections; each one's bytes go to ``conn-K.bin`` in ``directory``."""

    def __init__(self, directory: Path, connections: int, port: int = 0) -> None:
        self.directory = directory
        self.connections = connections
        directory.mkdir(parents=True, exist_ok=True)
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port: int = self.listener.getsockname()[1]
        self.paths: list[Path] = []
        self.errors: list[BaseException] = []
        self._readers: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="capture-accept", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        try:
            for index in range(self.connections):
                connection, _ = self.listener.accept()
                path = self.directory / f"conn-{index}.bin"
                self.paths.append(path)
                reader = threading.Thread(
                    target=self._read, args=(connection, path), name=f"capture-{index}", daemon=True
                )
                self._readers.append(reader)
                reader.start()
        except OSError as error:  # the listener closed before every connection came
            self.errors.append(error)
        finally:
            self.listener.close()

    def _read(self, connection: socket.socket, path: Path) -> None:
        try:
            with connection, path.open("wb") as output:
                while True:
                    data = connection.recv(1 << 20)
                    if not data:
                        return
                    output.write(data)
        except OSError as error:
            self.errors.append(error)

    def wait(self, timeout: float = 60.0) -> list[Path]:
        """Every connection accepted and closed; the files, in accept order."""
        deadline = time.monotonic() + timeout
        self._acceptor.join(timeout)
        if self._acceptor.is_alive():
            self.close()
            raise TimeoutError(
                f"only {len(self.paths)} of {self.connections} connections within {timeout} s"
            )
        for reader in self._readers:
            reader.join(max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise TimeoutError(f"{reader.name} still open after {timeout} s")
        if self.errors:
            raise self.errors[0]
        return list(self.paths)

    def close(self) -> None:
        self.listener.close()


def classify(paths: list[Path]) -> tuple[Path, list[Path]]:
    """The main channel's capture and the multifd channels' captures (by channel id, byte 24)."""
    main = [p for p in paths if p.read_bytes()[:4] == MAIN_MAGIC]
    if len(main) != 1:
        raise ValueError(f"expected one main channel among {paths}, found {len(main)}")
    channels = [p for p in paths if p not in main]
    channels.sort(key=lambda p: p.read_bytes()[24])
    return main[0], channels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, required=True, help="multifd-channels + 1")
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0)
    options = parser.parse_args(argv)
    receiver = CaptureReceiver(options.dir, options.connections, options.port)
    print(receiver.port, flush=True)
    for path in receiver.wait(options.timeout):
        print(f"{path}: {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
